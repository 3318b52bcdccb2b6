"""The audit's per-batch step: read -> invert once -> control + every intervention -> classifier heads, CLIP -> rows.

`AuditStep(config, results_hash, attributes)` loads the method (`pipelines.counterfactuals.MethodEngine`)
and the classifiers once; each call turns a batch of tasks (one per source, all its applicable
interventions) into PNGs and one ledger part of `row_schema` rows, and returns per-row outcomes
only. Exceptions are classified as in `pipelines.counterfactuals`: unreadable images and engine
item errors become error rows, transient errors are raised for a retry, anything else crashes.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from prism_ray.config import ConfigError
from prism_ray.faults import fault_point
from prism_ray.pipelines.counterfactuals import BatchReport
from prism_ray.results.clock import utc_now
from prism_ray.results.layout import Layout, digest
from prism_ray.scoring.audit_stats import CONTROL, GROUP, P_CF, P_CTRL, P_ORIG

# --- classifiers ------------------------------------------------------------------------------


class Classifiers:
    """Every configured classifier, loaded once; `__call__` gives (N, A) probabilities in `attributes` order."""

    def __init__(self, configs: list, device, cache_dir: str | None = None):
        from prism_ray.models.classifier import classifier_labels, load_classifier
        from prism_ray.models.loading import resolve_model_root

        self.models, self.attributes = [], []
        for i, c in enumerate(configs):
            model = load_classifier(resolve_model_root(c.path, cache_dir), device=device)
            heads = classifier_labels(model)
            mapping = c.heads or {h: h for h in heads}
            missing = sorted(set(mapping) - set(heads))
            if missing:
                raise ConfigError(
                    f"config field 'classifiers.{i}.heads': {missing} not among the heads {heads}"
                )
            self.models.append((model, [heads.index(h) for h in mapping]))
            self.attributes += list(mapping.values())
        clash = sorted({a for a in self.attributes if self.attributes.count(a) > 1})
        if clash:
            raise ConfigError(
                f"config field 'classifiers': attribute names {clash} come from two heads; "
                "rename them with 'heads'"
            )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from prism_ray.models.classifier import predict_proba

        return np.concatenate([predict_proba(m, images)[:, cols] for m, cols in self.models], axis=1)


def classifier_attributes(config) -> list[str]:
    """The attribute columns the rows will carry (loads the classifier configs only, not weights)."""
    import json

    from prism_ray.models.loading import resolve_model_root

    out = []
    for c in config.classifiers:
        root = resolve_model_root(c.path, config.model.cache_dir)
        folder = root / "classifier" if (root / "classifier" / "config.json").exists() else root
        try:
            labels = json.loads((folder / "config.json").read_text())["id2label"]
        except (OSError, KeyError, ValueError) as err:
            raise ConfigError(
                f"config field 'classifiers': '{c.path}' is not a classifier folder ({err})"
            ) from None
        heads = [labels[str(i)] for i in range(len(labels))]
        out += list((c.heads or {h: h for h in heads}).values())
    return out


# --- rows -----------------------------------------------------------------------------------


def row_schema(attributes: list[str], groups: list[str]):
    """rows.parquet: identity, prompts, subgroup values, three probabilities per attribute, scores."""
    import pyarrow as pa

    fields = [
        ("row_id", pa.string()),
        ("task_id", pa.string()),
        ("source_uri", pa.string()),
        ("source_id", pa.string()),
        ("intervention", pa.string()),
        ("target", pa.string()),
        ("source_prompt", pa.string()),
        ("edit_prompt", pa.string()),
        *[(GROUP + g, pa.string()) for g in groups],
        *[(prefix + a, pa.float32()) for a in attributes for prefix in (P_ORIG, P_CTRL, P_CF)],
        ("s_clip", pa.float32()),
        ("clip_image_image", pa.float32()),
        ("clip_image_text", pa.float32()),
        ("l1", pa.float32()),
        ("control_l1", pa.float32()),
        ("reconstruction_error", pa.float32()),
        ("reconstruction_psnr", pa.float32()),
        ("accepted", pa.bool_()),
        ("image_uri", pa.string()),
        ("control_uri", pa.string()),
        ("inversion_seconds", pa.float32()),
        ("edit_seconds", pa.float32()),
        ("config_hash", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
    return pa.schema(fields)


def error_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("task_id", pa.string()),
            ("source_uri", pa.string()),
            ("intervention", pa.string()),
            ("stage", pa.string()),
            ("reason", pa.string()),
            ("config_hash", pa.string()),
            ("created_at", pa.timestamp("us", tz="UTC")),
        ]
    )



def _image_key(intervention: str, item_id: str) -> str:
    return f"images/{digest('intervention', intervention, size=8)}/{item_id}.png"


class AuditStep:
    """Loads the method and the classifiers once; each call: a batch of sources -> PNGs + one ledger part."""

    def __init__(self, config, results_hash: str, attributes: list[str], engine=None, classifiers=None):
        from prism_ray.pipelines.counterfactuals import MethodEngine

        self.config, self.results_hash, self.attributes = config, results_hash, attributes
        self.layout = Layout.of(config.output)
        self.model_loads = 0
        if engine is None:
            engine = MethodEngine(config)
            self.model_loads += 1
        self.engine = engine
        if classifiers is None:
            classifiers = Classifiers(
                config.classifiers, getattr(engine, "sd", None) and engine.sd.device, config.model.cache_dir
            )
        self.classify = classifiers
        from prism_ray.pipelines.audit import group_columns

        self.groups = group_columns(config)
        self.schema = row_schema(attributes, self.groups)

    def __call__(self, tasks: list[dict]) -> BatchReport:
        from prism_ray.data.schemas import rows_to_table
        from prism_ray.pipelines.counterfactuals import read_batch
        from prism_ray.results.ledger import write_part

        fault_point("step.start")
        rows: list[dict] = []
        errors: list[dict] = []
        seconds: Counter = Counter()
        start = time.perf_counter()
        sources, unreadable = read_batch(tasks, self.config.data.decode, self.engine.vae_scale_factor)
        errors += [
            self._error(t["source_uri"], None, "read", reason, t["task_id"]) for t, reason in unreadable
        ]
        seconds["read"] += time.perf_counter() - start
        if sources:
            start = time.perf_counter()
            edited, failed = self.engine.counterfactuals(
                [p for _, _, p in sources], [t for t, _, _ in sources]
            )
            seconds["edit"] += time.perf_counter() - start
            for i, stage, reason in failed:
                task = sources[i][0]
                errors.append(self._error(task["source_uri"], None, stage, reason, task_id=task["task_id"]))
            start = time.perf_counter()
            for item in edited:
                task, source_id, _ = sources[item.index]
                rows += self._rows(task, source_id, item, seconds)
            seconds["score"] += time.perf_counter() - start
        fault_point("step.before_ledger")
        name = digest("batch", *sorted(t["task_id"] for t in tasks)) + ".parquet"
        if errors:
            write_part(self.layout, "errors", name, rows_to_table(errors, error_schema()))
        if rows:
            write_part(self.layout, "rows", name, rows_to_table(rows, self.schema))
        report = BatchReport(sources=len(tasks), seconds=seconds)
        done = {r["row_id"] for r in rows}
        for task in tasks:
            for e in task["edits"]:
                row_id = digest("audit-row", task["task_id"], e["intervention"])
                report.outcomes[row_id] = (e["intervention"], "accepted" if row_id in done else "error")
        return report

    def _rows(self, task: dict, source_id: str, item, seconds: Counter) -> list[dict]:
        from prism_ray.data.storage import write_png
        from prism_ray.scoring.metrics import l1

        k = len(task["edits"])
        source = item.source if item.source is not None else item.images[0] * 0
        control = item.reconstruction if item.reconstruction is not None else source
        p = self.classify(np.concatenate([source[None], control[None], item.images]))  # (2 + K, A)
        accepted = self.config.filter.accept(item.scores)
        control_l1 = float(l1(control[None], source[None], "unit")[0])
        control_uri = None
        start = time.perf_counter()
        if self.config.save_images:
            control_uri = self.layout.uri(_image_key(CONTROL, task["task_id"]))
            write_png(control, control_uri)
        rows = []
        for j, e in enumerate(task["edits"]):
            row_id = digest("audit-row", task["task_id"], e["intervention"])
            image_uri = None
            if self.config.save_images:
                image_uri = self.layout.uri(_image_key(e["intervention"], row_id))
                write_png(item.images[j], image_uri)
            row = {
                "row_id": row_id,
                "task_id": task["task_id"],
                "source_uri": task["source_uri"],
                "source_id": source_id,
                "intervention": e["intervention"],
                "target": e["target"],
                "source_prompt": task["source_prompt"],
                "edit_prompt": e["edit_prompt"],
                **{GROUP + g: task["groups"].get(g) for g in self.groups},
                **{P_ORIG + a: float(p[0, c]) for c, a in enumerate(self.attributes)},
                **{P_CTRL + a: float(p[1, c]) for c, a in enumerate(self.attributes)},
                **{P_CF + a: float(p[2 + j, c]) for c, a in enumerate(self.attributes)},
                **{
                    key: float(item.scores[key][j])
                    for key in (
                        "s_clip",
                        "clip_image_image",
                        "clip_image_text",
                        "l1",
                        "reconstruction_error",
                        "reconstruction_psnr",
                    )
                    if key in item.scores
                },
                "control_l1": control_l1,
                "accepted": bool(accepted[j]),
                "image_uri": image_uri,
                "control_uri": control_uri,
                "inversion_seconds": item.inversion_seconds,
                "edit_seconds": item.edit_seconds / k,
                "config_hash": self.results_hash,
                "created_at": utc_now(),
            }
            rows.append(row)
        seconds["write"] += time.perf_counter() - start
        return rows

    def _error(self, uri, intervention, stage, reason, task_id=None) -> dict:
        return {
            "task_id": task_id,
            "source_uri": uri,
            "intervention": intervention,
            "stage": stage,
            "reason": reason,
            "config_hash": self.results_hash,
            "created_at": utc_now(),
        }
