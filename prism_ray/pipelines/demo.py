"""The embedded default: phantoms -> fine-tune (Ray Train + DeepSpeed) -> counterfactuals (Ray Data) -> report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import Field, model_validator

from prism_ray.config import BaseConfig
from prism_ray.engine.settings import EditConfig, InversionConfig
from prism_ray.scoring.filter import FilterConfig


class DemoConfig(BaseConfig):
    """Everything the README's demo command runs; every field can be overridden with --set."""

    out: str = Field("outputs/demo", min_length=1, description="local folder for data, runs and results")
    model: str = Field("tiny", description="starting model family (the shipped phantom-trained tiny family)")
    n_subjects: int = Field(240, ge=20, le=100_000)
    seed: int = Field(0, ge=0)
    finetune_steps: int = Field(30, ge=1)
    finetune_workers: int = Field(2, ge=1)
    finetune_zero_stage: int = Field(2, ge=0, le=3)
    quota: int = Field(4, ge=1, description="accepted counterfactuals per subgroup")
    num_actors: int = Field(1, ge=1)
    # 20 DDIM steps (not the reference 50) keep the demo in minutes on a laptop CPU; the rest of
    # null-text inversion is the reference (10 inner steps, lr schedule, early stop).
    inversion: InversionConfig = InversionConfig(num_inference_steps=20)
    # PRISM's prompt-to-prompt defaults plus local blend with the noise-difference mask: the tiny
    # family's cross-attention is too diffuse for the attention mask, and without a blend its edits
    # also move findings they should keep. Effusion removal as configs/augment_tiny.yaml does it: a
    # wider mask for the broad opacity and the edit branch guided at 3 (83 % -> 100 % target flips with
    # no finding moved; device removal already met every aim as it is; BENCHMARKS.md, phantom benchmark).
    edit: EditConfig = EditConfig(
        local_blend=True,
        blend_mask="noise",
        per_intervention={"Pleural Effusion": {"noise_mask_quantile": 0.9, "edit_guidance": 3.0}},
    )
    # S_CLIP cannot see side effects (an edit that removes a device but adds cardiomegaly passes it): the
    # off-target filter scores source and edit with the tiny family's attribute classifier and rejects
    # edits that flip a finding the intervention should keep. `--set filter.off_target.classifier=null`: off.
    filter: FilterConfig = FilterConfig(off_target={"classifier": "tiny"})

    @model_validator(mode="before")
    @classmethod
    def _over_demo_defaults(cls, data):
        """`--set filter.s_clip_min=0.2` changes that field of the demo's own settings above; without this the
        whole section would fall back to the job defaults (50 steps, no blend, no off-target filter)."""
        if isinstance(data, dict):
            data = dict(data)
            for name in ("inversion", "edit", "filter"):
                if isinstance(data.get(name), dict):
                    data[name] = _merged(cls.model_fields[name].default.model_dump(), data[name])
        return data


def _merged(base: dict, extra: dict) -> dict:
    """`extra` over `base`, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


SUBGROUPS = [
    # (name, selector, intervention): the papers' device-removal and disease-removal edits.
    ("remove_devices", {"Support Devices": 1.0}, "Support Devices=false"),
    ("remove_effusion", {"Pleural Effusion": 1.0}, "Pleural Effusion=false"),
]


def _say(step: str, message: str) -> None:
    print(f"[demo] {step}: {message}", flush=True)


def run(config: DemoConfig, runner: Mapping[str, Callable]) -> Path:
    """Run the whole mission on phantoms and return the report folder.

    `runner`: {"finetune": the finetune job's runner, "augment": the augment job's} (the CLI's: Ray Train +
    DeepSpeed and Ray actors, `cli.JOBS["demo"]`).
    """
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
    from prism_ray.pipelines import augment, finetune
    from prism_ray.report.demo_report import write_demo_report
    from prism_ray.results.summary import RunIncomplete

    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    _say("1/4 data", f"writing {config.n_subjects} phantom chest X-rays with planted biases")
    data = write_phantom_dataset(
        str(out / "data"), PhantomDatasetConfig(n_subjects=config.n_subjects, seed=config.seed)
    )

    _say(
        "2/4 fine-tune",
        f"{config.finetune_steps} steps, {config.finetune_workers} Ray Train workers, ZeRO-{config.finetune_zero_stage}",
    )
    ft = finetune.FinetuneConfig.model_validate(
        {
            "model": {"path": config.model},
            "data": {"manifest": data.manifest_uri, "split": "train"},
            "train": {
                "max_steps": config.finetune_steps,
                "micro_batch_size": 4,
                "learning_rate": 1e-5,
                "zero_stage": config.finetune_zero_stage,
                "checkpoint_every": config.finetune_steps,
                "log_every": 5,
                "seed": config.seed,
            },
            "compute": {"num_workers": config.finetune_workers, "cpus_per_worker": 0.5},
            "run": {"storage_path": str(out / "runs"), "name": "finetune"},
        }
    )
    tuned = finetune.run(ft, runner=runner["finetune"])
    _say("2/4 fine-tune", f"step {tuned.final_step}, model exported to {tuned.model_path}")

    _say("3/4 counterfactuals", f"{len(SUBGROUPS)} subgroups x {config.quota} accepted, Ray actors")
    aug = augment.AugmentConfig.model_validate(
        {
            "model": {"path": tuned.model_path},
            "data": {"manifest": data.manifest_uri, "split": "test"},
            "subgroups": [
                {"name": name, "selector": selector, "interventions": [spec], "quota": config.quota}
                for name, selector, spec in SUBGROUPS
            ],
            "inversion": config.inversion.model_dump(),
            "edit": config.edit.model_dump(),
            "filter": config.filter.model_dump(),
            "output": str(out / "counterfactuals"),
            "seed": config.seed,
            "compute": {"num_actors": config.num_actors, "batch_size": 4},
        }
    )
    try:
        summary, incomplete = augment.run(aug, runner=runner["augment"]), None
    except RunIncomplete as err:  # still report what was made, then end non-zero
        summary, incomplete = err.summary, err

    _say("4/4 report", "scoring against the true counterfactuals and the decoder floor")
    # The classifier ships beside the starting family (fine-tuning exports only the diffusers parts).
    report = write_demo_report(
        out,
        str(out / "counterfactuals"),
        data.ground_truth_uri,
        config.model,
        filter_config=config.filter,
        run_info=_run_info(config, tuned.model_path, summary),
        vae_model=tuned.model_path,  # the decoder floor goes through the VAE that decoded the edits
    )
    minutes = (time.perf_counter() - t0) / 60
    _say(
        "done",
        f"{minutes:.1f} min. Counterfactuals: {out / 'counterfactuals'}  Report: {report / 'report.html'}",
    )
    (report / "augment_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if incomplete is not None:
        raise incomplete
    return report


def _run_info(config: DemoConfig, tuned_model: str, summary: dict) -> dict:
    """What the demo ran, for the top of its report."""
    off = config.filter.off_target
    return {
        "data": f"{config.n_subjects} phantom chest X-rays (seed {config.seed}); edits on the test split",
        "model": f"{config.model}, fine-tuned {config.finetune_steps} steps -> {tuned_model}",
        "interventions": "\n".join(
            f"{name}: {selector} -> {spec} (quota {config.quota})" for name, selector, spec in SUBGROUPS
        ),
        "editing": f"{config.inversion.method} inversion, {config.inversion.num_inference_steps} DDIM steps; "
        "prompt-to-prompt "
        f"{config.edit.controller}"
        + (f", local blend ({config.edit.blend_mask} mask)" if config.edit.local_blend else ""),
        "filter": f"S_CLIP >= {config.filter.s_clip_min:g}; off-target: "
        + (
            f"classifier {off.classifier} (no other head may flip or move > {off.max_shift:g})"
            if off.classifier
            else "off"
        ),
        "counterfactual rows": summary.get("manifest_rows"),
        "error rows": summary.get("error_rows"),
    }
