"""The off-target filter: edits that move findings their intervention does not allow are rejected."""

from __future__ import annotations

import numpy as np

from prism_ray.config import build_config
from prism_ray.scoring.filter import FilterConfig, OffTargetConfig, off_target_heads, on_target

HEADS = ["cardiomegaly", "pleural_effusion", "support_devices", "pacemaker", "sex_female"]


def test_off_target_heads_against_hand_made_probabilities():
    rule = OffTargetConfig(classifier="x")
    p_source = np.array([0.1, 0.2, 0.9, 0.8, 0.3])
    p_edits = np.array([
        [0.1, 0.2, 0.1, 0.1, 0.3],  # devices removed, pacemaker with them (implied): clean
        [0.7, 0.2, 0.1, 0.8, 0.3],  # devices removed, cardiomegaly added: off-target
        [0.1, 0.45, 0.9, 0.8, 0.3],  # effusion moved by 0.25 (< 0.3, no flip) but the target did not: clean
        [0.1, 0.2, 0.9, 0.8, 0.45],  # nothing flips, sex moved by 0.15: clean
        [0.1, 0.2, 0.9, 0.8, 0.65],  # sex flips: off-target
    ])
    allowed = [rule.allowed_heads(spec) for spec in
               ["Support Devices=0", "Support Devices=0", "Pleural Effusion=1", "Cardiomegaly=1", "Cardiomegaly=1"]]
    assert allowed[0] == {"support_devices", "pacemaker"}
    wrong = off_target_heads(p_source, p_edits, HEADS, allowed, rule.max_shift)
    assert wrong == [[], ["cardiomegaly"], [], [], ["sex_female"]]
    big = off_target_heads(p_source, np.array([[0.1, 0.2, 0.1, 0.1, 0.45]]), HEADS, [allowed[0]], 0.1)
    assert big == [["sex_female"]]  # moved 0.15 > 0.1 without flipping


def test_the_filter_counts_off_target_edits_only_with_a_classifier():
    scores = {"s_clip": np.array([0.5, 0.5]), "off_target": np.array([0, 2])}
    assert FilterConfig().accept(scores).tolist() == [True, True]  # no classifier: off
    on = build_config(FilterConfig, {"off_target": {"classifier": "tiny"}})
    assert on.accept(scores).tolist() == [True, False]
    assert OffTargetConfig(heads={"sex": "sex_female"}).allowed_heads("sex=flip; Cardiomegaly=0") == {
        "sex_female", "cardiomegaly"}


def test_on_target_against_hand_made_probabilities():
    """require_target: the classifier must see the intervention: a yes/no value's head on that side of 0.5,
    a relative value a flipped decision of its own or implied heads."""
    import pytest

    heads = [*HEADS, "age_ge_40", "age_ge_60"]
    rule = OffTargetConfig(classifier="x", require_target=True, heads={"sex": "sex_female"},
                           implied={"Support Devices": ["pacemaker"], "age": ["age_ge_40", "age_ge_60"]})
    src = np.array([0.1, 0.8, 0.9, 0.8, 0.3, 0.9, 0.2])
    edit = lambda **moved: np.array([moved.get(h, p) for h, p in zip(heads, src, strict=True)])  # noqa: E731
    assert on_target(src, edit(support_devices=0.2), heads, "Support Devices=0", rule)
    assert not on_target(src, edit(support_devices=0.6, pacemaker=0.1), heads, "Support Devices=false", rule)
    assert on_target(src, edit(cardiomegaly=0.7), heads, "Cardiomegaly=1", rule)
    assert not on_target(src, edit(cardiomegaly=0.45), heads, "Cardiomegaly=true", rule)  # moved, not across
    assert on_target(src, edit(sex_female=0.6), heads, "sex=flip", rule)
    assert not on_target(src, edit(sex_female=0.49), heads, "sex=flip", rule)
    assert on_target(src, edit(age_ge_60=0.7), heads, "age=+20", rule)  # an implied head crossed
    assert not on_target(src, edit(age_ge_40=0.6), heads, "age=+20", rule)  # no decision changed
    both = edit(cardiomegaly=0.7, pleural_effusion=0.3)
    assert on_target(src, both, heads, "Cardiomegaly=1; Pleural Effusion=0", rule)
    assert not on_target(src, edit(cardiomegaly=0.7), heads, "Cardiomegaly=1; Pleural Effusion=0", rule)
    with pytest.raises(ValueError, match="no head for 'race'"):
        on_target(src, src, heads, "race=flip", rule)
    scores = {"s_clip": np.ones(3), "off_target": np.zeros(3), "on_target": np.array([1, 0, 1])}
    assert build_config(FilterConfig, {"off_target": {"classifier": "x"}}).accept(scores).tolist() == [True] * 3
    required = build_config(FilterConfig, {"off_target": {"classifier": "x", "require_target": True}})
    assert required.accept(scores).tolist() == [True, False, True]


def test_the_engine_scores_every_head_with_the_shipped_classifier(tmp_path):
    import json

    from prism_ray.data.storage import read_image, read_table
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
    from prism_ray.pipelines import augment
    from prism_ray.pipelines.counterfactuals import MethodEngine

    data = write_phantom_dataset(str(tmp_path / "d"), PhantomDatasetConfig(n_subjects=20, seed=4))
    row = [r for r in read_table(data.manifest_uri).to_pylist() if r["Support Devices"] == 1.0][0]
    config = build_config(augment.AugmentConfig, {
        "model": {"device": "cpu"}, "data": {"manifest": "unused.parquet"},
        "subgroups": [{"name": "g", "interventions": ["Support Devices=0"], "quota": 1}],
        "inversion": {"num_inference_steps": 4, "num_inner_steps": 1},
        "filter": {"off_target": {"classifier": "tiny", "require_target": True}},
        "output": str(tmp_path / "out"),
    })
    task = {"source_uri": "x", "source_prompt": "Chest X-ray showing Support Devices",
            "edits": [{"edit_prompt": "Normal chest X-ray with no significant findings", "intervention": "Support Devices=0",
                       "rank": 0}]}
    [item], errors = MethodEngine(config).counterfactuals([read_image(row["image_uri"])], [task])
    assert not errors
    source = json.loads(item.scores["classifier_source"][0])
    assert set(source) == set(HEADS) and source["support_devices"] > 0.5  # the shipped classifier sees the device
    heads = item.scores["off_target_heads"][0]
    assert item.scores["off_target"][0] == (len(heads.split(",")) if heads else 0)
    edit = json.loads(item.scores["classifier_edit"][0])
    assert item.scores["on_target"][0] == (edit["support_devices"] < 0.5)
    accepted = config.filter.accept({**item.scores, "s_clip": np.ones(1)})[0]
    assert accepted == (item.scores["off_target"][0] == 0 and item.scores["on_target"][0] == 1)
    # A head the classifier lacks is refused before any image is edited, naming the attribute.
    import pytest

    blind = config.model_copy(update={"subgroups": [config.subgroups[0].model_copy(update={"interventions": ["race=flip"]})]})
    with pytest.raises(ValueError, match="no head for 'race'"):
        MethodEngine(blind)


def test_off_target_edits_are_rejected_rows_with_their_heads(tmp_path):
    from test_augment_pipeline import FakeEngine, make_config, manifest_rows, run

    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset

    class SideEffects(FakeEngine):
        """Every third attempt (by rank) also adds cardiomegaly."""

        def counterfactuals(self, pixels, tasks):
            out, errors = super().counterfactuals(pixels, tasks)
            for item in out:
                bad = [e["rank"] % 3 == 0 for e in tasks[item.index]["edits"]]
                item.scores["s_clip"] = np.ones(len(bad))
                item.scores["off_target"] = np.array([int(b) for b in bad])
                item.scores["off_target_heads"] = np.array(["cardiomegaly" if b else "" for b in bad], dtype=object)
            return out, errors

    data = write_phantom_dataset(str(tmp_path / "d"), PhantomDatasetConfig(n_subjects=120, resolution=32, seed=3))
    config = make_config(data.manifest_uri, tmp_path / "out", quota=4, filter={"off_target": {"classifier": "tiny"}})
    summary = run(config, engine=SideEffects())
    rows = manifest_rows(tmp_path / "out")
    assert all(r["accepted"] == (r["attempt_rank"] % 3 != 0) for r in rows)
    assert all((r["off_target_heads"] == "cardiomegaly") == (r["attempt_rank"] % 3 == 0) for r in rows)
    assert all(info["accepted"] == 4 for info in summary["subgroups"].values())  # quotas count clean edits only
