"""Fine-tuning on a real local Ray with real DeepSpeed: 2 workers, ZeRO-2 over gloo, resume, kill, export."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from prism_ray import faults
from prism_ray.config import build_config
from prism_ray.data.storage import read_table, write_png, write_table
from prism_ray.distributed.trainer import fit as ray_train  # the runner of `prism-ray finetune`
from prism_ray.pipelines.finetune import FinetuneConfig, run
from prism_ray.training.callbacks import checkpoint_unet_state
from prism_ray.training.diffusion import module_digest, state_dict_digest

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

CAPTIONS = ["chest x-ray showing cardiomegaly", "chest x-ray showing pleural effusion", "chest x-ray"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """6 good rows + 1 missing image + 1 corrupt image + 1 empty caption."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        write_png(rng.integers(0, 256, (72, 64), dtype=np.uint8), str(root / f"img{i}.png"))
        rows.append({"image_uri": f"img{i}.png", "caption": CAPTIONS[i % 3]})
    (root / "corrupt.png").write_bytes(b"\x89PNG but not really")
    write_png(rng.integers(0, 256, (72, 64), dtype=np.uint8), str(root / "uncaptioned.png"))
    rows += [
        {"image_uri": "missing.png", "caption": CAPTIONS[0]},
        {"image_uri": "corrupt.png", "caption": CAPTIONS[1]},
        # Its own file: a second row for img0.png with another caption would be a conflicting duplicate.
        {"image_uri": "uncaptioned.png", "caption": ""},
    ]
    write_table(pa.Table.from_pylist(rows), str(root / "manifest.parquet"))
    return root


def make_config(tiny_family, manifest, storage, *overrides) -> FinetuneConfig:
    base = {
        "model": {"path": str(tiny_family)},
        "data": {"manifest": str(manifest / "manifest.parquet"), "image_root": str(manifest)},
        "train": {
            "max_steps": 2,
            "micro_batch_size": 1,
            "learning_rate": 1e-3,
            "zero_stage": 2,
            "checkpoint_every": 2,
            "validation_every": 2,
            "validation_prompts": [CAPTIONS[0]],
            "validation_steps": 2,
        },
        "compute": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": str(storage), "name": "ft"},
    }
    return build_config(FinetuneConfig, base, overrides)


@pytest.fixture(scope="module")
def first_run(tiny_family, manifest, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    config = make_config(tiny_family, manifest, storage)
    return config, storage, run(config, runner=ray_train)


def test_zero2_run_counts_bad_rows_and_writes_metrics(first_run):
    config, storage, result = first_run
    assert (result.start_step, result.final_step) == (0, 2)
    assert result.skipped == {"image: file not found": 1, "caption: empty caption": 1} | {
        k: 1 for k in result.skipped if k.startswith("image: corrupt")
    }
    assert len(result.skipped) == 3
    metrics = read_table(f"{result.run_path}/metrics/part-00000001-00000002.parquet").to_pylist()
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["images_per_second"] > 0 for m in metrics)
    assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in metrics)  # ZeRO-2's own norm
    assert metrics[0]["lr"] == pytest.approx(1e-3)
    assert (storage / "ft" / "validation" / "step_00000002" / "prompt_00.png").exists()


def test_export_loads_and_denoises_with_frozen_parts_unchanged(first_run, tiny_sd):
    from prism_ray.models.loading import load_sd_components

    _, _, result = first_run
    model = load_sd_components(result.model_path, device="cpu")
    assert module_digest(model.vae) == module_digest(tiny_sd.vae)
    assert module_digest(model.text_encoder) == module_digest(tiny_sd.text_encoder)
    assert module_digest(model.unet) != module_digest(tiny_sd.unet)  # it trained
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = model.text_encoder(model.tokenizer([CAPTIONS[0]], padding="max_length", return_tensors="pt").input_ids)[0]
    with torch.no_grad():
        eps = model.unet(z, 981, context).sample
    assert eps.shape == z.shape and torch.isfinite(eps).all()


def test_a_finished_run_is_recognised_before_ray_train_starts(first_run, capfd):
    """Re-running a run that reached max_steps exports its checkpoint without launching Ray Train."""
    config, storage, first = first_run

    def no_training(config, plan):
        raise AssertionError("Ray Train was started for a finished run")

    result = run(config, runner=no_training)
    assert (result.final_step, result.checkpoint_path) == (2, first.checkpoint_path)
    assert "already trained to step 2" in capfd.readouterr().out
    assert not list((storage / "ft").glob("events/resume-*.json"))  # nothing was restored into a worker


def test_rerun_with_same_name_resumes_from_checkpoint(first_run, tiny_family, manifest):
    from prism_ray.models.loading import load_sd_components

    config, storage, first = first_run
    exported_at_2 = module_digest(load_sd_components(first.model_path, device="cpu").unet)
    checkpoint_at_2 = state_dict_digest(checkpoint_unet_state(first.checkpoint_path))
    assert checkpoint_at_2 == exported_at_2

    # The re-run also switches to cached latents (a data-path choice; the checkpoint is the same).
    again = make_config(
        tiny_family,
        manifest,
        storage,
        "train.max_steps=3",
        "train.cache_latents=true",
        f"run.export_path={storage / 'model-3'}",
    )
    result = run(again, runner=ray_train)
    assert (result.start_step, result.final_step) == (2, 3)
    assert result.skipped == first.skipped
    events = sorted((storage / "ft" / "events").glob("resume-*.json"))
    assert len(events) == 1
    event = json.loads(events[0].read_text())
    assert event["step"] == 2
    assert event["unet_sha256"] == checkpoint_at_2  # the restored U-Net is the checkpoint's
    metrics = read_table(f"{result.run_path}/metrics/part-00000003-00000003.parquet").to_pylist()
    assert [m["step"] for m in metrics] == [3]


@pytest.fixture
def ray_with_faults(tmp_path):
    """A local Ray whose workers see a fault plan: a worker exits hard in step 3, once (a marker file)."""
    import ray

    def init(**env):
        # As conftest's `ray_local`, plus `env` for every worker (the environment is fixed at ray.init).
        env_vars = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"} | env
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": env_vars},
        )

    ray.shutdown()
    init(**{faults.ENV: "finetune.step=exit@3", faults.ONCE_ENV: str(tmp_path / "faults")})
    yield tmp_path / "faults"
    ray.shutdown()
    init()


def test_killed_run_resumes_from_its_last_checkpoint(tiny_family, manifest, tmp_path, ray_with_faults):
    """A worker dies hard in step 3 (after the step-2 checkpoint); the re-run continues at step 2."""
    killed = make_config(
        tiny_family,
        manifest,
        tmp_path,
        "train.max_steps=4",
        "train.validation_every=null",
        "run.export=false",
        "train.zero_stage=0",  # the other DeepSpeed path (the first run is ZeRO-2): no ZeRO optimizer wrapper
        "train.precision=fp32",
    )
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError):
        run(killed, runner=ray_train)  # max_failures = 0: the run fails with its worker
    assert (ray_with_faults / "finetune.step.fired").exists()
    checkpoints = sorted((tmp_path / "ft").glob("checkpoint_*"))
    assert [c.name for c in checkpoints] == ["checkpoint_00000002"], "the step-2 checkpoint, nothing after"
    at_2 = state_dict_digest(checkpoint_unet_state(str(checkpoints[-1])))

    # Same name again (the marker keeps the fault from firing twice): resumes at 2, ends at 4.
    result = run(killed, runner=ray_train)
    assert (result.start_step, result.final_step) == (2, 4)
    event = json.loads(sorted((tmp_path / "ft" / "events").glob("resume-*.json"))[-1].read_text())
    assert event["step"] == 2 and event["unet_sha256"] == at_2
    metrics = read_table(f"{result.run_path}/metrics/part-00000003-00000004.parquet").to_pylist()
    assert [m["step"] for m in metrics] == [3, 4] and all(np.isfinite(m["loss"]) for m in metrics)
    # DeepSpeed keeps no gradient norm without ZeRO or mixed precision; the loop measures it (was NaN).
    assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in metrics)
