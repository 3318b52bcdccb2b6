"""The GPU benchmark script runs end to end on CPU with the shipped tiny family (`--smoke`); numbers are its job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "prism_ray" / "phantom" / "assets" / "tiny_phantom"
pytestmark = pytest.mark.skipif(not (SHIPPED / "unet").exists(), reason="no shipped tiny_phantom family")


def test_bench_gpu_smoke(tmp_path):
    bench = load_benchmark("bench_gpu")
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["unet"]) == {"fp32", "tf32", "bf16"}
    for mode in result["unet"].values():
        for row in mode.values():
            assert (
                0 < row["forward_ms"] < row["forward_backward_ms"]
            )  # backward costs more than forward alone
    names = [arm["name"] for arm in result["arms"]]
    assert names[0] == "per-image loop, reference" and any(n.startswith("direct") for n in names)
    assert {arm["preset"] for arm in result["arms"]} == {"reference", "fast", "fastest"}
    for arm in result["arms"]:
        assert arm["seconds_per_source"] > 0 and arm["bound_s"] > 0
        assert math.isclose(arm["ratio_to_bound"], arm["seconds_per_source"] / arm["bound_s"])
    loop, batched = result["arms"][0], result["arms"][1]
    assert loop["bound_s"] > batched["bound_s"]  # the loop inverts once per counterfactual
    assert result["full_length_check"]["seconds_per_source"] > 0
    assert all(row["img_per_s"] > 0 for row in result["finetune"].values())
    assert "| arm | s / source |" in (tmp_path / "results.md").read_text()
