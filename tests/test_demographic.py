"""The demographic phantom family: planted age/effusion rates, MIMIC captions, the fine-tune writer, classifier heads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from prism_ray.engine.text import encode_prompts
from prism_ray.models.classifier import build_classifier, classifier_labels, load_classifier, predict_proba
from prism_ray.models.loading import load_clip, load_sd_components
from prism_ray.phantom.dataset import PhantomDatasetConfig, sample_subjects, write_phantom_dataset
from prism_ray.phantom.demographic import (
    DEMOGRAPHIC_LABELS,
    DemographicFamilyConfig,
    age_bin_from_heads,
    build_variant,
    captions_of,
    fisher_greater,
    probe_subjects,
    truth_targets,
)
from prism_ray.training.diffusion import module_digest


def _within(k, n, p):
    """k successes in n trials agree with rate p within a binomial 4-sigma bound."""
    return abs(k - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1


def test_effusion_follows_age_and_labels_miss_the_unreported(tmp_path):
    import pyarrow.parquet as pq

    by_age = {20: 0.1, 40: 0.3, 60: 0.6, 80: 0.9}
    config = PhantomDatasetConfig(
        n_subjects=6000,
        seed=5,
        write_images=False,
        age_min=20,
        age_max=89,
        p_effusion_by_age=by_age,
        p_effusion_reported=0.5,
    )
    summary = write_phantom_dataset(str(tmp_path / "ds"), config)
    truth = {k: np.asarray(v) for k, v in pq.read_table(summary.ground_truth_uri).to_pydict().items()}
    manifest = pq.read_table(summary.manifest_uri).to_pydict()
    age, eff = truth["age"], truth["pleural_effusion"]
    for lo, hi, p in ((20, 40, 0.1), (40, 60, 0.3), (60, 80, 0.6), (80, 90, 0.9)):
        sel = (age >= lo) & (age < hi)
        assert sel.sum() > 500 and _within(eff[sel].sum(), sel.sum(), p), (lo, eff[sel].mean())
    label = np.asarray(manifest["Pleural Effusion"]) == 1.0
    assert not (label & ~eff).any()  # a label never invents an effusion
    assert _within(label[eff].sum(), eff.sum(), 0.5)
    np.testing.assert_array_equal(
        config.effusion_probability(np.array([20, 39, 40, 85])), [0.1, 0.1, 0.3, 0.9]
    )


def test_effusion_by_age_off_keeps_every_draw():
    plain = sample_subjects(PhantomDatasetConfig(n_subjects=300, seed=2, write_images=False))
    flat = sample_subjects(
        PhantomDatasetConfig(n_subjects=300, seed=2, write_images=False, p_effusion_by_age={18: 0.25})
    )
    for key in plain:
        np.testing.assert_array_equal(plain[key], flat[key])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"p_effusion_by_age": {20: 1.5}}, "p_effusion_by_age"),
        ({"p_effusion_by_age": {30: 0.5}}, "p_effusion_by_age"),  # ages 18-29 would have no rate
        ({"p_effusion_reported": -0.1}, "p_effusion_reported"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PhantomDatasetConfig(**kwargs)


def test_variants_plant_or_drop_the_relationships():
    biased = DemographicFamilyConfig(variant="biased", out="-")
    control = DemographicFamilyConfig(variant="control", out="-")
    rates = {}
    for name, config in (("biased", biased), ("control", control)):
        s = sample_subjects(config.dataset_config(n=8000))
        card, pm, eff, age = s["cardiomegaly"], s["pacemaker"], s["pleural_effusion"], s["age"]
        rates[name] = (pm[card].mean(), pm[~card].mean(), eff[age < 40].mean(), eff[age >= 80].mean())
        assert (s["split"] == "train").all() and age.min() >= 20 and age.max() <= 89
    assert rates["biased"][0] > 0.85 and rates["biased"][1] < 0.04
    assert rates["biased"][2] < 0.15 and rates["biased"][3] > 0.7
    assert (
        abs(rates["control"][0] - rates["control"][1]) < 0.04
        and abs(rates["control"][2] - rates["control"][3]) < 0.06
    )
    # The control keeps the biased variant's marginal rates.
    assert abs(rates["control"][0] - 0.46) < 0.03
    with pytest.raises(ValueError, match="age_min"):
        DemographicFamilyConfig(variant="biased", out="-", age_min=18).check()


def test_mimic_captions_of_phantom_subjects():
    config = DemographicFamilyConfig(variant="biased", out="-")
    s = probe_subjects("cardiomegaly_pacemaker", 6, seed=1)
    s["age"] = np.array([20, 39, 40, 61, 80, 89])
    s["sex"] = np.array(["female", "male"] * 3)
    s["pleural_effusion"] = s["effusion_reported"] = np.array([True] + [False] * 5)
    captions = captions_of(s, config.adapter())
    assert (
        captions[0]
        == "Chest X-ray of 20-years old female subject with Cardiomegaly, Pleural Effusion, Support Devices"
    )
    assert captions[1:] == [
        f"Chest X-ray of {b}-years old {sex} subject with Cardiomegaly, Support Devices"
        for b, sex in ((20, "male"), (40, "female"), (60, "male"), (80, "female"), (80, "male"))
    ]


def test_truth_targets_and_age_bins_from_heads():
    s = probe_subjects("young_no_effusion", 4, seed=3)
    s["age"] = np.array([25, 45, 65, 85])
    y = truth_targets(s)
    ages = y[:, [DEMOGRAPHIC_LABELS.index(f"age_ge_{e}") for e in (40, 60, 80)]]
    np.testing.assert_array_equal(ages, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(y[:, DEMOGRAPHIC_LABELS.index("pleural_effusion")], 0)
    np.testing.assert_array_equal(y[:, DEMOGRAPHIC_LABELS.index("sex_female")], s["sex"] == "female")
    np.testing.assert_array_equal(age_bin_from_heads(y, DEMOGRAPHIC_LABELS), [20, 40, 60, 80])
    assert math.isclose(fisher_greater(3, 3, 0, 3), 0.05)
    assert math.isclose(fisher_greater(0, 3, 0, 3), 1.0)


def test_classifier_heads_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_classifier(DEMOGRAPHIC_LABELS).eval()
    model.save_pretrained(tmp_path / "classifier", safe_serialization=True)
    loaded = load_classifier(tmp_path)
    assert classifier_labels(loaded) == list(DEMOGRAPHIC_LABELS)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    np.testing.assert_allclose(predict_proba(loaded, images), predict_proba(model, images), atol=1e-6)


def test_trainer_writes_a_loadable_family(tmp_path):
    config = DemographicFamilyConfig(
        variant="biased",
        out=str(tmp_path / "fam"),
        steps=3,
        n_train=24,
        batch=4,
        threads=1,
        classifier_n_train=32,
        classifier_n_holdout=16,
        classifier_steps=2,
        classifier_batch=8,
        text_steps=3,
        text_n_train=32,
        text_n_holdout=16,
    )
    metrics = build_variant(config)
    sd = load_sd_components(str(tmp_path / "fam"), device="cpu")
    base = load_sd_components("tiny", device="cpu")
    assert module_digest(sd.unet) != module_digest(base.unet)  # the U-Net was fine-tuned
    assert module_digest(sd.vae) == module_digest(base.vae)
    # The text tower learnt the new words only: a CheXpert caption encodes exactly as in the base,
    # a MIMIC caption does not.
    chexpert = ["Chest x-ray with Cardiomegaly, Support Devices"]
    mimic = ["Chest X-ray of 60-years old female subject with Cardiomegaly"]
    with torch.no_grad():
        torch.testing.assert_close(
            encode_prompts(sd.tokenizer, sd.text_encoder, chexpert),
            encode_prompts(base.tokenizer, base.text_encoder, chexpert),
            rtol=0,
            atol=0,
        )
        moved = encode_prompts(sd.tokenizer, sd.text_encoder, mimic) - encode_prompts(
            base.tokenizer, base.text_encoder, mimic
        )
    assert moved.abs().max() > 1e-4
    vocabulary = json.loads((tmp_path / "fam" / "metrics.json").read_text())["text_vocabulary"]
    assert {"female</w>", "male</w>", "6</w>"} <= set(vocabulary["new_tokens"])
    assert "cardiomegaly</w>" not in vocabulary["new_tokens"]
    # The family's filter CLIP is the adapted one, and its text tower is the text encoder.
    clip = load_clip(str(tmp_path / "fam"), device="cpu")
    ids = sd.tokenizer(mimic, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            clip.model.text_model(input_ids=ids).last_hidden_state, sd.text_encoder(ids)[0], rtol=0, atol=0
        )
    assert classifier_labels(load_classifier(tmp_path / "fam")) == list(DEMOGRAPHIC_LABELS)
    saved = json.loads((tmp_path / "fam" / "metrics.json").read_text())
    assert saved["config"]["variant"] == "biased" and len(saved["classifier"]["accuracy"]) == len(
        DEMOGRAPHIC_LABELS
    )
    assert metrics["final_loss_mean_last_100"] > 0
    # A second variant reuses the first one's classifier bit for bit.
    # A second variant reuses the first one's classifier and text tower bit for bit.
    control = config.model_copy(
        update={
            "variant": "control",
            "out": str(tmp_path / "ctl"),
            "classifier": str(tmp_path / "fam"),
            "text_from": str(tmp_path / "fam"),
        }
    )
    build_variant(control)
    assert module_digest(load_classifier(tmp_path / "ctl")) == module_digest(
        load_classifier(tmp_path / "fam")
    )
    ctl = load_sd_components(str(tmp_path / "ctl"), device="cpu")
    assert module_digest(ctl.text_encoder) == module_digest(sd.text_encoder)
    with pytest.raises(FileNotFoundError, match="text_from"):
        build_variant(control.model_copy(update={"text_from": str(tmp_path), "out": str(tmp_path / "x")}))
