"""The demo as a user runs it prints a readable log: its own steps, the jobs' progress, no Ray noise."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


NOISE = ("State API", "Failed to query", "Reporting training result", "TrainingReport(", "PreemptionWatcher",
         "Traceback", "Warning:", "Execution plan of Dataset", "Progress bars disabled", "core_worker.cc",
         "built successfully", "Checkpoint successfully created", "GetTimeoutError", "Token authentication")


def _demo(out):
    return subprocess.run(
        [sys.executable, "-m", "prism_ray.cli", "demo", "--set", f"out={out}",
         "--set", "finetune_steps=2", "--set", "quota=1", "--set", "n_subjects=40",
         "--set", "inversion.num_inference_steps=3", "--set", "inversion.num_inner_steps=1",
         # The log is what this test checks: 3-step edits of 40 phantoms are too rough for the off-target
         # filter to meet a quota (test_demo checks it); `null` is also how a user turns it off.
         "--set", "filter.off_target.classifier=null"],
        check=False, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def test_the_demo_log_is_short_and_shows_every_stage_on_first_run_and_re_run(tmp_path):
    import ray

    ray.shutdown()  # the demo starts its own Ray, as it does for a user: it must be the only one here
    for run in ("first", "re-run"):
        out = _demo(tmp_path / "demo")
        log = (out.stdout + out.stderr).splitlines()
        assert out.returncode == 0, "\n".join(log[-40:])
        assert len(log) <= 40, "\n".join(log)
        assert not [line for line in log if any(n in line for n in NOISE)], "\n".join(log)
        assert sum(line.startswith("[demo]") for line in log) == 6
        assert [line for line in log if line.startswith("[demo] done") and "report.html" in line]
        # the augment job's own lines, which Ray's logging config once swallowed
        assert [line for line in log if line.startswith("augment: outputs in ")], "\n".join(log)
        assert [line for line in log if line.startswith("augment: remove_devices: met")], "\n".join(log)
        if run == "first":
            assert len([line for line in log if "step 2/2 loss" in line]) == 1  # each progress line once
            assert [line for line in log if line.startswith("augment: round 1:")], "\n".join(log)
        else:  # nothing left to train or edit: no Ray Train start, no actors
            assert [line for line in log if "already trained to step 2" in line], "\n".join(log)
            assert not [line for line in log if line.startswith("augment: round")], "\n".join(log)
    assert (tmp_path / "demo" / "report" / "report.html").stat().st_size > 0
