"""The experiment job end to end in this process: real augment outputs (tiny quotas), five arms x three seeds;
arms (d), (e) and the augment limits on hand-made inputs."""

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


def test_experiment_trains_five_arms_and_writes_its_table(augmented):
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
            "fixes": ["group_balanced", "group_dro"],
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
    assert list(summary["arms"]) == list(experiment.ARMS)  # (a)-(e), in the table's order
    # The fixes: the original rows, each with its own knob; every arm the same selection rule and groups.
    assert summary["arms"]["group_dro"] == dict(summary["arms"]["original"], added=0)
    assert {r["select"] for r in summary["runs"]} == {"valid_loss"}
    for arm, objective in (("original", "erm"), ("group_balanced", "erm"), ("group_dro", "group_dro")):
        model = root / "out" / "runs" / f"{arm}-seed0" / "model"
        training = json.loads((model / "training.json").read_text())
        assert training["group_heads"] == ["pleural_effusion", "support_devices"]  # the primary comparison's
        assert (training["objective"], training["select"]) == (objective, "valid_loss")
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
    for a in experiment.ARMS[1:]:  # (b)-(e) alike: the seed-paired difference to (a)
        diff = np.array(per_seed[a]) - np.array(per_seed["original"])
        assert cells[a]["diff"] == pytest.approx(diff.mean())
    assert cells["original"]["diff"] is None and 0.0 <= cells["sd_samples"]["p_sign_flip"] <= 1.0
    written = json.loads((root / "out" / "summary.json").read_text())
    assert written["headline"]["pleural_effusion"]["accuracy"].keys() == set(experiment.ARMS)
    report = (root / "out" / "report.md").read_text()
    assert "### pleural_effusion" in report and report.index("## Primary comparison") < report.index("### ")
    primary = written["primary"]  # pleural_effusion x Support Devices (the other head's column) by default
    assert (primary["head"], primary["attribute"]) == ("pleural_effusion", "Support Devices")
    assert {c["arm"] for c in primary["comparisons"]} == {"counterfactuals", "sd_samples", "group_balanced", "group_dro"}


# --- arms (d), (e) and the augment limits, without training -------------------------------------


def _fix_config(tmp_path, **extra):
    from prism_ray.config import build_config
    from prism_ray.pipelines import experiment

    return build_config(experiment.ExperimentConfig, {
        "data": {"manifest": str(tmp_path / "data" / "manifest.parquet")},
        "heads": {"pleural_effusion": "Pleural Effusion", "support_devices": "Support Devices"},
        "output": str(tmp_path / "out"), **extra,
    })  # fmt: skip


def test_fixes_are_arms_on_the_original_rows_with_their_own_knob(tmp_path):
    from prism_ray.config import ConfigError
    from prism_ray.pipelines import experiment

    fixes = ["group_dro", "group_balanced"]
    config = _fix_config(tmp_path, fixes=fixes, train={"select": "valid_worst_group"})
    assert config.arms() == ["original", "group_balanced", "group_dro"]  # ARMS order; no augment output
    # The default groups: the primary head x the head whose column is the primary attribute.
    assert config.group_heads() == ["pleural_effusion", "support_devices"]
    trains = {a: experiment._classifier_config(config, "m.parquet", "/r", a, 3).train for a in config.arms()}
    assert {a: (t.balance, t.objective, t.select, t.seed) for a, t in trains.items()} == {
        "original": ("loss", "erm", "valid_worst_group", 3),
        "group_balanced": ("groups", "erm", "valid_worst_group", 3),
        "group_dro": ("loss", "group_dro", "valid_worst_group", 3),
    }
    assert {tuple(t.group_heads) for t in trains.values()} == {("pleural_effusion", "support_devices")}
    assert {t.max_steps for t in trains.values()} == {500}  # one step budget
    given = _fix_config(tmp_path, fixes=["group_dro"], train={"group_heads": ["support_devices"]})
    assert given.group_heads() == ["support_devices"]

    # Groups that cannot be derived (the primary attribute is not a head's column) must be given.
    with pytest.raises(
        ConfigError, match="group_heads: group_dro needs groups, and the primary attribute 'Sex'"
    ):
        _fix_config(tmp_path, heads={"pleural_effusion": "Pleural Effusion"}, fixes=["group_dro"],
                    evaluation={"subgroups": ["Sex"]})  # fmt: skip
    with pytest.raises(ConfigError, match="train.group_heads: 'sex' is not one of the heads"):
        _fix_config(tmp_path, fixes=["group_dro"], train={"group_heads": ["sex"]})
    with pytest.raises(ConfigError, match="or fixes to compare"):
        _fix_config(tmp_path)


def _augment_manifest(folder, rows):
    import pyarrow as pa

    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")


def test_the_augmentation_set_is_the_reports_quota_set_accepted(tmp_path):
    """One reader for the experiment and the reports: a row without quota_status is its own quota set
    (the reports always counted it; the experiment's own filter used to drop it), beyond-quota, set-aside
    and rejected rows are not in the augmentation set."""
    from prism_ray.pipelines.experiment import augment_rows as reexported
    from prism_ray.results.augmentation import augment_rows, finished_attempt, in_quota_set

    statuses = [("in_quota", True), (None, True), ("beyond_quota", True), ("set_aside", True), ("in_quota", False)]
    rows = [{"image_uri": f"cf/{i}.png", "subgroup": "g", "attempt_rank": i, "accepted": accepted,
             "quota_status": status} for i, (status, accepted) in enumerate(statuses)]  # fmt: skip
    _augment_manifest(tmp_path / "cf", rows)
    assert reexported is augment_rows
    assert augment_rows(str(tmp_path / "cf")).column("image_uri").to_pylist() == ["cf/0.png", "cf/1.png"]
    assert [in_quota_set(r) for r in rows] == [True, True, False, False, True]
    assert [finished_attempt(r) for r in rows] == [True, True, True, False, True]
    assert in_quota_set({}) and finished_attempt({})  # a manifest without the column


def test_augment_limits_take_each_subgroups_first_accepted_rows_in_attempt_order(tmp_path):
    """counterfactuals_limit: per subgroup, the accepted in-quota rows of the lowest attempt_rank, whatever the
    manifest's row order; the rejected and beyond-quota rows never count."""
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
    from prism_ray.pipelines import experiment

    phantoms = PhantomDatasetConfig(n_subjects=40, seed=1, write_images=False)
    data = write_phantom_dataset(str(tmp_path / "data"), phantoms)
    train = [r for r in pq.read_table(data.manifest_uri).to_pylist() if r["split"] == "train"]
    with_devices = [r for r in train if r["Support Devices"] == 1]
    without = [r for r in train if r["Support Devices"] == 0]
    plan = [  # (subgroup, attempt_rank, accepted, quota_status), in a shuffled manifest order
        ("remove", 3, True, "in_quota"), ("add", 1, True, "in_quota"), ("remove", 0, True, "in_quota"),
        ("remove", 1, False, "in_quota"), ("add", 0, False, "in_quota"), ("remove", 2, True, "in_quota"),
        ("add", 2, True, "in_quota"), ("add", 5, True, "beyond_quota"), ("add", 3, True, "in_quota"),
    ]  # fmt: skip
    rows = []
    for i, (subgroup, rank, accepted, status) in enumerate(plan):
        source = (with_devices if subgroup == "remove" else without)[i % 2]
        rows.append({"subgroup": subgroup, "attempt_rank": rank, "accepted": accepted, "quota_status": status,
                     "image_uri": f"cf/{subgroup}-{rank}.png", "source_uri": source["image_uri"],
                     "edit_prompt": "x", "intervention": f"Support Devices={int(subgroup == 'add')}"})  # fmt: skip
    _augment_manifest(tmp_path / "cf", rows)

    def chosen(limit):
        return experiment.augment_rows(str(tmp_path / "cf"), limit).column("image_uri").to_pylist()

    everything = ["cf/remove-3.png", "cf/add-1.png", "cf/remove-0.png", "cf/remove-2.png", "cf/add-2.png",
                  "cf/add-3.png"]  # fmt: skip
    assert chosen(None) == everything == chosen(10)  # the manifest's order
    assert chosen(1) == ["cf/add-1.png", "cf/remove-0.png"]
    assert chosen(2) == ["cf/add-1.png", "cf/remove-0.png", "cf/remove-2.png", "cf/add-2.png"]
    assert chosen(0) == []

    config = _fix_config(tmp_path, counterfactuals=str(tmp_path / "cf"), counterfactuals_limit=2,
                         fixes=["group_balanced"])  # fmt: skip
    manifests, counts = experiment.build_arms(config, str(tmp_path / "out"))
    assert counts["counterfactuals"]["added"] == 4 and counts["group_balanced"]["added"] == 0
    arm = pq.read_table(manifests["counterfactuals"]).to_pylist()
    added = {r["image_uri"].rsplit("/", 1)[-1]: r["support_devices"] for r in arm if "cf/" in r["image_uri"]}
    assert added == {"add-1.png": 1.0, "remove-0.png": 0.0, "remove-2.png": 0.0, "add-2.png": 1.0}
    original = pq.read_table(manifests["original"])
    assert pq.read_table(manifests["group_balanced"]).equals(original)  # (d) trains on the rows of (a)
