"""Score counterfactuals of phantoms against their true counterfactuals (same seed, one attribute changed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism_ray.data.captions import parse_interventions
from prism_ray.phantom.dataset import subject_attributes
from prism_ray.phantom.render import (
    DEVICE_KINDS,
    HIDDEN_DRAWS,
    PhantomAttributes,
    attribute_mask,
    render_phantom,
    shows,
    true_counterfactual,
)

# CheXpert label intervention -> phantom attribute change (value, the subject's attributes). Removing
# "Support Devices" removes every device kind, as a radiologist's "without support devices" would.
# Relative values act on the subject: `sex=flip` swaps the sex, `age=+20` adds 20 years (the true
# counterfactual's age; a binned caption moves one bin).
LABEL_TO_PHANTOM = {
    "Support Devices": lambda v, a: {"devices": frozenset({"pacemaker", "tube", "ecg"}) if v else frozenset()},
    "Cardiomegaly": lambda v, a: {"cardiomegaly": bool(v)},
    "Pleural Effusion": lambda v, a: {"pleural_effusion": bool(v)},
    "sex": lambda v, a: {"sex": _flip_sex(a.sex) if str(v).lower() == "flip" else str(v)},
    "age": lambda v, a: {"age": min(120, max(0, a.age + int(v))) if isinstance(v, str) else int(v)},
}


def _flip_sex(sex: str) -> str:
    return {"female": "male", "male": "female"}[sex]


# Classifier head that should change for each intervened label (its "target").
TARGET_HEAD = {
    "Support Devices": "support_devices",
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "pleural_effusion",
    "sex": "sex_female",
}


def phantom_intervention(spec: str, attrs: PhantomAttributes | None = None) -> dict:
    """'Support Devices=false' -> {'devices': frozenset()}; several interventions merge.

    Relative interventions (`sex=flip`, `age=+20`) need the subject's `attrs`.
    """
    from prism_ray.data.captions import is_relative

    change: dict = {}
    for item in parse_interventions(spec):
        if item.attribute not in LABEL_TO_PHANTOM:
            raise ValueError(f"intervention '{item}': no phantom counterpart for '{item.attribute}'")
        if is_relative(item) and attrs is None:
            raise ValueError(f"intervention '{item}' is relative: it needs the subject's attributes")
        change.update(LABEL_TO_PHANTOM[item.attribute](item.value, attrs))
    return change


def plausible_interventions(spec: str, attrs: PhantomAttributes) -> list[dict]:
    """Every phantom change the labels in `spec` are equally true of. "Support Devices=true" holds for
    any non-empty set of device kinds (kept: the subject's own devices), every other label for one change.
    The first item is `phantom_intervention`'s own choice."""
    own = phantom_intervention(spec, attrs)
    out = [own]
    if "devices" in own and own["devices"]:
        kept = attrs.devices
        others = [k for k in DEVICE_KINDS if k not in kept]
        for n in range(1 << len(others)):
            added = {k for j, k in enumerate(others) if n >> j & 1}
            change = {**own, "devices": frozenset(kept | added)}
            if change["devices"] and change not in out:
                out.append(change)
    return out


def plausible_counterfactuals(
    attrs: PhantomAttributes, seed: int, spec: str, draws: int = 16, resolution: int = 64, sample_seed: int = 0
) -> np.ndarray:
    """(M, R, R) uint8: the true counterfactual (first) and the others equally true of this source.

    Adding a finding the source does not show leaves part of its counterfactual unknowable from the
    source: which devices "Support Devices" means (`plausible_interventions`), where they sit, which
    side the fluid fills (`render.HIDDEN_DRAWS`). Those are redrawn `draws` times per plausible change,
    from other subjects' seeds; everything the source shows stays its own. A removal, or any change
    whose effect the source already shows (a larger heart, older bones), has one counterfactual (M = 1).
    """
    rng = np.random.default_rng([sample_seed, int(seed)])
    changes = plausible_interventions(spec, attrs)
    out = [true_counterfactual(attrs, seed, changes[0], resolution)]
    for k, change in enumerate(changes):
        target = attrs.intervene(change)
        hidden = [a for a in HIDDEN_DRAWS if shows(target, a) and not shows(attrs, a)]
        if not hidden:
            if k:
                out.append(render_phantom(target, seed, resolution))
            continue
        for _ in range(draws):
            donors = rng.integers(0, 2**31, size=len(hidden))
            out.append(render_phantom(target, seed, resolution, redraw=dict(zip(hidden, map(int, donors), strict=True))))
    return np.stack(out)


def blind_counterfactual(
    attrs: PhantomAttributes, seed: int, spec: str, resolution: int = 64, sample_seed: int = 1
) -> np.ndarray:
    """(R, R) uint8: the intervention drawn perfectly by a painter who cannot see the hidden draws.

    The intervention's own change (`phantom_intervention`), rendered with the source's seed, except that
    every hidden draw the change reveals (`render.HIDDEN_DRAWS`: device placement, fluid side and
    height, breast shadow) is taken from another subject picked by `sample_seed`. An edit sees only the
    source, so through the same decoder this is the error to the true counterfactual that a flawless
    edit should expect. A change that reveals no hidden draw (a removal, cardiomegaly, age) gives the
    true counterfactual itself. Its donors come from a stream of their own, so the image is not one of
    `plausible_counterfactuals`' draws.
    """
    target = attrs.intervene(phantom_intervention(spec, attrs))
    hidden = [a for a in HIDDEN_DRAWS if shows(target, a) and not shows(attrs, a)]
    rng = np.random.default_rng([sample_seed, int(seed), 1])
    redraw = {a: int(rng.integers(0, 2**31)) for a in hidden}
    return render_phantom(target, seed, resolution, redraw=redraw)


def true_cf_for(gt_row: dict, spec: str, resolution: int) -> np.ndarray:
    """The true counterfactual (uint8 (R, R)) of a ground-truth row under an intervention."""
    attrs: PhantomAttributes = subject_attributes(gt_row)
    return true_counterfactual(attrs, int(gt_row["seed"]), phantom_intervention(spec, attrs), resolution=resolution)


def region_for(gt_row: dict, spec: str, resolution: int) -> np.ndarray:
    """Boolean (R, R): where the intervention can change this subject's pixels, the union of the masks
    (`render.attribute_mask`) of the phantom attributes it changes ("Support Devices" -> every device's
    place; "Pleural Effusion" -> the fluid's). Outside it the true counterfactual equals the source."""
    attrs: PhantomAttributes = subject_attributes(gt_row)
    seed = int(gt_row["seed"])
    masks = [attribute_mask(attrs, seed, name, resolution) for name in phantom_intervention(spec, attrs)]
    return np.logical_or.reduce(masks)


def gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image[..., 0]


def vae_round_trip(vae, images: list[np.ndarray] | np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (N, R, R): gray images through a VAE alone (encode to the posterior mean, decode), no edit.

    Applied to the true counterfactuals it gives the **decoder floor**: the closest any edit can come to
    them through this decoder (bench_phantom's `true_vae` row); applied to the sources, what the round
    trip alone changes.
    """
    from prism_ray.engine.images import decode, encode, preprocess

    return decode(vae, encode(vae, preprocess([gray(x) for x in images], resolution)))[..., 0]


@dataclass
class RegionErrors:
    """Mean |image - reference| on [0, 1] per image (N,): whole image, inside and outside a region.

    `pooled()` averages over every pixel of every image, as bench_phantom's tables do (a large region
    weighs more than a small one), instead of over images.
    """

    whole: np.ndarray
    inside: np.ndarray  # NaN where the region is empty
    outside: np.ndarray  # NaN where the region is the whole image
    inside_pixels: np.ndarray
    outside_pixels: np.ndarray

    def pooled(self) -> dict[str, float]:
        def mean(values: np.ndarray, pixels: np.ndarray) -> float:
            total = pixels.sum()
            return float(np.nansum(values * pixels) / total) if total else float("nan")

        return {
            "whole": float(self.whole.mean()),
            "inside": mean(self.inside, self.inside_pixels),
            "outside": mean(self.outside, self.outside_pixels),
        }


def region_errors(
    images: list[np.ndarray], references: list[np.ndarray], regions: list[np.ndarray]
) -> RegionErrors:
    """|image - reference| per image over the whole image and inside / outside its region (`region_for`).

    With the true counterfactuals as references: the error to the truth where the edit had to act and
    where it had to leave the source alone (there the truth is the source)."""
    x = np.stack([gray(i) for i in images]).astype(np.float64) / 255  # (N, R, R)
    r = np.stack([gray(i) for i in references]).astype(np.float64) / 255
    m = np.stack(regions).astype(bool)
    err = np.abs(x - r)
    n_in, n_out = m.sum((1, 2)), (~m).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        inside = np.where(n_in > 0, (err * m).sum((1, 2)) / n_in, np.nan)
        outside = np.where(n_out > 0, (err * ~m).sum((1, 2)) / n_out, np.nan)
    return RegionErrors(err.mean((1, 2)), inside, outside, n_in, n_out)


def classifier_path(model_root: str | Path) -> Path | None:
    """The attribute classifier shipped beside a (phantom-trained) model family, if any."""
    path = Path(model_root) / "classifier"
    return path if (path / "config.json").exists() else None
