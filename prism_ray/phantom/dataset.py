"""The phantom dataset: subjects with two planted biases -> PNGs, a CheXpert-style manifest, a ground-truth table."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from prism_ray.data.captions import CHEXPERT_LABELS  # the manifest's label columns: one source of truth
from prism_ray.phantom.render import DEVICE_KINDS, PhantomAttributes, render_phantom

_SIMULATED_PATHOLOGIES = ("Cardiomegaly", "Pleural Effusion")
# MIMIC-style captions of a phantom manifest: age in 20-year bins (lower edges), sex from the `Sex` column.
MIMIC_AGE_BINS: tuple[int, ...] = (20, 40, 60, 80)


def mimic_adapter_options(age_bins: tuple[int, ...] = MIMIC_AGE_BINS) -> dict[str, Any]:
    """Options of the `mimic` caption adapter for a phantom manifest (`Age`, `Sex`, no race column).

    Captions read "Chest X-ray of 60-years old female subject with Cardiomegaly, Support Devices";
    ages below the first bin edge reject the row, so write the dataset with `age_min >= age_bins[0]`.
    """
    return {
        "age_column": "Age",
        "sex_column": "Sex",
        "race_column": None,
        "sex_map": {"Male": "male", "Female": "female"},
        "age_bins": tuple(age_bins),
        "labels": (*_SIMULATED_PATHOLOGIES, "Support Devices"),
    }


class SplitFractions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train: float = Field(0.7, ge=0.0, le=1.0)
    valid: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1, got {total:.6g}")
        return self


class OtherDeviceMix(BaseModel):
    """Which non-pacemaker device(s) a subject with one has: a tube only, ECG leads only, or both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tube: float = Field(0.45, ge=0.0, le=1.0)
    ecg: float = Field(0.35, ge=0.0, le=1.0)
    both: float = Field(0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sums_to_one(self) -> OtherDeviceMix:
        total = self.tube + self.ecg + self.both
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"other_device_mix must sum to 1, got {total:.6g}")
        return self


def _prob(default: float, description: str) -> Any:
    return Field(default, ge=0.0, le=1.0, description=description)


class PhantomDatasetConfig(BaseModel):
    """How many phantoms, their prevalences and the two planted biases.

    Bias (a), hidden relationship: pacemakers follow cardiomegaly (the labels only say
    `Support Devices`). Bias (b), shortcut: in the train split only, an *other* device (tube
    and/or ECG leads) follows pleural effusion; in valid/test it is independent of everything.
    Optional (c), demographic: `p_effusion_by_age` makes effusion depend on age (older subjects
    have more), and `p_effusion_reported` < 1 leaves some effusions out of the labels, as reports
    omit findings; both default off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_subjects: int = Field(1000, ge=1, le=10_000_000)
    resolution: int = Field(64, ge=16, le=2048)
    seed: int = Field(0, ge=0, lt=2**63)
    split_fractions: SplitFractions = SplitFractions()
    p_cardiomegaly: float = _prob(0.25, "P(cardiomegaly)")
    p_effusion: float = _prob(0.25, "P(pleural effusion); see p_effusion_by_age")
    p_effusion_by_age: dict[int, float] | None = Field(
        None,
        description="P(pleural effusion) from each age (key) up to the next key, e.g. {20: 0.1, 60: 0.6}; "
        "replaces p_effusion; None = p_effusion at every age",
    )
    p_effusion_reported: float = _prob(1.0, "P(Pleural Effusion label = 1 | effusion); others go unlabelled")
    p_female: float = _prob(0.5, "P(sex = female)")
    age_min: int = Field(18, ge=0, le=120)
    age_max: int = Field(90, ge=0, le=120)
    p_pacemaker_given_cardiomegaly: float = _prob(0.5, "P(pacemaker | cardiomegaly)")
    p_pacemaker_given_no_cardiomegaly: float = _prob(0.03, "P(pacemaker | no cardiomegaly)")
    p_other_device: float = _prob(0.25, "P(tube and/or ECG) in valid/test")
    p_other_device_given_effusion_train: float = _prob(0.8, "P(tube and/or ECG | effusion, train)")
    p_other_device_given_no_effusion_train: float = _prob(0.1, "P(tube and/or ECG | no effusion, train)")
    other_device_mix: OtherDeviceMix = OtherDeviceMix()
    effusion_severity: tuple[float, float] = Field(
        (1.0, 1.0),
        description="per-subject effusion severity drawn uniformly from [low, high] (0 < low <= high <= 1): "
        "1 is frank basal fluid, ~0.15 a subtle blunting of the costophrenic angle",
    )
    write_images: bool = Field(True, description="False writes only the tables (image_uri then points nowhere)")

    @field_validator("age_max")
    @classmethod
    def _age_range(cls, v: int, info: ValidationInfo) -> int:
        lo = info.data.get("age_min")
        if lo is not None and v < lo:
            raise ValueError(f"age_max ({v}) must be >= age_min ({lo})")
        return v

    @field_validator("p_effusion_by_age")
    @classmethod
    def _effusion_by_age(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("p_effusion_by_age must map at least one age to a probability (or be None)")
        for age, p in v.items():
            if not 0 <= age <= 120 or not 0.0 <= p <= 1.0:
                raise ValueError(f"p_effusion_by_age: {age}: {p} needs an age in [0, 120], a rate in [0, 1]")
        return dict(sorted(v.items()))

    @field_validator("effusion_severity")
    @classmethod
    def _severity_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"effusion_severity: needs 0 < low <= high <= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _effusion_ages_covered(self) -> PhantomDatasetConfig:
        if self.p_effusion_by_age is not None and min(self.p_effusion_by_age) > self.age_min:
            first = min(self.p_effusion_by_age)
            raise ValueError(f"p_effusion_by_age: its first age ({first}) must be <= age_min ({self.age_min})")
        return self

    def effusion_probability(self, age: np.ndarray) -> np.ndarray:
        """P(pleural effusion) of subjects of these ages (float64, same shape)."""
        age = np.asarray(age)
        if self.p_effusion_by_age is None:
            return np.full(age.shape, self.p_effusion, dtype=np.float64)
        edges = np.array(list(self.p_effusion_by_age))
        rates = np.array(list(self.p_effusion_by_age.values()), dtype=np.float64)
        return rates[np.searchsorted(edges, age, side="right") - 1]


@dataclass(frozen=True)
class PhantomDatasetSummary:
    root: str
    manifest_uri: str
    ground_truth_uri: str
    n_subjects: int
    split_counts: dict[str, int]
    images_written: bool


def _join(root: str, *parts: str) -> str:
    if "://" in root:
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(os.path.abspath(root), *parts)


def sample_subjects(config: PhantomDatasetConfig) -> dict[str, np.ndarray]:
    """Draw every subject's split, seed and attributes (columns of equal length)."""
    n = config.n_subjects
    rng = np.random.default_rng(config.seed)
    f = config.split_fractions
    n_train = int(round(n * f.train))
    n_valid = min(int(round(n * f.valid)), n - n_train)
    split = np.array(["train"] * n_train + ["valid"] * n_valid + ["test"] * (n - n_train - n_valid))
    split = split[rng.permutation(n)]
    seeds = rng.choice(2**31 - 1, size=n, replace=False).astype(np.int64)
    cardiomegaly = rng.random(n) < config.p_cardiomegaly
    effusion_draw = rng.random(n)  # compared with P(effusion | age) once ages are drawn: the draw order stays
    female = rng.random(n) < config.p_female
    age = rng.integers(config.age_min, config.age_max + 1, size=n).astype(np.int64)
    effusion = effusion_draw < config.effusion_probability(age)
    p_pm = np.where(cardiomegaly, config.p_pacemaker_given_cardiomegaly, config.p_pacemaker_given_no_cardiomegaly)
    pacemaker = rng.random(n) < p_pm
    p_other = np.where(
        split == "train",
        np.where(effusion, config.p_other_device_given_effusion_train, config.p_other_device_given_no_effusion_train),
        config.p_other_device,
    )
    other = rng.random(n) < p_other
    mix = config.other_device_mix
    kind = rng.random(n)  # [0, tube) tube only, [tube, tube+ecg) ECG only, rest both
    tube = other & ((kind < mix.tube) | (kind >= mix.tube + mix.ecg))
    ecg = other & (kind >= mix.tube)
    reported = effusion & (rng.random(n) < config.p_effusion_reported)
    low, high = config.effusion_severity  # drawn last: datasets of earlier versions keep their subjects
    severity = np.full(n, high) if low == high else rng.uniform(low, high, size=n)
    return {
        "subject_id": np.array([f"phantom{i:07d}" for i in range(n)]),
        "seed": seeds,
        "split": split,
        "cardiomegaly": cardiomegaly,
        "pleural_effusion": effusion,
        "effusion_reported": reported,
        "pacemaker": pacemaker,
        "tube": tube,
        "ecg": ecg,
        "sex": np.where(female, "female", "male"),
        "age": age,
        "effusion_severity": severity,
    }


def subject_attributes(row: dict[str, Any]) -> PhantomAttributes:
    """PhantomAttributes from one ground-truth row (dict with the ground-truth columns)."""
    return PhantomAttributes(
        cardiomegaly=bool(row["cardiomegaly"]),
        pleural_effusion=bool(row["pleural_effusion"]),
        devices=frozenset(k for k in DEVICE_KINDS if bool(row[k])),
        sex=str(row["sex"]),
        age=int(row["age"]),
        effusion_severity=float(row.get("effusion_severity", 1.0)),  # tables written before the knob: 1
    )


def label_columns(s: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The manifest's label columns of sampled subjects: the CheXpert labels (float 1/0), `Sex`, `Age`."""
    n = len(s["subject_id"])
    any_device = s["pacemaker"] | s["tube"] | s["ecg"]
    labels = {name: np.zeros(n, dtype=np.float64) for name in CHEXPERT_LABELS}
    labels["Cardiomegaly"] = s["cardiomegaly"].astype(np.float64)
    labels["Pleural Effusion"] = s["effusion_reported"].astype(np.float64)  # the truth keeps every effusion
    labels["Support Devices"] = any_device.astype(np.float64)
    pathology = np.zeros(n, dtype=bool)
    for name in _SIMULATED_PATHOLOGIES:
        pathology |= labels[name] == 1.0
    labels["No Finding"] = (~pathology).astype(np.float64)  # CheXpert: devices are not a finding
    return {**labels, "Sex": np.where(s["sex"] == "female", "Female", "Male"), "Age": s["age"]}


def write_phantom_dataset(out: str, config: PhantomDatasetConfig) -> PhantomDatasetSummary:
    """Write PNGs, a CheXpert-style manifest and a ground-truth table under `out` (path or fsspec URI).

    Layout: `images/<split>/<subject_id>.png`, `manifest.parquet`, `ground_truth.parquet`.
    """
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    s = sample_subjects(config)
    n = config.n_subjects
    image_uri = np.array([_join(out, "images", sp, sid + ".png") for sp, sid in zip(s["split"], s["subject_id"], strict=True)])

    if config.write_images:
        fs, root = fsspec.core.url_to_fs(out)
        for sp in ("train", "valid", "test"):
            fs.makedirs(f"{root.rstrip('/')}/images/{sp}", exist_ok=True)
        for i in range(n):
            attrs = subject_attributes({k: v[i] for k, v in s.items()})
            img = render_phantom(attrs, int(s["seed"][i]), config.resolution)
            buf = io.BytesIO()
            Image.fromarray(img, mode="L").save(buf, format="PNG", compress_level=1)
            fs.pipe_file(f"{root.rstrip('/')}/images/{s['split'][i]}/{s['subject_id'][i]}.png", buf.getvalue())

    labels = label_columns(s)
    manifest = pa.table(
        {
            "image_uri": pa.array(image_uri, pa.string()),
            "subject_id": pa.array(s["subject_id"], pa.string()),
            "seed": pa.array(s["seed"], pa.int64()),
            "split": pa.array(s["split"], pa.string()),
            **{name: pa.array(labels[name], pa.float64()) for name in CHEXPERT_LABELS},
            "Sex": pa.array(labels["Sex"], pa.string()),
            "Age": pa.array(labels["Age"], pa.int64()),
        }
    )
    truth = pa.table(
        {
            "subject_id": pa.array(s["subject_id"], pa.string()),
            "seed": pa.array(s["seed"], pa.int64()),
            "split": pa.array(s["split"], pa.string()),
            "image_uri": pa.array(image_uri, pa.string()),
            "cardiomegaly": pa.array(s["cardiomegaly"], pa.bool_()),
            "pleural_effusion": pa.array(s["pleural_effusion"], pa.bool_()),
            "pacemaker": pa.array(s["pacemaker"], pa.bool_()),
            "tube": pa.array(s["tube"], pa.bool_()),
            "ecg": pa.array(s["ecg"], pa.bool_()),
            "sex": pa.array(s["sex"], pa.string()),
            "age": pa.array(s["age"], pa.int64()),
            "effusion_severity": pa.array(s["effusion_severity"], pa.float64()),
            "resolution": pa.array(np.full(n, config.resolution), pa.int64()),
        }
    )
    manifest_uri, truth_uri = _join(out, "manifest.parquet"), _join(out, "ground_truth.parquet")
    for table, uri in ((manifest, manifest_uri), (truth, truth_uri)):
        with fsspec.open(uri, "wb") as f:
            pq.write_table(table, f)
    counts = {sp: int((s["split"] == sp).sum()) for sp in ("train", "valid", "test")}
    return PhantomDatasetSummary(
        root=_join(out), manifest_uri=manifest_uri, ground_truth_uri=truth_uri,
        n_subjects=n, split_counts=counts, images_written=config.write_images,
    )
