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
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "run_summary.json").read_bytes() == (out / "summary.json").read_bytes()  # the old name, one release
    assert summary["subgroups"]["devices"]["accepted"] == 1 and summary["actors"]["model_loads_per_actor"] == [1]


def _lines(done: subprocess.CompletedProcess) -> list[str]:
    return (done.stdout + done.stderr).splitlines()


def _quiet(lines: list[str]) -> list[str]:
    """Lines that are Ray's, DeepSpeed's or torch's internals, or a traceback: none may reach a user."""
    noise = ("Reporting training result", "TrainingReport(", "PreemptionWatcher", "Traceback", "FutureWarning",
             "DeprecationWarning", "Execution plan of Dataset", "Progress bars disabled", "core_worker.cc")
    return [line for line in lines if any(n in line for n in noise)]


def test_jobs_print_their_progress_and_their_end_after_ray_starts(tmp_path):
    """augment and audit as fresh processes (a user's terminal): Ray's logging config must not swallow the
    job's INFO lines; a progress line comes at least every PRISM_RAY_PROGRESS_SECONDS, the end names the
    outputs, and no line is Ray's noise."""
    import os

    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset

    data = write_phantom_dataset(str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=40, seed=4))
    env = dict(os.environ, PRISM_RAY_PROGRESS_SECONDS="2")
    short = ["--set", "inversion.num_inference_steps=3", "--set", "inversion.num_inner_steps=1",
             "--set", "compute.num_actors=1", "--set", f"data.manifest={data.manifest_uri}"]

    def job(*args):
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=900, env=env)

    out = tmp_path / "augment"
    augmented = job(
        "jobs/augment.py", "--config", "configs/augment_tiny.yaml", "--config", "configs/compute/augment_cpu.yaml",
        *short, "--set", f"output={out}", "--set", "filter.s_clip_min=-1.0", "--set", "filter.off_target.classifier=null",
        "--set", "subgroups=[{name: devices, selector: {Support Devices: 1}, interventions: ['Support Devices=0'], quota: 2}]",
    )
    lines = _lines(augmented)
    assert augmented.returncode == 0, "\n".join(lines[-40:])
    assert [line for line in lines if line.startswith("augment: round 1:")], lines
    assert [line for line in lines if line.startswith("augment:   round 1:") and "attempts" in line], lines
    assert [line for line in lines if line.startswith("augment: devices: met, 2/2 accepted in quota")], lines
    assert lines[-2:] and any(line == f"augment: outputs in {out} (manifest.parquet, errors.parquet, summary.json)"
                              for line in lines), lines
    assert not _quiet(lines), _quiet(lines)

    audited = job(
        "jobs/audit.py", "--config", "configs/audit_tiny.yaml", "--config", "configs/compute/augment_cpu.yaml",
        *short, "--set", f"output={tmp_path / 'audit'}", "--set", "max_sources=4", "--set", "stats.bootstrap=100",
        "--set", "interventions=['Support Devices=0']",
    )
    lines = _lines(audited)
    assert audited.returncode == 0, "\n".join(lines[-40:])
    assert f"audit: output {tmp_path / 'audit'}" in lines, lines  # the resolved output, at the start
    assert [line for line in lines if line.startswith("audit:   rows:")], lines  # the heartbeat
    assert [line for line in lines if "report.html" in line and str(tmp_path / "audit") in line], lines
    assert not _quiet(lines), _quiet(lines)
