"""`experiment` job: does an augmentation set help? Classifiers on original / + SD samples / + counterfactuals, compared.

Arms (PRISM, Table 3): (a) `original` = the training split; (b) `sd_samples` = (a) + the in-quota rows of an
`augment` run in `mode: samples`; (c) `counterfactuals` = (a) + its accepted in-quota counterfactuals, each
labelled as its source with the intervention applied. Beside them, the non-generative fixes (`fixes`) on the
rows of (a): (d) `group_balanced` = group-balanced resampling (`train.balance: groups`), (e) `group_dro` =
online Group DRO (`train.objective: group_dro`), both over `train.group_heads` (default: the primary
comparison's head and the head whose column is its attribute). Every arm trains with the same optimiser-step
budget, the same seeds and the same model-selection rule (`train.select`), validates (early stopping) on the
same validation split and is scored on the same test split.

Output layout under `output`:
  arms/<arm>/manifest.parquet   the arm's training + validation rows (image_uri, split, caption, one column per head)
  runs/<arm>-seed<k>/           each classifier run (checkpoints, metrics, model/ = the exported classifier)
  arms.parquet                  one row per arm x seed x head x subgroup x metric, with a bootstrap CI over test rows
  table.parquet                 per arm x head x subgroup x metric: mean over seeds +- t-interval, and for (b)-(e)
                                the paired difference to (a) with its t-interval, paired t-test and sign-flip p
  summary.json, report.md       the headline numbers; report.html when the HTML renderer is installed

The report opens with the primary comparison stated in the config before the run (`evaluation.primary_head`,
`evaluation.primary_attribute`: worst-group accuracy, (c) - (a) and (b) - (a) paired by seed), what the
seeds can resolve, and a multiplicity note; every other row is exploratory.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from prism_ray.config import BaseConfig
from prism_ray.data.config import DataConfig
from prism_ray.pipelines.classifier import (
    ClassifierComputeConfig,
    ClassifierModelConfig,
    ClassifierTrainConfig,
)
from prism_ray.results.augmentation import augment_rows  # the one reader; benchmarks import it from here

ARMS = ("original", "sd_samples", "counterfactuals", "group_balanced", "group_dro")
# The fixes' arms: the rows of (a), trained with these train settings instead of the experiment's.
FIX_TRAIN = {"group_balanced": {"balance": "groups"}, "group_dro": {"objective": "group_dro"}}
_BOUNDED = ("accuracy", "balanced_accuracy", "auroc", "ece", "worst_group_accuracy")  # metrics in [0, 1]


def _schema(*fields):
    import pyarrow as pa

    return pa.schema([pa.field(name, kind) for name, kind in fields])


def arms_schema():
    """arms.parquet: one row per arm x seed x head x subgroup x metric (CI: percentile bootstrap of test rows)."""
    import pyarrow as pa

    s, f, i = pa.string(), pa.float64(), pa.int64()
    return _schema(
        ("arm", s),
        ("seed", i),
        ("head", s),
        ("attribute", s),
        ("group", s),
        ("label", i),
        ("metric", s),
        ("value", f),
        ("ci_low", f),
        ("ci_high", f),
        ("n", i),
        ("best_step", i),
        ("final_step", i),
    )


def table_schema():
    """table.parquet: per arm x head x subgroup x metric over seeds; diff* / t / p* vs `original` (null there)."""
    import pyarrow as pa

    s, f, i = pa.string(), pa.float64(), pa.int64()
    return _schema(
        ("arm", s),
        ("head", s),
        ("attribute", s),
        ("group", s),
        ("label", i),
        ("metric", s),
        ("n_seeds", i),
        ("mean", f),
        ("sd", f),
        ("ci_low", f),
        ("ci_high", f),
        ("diff", f),
        ("diff_ci_low", f),
        ("diff_ci_high", f),
        ("t", f),
        ("p_paired_t", f),
        ("p_sign_flip", f),
    )


class EvaluationConfig(BaseConfig):
    """How the test split is scored."""

    subgroups: list[str] = Field(
        default_factory=list,
        description="manifest columns to score per value (Sex, Race, ...); other heads' "
        "columns are added by themselves",
    )
    age_column: str | None = Field(None, description="a numeric column scored per age bin")
    age_bins: tuple[int, ...] = Field((40, 60, 80), description="bin edges: <40, 40-59, 60-79, >=80")
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples of the test rows per CI")
    level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    min_group: int = Field(
        5, ge=1, description="smaller subgroups (and label x subgroup cells) are not scored"
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    primary_head: str | None = Field(
        None,
        description="the head of the pre-stated primary comparison (its worst-group accuracy); default: the first",
    )
    primary_attribute: str | None = Field(
        None,
        description="the primary comparison's groups: the head's label x this attribute; default: the first other "
        "head's column (the shortcut a counterfactual set should break), else the first of `subgroups`",
    )


class ExperimentConfig(BaseConfig):
    """`prism-ray experiment`: train arms (a)-(e) over seeds, evaluate on one held-out split, compare."""

    data: DataConfig = Field(..., description="the original manifest, with a 'split' column")
    heads: dict[str, str] = Field(..., min_length=1, description="head name -> column or column=value")
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    counterfactuals: str | None = Field(None, description="an augment output folder (counterfactual mode)")
    samples: str | None = Field(None, description="an augment output folder (mode: samples)")
    samples_labels: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="samples subgroup -> {column: value}; default: the labels of original rows with that caption",
    )
    counterfactuals_limit: int | None = Field(
        None,
        ge=0,
        description="at most this many counterfactuals per augment subgroup: the first accepted in-quota rows "
        "in the subgroup's attempt order (a learning curve over the set's size); None = all",
    )
    samples_limit: int | None = Field(None, ge=0, description="as counterfactuals_limit, for samples")
    fixes: list[Literal["group_balanced", "group_dro"]] = Field(
        default_factory=list,
        description="non-generative arms on the original rows: group_balanced (train.balance: groups), "
        "group_dro (train.objective: group_dro), over train.group_heads",
    )
    seeds: list[int] = Field([0, 1, 2], min_length=3, description="one classifier per arm and seed")
    model: ClassifierModelConfig = Field(default_factory=ClassifierModelConfig)
    train: ClassifierTrainConfig = Field(
        default_factory=ClassifierTrainConfig,
        description="as the classifier job's; train.seed is each of seeds",
    )
    compute: ClassifierComputeConfig = Field(default_factory=ClassifierComputeConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: str = Field(..., min_length=1)

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.data.split is not None:
            raise ValueError("data.split: the experiment reads train_split, valid_split and test_split")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: duplicates in {self.seeds}")
        if self.counterfactuals is None and self.samples is None and not self.fixes:
            raise ValueError(
                "counterfactuals: give an augment output (counterfactuals and/or samples) or fixes to compare"
            )
        if len(set(self.fixes)) != len(self.fixes):
            raise ValueError(f"fixes: duplicates in {self.fixes}")
        head = self.evaluation.primary_head
        if head is not None and head not in self.heads:
            raise ValueError(f"evaluation.primary_head: {head!r} is not one of the heads {list(self.heads)}")
        self.primary()
        t = self.train
        named = [("train.group_heads", h) for h in t.group_heads] + [("train.select_head", t.select_head)]
        for name, value in named:
            if value is not None and value not in self.heads:
                raise ValueError(f"{name}: {value!r} is not one of the heads {list(self.heads)}")
        uses = {
            "train.select: valid_worst_group": t.select == "valid_worst_group",
            "train.balance: groups": t.balance == "groups",
            "train.objective: group_dro": t.objective == "group_dro",
        }
        needs = list(self.fixes) + [what for what, on in uses.items() if on]
        if needs and not self.group_heads():
            raise ValueError(
                f"train.group_heads: {', '.join(needs)} needs groups, and the primary attribute "
                f"{self.primary()[1]!r} is not another head's column; give the heads whose labels define them"
            )
        return self

    def primary(self) -> tuple[str, str]:
        """(head, attribute) of the primary comparison: worst-group accuracy over head label x attribute."""
        e = self.evaluation
        head = e.primary_head or next(iter(self.heads))
        own = self.heads[head].partition("=")[0]
        others = [spec.partition("=")[0] for h, spec in self.heads.items() if h != head]
        # The attributes the test split is scored by (`test_attributes`), the other heads' columns first.
        candidates = [c for c in others if c != own] + list(e.subgroups)
        candidates += [f"{e.age_column} bin"] if e.age_column else []
        if e.primary_attribute is not None:
            if e.primary_attribute not in candidates:
                raise ValueError(
                    f"evaluation.primary_attribute: {e.primary_attribute!r} is not scored for {head!r}; "
                    f"one of {candidates}"
                )
            return head, e.primary_attribute
        if not candidates:
            raise ValueError("evaluation.primary_attribute: give the attribute of the primary comparison")
        return head, candidates[0]

    def group_heads(self) -> list[str]:
        """The heads whose joint label is a row's group, for every arm (the fixes' training, `train.select`):
        `train.group_heads`, else the primary comparison's head and the head whose column is its attribute
        (the shortcut: effusion x devices), else none."""
        if self.train.group_heads:
            return list(self.train.group_heads)
        head, attribute = self.primary()
        other = [h for h, spec in self.heads.items() if h != head and spec.partition("=")[0] == attribute]
        return [head, other[0]] if other else []

    def arms(self) -> list[str]:
        given = {
            "original": True,
            "sd_samples": self.samples is not None,
            "counterfactuals": bool(self.counterfactuals),
            **{fix: fix in self.fixes for fix in FIX_TRAIN},
        }
        return [arm for arm in ARMS if given[arm]]


# --- the arms' training rows -----------------------------------------------------------------


def counterfactual_targets(
    config: ExperimentConfig, sources: dict[str, dict], cf_rows: list[dict]
) -> np.ndarray:
    """(N, H) targets of counterfactual rows: the source's targets, then each intervention applied to the heads
    that read its attribute (a bool sets 1/0, a text value is compared with a 'column=value' head)."""
    import pyarrow as pa

    from prism_ray.data.captions import get_adapter, parse_interventions
    from prism_ray.data.targets import head_targets

    adapter = get_adapter(config.data.adapter, **config.data.adapter_options)
    out = np.full((len(cf_rows), len(config.heads)), np.nan, np.float32)
    for i, row in enumerate(cf_rows):
        source = sources.get(row["source_uri"])
        if source is None:
            raise ValueError(
                f"counterfactuals: source {row['source_uri']!r} is not a row of {config.data.manifest!r}"
            )
        out[i] = head_targets(pa.Table.from_pylist([source]), config.heads, config.train.uncertain)[0]
        edited = adapter.intervene(adapter.attributes(source), row["intervention"])
        for intervention in parse_interventions(row["intervention"]):
            value = edited[intervention.attribute]
            for h, spec in enumerate(config.heads.values()):
                column, _, wanted = spec.partition("=")
                if column == intervention.attribute:
                    out[i, h] = float(str(value) == wanted) if wanted else float(bool(value))
    return out


def sample_targets(config: ExperimentConfig, train_table, rows: list[dict]) -> np.ndarray:
    """(N, H) targets of SD samples: `samples_labels[subgroup]`, else the targets shared by every original
    training row whose caption is the prompt (a head they disagree on is NaN: the caption does not say)."""
    import pyarrow as pa

    from prism_ray.data.captions import get_adapter
    from prism_ray.data.targets import head_targets

    adapter = get_adapter(config.data.adapter, **config.data.adapter_options)
    targets = head_targets(train_table, config.heads, config.train.uncertain)
    by_caption: dict[str, list[int]] = {}
    for i, row in enumerate(train_table.to_pylist()):
        caption = row.get("caption") or adapter.caption(row)
        by_caption.setdefault(caption, []).append(i)
    out = np.full((len(rows), len(config.heads)), np.nan, np.float32)
    for i, row in enumerate(rows):
        given = config.samples_labels.get(row["subgroup"])
        if given is not None:
            out[i] = head_targets(pa.Table.from_pylist([given]), config.heads, config.train.uncertain)[0]
            continue
        same = by_caption.get(row["edit_prompt"])
        if not same:
            raise ValueError(
                f"config field 'samples_labels.{row['subgroup']}': no original row has the caption "
                f"{row['edit_prompt']!r}; give the sample's labels"
            )
        t = targets[same]
        agree = np.all(t == t[:1], axis=0)
        out[i] = np.where(agree, t[0], np.nan)
    return out


def build_arms(config: ExperimentConfig, root: str) -> tuple[dict[str, str], dict]:
    """Write each arm's manifest (train rows + the shared validation rows); {arm: manifest uri}, row counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from prism_ray.data.captions import get_adapter
    from prism_ray.data.manifest import ROW_COLUMN, prepare_manifest
    from prism_ray.data.storage import join_uri, resolve_uri, write_table
    from prism_ray.data.targets import head_targets

    manifest = prepare_manifest(config.data).table.drop_columns([ROW_COLUMN])
    split = manifest.column("split") if "split" in manifest.column_names else None
    if split is None:
        raise ValueError(f"config field 'data.manifest': {config.data.manifest!r} has no 'split' column")
    adapter = get_adapter(config.data.adapter, **config.data.adapter_options)
    uris = [
        resolve_uri(str(u), config.data.image_root)
        for u in manifest.column(config.data.image_column).to_pylist()
    ]
    rows = manifest.to_pylist()
    captions = [r.get("caption") or adapter.caption(r) for r in rows]

    def table(uri_list, split_name, caption_list, targets):
        columns = {"image_uri": uri_list, "split": [split_name] * len(uri_list), "caption": caption_list}
        columns.update({head: targets[:, h].astype(np.float64) for h, head in enumerate(config.heads)})
        return pa.table(columns)

    parts: dict[str, list] = {}
    for name in ("train", "valid"):
        wanted = config.train_split if name == "train" else config.valid_split
        idx = np.flatnonzero(pc.equal(split, wanted).to_numpy(zero_copy_only=False))
        if len(idx) == 0:
            raise ValueError(f"config field '{name}_split': no rows with split == {wanted!r}")
        sub = manifest.take(pa.array(idx))
        parts[name] = [
            table(
                [uris[i] for i in idx],
                name,
                [captions[i] for i in idx],
                head_targets(sub, config.heads, config.train.uncertain),
            )
        ]
    train_table = manifest.take(
        pa.array(np.flatnonzero(pc.equal(split, config.train_split).to_numpy(zero_copy_only=False)))
    )
    extra = {"original": None, **{fix: None for fix in FIX_TRAIN}}  # the fixes train on the original rows
    if config.samples is not None:
        s = augment_rows(config.samples, config.samples_limit).to_pylist()
        extra["sd_samples"] = table(
            [r["image_uri"] for r in s],
            "train",
            [r["edit_prompt"] for r in s],
            sample_targets(config, train_table, s),
        )
    if config.counterfactuals is not None:
        c = augment_rows(config.counterfactuals, config.counterfactuals_limit).to_pylist()
        sources = {u: r for u, r in zip(uris, rows, strict=True)}
        extra["counterfactuals"] = table(
            [r["image_uri"] for r in c],
            "train",
            [r["edit_prompt"] for r in c],
            counterfactual_targets(config, sources, c),
        )
    out, counts = {}, {}
    for arm in config.arms():
        pieces = parts["train"] + ([extra[arm]] if extra[arm] is not None else []) + parts["valid"]
        arm_table = pa.concat_tables(pieces)
        out[arm] = join_uri(root, "arms", arm, "manifest.parquet")
        write_table(arm_table, out[arm])
        counts[arm] = {
            "train_original": parts["train"][0].num_rows,
            "valid": parts["valid"][0].num_rows,
            "added": 0 if extra[arm] is None else extra[arm].num_rows,
        }
    return out, counts


# --- evaluation ------------------------------------------------------------------------------


def _group_values(values: list, bins: tuple[int, ...] | None = None) -> np.ndarray:
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append("missing")
        elif bins is not None:
            edges = [e for e in bins if float(v) >= e]
            if not edges:
                out.append(f"<{bins[0]}")
            else:
                nxt = [e for e in bins if e > edges[-1]]
                out.append(f"{edges[-1]}-{nxt[0] - 1}" if nxt else f">={edges[-1]}")
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v))
    return np.array(out, dtype=object)


def test_attributes(config: ExperimentConfig, test_table) -> dict[str, dict[str, np.ndarray]]:
    """head -> {attribute: per-row group value}: `evaluation.subgroups`, age bins, and the other heads' columns."""
    e = config.evaluation
    columns = list(dict.fromkeys(e.subgroups))
    for name in columns + ([e.age_column] if e.age_column else []):
        if name not in test_table.column_names:
            raise ValueError(f"config field 'evaluation': the manifest has no column {name!r}")
    common = {c: _group_values(test_table.column(c).to_pylist()) for c in columns}
    if e.age_column:
        common[f"{e.age_column} bin"] = _group_values(test_table.column(e.age_column).to_pylist(), e.age_bins)
    out = {}
    for head, spec in config.heads.items():
        mine = dict(common)
        for other, other_spec in config.heads.items():
            column = other_spec.partition("=")[0]
            if other != head and column not in mine and column != spec.partition("=")[0]:
                mine[column] = _group_values(test_table.column(column).to_pylist())
        out[head] = mine
    return out


def score_arm(config, probs: np.ndarray, targets: np.ndarray, attributes: dict) -> list[dict]:
    """Every metric row of one classifier on the test split (`scoring.classification.head_metrics`)."""
    from prism_ray.scoring.classification import head_metrics

    e = config.evaluation
    rows = []
    for h, head in enumerate(config.heads):
        for row in head_metrics(
            targets[:, h],
            probs[:, h],
            attributes[head],
            n_boot=e.n_boot,
            level=e.level,
            seed=e.seed,
            min_group=e.min_group,
            threshold=e.threshold,
        ):
            rows.append({"head": head, **row})
    return rows


def compare(arms: list[dict], level: float) -> list[dict]:
    """Per arm x head x subgroup x metric: mean over seeds +- t-interval; vs `original`, seed-paired differences
    with their t-interval, the paired t-test and the exact sign-flip p."""
    from prism_ray.scoring.classification import mean_ci, paired_t_test, sign_flip_p

    def key(r):
        return r["head"], r["attribute"], r["group"], r["label"], r["metric"]

    cells: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in arms:
        cells.setdefault(key(r), {}).setdefault(r["arm"], {})[r["seed"]] = r["value"]
    out = []
    for k, by_arm in cells.items():
        base = by_arm.get("original", {})
        for arm, by_seed in by_arm.items():
            mean, sd, low, high = mean_ci(np.array(list(by_seed.values())), level)
            if k[4] in _BOUNDED:  # a t-interval can leave [0, 1]; the metric cannot
                low, high = max(low, 0.0), min(high, 1.0)
            row = dict(zip(("head", "attribute", "group", "label", "metric"), k, strict=True))
            row.update(arm=arm, n_seeds=len(by_seed), mean=mean, sd=sd, ci_low=low, ci_high=high)
            seeds = sorted(
                s for s in by_seed if s in base and np.isfinite(by_seed[s]) and np.isfinite(base[s])
            )
            if arm != "original" and seeds:
                d = np.array([by_seed[s] - base[s] for s in seeds])
                dmean, _, dlow, dhigh = mean_ci(d, level)
                t, p = paired_t_test(d)
                row.update(
                    diff=dmean,
                    diff_ci_low=dlow,
                    diff_ci_high=dhigh,
                    t=t,
                    p_paired_t=p,
                    p_sign_flip=sign_flip_p(d),
                )
            out.append(row)
    return out


# --- the job ---------------------------------------------------------------------------------


def _classifier_config(config: ExperimentConfig, manifest: str, root: str, arm: str, seed: int):
    from prism_ray.config import build_config
    from prism_ray.pipelines.classifier import ClassifierConfig

    data = {
        "manifest": manifest,
        "adapter": config.data.adapter,
        "adapter_options": config.data.adapter_options,
        "decode": config.data.decode.model_dump(mode="json"),
    }
    return build_config(
        ClassifierConfig,
        {
            "data": data,
            "heads": {h: h for h in config.heads},
            "train_split": "train",
            "valid_split": "valid",
            "model": config.model.model_dump(mode="json"),
            # every arm: the same steps and selection rule over the same groups; a fix changes only its knob
            "train": {
                **config.train.model_dump(mode="json"),
                "seed": seed,
                "group_heads": config.group_heads(),
                **FIX_TRAIN.get(arm, {}),
            },
            "compute": config.compute.model_dump(mode="json"),
            "run": {"storage_path": f"{root}/runs", "name": f"{arm}-seed{seed}"},
        },
    )


def run(config: ExperimentConfig, runner) -> dict:
    """Train every arm x seed (`runner` as the classifier job's: `classifier.in_process` or Ray Train), score,
    compare, write."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from prism_ray.data.manifest import prepare_manifest
    from prism_ray.data.storage import resolve_uri, write_table
    from prism_ray.data.targets import head_targets
    from prism_ray.models.classifier import classifier_labels, load_classifier, predict_proba
    from prism_ray.pipelines import classifier as clf
    from prism_ray.results.layout import Layout
    from prism_ray.results.ledger import write_json_atomic

    started = time.perf_counter()
    layout = Layout.of(config.output)
    manifests, counts = build_arms(config, layout.root)
    print(f"experiment: arms {counts}", flush=True)

    test = prepare_manifest(config.data).table
    test = test.filter(pc.equal(test.column("split"), config.test_split))
    if test.num_rows == 0:
        raise ValueError(f"config field 'test_split': no rows with split == {config.test_split!r}")
    uris = [
        resolve_uri(str(u), config.data.image_root) for u in test.column(config.data.image_column).to_pylist()
    ]
    targets = head_targets(test, config.heads, config.train.uncertain)
    pixels, targets, errors = clf.load_pixels(
        clf.Rows(uris, targets), config.model.resolution, config.data.decode
    )
    keep = np.setdiff1d(np.arange(len(uris)), [uris.index(e["uri"]) for e in errors])
    attributes = test_attributes(config, test.take(pa.array(keep)))

    arm_rows, runs = [], []
    for arm, manifest in manifests.items():
        for seed in config.seeds:
            c = _classifier_config(config, manifest, layout.root, arm, seed)
            result = clf.run(c, runner=runner)
            model = load_classifier(result.model_path)
            if classifier_labels(model) != list(config.heads):
                raise RuntimeError(f"experiment: {result.model_path} has heads {classifier_labels(model)}")
            probs = predict_proba(model, pixels)
            for row in score_arm(config, probs, targets, attributes):
                arm_rows.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        **row,
                        "best_step": result.best_step,
                        "final_step": result.final_step,
                    }
                )
            runs.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "model": result.model_path,
                    "best_step": result.best_step,
                    "best_valid_loss": result.best_valid_loss,
                    "best_valid_worst_group": result.best_valid_worst_group,
                    "select": result.select,
                    "stopped_early": result.stopped_early,
                }
            )
            print(f"experiment: {arm} seed {seed} done ({time.perf_counter() - started:.0f}s)", flush=True)

    table_rows = compare(arm_rows, config.evaluation.level)
    write_table(pa.Table.from_pylist(arm_rows, schema=arms_schema()), layout.uri("arms.parquet"))
    write_table(pa.Table.from_pylist(table_rows, schema=table_schema()), layout.uri("table.parquet"))
    summary = {
        "job": "experiment",
        "output": layout.root,
        "config_hash": config.config_hash(),
        "arms": counts,
        "seeds": config.seeds,
        "test_rows": len(pixels),
        "test_unreadable": len(errors),
        "runs": runs,
        "paired_test": "two-sided paired t-test across seeds (df = seeds - 1); exact sign-flip p beside it",
        "headline": headline(table_rows, config),
        "primary": primary_comparison(table_rows, *config.primary()),
        "wall_seconds": time.perf_counter() - started,
    }
    write_json_atomic(summary, layout.uri("summary.json"))
    write_report(layout, summary, table_rows, config)
    print(
        f"experiment: wrote {layout.root}/table.parquet, report.md ({summary['wall_seconds']:.0f}s)",
        flush=True,
    )
    return summary


def headline(table_rows: list[dict], config: ExperimentConfig) -> dict:
    """Per head: overall accuracy and the worst-group accuracy of each attribute, per arm (mean, diff, p)."""
    out: dict = {}
    for r in table_rows:
        overall = r["attribute"] == "all" and r["metric"] in ("accuracy", "auroc")
        if not overall and r["metric"] != "worst_group_accuracy":
            continue
        name = r["metric"] if overall else f"worst_group_accuracy[{r['attribute']}]"
        cell = {
            k: r.get(k) for k in ("mean", "ci_low", "ci_high", "diff", "p_paired_t", "p_sign_flip") if k in r
        }
        out.setdefault(r["head"], {}).setdefault(name, {})[r["arm"]] = cell
    return out


def _fmt(x, digits: int = 3, sign: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


PRIMARY_LABELS = {"counterfactuals": "(c) − (a)", "sd_samples": "(b) − (a)", "group_balanced": "(d) − (a)",
                  "group_dro": "(e) − (a)"}


def primary_comparison(table_rows: list[dict], head: str, attribute: str) -> dict:
    """The pre-stated comparison from table.parquet's rows: worst-group accuracy of `head` over its label x
    `attribute` per arm (mean, t-interval), and (c) − (a), (b) − (a) paired by seed (difference, t-interval,
    paired t and sign-flip p, and whether the interval excludes 0)."""
    key = (head, attribute, "worst", "worst_group_accuracy")
    cells = {r["arm"]: r for r in table_rows if (r["head"], r["attribute"], r["group"], r["metric"]) == key}
    out = {"head": head, "attribute": attribute, "metric": "worst_group_accuracy", "arms": {}, "comparisons": []}
    mean = cells["original"].get("mean") if "original" in cells else None
    if mean is None or not np.isfinite(mean):  # (a worst-group accuracy of exactly 0 is a result, not missing)
        return {**out, "missing": f"no worst-group accuracy of {head!r} over {attribute!r}: no label x "
                f"{attribute!r} cell of at least evaluation.min_group test rows"}  # fmt: skip
    arms = {arm: {k: cells[arm].get(k) for k in ("mean", "ci_low", "ci_high", "n_seeds")} for arm in cells}
    comparisons = []
    for arm in PRIMARY_LABELS:  # the generative arms first; the non-generative fixes beside them
        r = cells.get(arm)
        if r is None or r.get("diff") is None:
            continue
        low, high = r.get("diff_ci_low"), r.get("diff_ci_high")
        finite = low is not None and high is not None and np.isfinite(low) and np.isfinite(high)
        comparisons.append({
            "arm": arm, "label": PRIMARY_LABELS[arm], "diff": r["diff"], "ci_low": low, "ci_high": high,
            "p_paired_t": r.get("p_paired_t"), "p_sign_flip": r.get("p_sign_flip"), "n_seeds": r["n_seeds"],
            "resolved": bool(finite and (low > 0 or high < 0)),
            "half_width": (high - low) / 2 if finite else None,
        })  # fmt: skip
    return {**out, "arms": arms, "comparisons": comparisons}


def seed_resolution(n_seeds: int, level: float) -> dict:
    """What n paired seeds can resolve: the t-interval's half width per unit of the differences' sd, and the
    smallest two-sided p the exact sign-flip test can give (2 / 2^n; the t-test has no such floor)."""
    from prism_ray.scoring.classification import t_quantile

    t = t_quantile(0.5 + level / 2, n_seeds - 1) if n_seeds >= 2 else math.nan
    alpha = 1 - level
    return {
        "n_seeds": n_seeds, "df": n_seeds - 1, "t_critical": t, "half_width_per_sd": t / math.sqrt(n_seeds),
        "min_sign_flip_p": 2.0 / 2**n_seeds,
        "seeds_for_sign_flip": next(n for n in range(2, 64) if 2.0 / 2**n <= alpha),
    }  # fmt: skip


def exploratory_tests(table_rows: list[dict], primary: dict, alpha: float) -> dict:
    """The paired t-tests of every other row: how many, how many below `alpha`, how many chance alone gives."""
    key = (primary["head"], primary["attribute"], "worst", "worst_group_accuracy")
    p = [r["p_paired_t"] for r in table_rows
         if r.get("p_paired_t") is not None and np.isfinite(r["p_paired_t"])
         and (r["head"], r["attribute"], r["group"], r["metric"]) != key]  # fmt: skip
    return {"tests": len(p), "below_alpha": sum(v < alpha for v in p), "expected_by_chance": alpha * len(p),
            "alpha": alpha, "smallest_p": min(p) if p else None}  # fmt: skip


def primary_text(primary: dict, resolution: dict, exploratory: dict, level: float) -> dict:
    """The report's opening as plain data: sentences before the table, the table, and sentences after it."""
    head, attribute = primary["head"], primary["attribute"]
    columns = ["comparison", "arm mean", f"difference [{level:.0%} CI]", "p (paired t)", "p (sign-flip)",
               "verdict"]
    if primary.get("missing"):
        return {"lead": f"The primary comparison could not be computed: {primary['missing']}.", "columns": columns,
                "rows": [], "verdict": "No verdict.", "after": []}  # fmt: skip
    base = primary["arms"]["original"]
    lead = (
        f"Stated in the config before the run (evaluation.primary_head, evaluation.primary_attribute): the "
        f"worst-group accuracy of `{head}`, the lowest accuracy over its label × `{attribute}` cells, arm minus "
        f"`original`, paired by seed. (a) original: {_fmt(base['mean'])} "
        f"[{_fmt(base['ci_low'])}, {_fmt(base['ci_high'])}]."
    )
    rows, verdicts = [], []
    for c in primary["comparisons"]:
        arm = primary["arms"][c["arm"]]
        if c["resolved"]:
            verdict = f"`{c['arm']}` {'above' if c['diff'] > 0 else 'below'} `original` (the interval excludes 0)"
        else:
            verdict = "not resolved (the interval includes 0)"
        interval = f"[{_fmt(c['ci_low'], sign=True)}, {_fmt(c['ci_high'], sign=True)}]"
        rows.append([c["label"], _fmt(arm["mean"]), f"{_fmt(c['diff'], sign=True)} {interval}",
                     _fmt(c["p_paired_t"]), _fmt(c["p_sign_flip"]), verdict])  # fmt: skip
        verdicts.append(f"{c['label']} = {_fmt(c['diff'], sign=True)}: {verdict}")
    n = resolution["n_seeds"]
    widths = ", ".join(
        f"±{_fmt(c['half_width'])} for {c['label']}" for c in primary["comparisons"] if c["half_width"]
    )
    seeds = (
        f"What {n} seeds can resolve: the paired t-test has {resolution['df']} degrees of freedom, so the "
        f"{level:.0%} interval of a difference is ± {_fmt(resolution['t_critical'], 2)} × sd / √{n} = "
        f"± {_fmt(resolution['half_width_per_sd'], 2)} × the seed-to-seed sd of the paired differences"
        + (f" (here {widths})" if widths else "")
        + "; a smaller true difference cannot be told from 0. The exact sign-flip test cannot go below "
        f"p = {_fmt(resolution['min_sign_flip_p'])} with {n} seeds (2 / 2^{n}); it needs "
        f"{resolution['seeds_for_sign_flip']} seeds to reach p ≤ {exploratory['alpha']:g}."
    )
    e, k = exploratory, max(1, len(primary["comparisons"]))
    multiplicity = (
        f"Multiplicity: everything below is exploratory. Its tables hold {e['tests']} paired t-tests (arms × heads "
        f"× metrics × subgroups) without correction, {e['below_alpha']} of them with p < {e['alpha']:g} where about "
        f"{e['expected_by_chance']:.1f} would by chance alone if no arm differed, so a single small p among them "
        f"(smallest here: {_fmt(e['smallest_p'])}) is not evidence that an arm helped. The conclusion rests on the "
        f"primary comparison's {k} test{'s' if k > 1 else ''} (Bonferroni over them: p < {e['alpha'] / k:g})."
    )
    return {"lead": lead, "columns": columns, "rows": rows, "verdict": "; ".join(verdicts) + ".",
            "after": [seeds, multiplicity]}  # fmt: skip


REPORT_COLUMNS = (
    "metric",
    "arm",
    "mean",
    "CI",
    "diff to original",
    "diff CI",
    "p (paired t)",
    "p (sign-flip)",
)


def report_sections(table_rows: list[dict], config: ExperimentConfig) -> dict[str, list[list[str]]]:
    """head -> rows of the report table: overall metrics, worst-group accuracies, label x subgroup accuracies."""
    out = {}
    for head in config.heads:
        mine = [r for r in table_rows if r["head"] == head]
        order: list[tuple] = []
        for r in mine:
            k = (r["attribute"], r["group"], r["label"], r["metric"])
            if k not in order and (k[0] == "all" or k[3] == "worst_group_accuracy" or k[2] is not None):
                order.append(k)
        rows = []
        for attribute, group, label, metric in order:
            if attribute == "all":
                what = metric
            elif group == "worst":
                what = f"worst-group accuracy over {head} x {attribute}"
            else:
                what = f"accuracy given {head}={label}, {attribute}={group}"
            for r in mine:
                if (r["attribute"], r["group"], r["label"], r["metric"]) != (attribute, group, label, metric):
                    continue
                rows.append(
                    [
                        what,
                        r["arm"],
                        _fmt(r["mean"]),
                        f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
                        _fmt(r.get("diff")),
                        f"[{_fmt(r.get('diff_ci_low'))}, {_fmt(r.get('diff_ci_high'))}]"
                        if "diff" in r
                        else "",
                        _fmt(r.get("p_paired_t")),
                        _fmt(r.get("p_sign_flip")),
                    ]
                )
        out[head] = rows
    return out


def markdown_row(cells: list[str]) -> str:
    """One Markdown table row; a '|' inside a cell is escaped so the row keeps its column count."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def write_report(layout, summary: dict, table_rows: list[dict], config: ExperimentConfig) -> None:
    """report.md, and report.html through the shared renderer (`prism_ray.report.html`) when present."""
    import fsspec

    level = config.evaluation.level
    intro = (
        f"Arms {list(summary['arms'])}, seeds {config.seeds}; test split `{config.test_split}` "
        f"({summary['test_rows']} images). Mean over seeds with a {level:.0%} t-interval; "
        "differences to `original` are paired by seed (two-sided paired t-test; exact sign-flip p, which "
        "cannot go below 2/2^seeds)."
    )
    primary = primary_comparison(table_rows, *config.primary())
    resolution = seed_resolution(len(config.seeds), level)
    opening = primary_text(primary, resolution, exploratory_tests(table_rows, primary, 1 - level), level)
    sections = report_sections(table_rows, config)
    lines = ["# Did the augmentation help?", "", "## Primary comparison", "", opening["lead"], "",
             markdown_row(opening["columns"]), "|" + "---|" * len(opening["columns"])]  # fmt: skip
    lines += [markdown_row(row) for row in opening["rows"]]
    lines += ["", f"**{opening['verdict']}**", ""]
    for sentence in opening["after"]:
        lines += [sentence, ""]
    lines += ["## All rows (exploratory)", "", intro, ""]
    for head, rows in sections.items():
        lines += [f"### {head}", "", markdown_row(list(REPORT_COLUMNS)), "|" + "---|" * len(REPORT_COLUMNS)]
        lines += [markdown_row(row) for row in rows] + [""]
    with fsspec.open(layout.uri("report.md"), "w") as f:
        f.write("\n".join(lines))
    try:
        from prism_ray.report.html import HtmlReport
    except ImportError:  # hook: the HTML renderer is not part of this installation
        return
    report = HtmlReport("Did the augmentation help?")
    report.add_heading("Primary comparison", id="primary")
    report.add_paragraph(opening["lead"])
    report.add_table(columns=opening["columns"], rows=opening["rows"], id="primary-table")
    report.add_paragraph(opening["verdict"], id="verdict")
    for sentence in opening["after"]:
        report.add_paragraph(sentence, css_class="note")
    report.add_heading("All rows (exploratory)", id="exploratory")
    report.add_paragraph(intro)
    for head, rows in sections.items():
        with report.details(f"{head}: {len(rows)} rows"):
            report.add_table(columns=list(REPORT_COLUMNS), rows=rows)
    report.write(layout.uri("report.html"))
