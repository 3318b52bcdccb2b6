"""The fine-tuning job without Ray: its config, the rows to train on, the run's plan, export and result."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field

from prism_ray.config import BaseConfig, config_field
from prism_ray.data.config import DataConfig
from prism_ray.models.config import ModelConfig


class TrainConfig(BaseConfig):
    """Optimisation knobs; defaults are PRISM's (AdamW lr 1e-5, betas (0.9, 0.999), wd 1e-2, eps 1e-8)."""

    max_steps: int = Field(
        1000, ge=1, description="optimizer steps in total (a resumed run continues the count)"
    )
    micro_batch_size: int = Field(1, ge=1, description="images per worker per forward pass")
    gradient_accumulation_steps: int = Field(1, ge=1)
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="if set: micro_batch_size x accumulation x workers must equal it (accumulation derived)",
    )
    learning_rate: float = Field(1e-5, gt=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-2, ge=0.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    lr_schedule: Literal["constant", "warmup", "warmup_decay"] = Field(
        "constant", description="none / DeepSpeed WarmupLR / WarmupDecayLR (linear decay to 0 at max_steps)"
    )
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gradient clipping; None = off")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer-state offload to CPU (GPU runs only)")
    latents: Literal["mean", "sample"] = Field("mean", description="VAE posterior mean (PRISM) or a sample")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="None = the model's scheduler config (epsilon for SD1.5)"
    )
    num_train_timesteps: int = Field(1000, ge=1)
    cache_latents: bool = Field(
        False, description="precompute VAE latents + text embeddings once with Ray Data"
    )
    ema: bool = False
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0)
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers", "eager"] = "sdpa"
    compile: bool = Field(
        False, description="torch.compile the U-Net (DeepSpeed's engine.compile; GPU, minutes of warm-up)"
    )
    seed: int = Field(0, ge=0)
    log_every: int = Field(1, ge=1, description="steps between metric reports / progress lines")
    checkpoint_every: int = Field(
        500, ge=1, description="steps between checkpoints (the last step always saves)"
    )
    validation_every: int | None = Field(
        None, ge=1, description="steps between validation images; None = off"
    )
    validation_prompts: list[str] = Field(default_factory=list)
    validation_steps: int = Field(10, ge=1, description="DDIM steps for validation images")
    validation_guidance: float = Field(7.5, ge=0.0)


class TrainComputeConfig(BaseConfig):
    """Launch settings (kept apart from the job's knobs): Ray Train workers and failure handling."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0, description="leave CPUs free for Ray Data when streaming")
    data_concurrency: int = Field(1, ge=1, description="Ray Data actors for latent caching")
    max_failures: int = Field(
        0, ge=-1, description="worker-group restarts from the latest checkpoint; -1 = forever"
    )


class RunStorageConfig(BaseConfig):
    """Where the run lives: `<storage_path>/<name>` holds checkpoints, metrics, validation images, the model."""

    storage_path: str = Field(..., min_length=1, description="local folder or URI (s3://, gs://, ...)")
    name: str = Field(..., min_length=1, description="re-running with the same name resumes")
    export: bool = True
    export_path: str | None = Field(None, description="default: <storage_path>/<name>/model")


class FinetuneConfig(BaseConfig):
    """The whole fine-tuning job, passed as one object to the Ray Train workers."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    compute: TrainComputeConfig = Field(default_factory=TrainComputeConfig)
    run: RunStorageConfig

    def check(self) -> None:
        """DeepSpeed / device combinations that cannot work, caught when the config loads."""
        from prism_ray.pipelines.deepspeed_config import check_combinations

        check_combinations(self)


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetunePlan:
    """What the driver settled before any worker starts; a runner trains from it."""

    run_path: str  # <storage_path>/<name>: checkpoint_*/, metrics/, validation/, errors/, events/, model/
    storage_path: str  # absolute (Ray wants absolute local paths)
    model_root: Path  # the resolved local diffusers folder
    resolution: int  # image side the U-Net was built for
    rows: pa.Table  # manifest rows to train on (bad ones are only found while reading them)
    min_side: int  # smallest usable image side (data.decode.min_side, else 8 latents of the VAE)
    deepspeed: dict  # DeepSpeed's JSON config

    @property
    def errors_uri(self) -> str:
        return f"{self.run_path}/errors"


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    run_path: str
    final_step: int
    start_step: int  # > 0 when the run resumed from a checkpoint
    model_path: str | None  # exported diffusers folder (None if run.export is false)
    checkpoint_path: str
    skipped: dict[str, int] = field(default_factory=dict)  # "stage: reason" -> manifest rows skipped


# A runner trains from the plan and returns the URI of the final checkpoint folder.
Runner = Callable[[FinetuneConfig, FinetunePlan], str]


def training_rows(data: DataConfig, errors_uri: str, config_hash: str) -> pa.Table:
    """The manifest rows to train on: `data.split` / `data.limit`, label cells parsed, duplicates
    collapsed; rows dropped on the way go to the run's errors table. A wrong column or no rows is a ValueError."""
    from prism_ray.data.manifest import prepare_manifest
    from prism_ray.training.examples import caption_source, write_error_rows

    manifest = prepare_manifest(data)
    if manifest.errors:
        write_error_rows([{"uri": e.source_uri or "", "error": f"{e.stage}: {e.reason}"} for e in manifest.errors],
                         errors_uri, config_hash)
    table = manifest.table
    print(
        f"finetune: {manifest.input_rows} input rows = "
        f"{manifest.input_rows - table.num_rows - len(manifest.errors) - manifest.duplicate_rows_collapsed} "
        f"not selected (split/limit) + {manifest.duplicate_rows_collapsed} duplicates collapsed + "
        f"{len(manifest.errors)} row errors + {table.num_rows} rows to train on (unreadable images are "
        f"counted as they are read)",
        flush=True,
    )
    if table.num_rows == 0:
        raise ValueError(f"config field 'data.manifest': no rows to train on in {data.manifest!r}")
    caption_source(table.column_names, data.adapter, data.adapter_options)  # a wrong adapter fails here
    return table


def vae_stride(root: Path) -> int:
    """Pixels per latent of a diffusers folder's VAE."""
    vae = json.loads((root / "vae" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1)


def model_resolution(root: Path) -> int:
    """Image side of a diffusers folder: U-Net sample size x the VAE's downsampling."""
    unet = json.loads((root / "unet" / "config.json").read_text())
    return int(unet["sample_size"]) * vae_stride(root)


def absolute_storage(path: str, field: str = "run.storage_path") -> str:
    """Ray wants absolute local paths; URIs (s3://, gs://, ...) pass through; a relative path under
    `ray job submit` is refused (`results.layout.resolve_output`)."""
    from prism_ray.results.layout import resolve_output

    return resolve_output(path, field)


def plan_run(config: FinetuneConfig) -> FinetunePlan:
    """Every check the driver can make (DeepSpeed combinations, model, manifest), before any worker starts."""
    from prism_ray.data.images import default_min_side
    from prism_ray.data.storage import join_uri
    from prism_ray.models.loading import check_model_folder
    from prism_ray.pipelines.deepspeed_config import build_deepspeed_config

    deepspeed = build_deepspeed_config(config)
    storage_path = absolute_storage(config.run.storage_path)
    with config_field("model.path"):  # a wrong model path is a config error, found before the run folder exists
        model_root = check_model_folder(config.model.path, config.model.cache_dir)
        resolution = model_resolution(model_root)
    run_path = join_uri(storage_path, config.run.name)
    return FinetunePlan(
        run_path=run_path,
        storage_path=storage_path,
        model_root=model_root,
        resolution=resolution,
        rows=training_rows(config.data, join_uri(run_path, "errors"), config.config_hash()),
        min_side=config.data.decode.min_side or default_min_side(vae_stride(model_root)),
        deepspeed=deepspeed,
    )


def run(config: FinetuneConfig, runner: Runner) -> FinetuneResult:
    """Fine-tune the U-Net on `config.data`, resume by `run.name`, export a diffusers folder.

    `runner` trains (the CLI's: Ray Train + DeepSpeed, `prism_ray.distributed.trainer.fit`); the
    export and the summary of skipped rows happen here, on the driver.
    """
    from prism_ray.data.storage import join_uri
    from prism_ray.training.callbacks import checkpoint_unet_state, latest_checkpoint, read_checkpoint_state
    from prism_ray.training.examples import skipped_rows
    from prism_ray.training.export import export_diffusers

    plan = plan_run(config)
    print(f"finetune: run folder {plan.run_path}", flush=True)
    checkpoint = latest_checkpoint(plan.run_path)
    if checkpoint is not None and int(read_checkpoint_state(checkpoint)["step"]) >= config.train.max_steps:
        # Nothing left to train: no Ray Train start and no DeepSpeed op build just to say so.
        print(f"finetune: already trained to step {config.train.max_steps} ({checkpoint}); exporting it", flush=True)
    else:
        checkpoint = runner(config, plan)
    state = read_checkpoint_state(checkpoint)
    model_path = None
    if config.run.export:
        model_path = (absolute_storage(config.run.export_path, "run.export_path") if config.run.export_path
                      else join_uri(plan.run_path, "model"))
        weights = checkpoint_unet_state(checkpoint, use_ema=config.train.ema)
        metadata = {"step": state["step"], "config_hash": config.config_hash(), "ema": config.train.ema}
        export_diffusers(plan.model_root, weights, model_path, metadata=metadata)
    skipped = skipped_rows(plan.errors_uri)
    if skipped:
        print(f"finetune: skipped {sum(skipped.values())} manifest rows: {skipped}", flush=True)
    print(f"finetune: step {state['step']}, run folder {plan.run_path}, model {model_path}", flush=True)
    return FinetuneResult(
        run_path=plan.run_path,
        final_step=int(state["step"]),
        start_step=int(state.get("start_step", 0)),
        model_path=model_path,
        checkpoint_path=checkpoint,
        skipped=skipped,
    )
