"""The job entrypoints as a user runs them: `python jobs/<job>.py` in a fresh process that starts its own Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=900)


def test_finetune_then_augment_from_the_entrypoints(tmp_path):
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset

    data = write_phantom_dataset(str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=24, seed=4))
    tuned = _job(
        "jobs/finetune.py", "--config", "configs/finetune_tiny.yaml", "--config", "configs/compute/finetune_cpu.yaml",
        "--set", f"data.manifest={data.manifest_uri}", "--set", f"run.storage_path={tmp_path / 'runs'}",
        "--set", "train.max_steps=1", "--set", "train.validation_every=null", "--set", "compute.num_workers=1",
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    model = tmp_path / "runs" / "finetune-tiny" / "model"
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").exists()

    out = tmp_path / "augment"
    augmented = _job(
        "jobs/augment.py", "--config", "configs/augment_tiny.yaml", "--config", "configs/compute/augment_cpu.yaml",
        "--set", f"model.path={model}", "--set", f"data.manifest={data.manifest_uri}", "--set", f"output={out}",
        "--set", "inversion.num_inference_steps=3", "--set", "inversion.num_inner_steps=1",
        "--set", "subgroups=[{name: devices, selector: {Support Devices: 1}, interventions: ['Support Devices=0'], quota: 1}]",
        "--set", "filter.s_clip_min=-1.0", "--set", "compute.num_actors=1",
    )
    assert augmented.returncode == 0, augmented.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["subgroups"]["devices"]["accepted"] == 1 and summary["actors"]["model_loads_per_actor"] == [1]
