"""Fine-tuning's driver side and loop callbacks without Ray: NaN guard, metrics, EMA, checkpoint files, export, run()."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from prism_ray import faults
from prism_ray.config import build_config
from prism_ray.data.storage import read_table, write_png, write_table
from prism_ray.pipelines.finetune import FinetuneConfig, run
from prism_ray.training.callbacks import (
    EMA,
    MetricsLog,
    NonFiniteLossError,
    check_finite_loss,
    checkpoint_unet_state,
    latest_checkpoint,
    read_checkpoint_state,
    write_checkpoint_files,
    write_validation_images,
)
from prism_ray.training.diffusion import module_digest, state_dict_digest
from prism_ray.training.examples import prepare_batch, skipped_rows
from prism_ray.training.export import export_diffusers


def test_nan_guard_names_the_steps():
    check_finite_loss(0.25, step=5, first_step=3)
    with pytest.raises(NonFiniteLossError, match=r"steps 3-5"):
        check_finite_loss(float("nan"), step=5, first_step=3)
    with pytest.raises(NonFiniteLossError, match=r"in step 7;"):
        check_finite_loss(float("inf"), step=7, first_step=7)
    # A NaN in any micro-step survives the on-device sum the loop checks.
    total = torch.zeros(()) + torch.tensor(0.5) + torch.tensor(float("nan")) + torch.tensor(0.5)
    assert not np.isfinite(float(total))


def test_metrics_rows_rate_and_flush(tmp_path):
    log = MetricsLog("abc", max_steps=4)
    first = log.record(step=1, loss=0.5, lr=1e-3, grad_norm=2.0, images=8)
    log.record(step=2, loss=0.25, lr=1e-3, grad_norm=1.0, images=8)
    assert first["step"] == 1 and first["images_per_second"] > 0 and "config_hash" not in first
    log.flush(str(tmp_path))
    assert log.rows == []
    rows = read_table(str(tmp_path / "metrics" / "part-00000001-00000002.parquet")).to_pylist()
    assert [(r["step"], r["loss"], r["config_hash"]) for r in rows] == [(1, 0.5, "abc"), (2, 0.25, "abc")]
    log.flush(str(tmp_path))  # nothing new: no empty part
    assert len(list((tmp_path / "metrics").iterdir())) == 1


def test_ema_moves_toward_weights_and_round_trips():
    module = torch.nn.Linear(3, 2)
    ema = EMA(module, decay=0.5)
    ema.step(module)  # diffusers' EMAModel: decay 0 at its first step (the shadow starts at the weights)
    before = ema.state_dict(module)
    assert torch.equal(before["weight"], module.weight.detach())
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.step(module)
    after = ema.state_dict(module)
    # Then a warm-up decay (1 + n) / (10 + n) = 2/11 at n = 1 (below the cap 0.5).
    assert torch.allclose(after["weight"], before["weight"] + (1 - 2 / 11), atol=1e-6)
    fresh = EMA(module, decay=0.5)
    fresh.load_state_dict(after, module)
    assert state_dict_digest(fresh.state_dict(module)) == state_dict_digest(after)


def test_checkpoint_files_and_latest_complete_folder(tmp_path):
    module = torch.nn.Linear(3, 2)
    for step in (2, 4):
        folder = tmp_path / f"checkpoint_{step:08d}"
        folder.mkdir()
        write_checkpoint_files(
            folder, step=step, start_step=0, config_hash="h", unet_state=module.state_dict()
        )
    (tmp_path / "checkpoint_00000006").mkdir()  # a folder whose state file never got written
    latest = latest_checkpoint(str(tmp_path))
    assert latest.endswith("checkpoint_00000004")
    assert read_checkpoint_state(latest) == {"step": 4, "start_step": 0, "config_hash": "h"}
    assert state_dict_digest(checkpoint_unet_state(latest)) == module_digest(module)
    assert latest_checkpoint(str(tmp_path / "nothing")) is None


def test_export_switches_atomically_and_keeps_the_old_one_on_failure(
    tiny_family, tiny_sd, tmp_path, monkeypatch
):
    from prism_ray.models.loading import load_sd_components

    target = tmp_path / "model"
    first = {k: v + 0.01 for k, v in tiny_sd.unet.state_dict().items()}
    export_diffusers(tiny_family, first, str(target), metadata={"step": 1})
    second = {k: v - 0.01 for k, v in tiny_sd.unet.state_dict().items()}

    # Dies after the new folder is written, before the switch: the old export is untouched and loads.
    monkeypatch.setenv(faults.ENV, "finetune.export=interrupt")
    faults.reset()
    with pytest.raises(faults.InjectedFault):
        export_diffusers(tiny_family, second, str(target), metadata={"step": 2})
    monkeypatch.delenv(faults.ENV)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind
    assert json.loads((target / "prism_finetune.json").read_text())["step"] == 1
    assert torch.equal(
        load_sd_components(str(target), device="cpu").unet.state_dict()["conv_in.weight"],
        first["conv_in.weight"],
    )

    export_diffusers(tiny_family, second, str(target), metadata={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded = load_sd_components(str(target), device="cpu")
    assert torch.equal(loaded.unet.state_dict()["conv_in.weight"], second["conv_in.weight"])
    assert module_digest(loaded.vae) == module_digest(tiny_sd.vae)


def test_validation_images_are_written(tiny_sd, tmp_path):
    train = build_config(FinetuneConfig, _base(tmp_path, tmp_path), ["train.validation_prompts=[a, b]"]).train
    uris = write_validation_images(tiny_sd.unet, tiny_sd, train, str(tmp_path), 3)
    assert [u.rsplit("/", 2)[-2:] for u in uris] == [
        ["step_00000003", "prompt_00.png"],
        ["step_00000003", "prompt_01.png"],
    ]
    assert all(
        (tmp_path / "validation" / "step_00000003" / f"prompt_0{i}.png").stat().st_size > 0 for i in (0, 1)
    )


# --- the driver: rows -> examples, run() with an in-process runner ----------------------------


def _base(root, storage) -> dict:
    return {
        "model": {"path": "tiny"},
        "data": {"manifest": str(root / "manifest.parquet"), "image_root": str(root)},
        "run": {"storage_path": str(storage), "name": "ft"},
    }


@pytest.fixture
def manifest(tmp_path):
    write_png(np.full((40, 48), 200, np.uint8), str(tmp_path / "ok.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [
        {"image_uri": "ok.png", "caption": "chest x-ray"},
        {"image_uri": "missing.png", "caption": "chest x-ray"},
        {"image_uri": "bad.png", "caption": "chest x-ray"},
        {"image_uri": "ok.png", "caption": ""},
    ]
    write_table(pa.Table.from_pylist(rows), str(tmp_path / "manifest.parquet"))
    return tmp_path


def test_prepare_batch_keeps_good_rows_and_writes_error_rows(manifest, tmp_path):
    config = build_config(FinetuneConfig, _base(manifest, tmp_path))
    batch = read_table(config.data.manifest)
    errors = str(tmp_path / "errors")
    out = prepare_batch(batch, data=config.data, resolution=32, errors_uri=errors, config_hash="h")
    assert out["pixels"].shape == (1, 3, 32, 32) and out["pixels"].dtype == np.uint8
    assert int(out["pixels"][0, 0, 0, 0]) == 200 and list(out["caption"]) == ["chest x-ray"]
    prepare_batch(
        batch, data=config.data, resolution=32, errors_uri=errors, config_hash="h"
    )  # a second epoch
    assert len(list((tmp_path / "errors").iterdir())) == 1  # the same bad rows overwrite the same part
    skipped = skipped_rows(errors)
    assert sum(skipped.values()) == 3
    assert skipped["image: file not found"] == 1 and skipped["caption: empty caption"] == 1


def test_only_item_errors_become_error_rows(manifest):
    from prism_ray.training.examples import prepare_examples

    rows = [{"image_uri": "ok.png", "caption": "chest x-ray"}]

    def prepare(caption_fn):
        return prepare_examples(
            rows, image_column="image_uri", image_root=str(manifest), resolution=32, caption_fn=caption_fn
        )

    def rejected(row):
        raise ValueError("uncertain label")  # what an adapter's RowRejected is

    def buggy(row):
        return row["no such column"]

    def out_of_space(row):
        raise OSError(28, "No space left on device")

    assert prepare(rejected)[0]["error"] == "caption: uncertain label"
    with pytest.raises(KeyError):  # a bug crashes the job
        prepare(buggy)
    with pytest.raises(OSError):  # a resource error is raised, so that Ray retries the task
        prepare(out_of_space)


def test_run_exports_the_runners_checkpoint_and_summarises_skips(tiny_family, tiny_sd, manifest, tmp_path):
    """`run` with an in-process runner standing in for Ray Train: checks, export, result."""
    from prism_ray.models.loading import load_sd_components

    config = build_config(
        FinetuneConfig, _base(manifest, tmp_path / "runs") | {"model": {"path": str(tiny_family)}}
    )
    trained = {k: v * 0.5 for k, v in tiny_sd.unet.state_dict().items()}

    def runner(config, plan):
        # The two 'ok.png' rows disagree (captions differ): both are row errors before any worker starts.
        assert plan.rows.num_rows == 2 and plan.resolution == 64 and plan.deepspeed["train_batch_size"] == 1
        prepare_batch(
            plan.rows,
            data=config.data,
            resolution=plan.resolution,
            errors_uri=plan.errors_uri,
            config_hash="h",
        )
        folder = tmp_path / "runs" / "ft" / "checkpoint_00000007"
        folder.mkdir(parents=True)
        write_checkpoint_files(folder, step=7, start_step=5, config_hash="h", unet_state=trained)
        return str(folder)

    result = run(config, runner=runner)
    assert (result.start_step, result.final_step) == (5, 7)
    assert result.model_path == str(tmp_path / "runs" / "ft" / "model")
    assert sum(result.skipped.values()) == 3  # ok.png (its two rows conflict), a missing and a corrupt file
    exported = load_sd_components(result.model_path, device="cpu")
    assert module_digest(exported.unet) == state_dict_digest(trained)
    assert json.loads((tmp_path / "runs" / "ft" / "model" / "prism_finetune.json").read_text())["step"] == 7


def test_run_fails_before_training_on_a_bad_manifest(manifest, tmp_path):
    config = build_config(FinetuneConfig, _base(manifest, tmp_path), ["data.split=train"])

    def runner(config, plan):
        raise AssertionError("must not start")

    with pytest.raises(ValueError, match="data.split is set but there is no 'split' column"):
        run(config, runner=runner)
