"""The accept filter: which counterfactuals to keep, from their CLIP scores and reconstruction error; and
the model-fit warning (a source reconstructed below `fit_warning_psnr`) that augment and edit share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from pydantic import Field

from prism_ray.config import BaseConfig
from prism_ray.scoring.classification import decision, flipped


class OffTargetConfig(BaseConfig):
    """Reject edits that change findings they should not, judged by an attribute classifier.

    An edit of attributes A (its intervention) may change the heads of A and the heads declared
    implied by A (removing "Support Devices" removes the pacemaker); any other head whose decision
    flips (p crosses 0.5) or whose probability moves more than `max_shift` makes it off-target.
    """

    classifier: str | None = Field(
        None, description="classifier folder, or a model family carrying classifier/; None = the filter is off"
    )
    heads: dict[str, str] = Field(
        default_factory=dict,
        description="attribute -> head name; default: the attribute lower-cased, spaces as '_' ('Support Devices' -> "
        "'support_devices')",
    )
    implied: dict[str, list[str]] = Field(
        default_factory=lambda: {"Support Devices": ["pacemaker"]},
        description="heads an intervention on the attribute may change besides its own",
    )
    max_shift: float = Field(0.3, gt=0.0, le=1.0, description="largest allowed probability move of another head")
    require_target: bool = Field(
        False,
        description="also reject an edit in which the classifier does not see its intervention: a yes/no value "
        "('Cardiomegaly=0') needs its head on that side of 0.5, any other value ('sex=flip', 'age=+20') a "
        "flipped decision of its own or implied heads (column on_target)",
    )

    def head_of(self, attribute: str) -> str:
        return self.heads.get(attribute, attribute.lower().replace(" ", "_"))

    def allowed_heads(self, intervention: str) -> set[str]:
        """Heads an intervention ('A=0; B=1') may change."""
        allowed: set[str] = set()
        for part in filter(None, (p.strip() for p in intervention.split(";"))):
            attribute = part.split("=", 1)[0].strip()
            allowed.add(self.head_of(attribute))
            allowed.update(self.implied.get(attribute, []))
        return allowed


def off_target_heads(
    p_source: np.ndarray, p_edits: np.ndarray, labels: list[str], allowed: list[set[str]], max_shift: float
) -> list[list[str]]:
    """Per edit, the heads it changed that it should not have.

    p_source (H,) and p_edits (K, H) are the classifier's probabilities of the source and its K edits;
    `allowed[k]` the heads edit k may change. A head is off-target when its decision flips (0.5) or
    its probability moves more than `max_shift`.
    """
    flips = flipped(p_source[None], p_edits)  # (K, H)
    moved = np.abs(p_edits - p_source[None]) > max_shift  # (K, H)
    return [[h for j, h in enumerate(labels) if (flips[k, j] or moved[k, j]) and h not in allowed[k]]
            for k in range(len(p_edits))]


class TargetCheck(NamedTuple):
    """How `on_target` judges one part of an intervention: a yes/no value puts head `head` on the side of
    0.5 that `value` names; any other value (`head` None) must flip one of `heads` (own and implied)."""

    head: int | None
    value: bool
    heads: list[int]


def target_checks(intervention: str, labels: list[str], rule: OffTargetConfig) -> list[TargetCheck]:
    """One TargetCheck per part of an intervention ('A=0; B=+20'). Raises ValueError naming the attribute
    when the classifier has none of its heads."""
    from prism_ray.data.captions import parse_interventions

    out = []
    for item in parse_interventions(intervention):
        own, value = rule.head_of(item.attribute), item.value
        heads = [labels.index(h) for h in (own, *rule.implied.get(item.attribute, [])) if h in labels]
        if not heads:
            raise ValueError(
                f"filter.off_target.require_target: the classifier has no head for {item.attribute!r} "
                f"(heads: {', '.join(labels)}); name it in filter.off_target.heads"
            )
        yes_no = own in labels and isinstance(value, (bool, int)) and value in (0, 1)
        out.append(TargetCheck(labels.index(own) if yes_no else None, bool(value) if yes_no else False, heads))
    return out


def on_target(p_source: np.ndarray, p_edit: np.ndarray, labels: list[str], intervention: str,
              rule: OffTargetConfig) -> bool:
    """Whether the classifier sees an edit's intervention happen: for every part of it, a yes/no value puts
    the attribute's head on that side of 0.5, any other value ('sex=flip', 'age=+20') flips the decision of
    the attribute's head or of a head it implies. p_source and p_edit are (H,) probabilities over `labels`."""
    for check in target_checks(intervention, labels, rule):
        if check.head is not None:
            if decision(p_edit[check.head]) != check.value:
                return False
        elif not any(flipped(p_source[k], p_edit[k]) for k in check.heads):
            return False
    return True


class Threshold(NamedTuple):
    """One accept threshold: the score `key` must be >= `bound` (`is_minimum`) or <= it; `label` names a
    failure in reports ('{:g}' takes the bound)."""

    key: str
    bound: float
    is_minimum: bool
    label: str


class FilterConfig(BaseConfig):
    """Which counterfactuals to keep, from the scores of `ClipScorer.score` (+ the reconstruction error).

    PRISM keeps S_CLIP >= 0.1. LANCE additionally requires CLIP image-image similarity and
    image-text similarity of the edit above thresholds (it uses 0.7 / 0.2 / 0.2); those two
    are off (None) by default, as is prism_ray's own `reconstruction_error_max`.
    """

    s_clip_min: float = Field(0.1, ge=-1.0, le=1.0)
    image_image_min: float | None = Field(None, ge=-1.0, le=1.0)
    image_text_min: float | None = Field(None, ge=-1.0, le=1.0)
    reconstruction_error_max: float | None = Field(
        None,
        ge=0.0,
        description="reject every edit of a source whose unedited reconstruction has a relative squared "
        "latent error above this (the inversion failed); None = off, as in PRISM",
    )

    off_target: OffTargetConfig = Field(default_factory=OffTargetConfig)
    reconstruction_psnr_min: float | None = Field(
        None,
        ge=0.0,
        description="reject every edit of a source whose unedited reconstruction is below this PSNR (dB) from "
        "the source: the model does not fit the image (phantoms ~30 dB, unseen real anatomy ~21 dB); None = off",
    )
    fit_warning_psnr: float = Field(
        25.0, ge=0.0, description="the run summary warns when over a quarter of the sources reconstruct below this"
    )

    def thresholds(self) -> list[Threshold]:
        """The active thresholds, in the order `accept` and the reports check them."""
        classifier = self.off_target.classifier
        every = [
            Threshold("s_clip", self.s_clip_min, True, "S_CLIP < {:g}"),
            Threshold("clip_image_image", self.image_image_min, True, "CLIP image-image < {:g}"),
            Threshold("clip_image_text", self.image_text_min, True, "CLIP image-text < {:g}"),
            Threshold("reconstruction_error", self.reconstruction_error_max, False, "reconstruction error > {:g}"),
            Threshold("reconstruction_psnr", self.reconstruction_psnr_min, True, "fidelity PSNR < {:g} dB"),
            # number of heads the edit changed that it should not have (only with a classifier)
            Threshold("off_target", 0 if classifier else None, False, "off-target"),
            # 1 when the classifier sees the intervention happen (only with require_target)
            Threshold("on_target", 1 if classifier and self.off_target.require_target else None, True,
                      "target not seen"),
        ]
        return [t for t in every if t.bound is not None]

    def accept(self, scores: Mapping[str, Any]) -> np.ndarray:
        """Boolean (N,) array: every active threshold met (score >= minimum, error <= maximum).
        NaN is rejected."""
        keep = None
        for t in self.thresholds():
            if t.key not in scores:
                raise ValueError(f"scores lack {t.key!r}, needed by the filter threshold on it")
            value = np.asarray(scores[t.key], dtype=np.float64)
            ok = value >= t.bound if t.is_minimum else value <= t.bound
            keep = ok if keep is None else keep & ok
        return keep


# --- does the model fit the images? ------------------------------------------------------------
# A latent error can look fine while the VAE paints its training texture over an image unlike its data
# (a grey gradient, a colour photo came back as chest X-rays); the pixel PSNR of the unedited
# reconstruction sees it. `fit_warning_psnr` is the threshold; the augment job warns per run when over
# FIT_WARNING_SHARE of the sources fall below it, the edit job per image.
FIT_WARNING_SHARE = 0.25


def fit_warning(psnr: float | None, threshold: float) -> str | None:
    """The model-fit warning of one image from its reconstruction PSNR (dB); None when it fits or is unknown."""
    if psnr is None or not psnr < threshold:  # NaN: unknown, no warning
        return None
    return (
        f"reconstructs below {threshold:.1f} dB PSNR ({psnr:.1f} dB) without any edit: the model may not fit "
        "this image, and its counterfactuals may be the model's own picture rather than an edit of it"
    )


def model_fit(rows: list[dict], threshold: float) -> dict:
    """How many sources (rows' `reconstruction_psnr`, one per `source_uri`) reconstruct below `threshold` dB;
    `warning` when over FIT_WARNING_SHARE of them do, with its sentence in `message`."""
    psnr = {r["source_uri"]: r.get("reconstruction_psnr") for r in rows}
    known = [v for v in psnr.values() if v is not None]
    below = sum(v < threshold for v in known)
    share = below / len(known) if known else None
    warning = bool(share is not None and share > FIT_WARNING_SHARE)
    message = None
    if warning:
        message = f"{below} of {len(known)} sources reconstruct below {threshold:.1f} dB PSNR: the model may not fit "
        message += "these images"
    return {"psnr_threshold": threshold, "sources": len(known), "below": below, "share_below": share,
            "warning": warning, "message": message}  # fmt: skip
