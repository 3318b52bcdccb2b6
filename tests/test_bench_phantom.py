"""The phantom benchmark script runs end to end on the shipped family (tiny settings; numbers are its job)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "prism_ray" / "phantom" / "assets" / "tiny_phantom"
pytestmark = pytest.mark.skipif(not (SHIPPED / "classifier").exists(), reason="no shipped tiny_phantom family")


def test_bench_phantom_smoke(tmp_path):
    bench = load_benchmark("bench_phantom")
    out = tmp_path / "bench"
    argv = ["--per-intervention", "2", "--steps", "2", "--threads", "1", "--only", "remove_devices", "change_sex",
            "--fast-inversions", "direct", "--out", str(out)]
    assert bench.main(argv) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"remove_devices", "change_sex"}
    for entry in results.values():
        assert entry["sources"] == 2
        assert entry["true_cf_target_flip_rate"] >= 0.5  # the truth itself moves the target head
        for arm in ("no_edit", "ddim_swap", "true_vae", "blind_vae", "nti_swap", "full", "full_blend", "full_noise_blend", "shipped", "direct_p2p",
                    "direct_noise_blend", "direct_shipped"):
            assert 0.0 <= entry[arm]["error_to_true"] < 1.0 and 0.0 <= entry[arm]["target_flip_rate"] <= 1.0
    assert "male patient" in results["change_sex"]["example_prompts"][0]
    assert "female patient" in results["change_sex"]["example_prompts"][1]
    assert (out / "remove_devices.png").exists() and "| remove_devices" in (out / "results.md").read_text()


def test_sources_satisfy_the_intervention():
    bench = load_benchmark("bench_phantom")
    for iv in bench.INTERVENTIONS:
        subjects = bench.draw_sources(iv.applies, 5, seed=3)
        assert len(subjects) == 5 and all(iv.applies(a) for a, _ in subjects)
        assert all(2**31 <= s < 2**32 for _, s in subjects)
        source, edit = bench.captions(iv, subjects[0][0])
        assert source != edit


def test_bench_phantom_precision_parity_smoke(tmp_path):
    """--precision fastest: reference and fastest each invert and edit the same sources; the table counts
    agreeing decisions and compares the reconstruction errors (tiny settings: a run, not a verdict)."""
    bench = load_benchmark("bench_phantom")
    out = tmp_path / "precision"
    argv = ["--precision", "fastest", "--per-intervention", "2", "--steps", "2", "--threads", "1",
            "--only", "remove_devices", "--out", str(out)]
    assert bench.main(argv) == 0
    entry = json.loads((out / "precision.json").read_text())["results"]["remove_devices"]
    assert entry["sources"] == 2 and 0 <= entry["filter_equal"] <= 2 and 0 <= entry["target_flip_equal"] <= 2
    assert set(entry["accepted"]) == {"reference", "fastest"}
    assert 0.5 < entry["reconstruction_ratio"] < 2.0  # bf16 inner steps barely move the reconstruction
    assert entry["mean_abs_pixel_diff"] < 0.05
    assert "| remove_devices | " in (out / "precision.md").read_text()


def test_age_edits_target_the_next_bin_edge():
    from prism_ray.phantom.demographic import DEMOGRAPHIC_LABELS
    from prism_ray.phantom.render import PhantomAttributes

    bench = load_benchmark("bench_phantom")
    heads = list(DEMOGRAPHIC_LABELS)
    age_up = next(iv for iv in bench.DEMOGRAPHIC_INTERVENTIONS if iv.name == "age_up")
    subjects = [(PhantomAttributes(age=age), 0) for age in (20, 39, 40, 65, 79)]
    expected = ["age_ge_40", "age_ge_40", "age_ge_60", "age_ge_80", "age_ge_80"]
    assert [heads[k] for k in bench.target_index(age_up, subjects, heads)] == expected
    assert bench.family_kind(heads) == "demographic" and bench.family_kind(["cardiomegaly", "sex_female"]) == "base"
    # The truth adds 20 years to each subject; the MIMIC captions move one bin.
    assert age_up.applies(PhantomAttributes(age=79)) and not age_up.applies(PhantomAttributes(age=80))
    source, edit = bench.captions(age_up, PhantomAttributes(age=45, sex="female"), "demographic")
    assert source.startswith("Chest X-ray of 40-years old female") and edit.startswith("Chest X-ray of 60-years old female")
    flip = next(iv for iv in bench.DEMOGRAPHIC_INTERVENTIONS if iv.name == "flip_sex")
    assert "old male subject" in bench.captions(flip, PhantomAttributes(age=45, sex="female"), "demographic")[1]


def test_bench_phantom_on_a_demographic_family(tmp_path):
    """A demographic family (MIMIC captions, age-bin heads) switches the benchmark to its interventions."""
    from prism_ray.phantom.demographic import DemographicFamilyConfig, build_variant

    family = tmp_path / "family"
    build_variant(DemographicFamilyConfig(
        variant="control", out=str(family), steps=2, n_train=16, batch=4, threads=1, classifier_n_train=32,
        classifier_n_holdout=16, classifier_steps=2, classifier_batch=8, text_steps=2, text_n_train=32,
        text_n_holdout=16,
    ))
    bench = load_benchmark("bench_phantom")
    out = tmp_path / "bench"
    argv = ["--model", str(family), "--per-intervention", "2", "--steps", "2", "--threads", "1",
            "--only", "age_up", "flip_sex", "--out", str(out)]
    assert bench.main(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["family"] == "demographic" and set(saved["results"]) == {"age_up", "flip_sex"}
    for entry in saved["results"].values():
        assert "-years old" in entry["example_prompts"][0] and entry["example_prompts"][0] != entry["example_prompts"][1]
        assert 0.0 <= entry["full_noise_blend"]["target_flip_rate"] <= 1.0
        assert entry["source_to_true"] > 0  # the true counterfactual differs from the source


def test_bench_phantom_sweep_smoke(tmp_path):
    """--sweep: arms with the lung fields and the oracle region as the user's edit mask run beside the
    baselines, and every arm reports the error to the nearest plausible counterfactual (an addition has
    several, so it is at most the error to the seed's own)."""
    bench = load_benchmark("bench_phantom")
    out = tmp_path / "sweep"
    argv = ["--sweep", "--per-intervention", "2", "--steps", "2", "--threads", "1", "--only", "add_effusion",
            "--sweep-arms", "lungs_g3", "oracle_noise_g3", "--out", str(out)]
    assert bench.main(argv) == 0
    entry = json.loads((out / "sweep.json").read_text())["results"]["add_effusion"]
    assert entry["sources"] == 2
    assert entry["true_vae"]["error_to_true"] < entry["no_edit"]["error_to_true"]  # the decoder's floor
    for arm in ("no_edit", "ddim_swap", "true_vae", "lungs_g3", "oracle_noise_g3"):
        s = entry[arm]
        assert 0.0 < s["error_to_plausible"] <= s["error_to_true"] < 1.0
        assert 0.0 <= s["non_target_flip_beyond_truth_rate"] <= s["non_target_flip_rate"] <= 1.0
    assert "| add_effusion (n=2) | lungs_g3 |" in (out / "sweep.md").read_text()


def test_judged_rows_with_the_family_classifier_as_judge_keep_no_off_target_flip(tmp_path):
    """`--judge-seed`: every edit arm is filtered as the pipeline filters. With the scoring classifier itself as
    the judge (copied where the judge would be trained), no accepted edit may show an off-target flip, and
    with `require_target` every accepted edit flips its target."""
    import shutil

    bench = load_benchmark("bench_phantom")
    out = tmp_path / "bench"
    shutil.copytree(SHIPPED / "classifier", out / "judge_seed7")
    argv = ["--sweep", "--sweep-arms", "noise_g3", "--per-intervention", "3", "--steps", "3", "--threads", "1",
            "--only", "add_effusion", "--judge-seed", "7", "--out", str(out)]
    assert bench.main(argv) == 0
    entry = json.loads((out / "sweep.json").read_text())["results"]["add_effusion"]
    assert entry["judge_reads_alike"] == 1.0
    assert set(entry["judged"]) == {"ddim_swap", "noise_g3", "ddim_swap+target", "noise_g3+target"}
    for name, row in entry["judged"].items():
        assert 0.0 <= row["accepted_rate"] <= 1.0
        if row["accepted_rate"]:
            assert row["non_target_flip_rate"] == 0.0
            assert set(row["baselines_on_accepted"]) == {"no_edit", "ddim_swap", "true_vae", "blind_vae"}
            if name.endswith("+target"):  # the judge saw the effusion appear: so does the same classifier
                assert row["target_flip_rate"] == 1.0
    for arm in ("ddim_swap", "noise_g3"):
        assert entry["judged"][f"{arm}+target"]["accepted_rate"] <= entry["judged"][arm]["accepted_rate"]
    assert entry["blind_vae"]["target_flip_rate"] == 1.0  # a flawless drawing of the fluid reads as effusion
    assert "| add_effusion | noise_g3 |" in (out / "sweep.md").read_text()


@pytest.mark.slow
def test_independent_classifier_trains_the_family_heads_from_another_seed(tmp_path):
    from prism_ray.models.classifier import classifier_labels, load_classifier, predict_proba

    bench = load_benchmark("bench_phantom")
    family = load_classifier(SHIPPED / "classifier")
    heads = classifier_labels(family)
    judge = bench.independent_classifier("base", heads, 3, 64, tmp_path / "judge")
    assert classifier_labels(judge) == heads and (tmp_path / "judge" / "config.json").exists()
    iv = next(i for i in bench.INTERVENTIONS if i.name == "add_devices")
    cases = bench.make_cases(iv, bench.sources_for(iv, "base", 8, 5), heads, family, 64, draws=1)
    assert bench.judge_agreement(judge, cases) > 0.9  # a second reader of the same findings, not a copy
    assert not np.allclose(predict_proba(judge, cases.src), cases.p_src)
    again = bench.independent_classifier("base", heads, 3, 64, tmp_path / "judge")  # loaded, not retrained
    assert np.array_equal(predict_proba(again, cases.src), predict_proba(judge, cases.src))


def test_lower_lung_zones_hold_every_effusion_and_nothing_outside_the_lungs():
    from prism_ray.phantom.render import PhantomAttributes, attribute_mask, lung_mask

    bench = load_benchmark("bench_phantom")
    for seed in range(2**31 + 100, 2**31 + 130):
        lower, lungs = bench.lower_lung_zones(seed, 64), lung_mask(seed, 64)
        fluid = attribute_mask(PhantomAttributes(pleural_effusion=True), seed, "pleural_effusion", 64)
        assert fluid.any() and not (fluid & ~lower).any() and not (lower & ~lungs).any()
        assert 0.4 < lower.sum() / lungs.sum() < 0.75  # a zone, not the whole field
        left, right = bench.lower_lung_zones(seed, 64, -1), bench.lower_lung_zones(seed, 64, +1)
        assert left.any() and right.any() and not (left & right).any() and np.array_equal(left | right, lower)
        assert left.nonzero()[1].max() < right.nonzero()[1].min()
    assert {bench.coin_side(s) for s in range(2**31, 2**31 + 20)} == {-1, 1}
