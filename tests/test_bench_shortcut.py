"""The shortcut benchmark's pipeline end to end at tiny sizes (`--quick`): every step runs and writes what
BENCHMARKS.md reads; the figures themselves come from the full run, not from this test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.slow


def test_the_quick_benchmark_runs_every_step_and_writes_its_report(tmp_path):
    import bench_shortcut

    result = bench_shortcut.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["verdict"] == result["verdict"] and saved["verdict"] != "incomplete run"
    assert set(saved["sweep"]) == {"0.5", "1.0"}
    for arms in saved["sweep"].values():  # every arm trained and scored at every correlation
        assert set(k for k, v in arms.items() if v) == set(bench_shortcut.ARM_LABELS)
        for v in arms.values():
            assert 0.0 <= v["mean"] <= 1.0 and v["n_seeds"] == 3
    assert set(saved["learning_curve"]) == {"2", "4"}
    # At c = 1 every effusion image of train has a device: all counterfactuals are eligible; at 0.5 fewer are.
    assert saved["eligible_counterfactuals"]["1.0"] >= saved["eligible_counterfactuals"]["0.5"] > 0
    audit = saved["audit"]["Support Devices=0"]
    assert audit["n"] > 0 and audit["ci"][0] <= audit["difference"] <= audit["ci"][1]
    assert {"original", "counterfactuals"} <= {row[1] for row in saved["audit_table"]}
    quality = saved["label_quality"]["remove_devices"]
    assert quality["n"] > 0 and 0.0 <= quality["judge_device_as_labelled"] <= 1.0
    assert 0.0 <= quality["truth_effusion_as_labelled"] <= 1.0 and 0.0 <= quality["truth_device_removed"] <= 1.0
    assert "truth_device_removed" not in saved["label_quality"]["add_devices"]  # an addition's placement is one of many
    page = (tmp_path / "report.html").read_text()
    for anchor in ('id="verdict"', 'id="sweep"', 'id="curve"', 'id="main"', 'id="audit"', 'id="examples"'):
        assert anchor in page, anchor
