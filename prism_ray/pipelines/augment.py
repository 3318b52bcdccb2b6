"""`augment` job: quota-exact, resumable counterfactual augmentation sets per subgroup (no Ray here)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from pydantic import Field, field_validator, model_validator

from prism_ray.config import BaseConfig, ConfigError, config_field
from prism_ray.console import Progress
from prism_ray.data.captions import check_interventions, check_selector, parse_interventions
from prism_ray.data.config import DataConfig
from prism_ray.data.schemas import COUNTERFACTUAL_SCHEMA, ERROR_SCHEMA, rows_to_table
from prism_ray.engine.settings import EditConfig, EngineComputeConfig, InversionConfig
from prism_ray.faults import fault_point
from prism_ray.models.config import ModelConfig
from prism_ray.pipelines.counterfactuals import BatchReport, CounterfactualStep, is_transient
from prism_ray.pipelines.quota import PlannerPolicy, Slot, SlotPool, SubgroupProgress, kept_prefix, plan_round
from prism_ray.results.clock import utc_now
from prism_ray.results.layout import Layout, digest
from prism_ray.results.ledger import (
    OutputGuard,
    OutputWriteError,
    check_config_hash,
    check_writable,
    commit,
    read_state,
    write_part,
)
from prism_ray.results.summary import RunIncomplete, write_summary
from prism_ray.scoring.filter import FilterConfig
from prism_ray.scoring.filter import model_fit as filter_model_fit

log = logging.getLogger("prism_ray.augment")

SelectorValue = bool | int | float | str

# Subgroup names become folder names under the output URI: keep them path- and URI-safe.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SubgroupConfig(BaseConfig):
    """One subgroup: which source rows, which edits, and how many accepted counterfactuals to keep.

    `selector`: manifest column -> value (or a list of allowed values); all must match; empty
    selects every row. Numbers compare by value (1 matches a CheXpert 1.0).
    `interventions`: one edit each, in the compact form of `prism_ray.data.captions` ("Support
    Devices=0"; "a=1; b=0" for an edit that changes two attributes at once).
    `prompt`: the text-to-image prompt of `mode: samples` (the paper's "SD samples" arm).
    """

    name: str
    selector: dict[str, SelectorValue | list[SelectorValue]] = Field(default_factory=dict)
    interventions: list[str] = Field(default_factory=list)
    quota: int = Field(2500, ge=0, description="accepted counterfactuals (samples) to keep, exactly")
    prompt: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"must match {_NAME.pattern} (it names an output folder), got {name!r}")
        return name

    @field_validator("selector")
    @classmethod
    def _check_selector(cls, selector: dict) -> dict:
        for column, value in selector.items():
            if isinstance(value, list) and not value:
                raise ValueError(f"column {column!r}: empty list of values selects nothing")
        return selector

    @field_validator("interventions")
    @classmethod
    def _check_interventions(cls, interventions: list[str]) -> list[str]:
        canonical = []
        for spec in interventions:
            parsed = parse_interventions(spec)  # ValueError names the bad string
            if not parsed:
                raise ValueError(f"intervention {spec!r} is empty")
            canonical.append("; ".join(str(i) for i in parsed))
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"duplicate interventions: {interventions}")
        return canonical

    def selector_values(self) -> dict[str, list[SelectorValue]]:
        return {c: (v if isinstance(v, list) else [v]) for c, v in self.selector.items()}


class SamplingConfig(BaseConfig):
    """Plain text-to-image sampling (`mode: samples`): DDIM with the reference betas."""

    num_inference_steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0)
    batch_size: int = Field(4, ge=1, description="images denoised together")


class PlannerConfig(BaseConfig):
    """How rounds are sized (see pipelines.quota): remaining / p_hat * over_provision + a binomial margin."""

    over_provision: float = Field(1.0, ge=1.0, le=10.0, description="factor on a round's expected attempts")
    margin_sigmas: float = Field(
        1.0, ge=0.0, le=10.0, description="standard deviations of extra attempts once p_hat is measured (round 2 on)"
    )
    initial_acceptance: float = Field(0.5, gt=0.0, le=1.0, description="acceptance prior before any result")
    prior_weight: float = Field(2.0, ge=0.0, description="pseudo-attempts behind the prior")
    min_acceptance: float = Field(0.05, gt=0.0, le=1.0, description="floor of the estimate (caps a round)")
    max_rounds: int = Field(10, ge=1, description="rounds are cheap: the actor pool lives for the job")
    max_attempts_per_round: int | None = Field(None, ge=1, description="cap on one round's attempts")


class ActorPoolConfig(EngineComputeConfig):
    """Where and how wide the job runs (not part of the results hash); the engine's memory budget and
    kernels (`gpu_memory_gb`, `channels_last`, `compile_unet`, `attention`) come from `EngineComputeConfig`."""

    num_actors: int = Field(1, ge=1, description="long-lived actors, one model copy each, for the whole job")
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    num_cpus_per_actor: float = Field(1.0, gt=0.0)
    batch_size: int = Field(4, ge=1, description="sources per batch (inverted together)")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per actor; default: its CPUs")
    max_retries: int = Field(
        2, ge=0, description="retries of a batch after a transient error (OOM, storage) or a lost actor"
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="non-secret env for the actors (e.g. AWS_ENDPOINT_URL); credentials: the cluster's",
    )
    shared_storage: bool = Field(
        False, description="a local output path is on storage every node sees (NFS, ...); else refused on multi-node clusters"
    )


class AugmentConfig(BaseConfig):
    """`prism-ray augment`: filtered counterfactual augmentation sets (or SD samples) per subgroup."""

    model: ModelConfig = ModelConfig()
    data: DataConfig | None = Field(None, description="source manifest; required in counterfactual mode")
    subgroups: list[SubgroupConfig] = Field(..., min_length=1)
    mode: Literal["counterfactual", "samples"] = "counterfactual"
    inversion: InversionConfig = InversionConfig()
    edit: EditConfig = EditConfig()
    filter: FilterConfig = FilterConfig()
    sampling: SamplingConfig = SamplingConfig()
    output: str = Field(..., min_length=1, description="output folder, any fsspec URI")
    seed: int = Field(0, ge=0, lt=2**63, description="source order and sample generators")
    planner: PlannerConfig = PlannerConfig()
    compute: ActorPoolConfig = ActorPoolConfig()

    @model_validator(mode="after")
    def _check_subgroups(self) -> AugmentConfig:
        if self.mode == "counterfactual" and self.data is None:
            raise ValueError("data: counterfactual mode needs a source manifest (data.manifest)")
        names = [g.name for g in self.subgroups]
        if len(set(names)) != len(names):
            raise ValueError(f"subgroups: duplicate names {names}")
        for g in self.subgroups:
            if self.mode == "counterfactual" and not g.interventions:
                raise ValueError(f"subgroups.{g.name}.interventions: counterfactual mode needs at least one")
            if self.mode == "counterfactual":
                # Attributes the adapter does not know, and selector values a label can never hold,
                # would otherwise run to an empty subgroup.
                data = self.data
                for what, check, value in (("interventions", check_interventions, g.interventions),
                                           ("selector", check_selector, g.selector)):
                    try:
                        check(data.adapter, data.adapter_options, value)
                    except ValueError as err:
                        raise ValueError(f"subgroups.{g.name}.{what}: {err}") from None
            if self.mode == "samples" and not (g.prompt and g.prompt.strip()):
                raise ValueError(f"subgroups.{g.name}.prompt: samples mode needs a prompt")
        if self.mode == "counterfactual" and self.model.dtype != "float32":
            # Null-text inversion optimises embeddings through the U-Net and DDIM inversion
            # accumulates error step by step: both need fp32 weights.
            raise ValueError(
                f"model.dtype: inversion needs float32 weights, got {self.model.dtype}; "
                "use inversion.precision=fast or fastest for bf16 passes"
            )
        return self

    def results_hash(self, weights_digest: str = "") -> str:
        """Hash of everything that changes an attempt's pixels or its accept decision, including
        the model weights (`models.loading.weights_digest`), not only where they are.

        Quotas, selectors, planner and compute settings are left out on purpose: extending a
        quota or adding actors must keep the ids of finished work, so a re-run skips it.
        Subgroup names and interventions enter each id directly.
        """
        dump = self.model_dump(mode="json")
        model = {k: v for k, v in dump["model"].items() if k not in ("device", "cache_dir")}
        data = self.data and data_identity(self.data)
        keep = {"model": model, "weights": weights_digest, "data": data, "mode": self.mode, "seed": self.seed}
        if self.mode == "counterfactual":
            keep.update(inversion=self.inversion.identity(), edit=self.edit.identity(), filter=dump["filter"])
        else:
            keep.update(sampling=dump["sampling"])
        canonical = json.dumps(keep, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def data_identity(data: DataConfig) -> dict:
    """The data settings a result depends on, for a results hash: how a row's URI and caption are read
    and its pixels decoded. Not the manifest's name (a corrected copy resumes the same folder) nor
    which rows it selects (`split`, `limit`): the rows enter the ids of the attempts made of them."""
    keys = ("image_column", "image_root", "adapter", "adapter_options", "decode")
    dump = data.model_dump(mode="json")
    out = {k: dump[k] for k in keys}
    if data.edit_mask_column or data.keep_mask_column:  # masks change pixels
        out.update(edit_mask_column=data.edit_mask_column, keep_mask_column=data.keep_mask_column)
    return out


# --- the job ---------------------------------------------------------------------------------
# Per round: select + caption sources (driver, metadata only) -> plan the round's slots
# (pipelines.quota) -> tasks (one per source: invert once, edit many) -> the runner feeds them to
# long-lived steps (pipelines.counterfactuals; in Ray actors by default) -> each step writes PNGs,
# then its ledger part -> only per-slot outcomes reach the driver. After the last round the
# driver marks every finished row in_quota / beyond_quota / set_aside and commits the manifest.
#
# Output layout under `output` (results.layout.Layout):
#   images/<subgroup>/<cf_id>.png   every finished attempt, accepted or rejected by the filter
#   manifest.parquet                 one row per finished attempt (COUNTERFACTUAL_SCHEMA), with quota_status
#   errors.parquet                   one row per failure (ERROR_SCHEMA): source, stage, reason
#   summary.json                     counts, acceptance, throughput, stage timings, model loads per actor
#   run_summary.json                 the same (its name before this release; dropped in the next one)
#   _ledger/rows|errors/*.parquet    finished work not yet committed (one part per batch)



def _selector_mask(table, subgroup: SubgroupConfig):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = pa.array(np.ones(table.num_rows, dtype=bool))
    for column, values in subgroup.selector_values().items():
        if column not in table.column_names:
            raise ValueError(f"subgroups.{subgroup.name}.selector: manifest has no column {column!r}")
        col = table.column(column)
        try:
            value_set = pa.array(values).cast(col.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            field = f"subgroups.{subgroup.name}.selector.{column}"
            raise ValueError(f"{field}: {values!r} does not fit the column type {col.type}: {err}") from None
        mask = pc.and_(mask, pc.fill_null(pc.is_in(col, value_set=value_set), False))
    return mask


@dataclass
class Sources:
    """Captioned candidate sources per subgroup (driver-side metadata, no pixels)."""

    by_subgroup: dict[str, list[str]]
    caption: dict[str, str] = field(default_factory=dict)  # uri -> source prompt
    row: dict[str, dict] = field(default_factory=dict)  # uri -> manifest row (for edit captions)
    index: dict[str, int] = field(default_factory=dict)  # uri -> its 0-based row in the input manifest
    errors: list[dict] = field(default_factory=list)
    accounting: dict[str, int] = field(default_factory=dict)  # input rows by what became of them


def load_sources(config: AugmentConfig) -> Sources:
    """Typed, de-duplicated manifest rows -> captioned sources per subgroup; bad rows -> error rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from prism_ray.data.manifest import ROW_COLUMN, prepare_manifest, read_sources

    out = Sources({g.name: [] for g in config.subgroups})
    if config.mode == "samples":
        return out
    manifest = prepare_manifest(config.data)  # labels parsed per cell: one bad cell is one row error
    table = manifest.table
    masks = {g.name: _selector_mask(table, g) for g in config.subgroups}
    union = pa.array(np.zeros(table.num_rows, dtype=bool))
    for mask in masks.values():
        union = pc.or_(union, mask)
    member = {name: set(table.filter(mask).column(ROW_COLUMN).to_pylist()) for name, mask in masks.items()}
    sources, row_errors = read_sources(config.data, table.filter(union))
    for s in sources:
        out.caption.setdefault(s.image_uri, s.caption)
        out.row.setdefault(s.image_uri, s.row)
        out.index.setdefault(s.image_uri, s.index)
        for name in out.by_subgroup:
            if s.index in member[name]:
                out.by_subgroup[name].append(s.image_uri)
    out.errors = [dict(e.as_row(), subgroup=None, slot_id=None) for e in manifest.errors + row_errors]
    # Every input row lands in exactly one bucket (the run summary adds what became of the sources).
    selected = int(pc.sum(union).as_py() or 0)
    out.accounting = {
        "input_rows": manifest.input_rows,
        "not_selected": manifest.input_rows - selected - len(manifest.errors) - manifest.duplicate_rows_collapsed,
        "duplicate_rows_collapsed": manifest.duplicate_rows_collapsed,
        "rows_with_errors": len(manifest.errors) + len(row_errors),
        "sources": len(sources),
    }
    for g in config.subgroups:
        if not out.by_subgroup[g.name] and not any(member[g.name]):
            raise ConfigError(
                f"config field 'subgroups.{g.name}.selector': {g.selector} matches no usable row of "
                f"'{config.data.manifest}'"
            )
    return out


def make_pools(config: AugmentConfig, sources: Sources, results_hash: str) -> list[SlotPool]:
    common = dict(results_hash=results_hash, seed=config.seed)
    if config.mode == "samples":
        return [SlotPool(g.name, prompt=g.prompt, filtered=False, **common) for g in config.subgroups]
    return [
        SlotPool(g.name, sources=sources.by_subgroup[g.name], edits=g.interventions, **common)
        for g in config.subgroups
    ]


def build_tasks(
    config: AugmentConfig, progress: dict[str, SubgroupProgress], sources: Sources, round_index: int,
    results_hash: str,
) -> tuple[list[dict], list[dict]]:
    """Planned slots -> tasks (one per source, all its edits of this round) + caption errors."""
    from prism_ray.data.captions import get_adapter

    planned = [slot for state in progress.values() for slot in state.planned]
    errors: list[dict] = []
    if config.mode == "samples":
        tasks = []
        for slot in planned:
            seed = int(digest("sample-seed", config.seed, slot.subgroup, slot.sample_index, size=15), 16)
            edit = dict(slot_id=slot.slot_id, subgroup=slot.subgroup, prompt=slot.edit,
                        sample_index=slot.sample_index, sample_seed=seed, rank=slot.rank)
            tasks.append({"task_id": slot.slot_id, "edits": [edit]})
        return tasks, errors
    adapter = get_adapter(config.data.adapter, **config.data.adapter_options)
    by_source: dict[str, list[Slot]] = defaultdict(list)
    for slot in planned:
        by_source[slot.source].append(slot)
    tasks = []
    for uri, slots in by_source.items():
        source_prompt = sources.caption[uri]
        edits = []
        for slot in slots:
            try:
                edit_prompt = adapter.edit_caption(sources.row[uri], slot.edit)
                if edit_prompt == source_prompt:
                    raise ValueError(f"intervention {slot.edit!r} leaves the caption unchanged")
            except ValueError as err:
                errors.append(dict(source_uri=uri, slot_id=slot.slot_id, stage="caption", reason=str(err),
                                   subgroup=slot.subgroup, config_hash=results_hash, created_at=utc_now()))
                continue
            edits.append(dict(slot_id=slot.slot_id, subgroup=slot.subgroup, intervention=slot.edit,
                              edit_prompt=edit_prompt, rank=slot.rank))
        if edits:
            task_id = digest("task", round_index, uri, *sorted(e["slot_id"] for e in edits))
            tasks.append(dict(task_id=task_id, source_uri=uri, row=sources.index.get(uri), source_prompt=source_prompt,
                              edits=edits, masks=mask_uris(config.data, sources.row[uri])))
    return tasks, errors


def mask_uris(data: DataConfig, row: dict) -> dict[str, tuple[str, str]]:
    """A source row's user masks: {"edit" | "keep": (config field, resolved URI)}; blank cells: no mask."""
    from prism_ray.data.storage import resolve_uri

    out = {}
    for kind, column in (("edit", data.edit_mask_column), ("keep", data.keep_mask_column)):
        raw = None if column is None else row.get(column)
        if raw is not None and str(raw).strip():
            out[kind] = (f"data.{kind}_mask_column '{column}'", resolve_uri(str(raw), data.image_root))
    return out


def batches(tasks: list[dict], batch_size: int, workers: int) -> list[list[dict]]:
    """Tasks in batches of at most `batch_size`, smaller when a round is small, so every worker has work."""
    size = max(1, min(batch_size, math.ceil(len(tasks) / max(workers, 1))))
    return [tasks[i : i + size] for i in range(0, len(tasks), size)]


@dataclass
class Finished:
    """What an output folder holds now: finished rows by slot (PNG present), errors, ledger parts."""

    rows: dict[str, dict]
    errors: list[dict]
    parts: list[str]
    images: set[str]
    rows_without_png: int = 0  # rows whose PNG is gone: not done, planned again

    def done(self, pools: list[SlotPool]) -> dict[str, dict[str, bool]]:
        """subgroup -> {slot_id: accepted} of the finished attempts that belong to its pool as configured."""
        by_name = {p.subgroup: p for p in pools}
        out: dict[str, dict[str, bool]] = defaultdict(dict)
        for sid, row in self.rows.items():
            pool = by_name.get(row["subgroup"])
            if pool is not None and pool.contains(sid, row.get("attempt_rank")):
                out[row["subgroup"]][sid] = bool(row["accepted"])
        return out

    def failed(self) -> tuple[set[str], set[str]]:
        """(failed slot ids, failed source URIs): never planned again."""
        slots, srcs = set(), set()
        for e in self.errors:
            if e.get("slot_id"):
                slots.add(e["slot_id"])
            elif e.get("source_uri") and e["stage"] in ("read", "invert"):
                srcs.add(e["source_uri"])
        return slots - set(self.rows), srcs


def _dedupe_errors(errors: list[dict]) -> list[dict]:
    seen, out = set(), []
    for e in errors:
        key = (e.get("source_uri"), e.get("slot_id"), e["stage"], e["reason"], e.get("subgroup"))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def load_finished(layout: Layout, results_hash: str) -> Finished:
    state = read_state(layout)
    check_config_hash(state.rows + state.errors, results_hash, layout.root)
    finished = Finished({}, _dedupe_errors(state.errors), state.parts, state.images)
    for row in state.rows:  # committed rows first: a re-done slot keeps its first result
        if row["slot_id"] in finished.rows:
            continue
        if Layout.image_key(row["subgroup"], row["cf_id"]) not in state.images:
            finished.rows_without_png += 1
            continue
        finished.rows[row["slot_id"]] = row
    return finished


def finalise(config: AugmentConfig, layout: Layout, pools: list[SlotPool], results_hash: str,
             extra_errors: list[dict]) -> dict:
    """Mark every finished row in_quota / beyond_quota / set_aside and commit manifest + errors."""
    finished = load_finished(layout, results_hash)
    quotas = {g.name: g.quota for g in config.subgroups}
    done = finished.done(pools)
    failed_slots, failed_sources = finished.failed()
    status: dict[str, str] = {}
    per_group = {}
    for pool in pools:
        mine = done.get(pool.subgroup, {})
        kept, accepted = kept_prefix(pool, quotas[pool.subgroup], mine, failed_slots, failed_sources)
        status.update({s.slot_id: "in_quota" for s in kept})
        beyond = [sid for sid in mine if sid not in status]
        status.update({sid: "beyond_quota" for sid in beyond})
        per_group[pool.subgroup] = {
            "quota": quotas[pool.subgroup],
            "accepted": accepted,
            "rejected": len(kept) - accepted,
            "beyond_quota": len(beyond),
            "beyond_quota_accepted": sum(mine[sid] for sid in beyond),
        }
    set_aside: Counter = Counter()
    rows = []
    for sid, row in finished.rows.items():
        row = dict(row, quota_status=status.get(sid, "set_aside"))
        if row["quota_status"] == "set_aside":
            set_aside[row["subgroup"]] += 1
        rows.append(row)
    if set_aside:
        log.warning("kept, set aside (their subgroup, selector or interventions changed): %s", dict(set_aside))
    errors = _dedupe_errors(finished.errors + extra_errors)
    commit(layout, rows_to_table(rows, COUNTERFACTUAL_SCHEMA), rows_to_table(errors, ERROR_SCHEMA), finished.parts)
    return {
        "subgroups": per_group,
        "fit": model_fit(rows, config.filter.fit_warning_psnr) if config.mode == "counterfactual" else {},
        "sources_with_rows": {r["source_uri"] for r in rows},
        "sources_with_errors": {e["source_uri"] for e in errors if e.get("source_uri")},
        "set_aside": dict(set_aside),
        "rows": len(rows),
        "errors": len(errors),
        "rows_without_png": finished.rows_without_png,
        "pngs_without_rows": len(finished.images - {Layout.image_key(r["subgroup"], r["cf_id"]) for r in rows}),
    }


def model_fit(rows: list[dict], threshold: float) -> dict:
    """`scoring.filter.model_fit` (the edit job warns per image with the same threshold), logged as a warning
    when over a quarter of the sources reconstruct below `threshold` dB."""
    fit = filter_model_fit(rows, threshold)
    if fit["warning"]:
        log.warning("augment: %s (filter.reconstruction_psnr_min rejects their edits)", fit["message"])
    return fit


class Tally:
    """Per-subgroup accepted/rejected/error counts and stage seconds, fed by the batch reports."""

    def __init__(self, names: list[str]):
        self.counts = {n: Counter() for n in names}
        self.seconds: Counter = Counter()
        self.sources = 0

    def add(self, report: BatchReport) -> None:
        for subgroup, outcome in report.outcomes.values():
            self.counts[subgroup][outcome] += 1
        self.sources += report.sources
        self.seconds.update(report.seconds)

    def line(self) -> str:
        return " | ".join(
            f"{name}: {c['accepted']} accepted / {c['accepted'] + c['rejected']} attempted ({c['error']} errors)"
            for name, c in self.counts.items()
        )

    def total(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.counts.values())


# --- runners ---------------------------------------------------------------------------------


class InProcessRunner:
    """The job's steps in this process, without Ray: one step (models loaded once), batch retries
    on transient errors as the Ray runner does. For debugging and the tests of the job itself."""

    def __init__(self, step_factory, compute: ActorPoolConfig, engine=None):
        self.step = step_factory(engine=engine) if engine is not None else step_factory()
        self.compute = compute
        self.retries = 0

    def map(self, work: list[list[dict]], on_report) -> None:
        for batch in work:
            for attempt in range(self.compute.max_retries + 1):
                try:
                    report = self.step(batch)
                    break
                except Exception as err:
                    if not is_transient(err):
                        raise  # a bug: crash with its traceback
                    if attempt == self.compute.max_retries:
                        raise RuntimeError(
                            f"batch of {len(batch)} tasks failed {attempt + 1} times, last with "
                            f"{type(err).__name__}: {err}"
                        ) from err
                    self.retries += 1
                    log.warning("transient %s on a batch (try %d): %s", type(err).__name__, attempt + 1, err)
            on_report(report)

    def stats(self) -> dict:
        return {"model_loads_per_actor": [self.step.model_loads], "batch_retries": self.retries,
                "actor_restarts": 0}

    def close(self) -> None:
        pass


def in_process(step_factory, compute: ActorPoolConfig, output: str = "", engine=None) -> InProcessRunner:
    return InProcessRunner(step_factory, compute, engine)


def map_batches(runner, work: list[list[dict]], on_report) -> None:
    """`runner.map(work, on_report)`; a write the output refused ends the job in its own one line,
    also where the runner wraps the step's exception (Ray's RayTaskError keeps it as `cause`)."""
    try:
        runner.map(work, on_report)
    except OutputWriteError as err:
        raise (getattr(err, "cause", None) or err) from None


def model_roots(config) -> list:
    """The local folders of a job's models (for `models.loading.weights_digest`), checked on the driver
    before the job creates anything: a wrong path is a config error naming its field."""
    from prism_ray.models.loading import check_model_folder, require_supported_prediction, resolve_model_root

    m = config.model
    with config_field("model.path"):
        roots = [check_model_folder(m.path, m.cache_dir)]
        if config.mode == "counterfactual":
            require_supported_prediction(roots[0])
    if m.clip_path:
        with config_field("model.clip_path"):
            roots.append(resolve_model_root(m.clip_path, m.cache_dir))
    if config.filter.off_target.classifier:  # loaded by every actor: checked once here
        with config_field("filter.off_target.classifier"):
            resolve_model_root(config.filter.off_target.classifier, m.cache_dir)
    return roots


def run(config: AugmentConfig, runner) -> dict:
    """Run rounds until every subgroup meets its quota (or runs out of sources); returns the run summary.

    `runner(step_factory, compute, output)` returns the object that feeds batches to long-lived steps for
    the whole job (`map`, `stats`, `close`): `in_process` here, or Ray actors (`distributed.rounds.ray_runner`,
    joins or starts Ray; the CLI's choice, `cli.JOBS`). Raises `RunIncomplete` (after writing outputs and
    summary) on a shortfall.
    """
    from prism_ray.models.loading import weights_digest

    started, t0 = utc_now(), time.perf_counter()
    layout = Layout.of(config.output)  # resolved on the driver; relative paths refused under `ray job submit`
    if layout.root != config.output:  # actors may run elsewhere: give them an absolute output path
        config = config.model_copy(update={"output": layout.root})
    t = time.perf_counter()
    roots = model_roots(config)  # a wrong model path is a config error here, before the output exists
    log.info("augment: output %s", layout.root)
    check_writable(layout)  # a read-only or full output ends the job now, not after every batch
    model_id = weights_digest(*roots)
    results_hash = config.results_hash(model_id)
    sources = load_sources(config)
    pools = make_pools(config, sources, results_hash)
    quotas = {g.name: g.quota for g in config.subgroups}
    policy = PlannerPolicy.from_config(config.planner)
    driver_seconds = Counter(load_sources=time.perf_counter() - t)
    extra_errors = [dict(e, config_hash=results_hash, created_at=utc_now()) for e in sources.errors]
    tally = Tally(list(quotas))
    rounds: list[dict] = []
    progress: dict[str, SubgroupProgress] = {}
    pool_runner = None
    round_progress: list[Progress] = []  # the running round's progress line

    def on_report(report: BatchReport) -> None:  # one batch done: count it
        tally.add(report)
        fault_point("augment.batch_done")
        round_progress[-1].advance(len(report.outcomes))

    try:
        for round_index in range(config.planner.max_rounds + 1):
            t = time.perf_counter()
            finished = load_finished(layout, results_hash)
            failed_slots, failed_sources = finished.failed()
            progress = plan_round(pools, quotas, finished.done(pools), failed_slots, failed_sources, policy)
            tasks, caption_errors = build_tasks(config, progress, sources, round_index, results_hash)
            driver_seconds["plan"] += time.perf_counter() - t
            if caption_errors:  # recorded now, so the next plan skips those slots
                name = digest("driver", round_index, *sorted(e["slot_id"] for e in caption_errors)) + ".parquet"
                write_part(layout, "errors", name, rows_to_table(caption_errors, ERROR_SCHEMA))
            if not any(p.status == "running" for p in progress.values()) or round_index == config.planner.max_rounds:
                break
            if not tasks:
                continue  # every planned slot failed its caption: plan again without them
            n_slots = sum(len(task["edits"]) for task in tasks)
            log.info("augment: round %d: %d tasks, %d attempts (%s)", round_index + 1, len(tasks), n_slots,
                     ", ".join(f"{n} +{len(p.planned)} at p={p.acceptance:.2f}" for n, p in progress.items() if p.planned))
            t = time.perf_counter()
            before = {n: Counter(c) for n, c in tally.counts.items()}
            with Progress(f"augment:   round {round_index + 1}", n_slots, "attempts", detail=tally.line) as line:
                round_progress.append(line)
                if pool_runner is None:  # started once (under the progress line: Ray, model loads), fed round after round
                    step = partial(CounterfactualStep, config, results_hash, model_id)
                    pool_runner = runner(partial(OutputGuard, step, layout.root), config.compute, layout.root)
                map_batches(pool_runner, batches(tasks, config.compute.batch_size, config.compute.num_actors),
                            on_report)
            seconds = time.perf_counter() - t
            rounds.append({"round": round_index + 1, "tasks": len(tasks), "attempts_planned": n_slots,
                           "seconds": seconds, "subgroups": {n: dict(tally.counts[n] - before[n]) for n in quotas}})
            log.info("augment: round %d done in %.1fs: %s", round_index + 1, seconds, tally.line())
        actors = pool_runner.stats() if pool_runner is not None else {}
    finally:
        if pool_runner is not None:
            pool_runner.close()

    t = time.perf_counter()
    final = finalise(config, layout, pools, results_hash, extra_errors)
    fault_point("augment.after_commit")
    driver_seconds["finalise"] += time.perf_counter() - t
    summary = _summary(config, layout, started, time.perf_counter() - t0, results_hash, model_id,
                       rounds, progress, final, tally, actors, driver_seconds)
    summary["accounting"] = account(sources, final)
    write_summary(layout, summary, legacy_name=True)
    from prism_ray.report.augment_report import accounting_line, write_augment_report

    if summary["accounting"]:
        log.info("%s", accounting_line(summary["accounting"]))
    short = {n: s["shortfall"] for n, s in summary["subgroups"].items() if s["shortfall"]}
    for name, info in summary["subgroups"].items():
        log.info("augment: %s: %s, %d/%d accepted in quota, %d rejected, %d beyond quota%s", name, info["status"],
                 info["accepted"], info["quota"], info["rejected"], info["beyond_quota"],
                 f", SHORTFALL {info['shortfall']}" if info["shortfall"] else "")
    log.info("augment: outputs in %s (manifest.parquet, errors.parquet, summary.json)", layout.root)
    try:
        write_augment_report(config, summary)  # report.html, also for an incomplete run
    except OutputWriteError as err:  # the results are committed: the report is not one, the run ends by them
        log.warning("augment: no report: %s", err)
    if short or final["rows"] == 0 and sum(quotas.values()):
        detail = ", ".join(f"{n} short by {k}" for n, k in short.items()) or "no outputs"
        errors = summary["error_rows"]
        raise RunIncomplete(
            f"augment incomplete: {detail} ({final['rows']} rows, {errors} error rows; see {layout.errors})", summary
        )
    return summary


def account(sources: Sources, final: dict) -> dict:
    """Every input row in exactly one bucket, and every source in exactly one outcome."""
    if not sources.accounting:
        return {}  # samples mode: no input manifest
    uris = set(sources.caption)
    with_rows = uris & final["sources_with_rows"]
    failed = (uris & final["sources_with_errors"]) - with_rows
    out = dict(sources.accounting)
    out.update(sources_with_outputs=len(with_rows), sources_failed=len(failed),
               sources_not_needed=len(uris) - len(with_rows) - len(failed))
    return out


def _summary(config, layout, started, wall, results_hash, model_id, rounds, progress, final, tally, actors,
             driver_seconds) -> dict:
    work_seconds = sum(r["seconds"] for r in rounds)
    attempts = tally.total("accepted") + tally.total("rejected")
    subgroups = {}
    for name, info in final["subgroups"].items():
        attempted = info["accepted"] + info["rejected"]
        status = "met" if info["accepted"] >= info["quota"] else progress[name].status
        subgroups[name] = {
            **info,
            "attempted": attempted,
            "acceptance_rate": info["accepted"] / attempted if attempted else None,
            "status": "incomplete" if status == "running" else status,  # running at the end: max_rounds
            "shortfall": max(0, info["quota"] - info["accepted"]),
            "this_run": dict(tally.counts[name]),
        }

    def per_second(n: int) -> float | None:
        return n / work_seconds if work_seconds else None

    return {
        "job": "augment",
        "mode": config.mode,
        "output": layout.root,
        "config_hash": config.config_hash(),
        "results_hash": results_hash,
        "model_weights_digest": model_id,
        "started_at": started.isoformat(),
        "wall_seconds": wall,
        "rounds": rounds,
        "subgroups": subgroups,
        "set_aside": final["set_aside"],
        "model_fit": final["fit"],
        "manifest_rows": final["rows"],
        "error_rows": final["errors"],
        "rows_without_png": final["rows_without_png"],
        "pngs_without_rows": final["pngs_without_rows"],
        "attempts_this_run": attempts,
        "errors_this_run": tally.total("error"),
        "throughput": {
            "attempts_per_second": per_second(attempts),
            "accepted_per_second": per_second(tally.total("accepted")),
            "sources_per_second": per_second(tally.sources),
            "round_seconds": work_seconds,
        },
        "actors": actors,
        "actor_stage_seconds": dict(tally.seconds),
        "driver_stage_seconds": dict(driver_seconds),
        "compute": config.compute.model_dump(mode="json"),
    }
