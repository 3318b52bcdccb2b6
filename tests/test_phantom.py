"""Phantom renderer, true counterfactuals and the phantom dataset writer."""

import io
import math
import os

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prism_ray.data.captions import CHEXPERT_LABELS
from prism_ray.data.contact_sheet import save_contact_sheet
from prism_ray.phantom.dataset import PhantomDatasetConfig, subject_attributes, write_phantom_dataset
from prism_ray.phantom.render import (
    PhantomAttributes,
    attribute_mask,
    lung_mask,
    render_phantom,
    true_counterfactual,
)

# (attribute whose mask must contain the change, intervention, source attributes)
INTERVENTIONS = [
    ("cardiomegaly", {"cardiomegaly": True}, PhantomAttributes()),
    ("cardiomegaly", {"cardiomegaly": False}, PhantomAttributes(cardiomegaly=True, pleural_effusion=True)),
    ("pleural_effusion", {"pleural_effusion": True}, PhantomAttributes(cardiomegaly=True)),
    ("pacemaker", {"pacemaker": True}, PhantomAttributes(devices={"ecg"})),
    ("tube", {"tube": True}, PhantomAttributes(devices={"pacemaker"})),
    ("ecg", {"ecg": False}, PhantomAttributes(devices={"ecg", "tube", "pacemaker"})),
    ("devices", {"devices": frozenset()}, PhantomAttributes(devices={"ecg", "tube", "pacemaker"})),
    ("sex", {"sex": "female"}, PhantomAttributes(sex="male")),
    ("sex", {"sex": "male"}, PhantomAttributes(sex="female", cardiomegaly=True)),
    ("age", {"age": 85}, PhantomAttributes(age=25)),
]


def test_same_seed_is_bitwise_identical_and_seeds_differ():
    attrs = PhantomAttributes(cardiomegaly=True, devices={"pacemaker"}, sex="female", age=70)
    a, b = render_phantom(attrs, 7), render_phantom(attrs, 7)
    assert a.dtype == np.uint8 and a.shape == (64, 64)
    np.testing.assert_array_equal(a, b)
    c = render_phantom(attrs, 8)
    assert np.mean(a != c) > 0.5  # different anatomy and noise


@pytest.mark.parametrize("resolution", [64, 128, 256])
def test_resolutions_render_a_chest(resolution):
    img = render_phantom(PhantomAttributes(), 3, resolution)
    assert img.shape == (resolution, resolution)
    h = resolution
    # Dark lung fields inside a brighter mediastinum, dark air outside the body at the sides.
    lungs = np.concatenate([img[int(0.3 * h) : int(0.5 * h), int(0.2 * h) : int(0.3 * h)].ravel(),
                            img[int(0.3 * h) : int(0.5 * h), int(0.7 * h) : int(0.8 * h)].ravel()])
    mediastinum = img[int(0.3 * h) : int(0.5 * h), int(0.47 * h) : int(0.53 * h)]
    assert mediastinum.mean() > lungs.mean() + 60
    assert img[int(0.5 * h), :2].mean() < 60


@pytest.mark.parametrize("attribute,intervention,source", INTERVENTIONS)
@pytest.mark.parametrize("seed", [0, 11])
def test_true_counterfactual_changes_only_inside_the_attribute_mask(attribute, intervention, source, seed):
    for resolution in (64, 128):
        before = render_phantom(source, seed, resolution)
        after = true_counterfactual(source, seed, intervention, resolution)
        mask = attribute_mask(source, seed, attribute, resolution)
        changed = before != after
        assert not changed[~mask].any(), f"{attribute}: {changed[~mask].sum()} pixels changed outside the mask"
        assert changed[mask].sum() >= 0.01 * resolution**2 / 64, f"{attribute}: too few pixels changed"
        assert mask.mean() < (0.75 if attribute == "age" else 0.4)  # a region, not the whole image


def test_cardiomegaly_enlarges_the_heart_and_age_darkens_bone():
    small = attribute_mask(PhantomAttributes(), 4, "cardiomegaly", 128)
    base = render_phantom(PhantomAttributes(), 4, 128).astype(int)
    big = render_phantom(PhantomAttributes(cardiomegaly=True), 4, 128).astype(int)
    assert (big - base)[small].sum() > 0 and (big - base)[small].mean() > 5  # brighter: heart fills the lung
    bone = attribute_mask(PhantomAttributes(), 4, "age", 128)
    young = render_phantom(PhantomAttributes(age=20), 4, 128).astype(int)
    old = render_phantom(PhantomAttributes(age=90), 4, 128).astype(int)
    assert (young - old)[bone].mean() > 3


def test_intervention_validation():
    with pytest.raises(ValueError, match="unknown attribute"):
        true_counterfactual(PhantomAttributes(), 0, {"race": "x"})
    with pytest.raises(ValueError, match="age"):
        true_counterfactual(PhantomAttributes(), 0, {"age": -3})
    with pytest.raises(ValueError, match="devices"):
        PhantomAttributes(devices={"stent"})
    with pytest.raises(ValueError, match="attribute"):
        attribute_mask(PhantomAttributes(), 0, "race")


def test_relative_interventions_act_on_the_subject():
    from prism_ray.phantom.truth import phantom_intervention

    old_woman = PhantomAttributes(sex="female", age=70)
    assert phantom_intervention("sex=flip", old_woman) == {"sex": "male"}
    assert phantom_intervention("sex=flip", PhantomAttributes(sex="male")) == {"sex": "female"}
    assert phantom_intervention("age=+20", old_woman) == {"age": 90}
    assert phantom_intervention("age=-20", old_woman) == {"age": 50}
    assert phantom_intervention("age=+20", PhantomAttributes(age=110)) == {"age": 120}  # the renderer's limit
    assert phantom_intervention("age=80; Cardiomegaly=0") == {"age": 80, "cardiomegaly": False}
    with pytest.raises(ValueError, match="relative"):
        phantom_intervention("age=+20")  # nothing to add 20 years to
    with pytest.raises(ValueError, match="race"):
        phantom_intervention("race=asian", old_woman)


def test_redraw_moves_only_the_hidden_attribute():
    """`redraw` takes one attribute's placement from another seed: a phantom without it renders
    unchanged, and with it the pixels that change are only those of the old or the new device."""
    seed, donor = 2**31 + 11, 2**31 + 12
    plain = PhantomAttributes(cardiomegaly=True, pleural_effusion=True)
    assert np.array_equal(render_phantom(plain, seed, 64, redraw={"pacemaker": donor}), render_phantom(plain, seed, 64))
    paced = plain.intervene({"pacemaker": True})
    own, moved = render_phantom(paced, seed, 64), render_phantom(paced, seed, 64, redraw={"pacemaker": donor})
    source = render_phantom(plain, seed, 64)
    changed = own != moved
    assert changed.any()
    assert not (changed & (own == source) & (moved == source)).any()
    with pytest.raises(ValueError, match="'cardiomegaly' has no hidden draws"):
        render_phantom(plain, seed, 64, redraw={"cardiomegaly": donor})


def test_plausible_counterfactuals():
    from prism_ray.phantom.truth import (
        phantom_intervention,
        plausible_counterfactuals,
        plausible_interventions,
    )

    seed = 2**31 + 21
    bare = PhantomAttributes(age=55)
    sick = PhantomAttributes(cardiomegaly=True, pleural_effusion=True, devices=frozenset({"tube"}), age=55)
    # A removal, or a change the source already shows the geometry of, has one counterfactual.
    for attrs, spec in ((sick, "Support Devices=false"), (sick, "Pleural Effusion=false"), (bare, "Cardiomegaly=true")):
        only = plausible_counterfactuals(attrs, seed, spec, draws=4)
        assert only.shape == (1, 64, 64)
        assert np.array_equal(only[0], true_counterfactual(attrs, seed, phantom_intervention(spec, attrs)))
    # "Support Devices" is true of any non-empty set of kinds, each placed where another subject's would be.
    changes = plausible_interventions("Support Devices=true", bare)
    assert changes[0] == phantom_intervention("Support Devices=true", bare) and len(changes) == 7
    assert {c["devices"] for c in changes} == {frozenset(s) for s in
                                              (("pacemaker",), ("tube",), ("ecg",), ("pacemaker", "tube"),
                                               ("pacemaker", "ecg"), ("tube", "ecg"), ("pacemaker", "tube", "ecg"))}
    assert all("tube" in c["devices"] for c in plausible_interventions("Support Devices=true", sick))
    cfs = plausible_counterfactuals(bare, seed, "Support Devices=true", draws=3)
    assert cfs.shape == (1 + 7 * 3, 64, 64)
    assert np.array_equal(cfs[0], true_counterfactual(bare, seed, phantom_intervention("Support Devices=true", bare)))
    assert len({c.tobytes() for c in cfs}) == len(cfs)
    assert np.array_equal(cfs, plausible_counterfactuals(bare, seed, "Support Devices=true", draws=3))
    # Added fluid: its side and height are redrawn; the rest of the subject stays its own.
    fluid = plausible_counterfactuals(bare, seed, "Pleural Effusion=true", draws=8)
    assert fluid.shape == (9, 64, 64)
    source = render_phantom(bare, seed, 64)
    assert all((c != source).any() for c in fluid)
    assert len({c.tobytes() for c in fluid}) > 2
    # Wherever the fluid is drawn, it stays inside the subject's lung fields.
    lungs = lung_mask(seed, 64)
    assert lungs.mean() > 0.15 and all(((c != source) & ~lungs).sum() == 0 for c in fluid)


def test_blind_counterfactual_draws_what_the_source_cannot_show():
    """A flawless edit that cannot see the hidden draws: a removal or a heart change is the true
    counterfactual itself; an addition changes only the drawn structure's pixels, lands somewhere the
    truth set did not draw, and stays inside the lungs for fluid."""
    from prism_ray.phantom.truth import blind_counterfactual, phantom_intervention, plausible_counterfactuals

    seed = 2**31 + 31
    bare = PhantomAttributes(age=60)
    sick = PhantomAttributes(cardiomegaly=True, pleural_effusion=True, devices=frozenset({"ecg"}), age=60)
    for attrs, spec in ((sick, "Support Devices=false"), (sick, "Pleural Effusion=false"), (bare, "Cardiomegaly=true"),
                        (bare, "age=+20")):
        truth = true_counterfactual(attrs, seed, phantom_intervention(spec, attrs))
        assert np.array_equal(blind_counterfactual(attrs, seed, spec), truth)
    source = render_phantom(bare, seed, 64)
    for spec in ("Support Devices=true", "Pleural Effusion=true"):
        truth = true_counterfactual(bare, seed, phantom_intervention(spec, bare))
        blind = blind_counterfactual(bare, seed, spec)
        assert (blind != truth).any() and (blind != source).any()
        assert np.array_equal(blind, blind_counterfactual(bare, seed, spec))
        assert not np.array_equal(blind, blind_counterfactual(bare, seed, spec, sample_seed=2))
        # Only the structure's pixels differ from the truth: where neither draw put it, both are the source.
        assert not ((blind != truth) & (blind == source) & (truth == source)).any()
        assert all((blind != p).any() for p in plausible_counterfactuals(bare, seed, spec, draws=8))
    fluid = blind_counterfactual(bare, seed, "Pleural Effusion=true")
    assert ((fluid != source) & ~lung_mask(seed, 64)).sum() == 0


def test_contact_sheet(tmp_path):
    imgs = [render_phantom(PhantomAttributes(cardiomegaly=bool(i % 2)), i, 64) for i in range(6)]
    path = str(tmp_path / "sheet.png")
    save_contact_sheet(imgs, path, ncols=3, labels=[f"s{i}" for i in range(6)], upscale=2)
    sheet = np.asarray(Image.open(path))
    assert sheet.ndim == 2 and sheet.shape[1] > 3 * 128 and sheet.shape[0] > 2 * 128


def _read_parquet(uri):
    with fsspec.open(uri, "rb") as f:
        return pq.read_table(f)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_write_dataset(tmp_path, where):
    out = str(tmp_path / "ds") if where == "local" else f"memory://phantom-test-{os.getpid()}"
    config = PhantomDatasetConfig(n_subjects=40, resolution=64, seed=3)
    summary = write_phantom_dataset(out, config)
    manifest = _read_parquet(summary.manifest_uri)
    truth = _read_parquet(summary.ground_truth_uri)
    assert manifest.num_rows == truth.num_rows == 40
    assert manifest.column_names == ["image_uri", "subject_id", "seed", "split", *CHEXPERT_LABELS, "Sex", "Age"]
    assert str(manifest.schema.field("Age").type) == "int64" and str(manifest.schema.field("seed").type) == "int64"
    for name in CHEXPERT_LABELS:
        assert str(manifest.schema.field(name).type) == "double"
        assert set(manifest.column(name).to_pylist()) <= {0.0, 1.0}
    m, t = manifest.to_pydict(), truth.to_pydict()
    assert set(m["Sex"]) <= {"Male", "Female"} and set(m["split"]) <= {"train", "valid", "test"}
    assert sum(summary.split_counts.values()) == 40
    for col in ("pacemaker", "tube", "ecg", "cardiomegaly", "pleural_effusion", "sex", "age"):
        assert col in t
    for i in range(40):
        devices = t["pacemaker"][i] or t["tube"][i] or t["ecg"][i]
        assert m["Support Devices"][i] == float(devices)
        assert m["Cardiomegaly"][i] == float(t["cardiomegaly"][i])
        assert m["Pleural Effusion"][i] == float(t["pleural_effusion"][i])
        assert m["No Finding"][i] == float(not (t["cardiomegaly"][i] or t["pleural_effusion"][i]))
        for name in ("Edema", "Fracture", "Pneumothorax"):
            assert m[name][i] == 0.0
    if where == "local":
        assert all(os.path.isabs(u) for u in m["image_uri"])
    else:
        assert all(u.startswith("memory://") for u in m["image_uri"])
    # Images decode to the right size and equal a fresh render of the ground truth.
    for i in (0, 17, 39):
        with fsspec.open(m["image_uri"][i], "rb") as f:
            img = np.asarray(Image.open(io.BytesIO(f.read())))
        assert img.shape == (64, 64) and img.dtype == np.uint8
        row = {k: v[i] for k, v in t.items()}
        np.testing.assert_array_equal(img, render_phantom(subject_attributes(row), row["seed"], 64))
    if where == "memory":
        fsspec.filesystem("memory").rm(out.removeprefix("memory://"), recursive=True)


def _within(k, n, p):
    """k successes in n trials agree with rate p within a binomial 4-sigma bound."""
    return abs(k - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1


def test_planted_bias_rates(tmp_path):
    config = PhantomDatasetConfig(
        n_subjects=2000, seed=1, write_images=False,
        p_cardiomegaly=0.3, p_effusion=0.3,
        p_pacemaker_given_cardiomegaly=0.6, p_pacemaker_given_no_cardiomegaly=0.05,
        p_other_device=0.3, p_other_device_given_effusion_train=0.85, p_other_device_given_no_effusion_train=0.1,
    )
    summary = write_phantom_dataset(str(tmp_path / "ds"), config)
    t = {k: np.asarray(v) for k, v in _read_parquet(summary.ground_truth_uri).to_pydict().items()}
    assert not os.path.exists(tmp_path / "ds" / "images")
    card, eff, pm = t["cardiomegaly"], t["pleural_effusion"], t["pacemaker"]
    other = t["tube"] | t["ecg"]
    train = t["split"] == "train"
    checks = [
        (pm[card], 0.6), (pm[~card], 0.05),  # (a) hidden relationship
        (other[train & eff], 0.85), (other[train & ~eff], 0.1),  # (b) shortcut, train only
        (other[~train & eff], 0.3), (other[~train & ~eff], 0.3),
        (card, 0.3), (eff, 0.3), (t["sex"] == "female", 0.5),
    ]
    for values, p in checks:
        assert _within(values.sum(), values.size, p), (values.mean(), p)
    assert t["age"].min() >= 18 and t["age"].max() <= 90
    assert abs(train.mean() - 0.7) < 1e-3


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"p_cardiomegaly": 1.5}, "p_cardiomegaly"),
        ({"n_subjects": 0}, "n_subjects"),
        ({"age_min": 60, "age_max": 30}, "age_max"),
        ({"split_fractions": {"train": 0.5, "valid": 0.1, "test": 0.1}}, "split_fractions"),
        ({"other_device_mix": {"tube": 0.5, "ecg": 0.5, "both": 0.5}}, "other_device_mix"),
        ({"p_pacemaker_given_cardiomegaly": -0.1}, "p_pacemaker_given_cardiomegaly"),
        ({"prevalence": 0.1}, "prevalence"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PhantomDatasetConfig(**kwargs)


def test_effusion_severity_shrinks_the_fluid_inside_its_full_region():
    """Severity 1 is the frank effusion; lower severities change fewer pixels, all inside severity 1's region,
    and still change some (a blunted costophrenic angle); the true counterfactual (effusion removed) is the
    same image at every severity."""
    from prism_ray.phantom.render import PhantomAttributes, attribute_mask, render_phantom

    for seed in (3, 11, 29):
        clean = render_phantom(PhantomAttributes(), seed, 64).astype(int)
        full = attribute_mask(PhantomAttributes(pleural_effusion=True), seed, "pleural_effusion", 64)
        changed = []
        for severity in (1.0, 0.5, 0.3, 0.15):
            attrs = PhantomAttributes(pleural_effusion=True, effusion_severity=severity)
            diff = np.abs(render_phantom(attrs, seed, 64).astype(int) - clean)
            assert diff[~full].max() == 0  # nothing outside the frank effusion's region
            assert np.array_equal(render_phantom(attrs.intervene({"pleural_effusion": False}), seed, 64), clean)
            changed.append(int((diff > 0).sum()))
        assert changed == sorted(changed, reverse=True) and changed[-1] > 0, changed


def test_dataset_severity_is_drawn_last_and_recorded_in_the_ground_truth(tmp_path):
    import pyarrow.parquet as pq

    from prism_ray.phantom.dataset import PhantomDatasetConfig, sample_subjects, write_phantom_dataset

    plain = sample_subjects(PhantomDatasetConfig(n_subjects=50, seed=2))
    subtle = sample_subjects(PhantomDatasetConfig(n_subjects=50, seed=2, effusion_severity=(0.15, 0.35)))
    for key in plain:  # the knob leaves every other draw as it was
        if key != "effusion_severity":
            assert np.array_equal(plain[key], subtle[key]), key
    assert np.all(plain["effusion_severity"] == 1.0)
    assert 0.15 <= subtle["effusion_severity"].min() and subtle["effusion_severity"].max() <= 0.35
    summary = write_phantom_dataset(str(tmp_path), PhantomDatasetConfig(n_subjects=6, seed=2, effusion_severity=(0.2, 0.2)))
    assert set(pq.read_table(summary.ground_truth_uri).column("effusion_severity").to_pylist()) == {0.2}
    with pytest.raises(ValueError, match="effusion_severity"):
        PhantomDatasetConfig(effusion_severity=(0.5, 0.2))
