"""`prism-ray audit`: every image x every intervention (+ a control reconstruction), classifier heads and CLIP scored.

Per source the step inverts once, reconstructs it unedited through the same pipeline (the
*control*: what the inversion and decoding alone change) and edits it with every intervention
whose caption differs from the source's; every classifier head scores the original, the control
and each counterfactual. The statistics (`scoring.audit_stats`) then compare each head's change
rate under an intervention with its change rate under the control, over the same images, and
flag the heads that change although the intervention did not ask for it (the papers'
"removing cardiomegaly also removed the pacemaker").

No quotas and no rounds: every selected source once, in batches over the same long-lived steps
as `augment` (`distributed.actors.ActorPool`), resumable through the results ledger.

Output layout under `output` (docs/results.md):
  rows.parquet                     one row per source x intervention (every score, see `row_schema`)
  errors.parquet                   one row per failure (source, stage, reason)
  cochange.parquet                 intervention x attribute x subgroup co-change statistics
  interventions.parquet            per intervention x subgroup: target CPG, acceptance, L1
  summary.json                     what ran, counts, accounting, flagged co-changes, timings
  report.html                      the self-contained report (heatmap, flagged table, image grids)
  images/<intervention>/<id>.png   counterfactuals; images/control/<id>.png the control reconstructions
  _ledger/rows|errors/*.parquet    finished batches not yet compacted into rows/errors.parquet
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from functools import partial
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from prism_ray.config import BaseConfig, ConfigError, config_field
from prism_ray.console import Progress
from prism_ray.data.config import DataConfig
from prism_ray.engine.settings import EditConfig, InversionConfig
from prism_ray.faults import fault_point
from prism_ray.models.config import ModelConfig
from prism_ray.pipelines.audit_step import AuditStep, classifier_attributes, error_schema, row_schema
from prism_ray.pipelines.augment import ActorPoolConfig, batches, data_identity, map_batches, model_roots
from prism_ray.pipelines.counterfactuals import BatchReport
from prism_ray.results.clock import utc_now
from prism_ray.results.compaction import compact_table, read_column, table_files
from prism_ray.results.layout import Layout, digest
from prism_ray.results.ledger import OutputGuard, OutputWriteError, check_writable
from prism_ray.scoring.audit_stats import CONTROL, AuditStatsConfig
from prism_ray.scoring.filter import FilterConfig

log = logging.getLogger("prism_ray.audit")

# The row contract the statistics read (scoring.audit_stats): per attribute `a` three probability
# columns (original, control reconstruction, counterfactual) and per subgroup a GROUP column
# ("group__sex" = "female").


class AuditClassifierConfig(BaseConfig):
    """One attribute classifier (a transformers image-classification folder, sigmoid heads)."""

    path: str = Field(
        ..., min_length=1, description="classifier folder (a model family's 'classifier/' is found)"
    )
    heads: dict[str, str] | None = Field(
        None, description="head name -> attribute name in the tables; None = every head under its own name"
    )


class AuditReportConfig(BaseConfig):
    """How many pictures the report embeds (it samples: a 100k-image audit stays a few MB)."""

    strongest: int = Field(
        4, ge=0, description="examples per flagged cell and intervention, largest change first"
    )
    random: int = Field(2, ge=0, description="random examples per intervention")
    max_images: int = Field(120, ge=0, description="hard cap on embedded example rows")


DEFAULT_TARGETS = {
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "pleural_effusion",
    "Support Devices": "support_devices",
    "sex": "sex_female",
}
DEFAULT_IMPLIED = {"Support Devices": ["pacemaker", "tube", "ecg"]}


class AuditConfig(BaseConfig):
    """`prism-ray audit`: which images, which model, which classifiers and interventions, where to write."""

    model: ModelConfig = ModelConfig()
    data: DataConfig
    classifiers: list[AuditClassifierConfig] = Field(..., min_length=1)
    interventions: list[str] = Field(
        ...,
        min_length=1,
        description="compact do(...) forms: 'Cardiomegaly=0', "
        "'sex=flip', 'age=+20'; each applies to the sources whose caption it changes",
    )
    targets: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_TARGETS),
        description="intervened attribute -> the classifier attribute it is meant to change",
    )
    implied: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_IMPLIED.items()},
        description="intervened attribute -> other attributes it may change (not flagged)",
    )
    subgroups: list[str | list[str]] = Field(
        default_factory=lambda: ["sex", "age"],
        description="caption attributes whose values split the statistics (plus 'all'), or lists of them "
        "(label combinations, e.g. [Cardiomegaly, Support Devices]); attributes the adapter lacks are skipped",
    )
    selector: dict[str, str | int | float | bool | list[str | int | float | bool]] = Field(
        default_factory=dict, description="manifest column -> value(s): the rows to audit (empty: all)"
    )
    max_sources: int | None = Field(None, ge=1, description="audit a seeded random subset of this size")
    inversion: InversionConfig = InversionConfig()
    # A loose noise-difference blend by default. A tight blend (the augment job's 0.5) pastes most of the
    # image back from the source and hides the co-changes the audit looks for; no blend lets the edit
    # re-draw what the model leaves to chance (which device kind "Support Devices" becomes), a drift the
    # unedited control cannot show. The noise mask at 0.3 covers what the model itself changes with the
    # caption, learnt relationships included (BENCHMARKS.md, bias audit: no blend flagged the control
    # model's pacemaker drift, this blend did not, and kept both planted findings).
    edit: EditConfig = EditConfig(local_blend=True, blend_mask="noise", noise_mask_threshold=0.3)
    filter: FilterConfig = FilterConfig()
    stats: AuditStatsConfig = AuditStatsConfig()
    report: AuditReportConfig = AuditReportConfig()
    save_images: bool = Field(
        True, description="write every counterfactual and control PNG (the report needs some)"
    )
    compute: ActorPoolConfig = ActorPoolConfig()
    output: str = Field(..., min_length=1, description="output folder, any fsspec URI")
    seed: int = Field(0, ge=0, lt=2**63)

    mode: Literal["counterfactual"] = Field("counterfactual", description="fixed: the engine edits")

    @model_validator(mode="after")
    def _check(self) -> AuditConfig:
        from prism_ray.data.captions import check_interventions, parse_interventions

        check_interventions(self.data.adapter, self.data.adapter_options, self.interventions)
        if len(set(self.interventions)) != len(self.interventions):
            raise ValueError("interventions: listed twice")
        for spec in self.interventions:
            if spec == CONTROL:
                raise ValueError(f"interventions: {CONTROL!r} is the audit's own control")
            if not any(i.attribute in self.targets for i in parse_interventions(spec)):
                raise ValueError(
                    f"targets: no target attribute for intervention {spec!r} (add its attribute)"
                )
        if self.model.dtype != "float32":
            raise ValueError(f"model.dtype: inversion needs float32 weights, got {self.model.dtype}")
        return self

    def results_hash(self, weights_digest: str) -> str:
        """What decides a row's values: model weights, how data is read, method knobs, the filter (each row's
        `accepted`), classifiers (not compute/report). The manifest's name and the row selection are left out: a task id carries its
        source row's content (`plan_tasks`), so a corrected copy of the manifest resumes the folder."""
        dump = self.model_dump(mode="json")
        keep = {k: dump[k] for k in ("classifiers", "seed", "filter")}  # every row stores `accepted`
        keep.update(data=data_identity(self.data), inversion=self.inversion.identity(), edit=self.edit.identity())
        keep["model"] = {k: v for k, v in dump["model"].items() if k not in ("device", "cache_dir")}
        keep["weights"] = weights_digest
        import json

        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def target_of(self, intervention: str) -> str:
        from prism_ray.data.captions import parse_interventions

        return next(
            self.targets[i.attribute]
            for i in parse_interventions(intervention)
            if i.attribute in self.targets
        )

    def expected_of(self, intervention: str) -> list[str]:
        """Attributes the intervention may change without being flagged: its targets and their implied ones."""
        from prism_ray.data.captions import parse_interventions

        out: list[str] = []
        for item in parse_interventions(intervention):
            out += [self.targets[item.attribute]] if item.attribute in self.targets else []
            out += self.implied.get(item.attribute, [])
        return list(dict.fromkeys(out))


# --- planning (driver: metadata only) ---------------------------------------------------------


def plan_tasks(config: AuditConfig, results_hash: str) -> tuple[list[dict], list[dict], dict]:
    """Every selected source -> one task (its applicable interventions) + error rows + accounting.

    An intervention applies to a source when it changes its caption (do(Cardiomegaly=0) on an image
    without cardiomegaly, or age=+20 in the oldest bin, is not an edit). Tasks carry only metadata.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from prism_ray.data.captions import get_adapter
    from prism_ray.data.manifest import prepare_manifest, read_sources

    manifest = prepare_manifest(config.data)
    table = manifest.table
    for column, values in config.selector.items():
        if column not in table.column_names:
            raise ConfigError(f"config field 'selector.{column}': the manifest has no column {column!r}")
        allowed = values if isinstance(values, list) else [values]
        try:
            value_set = pa.array(allowed).cast(table.column(column).type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            raise ConfigError(
                f"config field 'selector.{column}': {allowed!r} does not fit the column ({err})"
            ) from None
        table = table.filter(pc.fill_null(pc.is_in(table.column(column), value_set=value_set), False))
    selected = table.num_rows
    if config.max_sources is not None and table.num_rows > config.max_sources:
        pick = np.sort(
            np.random.default_rng(config.seed).choice(table.num_rows, config.max_sources, replace=False)
        )
        table = table.take(pa.array(pick))
    sources, row_errors = read_sources(config.data, table)
    adapter = get_adapter(config.data.adapter, **config.data.adapter_options)
    groups = group_columns(config)
    tasks, errors = (
        [],
        [dict(e.as_row(), task_id=None, intervention=None) for e in manifest.errors + row_errors],
    )
    counts = Counter()
    targets = {spec: config.target_of(spec) for spec in config.interventions}
    # Sources with the same labels get the same edits: plan each label combination once
    # (a 100k-image manifest has a few hundred), so planning costs what reading the manifest does.
    plans: dict[tuple, tuple[dict, list[dict], list[tuple[str, str]]]] = {}
    for s in sources:
        key = tuple(s.row.get(c) for c in adapter.label_columns) + (s.caption,)
        if key not in plans:
            attrs = adapter.attributes(s.row)
            edits, failures = [], []
            for spec in config.interventions:
                try:
                    prompt = adapter.render(adapter.intervene(attrs, spec))
                except ValueError as err:
                    failures.append((spec, str(err)))
                    continue
                if prompt != s.caption:
                    edits.append({"intervention": spec, "edit_prompt": prompt, "target": targets[spec]})
            plans[key] = ({g: _group_value(attrs[g]) for g in groups}, edits, failures)
        groups_of, edits, failures = plans[key]
        errors += [
            dict(source_uri=s.image_uri, intervention=spec, stage="caption", reason=reason)
            for spec, reason in failures
        ]
        counts["not_applicable"] += len(config.interventions) - len(edits) - len(failures)
        if not edits:
            counts["sources_without_edit"] += 1
            continue
        # What the task's rows depend on: the image, its caption and labels (group values, edit captions).
        content = [s.caption, *sorted(groups_of.items()), *[(e["intervention"], e["edit_prompt"]) for e in edits]]
        task_id = digest("audit-task", s.image_uri, results_hash, *content)
        tasks.append(
            {
                "task_id": task_id,
                "source_uri": s.image_uri,
                "row": s.index,
                "source_prompt": s.caption,
                "groups": groups_of,
                "edits": edits,
            }
        )
    accounting = {
        "input_rows": manifest.input_rows,
        "duplicate_rows_collapsed": manifest.duplicate_rows_collapsed,
        "not_selected": manifest.input_rows
        - manifest.duplicate_rows_collapsed
        - len(manifest.errors)
        - selected,
        "not_sampled": selected - table.num_rows,
        "rows_with_errors": len(manifest.errors) + len(row_errors),
        "sources": len(sources),
        "sources_without_applicable_intervention": counts["sources_without_edit"],
        "source_interventions_not_applicable": counts["not_applicable"],
        "tasks": len(tasks),
        "planned_rows": sum(len(t["edits"]) for t in tasks),
    }
    return tasks, errors, accounting


def group_columns(config: AuditConfig) -> list[str]:
    """Caption attributes named by `subgroups` (alone or in combinations) that the adapter has."""
    from prism_ray.data.captions import get_adapter

    known = get_adapter(config.data.adapter, **config.data.adapter_options).known_attributes()
    named = {g for spec in config.subgroups for g in ([spec] if isinstance(spec, str) else spec)}
    return [g for g in known if g in named]


def stats_subgroups(config: AuditConfig) -> list[str | tuple[str, ...]]:
    groups = set(group_columns(config))
    out = []
    for spec in config.subgroups:
        names = (spec,) if isinstance(spec, str) else tuple(spec)
        if all(n in groups for n in names):
            out.append(names[0] if len(names) == 1 else names)
    return out


def _group_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# --- resuming ---------------------------------------------------------------------------------


def finished_tasks(layout: Layout, results_hash: str) -> tuple[set[str], set[str]]:
    """(task ids with rows, task ids that failed at read/invert): both are not planned again.

    Reads two columns only, so resuming a million-row audit does not load its rows.
    """
    fs, _ = layout.fs()
    done: set[str] = set()
    hashes: set[str] = set()
    for path in table_files(layout, "rows.parquet", "rows"):
        done.update(read_column(fs, path, "task_id"))
        hashes.update(read_column(fs, path, "config_hash"))
    failed: set[str] = set()
    for path in table_files(layout, "errors.parquet", "errors"):
        ids, stages = read_column(fs, path, "task_id"), read_column(fs, path, "stage")
        hashes.update(read_column(fs, path, "config_hash"))
        failed.update(t for t, s in zip(ids, stages, strict=True) if t and s in ("read", "invert", "edit"))
    other = sorted(h for h in hashes - {results_hash} if h)
    if other:
        raise ValueError(
            f"output '{layout.root}' holds results of another configuration or model weights "
            f"(config_hash {other}, this run's is {results_hash}); choose a new output URI"
        )
    return done, failed - done


# --- the job ---------------------------------------------------------------------------------


def run(config: AuditConfig, runner) -> dict:
    """Audit every selected source once (resuming what an earlier run finished); returns the summary.

    `runner(step_factory, compute, output)` as in `pipelines.augment.run` (`augment.in_process`, or the Ray
    actors of `distributed.rounds.ray_runner`: the CLI's choice).
    """
    from prism_ray.data.schemas import rows_to_table
    from prism_ray.models.loading import resolve_model_root, weights_digest
    from prism_ray.results.ledger import write_json_atomic, write_part
    from prism_ray.scoring.audit_stats import audit_statistics

    started, t0 = utc_now(), time.perf_counter()
    layout = Layout.of(config.output)
    if layout.root != config.output:
        config = config.model_copy(update={"output": layout.root})
    m = config.model
    roots = model_roots(config)  # wrong model paths are config errors here, before the output exists
    for i, c in enumerate(config.classifiers):
        with config_field(f"classifiers.{i}.path"):
            roots.append(resolve_model_root(c.path, m.cache_dir))
    check_writable(layout)  # a read-only or full output ends the job now, not after every batch
    log.info("audit: output %s", layout.root)
    model_id = weights_digest(*roots)
    results_hash = config.results_hash(model_id)
    attributes = classifier_attributes(config)
    seconds = Counter()

    t = time.perf_counter()
    tasks, plan_errors, accounting = plan_tasks(config, results_hash)
    done, failed = finished_tasks(layout, results_hash)
    todo = [task for task in tasks if task["task_id"] not in done and task["task_id"] not in failed]
    seconds["plan"] = time.perf_counter() - t
    log.info(
        "audit: %d sources x %d interventions -> %d rows planned; %d tasks finished earlier, %d to do",
        accounting["sources"],
        len(config.interventions),
        accounting["planned_rows"],
        len(tasks) - len(todo),
        len(todo),
    )
    if plan_errors:
        stamped = [dict(e, config_hash=results_hash, created_at=utc_now()) for e in plan_errors]
        write_part(
            layout,
            "errors",
            "plan-" + digest("plan", results_hash, len(stamped)) + ".parquet",
            rows_to_table(stamped, error_schema()),
        )

    tally = Counter()
    work_seconds = 0.0
    actors: dict = {}
    if todo:
        step_factory = partial(OutputGuard, partial(AuditStep, config, results_hash, attributes), layout.root)
        total = sum(len(task["edits"]) for task in todo)
        line = Progress("audit:   rows", total, "rows", detail=lambda: f"{tally['error']} errors")

        def on_report(report: BatchReport) -> None:
            for _, outcome in report.outcomes.values():
                tally[outcome] += 1
            tally["sources"] += report.sources
            fault_point("audit.batch_done")
            seconds.update({f"actor_{k}": v for k, v in report.seconds.items()})
            line.advance(len(report.outcomes))

        t = time.perf_counter()
        with line:  # from the Ray start on: the first rows come only after the actors load the models
            pool = runner(step_factory, config.compute, layout.root)
            try:
                map_batches(pool, batches(todo, config.compute.batch_size, config.compute.num_actors), on_report)
                actors = pool.stats()
            finally:
                pool.close()
        work_seconds = time.perf_counter() - t

    t = time.perf_counter()
    n_rows = compact_table(layout, "rows.parquet", "rows", row_schema(attributes, group_columns(config)))
    n_errors = compact_table(layout, "errors.parquet", "errors", error_schema())
    seconds["compact"] = time.perf_counter() - t
    if n_rows == 0:
        write_json_atomic(
            {"job": "audit", "rows": 0, "errors": n_errors, "accounting": accounting},
            layout.summary,
        )
        raise ValueError(f"audit: no source could be audited ({n_errors} error rows, see {layout.errors})")

    t = time.perf_counter()
    expected = {spec: config.expected_of(spec) for spec in config.interventions}
    tables = audit_statistics(
        layout.uri("rows.parquet"), stats_subgroups(config), expected, config.stats, attributes=attributes
    )
    from prism_ray.results.ledger import write_table_atomic

    write_table_atomic(tables.cochange, layout.uri("cochange.parquet"))
    write_table_atomic(tables.interventions, layout.uri("interventions.parquet"))
    seconds["statistics"] = time.perf_counter() - t
    flagged = [r for r in tables.cochange.to_pylist() if r["flagged"]]
    flagged.sort(key=lambda r: (r["q_value"], -abs(r["difference"])))
    summary = {
        "job": "audit",
        "output": layout.root,
        "results_hash": results_hash,
        "model_weights_digest": model_id,
        "model": m.path,
        "classifiers": [c.path for c in config.classifiers],
        "attributes": attributes,
        "interventions": config.interventions,
        "edit": {
            "controller": config.edit.controller,
            "local_blend": config.edit.local_blend,
            "inversion": config.inversion.method,
            "steps": config.inversion.num_inference_steps,
        },
        "started_at": started.isoformat(),
        "wall_seconds": time.perf_counter() - t0,
        "rows": n_rows,
        "error_rows": n_errors,
        "accounting": accounting,
        "this_run": {
            "rows": tally["accepted"],
            "row_errors": tally["error"],
            "sources": tally["sources"],
            "seconds": work_seconds,
            "sources_per_second": tally["sources"] / work_seconds if work_seconds else None,
        },
        "flagged": [
            {
                k: r[k]
                for k in (
                    "intervention",
                    "attribute",
                    "subgroup",
                    "change_rate",
                    "control_rate",
                    "difference",
                    "ci_low",
                    "ci_high",
                    "q_value",
                )
            }
            for r in flagged
        ],
        "stats": config.stats.model_dump(mode="json"),
        "seconds": dict(seconds),
        "actors": actors,
    }
    t = time.perf_counter()
    from prism_ray.pipelines.audit_examples import write_report

    try:
        write_report(config, layout, summary, tables)
    except OutputWriteError as err:  # the tables are written: the report is not a result, the run ends by them
        log.warning("audit: no report: %s", err)
    summary["seconds"]["report"] = time.perf_counter() - t
    write_json_atomic(summary, layout.summary)
    for r in summary["flagged"][:10]:
        log.info(
            "audit: FLAGGED %s -> %s (%s): %.0f%% vs %.0f%% control, q=%.1g",
            r["intervention"],
            r["attribute"],
            r["subgroup"],
            100 * r["change_rate"],
            100 * r["control_rate"],
            r["q_value"],
        )
    log.info(
        "audit: %d rows, %d error rows, %d flagged co-changes; report %s",
        n_rows,
        n_errors,
        len(summary["flagged"]),
        layout.uri("report.html"),
    )
    return summary
