"""The experiment job end to end in this process: real augment outputs (tiny quotas), three arms x three seeds."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """A phantom set, two accepted counterfactuals (one per shortcut-breaking edit) and two SD samples."""
    import torch

    from prism_ray.config import build_config
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
    from prism_ray.pipelines.augment import AugmentConfig, in_process, run

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("experiment")
    data = write_phantom_dataset(str(root / "data"), PhantomDatasetConfig(n_subjects=120, seed=2))
    fast = {
        "model": {"path": "tiny", "device": "cpu"},
        "filter": {"s_clip_min": -1.0},
        "inversion": {"num_inference_steps": 3, "num_inner_steps": 1},
        "planner": {"initial_acceptance": 1.0},
    }
    run(
        build_config(
            AugmentConfig,
            {
                **fast,
                "data": {"manifest": data.manifest_uri, "split": "train"},
                "output": str(root / "cf"),
                "subgroups": [
                    {
                        "name": "remove",
                        "selector": {"Pleural Effusion": 1, "Support Devices": 1},
                        "interventions": ["Support Devices=0"],
                        "quota": 1,
                    },
                    {
                        "name": "add",
                        "selector": {"Pleural Effusion": 0, "Support Devices": 0},
                        "interventions": ["Support Devices=1"],
                        "quota": 1,
                    },
                ],
            },
        ),
        runner=in_process,
    )
    run(
        build_config(
            AugmentConfig,
            {
                **fast,
                "mode": "samples",
                "sampling": {"num_inference_steps": 3},
                "output": str(root / "samples"),
                "subgroups": [
                    {"name": "effusion", "prompt": "Chest X-ray showing Pleural Effusion", "quota": 2}
                ],
            },
        ),
        runner=in_process,
    )
    return root, data


def test_experiment_trains_three_arms_and_writes_its_table(augmented):
    from prism_ray.config import build_config
    from prism_ray.pipelines import classifier, experiment

    root, data = augmented
    config = build_config(
        experiment.ExperimentConfig,
        {
            "data": {"manifest": data.manifest_uri},
            "heads": {"pleural_effusion": "Pleural Effusion", "support_devices": "Support Devices"},
            "counterfactuals": str(root / "cf"),
            "samples": str(root / "samples"),
            "train": {
                "max_steps": 6,
                "batch_size": 8,
                "eval_every": 3,
                "log_every": 3,
                "checkpoint_every": 6,
            },
            "evaluation": {"subgroups": ["Sex"], "n_boot": 20, "min_group": 1},
            "output": str(root / "out"),
        },
    )
    summary = experiment.run(config, runner=classifier.in_process)

    assert summary["arms"]["counterfactuals"]["added"] == 2 and summary["arms"]["sd_samples"]["added"] == 2
    # Counterfactual labels: the source's, with the intervention applied.
    arm = pq.read_table(root / "out" / "arms" / "counterfactuals" / "manifest.parquet").to_pylist()
    source = {r["image_uri"]: r for r in pq.read_table(data.manifest_uri).to_pylist()}
    cf = {r["image_uri"]: r for r in pq.read_table(root / "cf" / "manifest.parquet").to_pylist()}
    added = [r for r in arm if r["image_uri"] in cf]
    assert len(added) == 2
    for r in added:
        src, edit = source[cf[r["image_uri"]]["source_uri"]], cf[r["image_uri"]]["intervention"]
        assert r["pleural_effusion"] == src["Pleural Effusion"]
        assert r["support_devices"] == (0.0 if edit == "Support Devices=0" else 1.0) != src["Support Devices"]
    # SD samples get the labels of the original rows with their caption: effusion, no device.
    samples = [
        r
        for r in pq.read_table(root / "out" / "arms" / "sd_samples" / "manifest.parquet").to_pylist()
        if r["caption"] == "Chest X-ray showing Pleural Effusion" and "/samples/" in r["image_uri"]
    ]
    assert [(r["pleural_effusion"], r["support_devices"]) for r in samples] == [(1.0, 0.0)] * 2

    arms = pq.read_table(root / "out" / "arms.parquet").to_pylist()
    assert {(r["arm"], r["seed"]) for r in arms} == {(a, s) for a in experiment.ARMS for s in (0, 1, 2)}
    table = pq.read_table(root / "out" / "table.parquet").to_pylist()
    key = ("pleural_effusion", "Support Devices", "worst", None, "worst_group_accuracy")
    cells = {
        r["arm"]: r for r in table if (r["head"], r["attribute"], r["group"], r["label"], r["metric"]) == key
    }
    per_seed = {
        a: [
            r["value"]
            for r in arms
            if r["arm"] == a and (r["head"], r["attribute"], r["group"], r["label"], r["metric"]) == key
        ]
        for a in experiment.ARMS
    }
    for a in experiment.ARMS:
        assert cells[a]["n_seeds"] == 3 and cells[a]["mean"] == pytest.approx(np.mean(per_seed[a]))
    diff = np.array(per_seed["counterfactuals"]) - np.array(per_seed["original"])
    assert cells["counterfactuals"]["diff"] == pytest.approx(diff.mean())
    assert cells["original"]["diff"] is None and 0.0 <= cells["sd_samples"]["p_sign_flip"] <= 1.0
    written = json.loads((root / "out" / "summary.json").read_text())
    assert written["headline"]["pleural_effusion"]["accuracy"].keys() == set(experiment.ARMS)
    report = (root / "out" / "report.md").read_text()
    assert "### pleural_effusion" in report and report.index("## Primary comparison") < report.index("### ")
    primary = written["primary"]  # pleural_effusion x Support Devices (the other head's column) by default
    assert (primary["head"], primary["attribute"]) == ("pleural_effusion", "Support Devices")
    assert {c["arm"] for c in primary["comparisons"]} == {"counterfactuals", "sd_samples"}
