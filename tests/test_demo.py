"""The README's main command, shrunk: phantoms -> Ray Train + DeepSpeed fine-tune -> Ray
actor counterfactuals with the demo's edit settings -> report against the true counterfactuals."""

from __future__ import annotations

import json

from prism_ray.engine.settings import InversionConfig
import pytest

from prism_ray.pipelines.demo import SUBGROUPS, DemoConfig, run as run_demo


@pytest.mark.slow
def test_demo_end_to_end(ray_local, tmp_path):
    config = DemoConfig(
        out=str(tmp_path / "demo"),
        n_subjects=40,
        finetune_steps=2,
        quota=1,
        inversion=InversionConfig(num_inference_steps=8, num_inner_steps=2),
    )
    report = run_demo(config)
    assert (report / "report.md").exists() and (report / "counterfactuals.png").stat().st_size > 0
    stats = {s["subgroup"]: s for s in json.loads((report / "summary.json").read_text())}
    assert set(stats) == {name for name, _, _ in SUBGROUPS}
    for s in stats.values():
        assert s["attempted"] >= 1 and 0.0 < s["l1_to_source"] < 0.5
        assert "target_cpg" in s  # the shipped classifier scored them
        assert 0.0 < s["mean_reconstruction_error"] < 1.0
    summary = json.loads((report / "augment_summary.json").read_text())
    assert summary  # the augment job's own summary is kept beside the report
