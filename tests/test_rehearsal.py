"""The SD v1.5 rehearsal at CI's size: every `*_sd15.yaml` job through the CLI on SD v1.5's layout.

`benchmarks/rehearsal_sd15.py --scale reduced` builds a family with SD v1.5's layer layout and
attention dims at narrow widths (the full shape is a documented command: docs/rehearsal.md), then runs
finetune (ZeRO-2, bf16, export) -> augment on the export -> audit -> edit -> submit to a local head,
each a fresh `prism-ray` process, and checks each stage's outputs against its job contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_the_reduced_rehearsal_runs_every_sd15_job_end_to_end(tmp_path):
    result = load_benchmark("rehearsal_sd15").main(["--out", str(tmp_path), "--scale", "reduced", "--resolution", "64",
                           "--subjects", "12", "--classifier", "tiny", "--timeout", "900"])
    stages = result["stages"]
    assert list(stages) == ["family", "phantoms", "finetune", "augment", "audit", "edit", "submit"]
    assert stages["augment"]["checks"]["accepted"] == {"remove_devices": 1, "remove_effusion": 1}
    assert stages["submit"]["checks"]["accepted"] == {"remove_devices": 1, "remove_effusion": 1}
    assert stages["edit"]["checks"]["counterfactuals"] == 2
    assert stages["audit"]["checks"]["interventions_applied"] >= 2
    export = Path(stages["finetune"]["export"])
    unet = json.loads((export / "unet" / "config.json").read_text())
    assert unet["down_block_types"][-1] == "DownBlock2D" and unet["cross_attention_dim"] == 768
    # No traceback through the project's code. (Ray's own threads may print one under load or beside another
    # Ray instance on the machine, e.g. Ray Train's PlacementGroupCleanerMonitor: "Found multiple active Ray
    # instances"; the job is unaffected.)
    ours = f'File "{ROOT / "prism_ray"}'
    for name in ("finetune", "augment", "audit", "edit", "submit"):
        assert ours not in Path(stages[name]["log"]).read_text(), name
    assert json.loads((tmp_path / "result.json").read_text())["scale"] == "reduced"
