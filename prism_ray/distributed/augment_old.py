"""`augment` job: quota-exact, resumable counterfactual augmentation sets per subgroup on Ray Data actors.

Pipeline, per round (see `augment`):
  manifest -> select + caption sources (driver, metadata only) -> plan the round's slots (prism_ray.pipelines.quota)
  -> tasks (one per source: invert once, edit many) -> Ray Data: repartition -> map_batches(AugmentWorker,
  ActorPoolStrategy) -> each actor writes PNGs, then its ledger part -> only metadata reaches the driver.
After the last round the driver trims every subgroup to its quota and finalises the output.

Output layout under `config.output` (any fsspec URI):
  images/<subgroup>/<cf_id>.png   every kept attempt, accepted or rejected by the filter
  manifest.parquet                 one row per kept attempt (COUNTERFACTUAL_SCHEMA)
  errors.parquet                   one row per failure (ERROR_SCHEMA): source, stage, reason
  run_summary.json                 counts, acceptance rates, throughput, stage timings, config hashes
  _ledger/rows|errors/*.parquet    work done but not yet finalised (one part per actor batch)

Invariants and how they hold:
- A ledger row is written only after its PNG: a killed actor leaves at most PNGs without rows.
  Those are re-planned (their slots are not done) and any leftover file is deleted at the end.
- Ids are deterministic (quota.slot_id before reading, cf_id from the source bytes after), so a
  retried batch rewrites the same paths; rows are de-duplicated by slot_id on every load.
- Exact quotas: a subgroup keeps the prefix of its attempt order up to the quota-th accept
  (quota.kept_prefix), i.e. what one sequential worker would have kept. Over-provisioned
  attempts beyond it are surplus: their rows and PNGs are deleted at finalisation (re-done,
  with the same ids, if the quota is raised later).
- Finalisation writes manifest.parquet first, then deletes consumed ledger parts, then orphan
  PNGs; a crash at any point leaves a state the next run loads and finishes the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prism_ray.pipelines.augment import AugmentConfig
from prism_ray.pipelines.quota import PlannerPolicy, Slot, SlotPool, SubgroupProgress, kept_prefix, plan_round
from prism_ray.data.schemas import COUNTERFACTUAL_SCHEMA, ERROR_SCHEMA, rows_to_table

log = logging.getLogger("prism_ray.augment")

STAGES = ("read", "invert", "edit", "score", "write")


def _digest(*parts: object, size: int = 24) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:size]


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --- output layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Paths under the output folder; `key`s are relative to it ('images/g/x.png')."""

    root: str  # as configured (URI or local path), without a trailing slash

    @classmethod
    def of(cls, output: str) -> Layout:
        root = output.rstrip("/")
        if "://" not in root:
            root = os.path.abspath(root)
        return cls(root)

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    @staticmethod
    def image_key(subgroup: str, cf_id: str) -> str:
        return f"images/{subgroup}/{cf_id}.png"

    @property
    def manifest(self) -> str:
        return self.uri("manifest.parquet")

    @property
    def errors(self) -> str:
        return self.uri("errors.parquet")

    @property
    def summary(self) -> str:
        return self.uri("run_summary.json")

    def ledger(self, kind: str, name: str = "") -> str:
        return self.uri(f"_ledger/{kind}/{name}") if name else self.uri(f"_ledger/{kind}")

    @property
    def fault_marker(self) -> str:
        return self.uri("_ledger/fault_injected")

    def fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.root)


# --- the actor -------------------------------------------------------------------------------


@dataclass
class _Outcome:
    rows: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)  # stage -> wall seconds of this batch


class AugmentWorker:
    """Ray Data UDF: loads the models once, then turns a batch of tasks into PNGs + ledger rows.

    Runs without Ray too: `AugmentWorker(config)(table_of_tasks)` is what the tests call directly.
    Returns one metadata row per attempted slot (never images).
    """

    def __init__(self, config: AugmentConfig):
        import torch

        from prism_ray.models.loading import load_sd_components

        self.config = config
        self.layout = Layout.of(config.output)
        compute = config.compute
        torch.set_num_threads(compute.torch_threads or max(1, int(compute.num_cpus_per_actor)))
        m = config.model
        self.sd = load_sd_components(m.path, device=m.device, dtype=m.dtype, cache_dir=m.cache_dir)
        # The configured model location, not the resolved local cache path, identifies the model:
        # nodes with different cache folders must still agree on every id.
        self.model_id = _digest("model", m.path, m.clip_path, m.dtype, size=12)
        self.results_hash = config.results_hash()
        self.batches_done = 0
        if config.mode == "counterfactual":
            from prism_ray.scoring.clip_score import ClipScorer
            from prism_ray.engine.editor import Editor
            from prism_ray.models.loading import load_clip

            clip = load_clip(m.clip_path or m.path, device=m.device, cache_dir=m.cache_dir)
            self.scorer = ClipScorer.from_components(clip)
            self.thresholds = config.filter
            self.editor = Editor(self.sd, config.edit, config.inversion)

    # -- Ray Data entry point -------------------------------------------------------------

    def __call__(self, batch: pa.Table) -> pa.Table:
        tasks = [json.loads(t) for t in batch.column("task").to_pylist()]
        outcome = self.process(tasks)
        self._maybe_die()  # fault injection: PNGs are written, the ledger part is not
        self._write_ledger(tasks, outcome)
        self.batches_done += 1
        return self._metadata(tasks, outcome)

    def process(self, tasks: list[dict]) -> _Outcome:
        """PNGs written, rows and errors returned; one bad item never stops the batch."""
        if self.config.mode == "samples":
            return self._process_samples(tasks)
        return self._process_counterfactuals(tasks)

    # -- counterfactual mode --------------------------------------------------------------

    def _read(self, tasks: list[dict], out: _Outcome) -> list[tuple[dict, str, np.ndarray]]:
        """(task, source_id, pixels) for every readable source; the others become 'read' errors."""
        from prism_ray.data.storage import ImageReadError, decode_image, read_image_bytes

        start = time.perf_counter()
        good = []
        for task in tasks:
            uri = task["source_uri"]
            try:
                data = read_image_bytes(uri)
                good.append((task, hashlib.sha256(data).hexdigest(), decode_image(data, uri)))
            except ImageReadError as err:
                out.errors.append(self._error(task, "read", err.reason))
        out.seconds["read"] += time.perf_counter() - start
        return good

    def _edit(self, images: list[np.ndarray], source_prompts: list[str], edit_prompts: list[list[str]]):
        """The one call into the editing engine: invert once, edit K prompts per image.

        Returns (items with .index, .edits (K, R, R, 3) uint8, .inversion_seconds, .edit_seconds),
        errors as (index, stage, reason). The engine wants the same K for every image of a call,
        so images are grouped by K here.
        """
        from prism_ray.engine.editor import edit_many

        by_k: dict[int, list[int]] = defaultdict(list)
        for i, prompts in enumerate(edit_prompts):
            by_k[len(prompts)].append(i)
        items, errors = [], []
        for idx in by_k.values():
            pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
            got, bad = edit_many(self.editor, pick(images), pick(source_prompts), pick(edit_prompts))
            for item in got:
                item.index = idx[item.index]
                items.append(item)
            errors += [(idx[i], stage, reason) for i, stage, reason in bad]
        return items, errors

    def _process_counterfactuals(self, tasks: list[dict]) -> _Outcome:
        from prism_ray.engine.images import preprocess
        from prism_ray.scoring.metrics import l1

        out = _Outcome()
        sources = self._read(tasks, out)
        if not sources:
            return out
        res = self.sd.resolution
        start = time.perf_counter()
        try:
            items, errors = self._edit(
                [img for _, _, img in sources],
                [t["source_prompt"] for t, _, _ in sources],
                [[e["edit_prompt"] for e in t["edits"]] for t, _, _ in sources],
            )
        except Exception as err:  # a batch-level engine failure costs this batch, not the job
            items, errors = [], [(i, "edit", f"{type(err).__name__}: {err}") for i in range(len(sources))]
            log.exception("engine failed on a batch of %d sources", len(sources))
        engine_seconds = time.perf_counter() - start
        inv = sum(item.inversion_seconds for item in items)
        out.seconds["invert"] += min(inv, engine_seconds)
        out.seconds["edit"] += max(engine_seconds - inv, 0.0)
        for i, stage, reason in errors:
            task = sources[i][0]
            # Inversion depends only on the source: it fails for every edit. Edit failures are per slot.
            if stage == "invert":
                out.errors.append(self._error(task, stage, reason))
            else:
                out.errors += self._slot_errors(task, stage, reason)

        for item in items:
            task, source_id, pixels = sources[item.index]
            edits = task["edits"]
            start = time.perf_counter()
            try:
                # The source as the model saw it (square, model resolution): what L1 and CLIP compare to.
                x = preprocess([pixels], res)[0]  # (3, R, R) in [-1, 1]
                orig = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()  # (R, R, 3)
                origs = np.repeat(orig[None], len(edits), axis=0)  # (K, R, R, 3)
                prompts = [e["edit_prompt"] for e in edits]
                scores = self.scorer.score(origs, item.edits, task["source_prompt"], prompts)
                scores["reconstruction_error"] = np.full(len(edits), item.reconstruction_error)
                accepted = self.thresholds.accept(scores)
                l1_unit, l1_255 = l1(item.edits, origs, "unit"), l1(item.edits, origs, "255")
            except Exception as err:
                out.errors += self._slot_errors(task, "score", f"{type(err).__name__}: {err}")
                continue
            finally:
                out.seconds["score"] += time.perf_counter() - start
            for k, edit in enumerate(edits):
                cf_id = _digest(
                    "cf", source_id, edit["subgroup"], edit["intervention"], edit["edit_prompt"],
                    self.model_id, self.results_hash,
                )
                row = {
                    "cf_id": cf_id,
                    "slot_id": edit["slot_id"],
                    "attempt_rank": edit["rank"],
                    "source_uri": task["source_uri"],
                    "source_id": source_id,
                    "subgroup": edit["subgroup"],
                    "source_prompt": task["source_prompt"],
                    "edit_prompt": edit["edit_prompt"],
                    "intervention": edit["intervention"],
                    "s_clip": float(scores["s_clip"][k]),
                    "clip_image_image": float(scores["clip_image_image"][k]),
                    "clip_image_text": float(scores["clip_image_text"][k]),
                    "l1": float(l1_unit[k]),
                    "l1_255": float(l1_255[k]),
                    "accepted": bool(accepted[k]),
                    "reconstruction_error": item.reconstruction_error,
                    "inversion_seconds": item.inversion_seconds,
                    "edit_seconds": item.edit_seconds / len(edits),
                }
                self._write_png(item.edits[k], row, task, edit, out)
        return out

    # -- samples mode ---------------------------------------------------------------------

    def _pipeline(self):
        if not hasattr(self, "_sd_pipeline"):
            from diffusers import StableDiffusionPipeline

            from prism_ray.engine.scheduler import make_ddim_scheduler

            s = self.sd
            self._sd_pipeline = StableDiffusionPipeline(
                vae=s.vae, text_encoder=s.text_encoder, tokenizer=s.tokenizer, unet=s.unet,
                scheduler=make_ddim_scheduler(self.config.sampling.num_inference_steps),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            self._sd_pipeline.set_progress_bar_config(disable=True)
        return self._sd_pipeline

    def _process_samples(self, tasks: list[dict]) -> _Outcome:
        import torch

        out = _Outcome()
        cfg, res = self.config.sampling, self.sd.resolution
        slots = [(task, e) for task in tasks for e in task["edits"]]
        for begin in range(0, len(slots), cfg.batch_size):
            chunk = slots[begin : begin + cfg.batch_size]
            start = time.perf_counter()
            try:
                # One generator per item, seeded from the slot: a sample does not depend on its batch-mates.
                generators = [torch.Generator(self.sd.device).manual_seed(e["sample_seed"]) for _, e in chunk]
                images = self._pipeline()(
                    [e["prompt"] for _, e in chunk], height=res, width=res,
                    num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                    generator=generators, output_type="np",
                ).images
                images = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)  # (B, R, R, 3)
            except Exception as err:
                reason = f"{type(err).__name__}: {err}"
                out.errors += [self._error(task, "edit", reason, e) for task, e in chunk]
                continue
            seconds = time.perf_counter() - start
            out.seconds["edit"] += seconds
            for (task, e), image in zip(chunk, images):
                cf_id = _digest(
                    "sample", e["subgroup"], e["prompt"], e["sample_seed"], self.model_id, self.results_hash
                )
                row = {
                    "cf_id": cf_id,
                    "slot_id": e["slot_id"],
                    "attempt_rank": e["rank"],
                    "source_uri": "",  # text-to-image: no source image
                    "source_id": "",
                    "subgroup": e["subgroup"],
                    "source_prompt": "",
                    "edit_prompt": e["prompt"],
                    "sample_seed": e["sample_seed"],
                    "accepted": True,  # the "SD samples" arm is not filtered
                    "edit_seconds": seconds / len(chunk),
                }
                self._write_png(image, row, task, e, out)
        return out

    # -- writing --------------------------------------------------------------------------

    def _write_png(self, image: np.ndarray, row: dict, task: dict, edit: dict, out: _Outcome) -> None:
        from prism_ray.data.storage import write_png

        start = time.perf_counter()
        key = Layout.image_key(row["subgroup"], row["cf_id"])
        try:
            write_png(image, self.layout.uri(key))
        except Exception as err:  # storage hiccup: an error row for this slot, no ledger row
            out.errors.append(self._error(task, "write", f"{type(err).__name__}: {err}", edit))
            return
        finally:
            out.seconds["write"] += time.perf_counter() - start
        row.update(
            image_uri=self.layout.uri(key),
            model_id=self.model_id,
            config_hash=self.results_hash,
            created_at=_now(),
        )
        out.rows.append(row)

    def _error(self, task: dict, stage: str, reason: str, edit: dict | None = None) -> dict:
        """An error row; without `edit` it is about the source (all its slots, every subgroup)."""
        every = ",".join(sorted({e["subgroup"] for e in task["edits"]}))
        return {
            "source_uri": task.get("source_uri") or None,
            "slot_id": None if edit is None else edit["slot_id"],
            "stage": stage,
            "reason": reason,
            "subgroup": every if edit is None else edit["subgroup"],
            "config_hash": self.results_hash,
            "created_at": _now(),
        }

    def _slot_errors(self, task: dict, stage: str, reason: str) -> list[dict]:
        return [self._error(task, stage, reason, edit) for edit in task["edits"]]

    def _write_ledger(self, tasks: list[dict], out: _Outcome) -> None:
        from prism_ray.data.storage import write_table

        # Named by the batch's tasks: a retried batch overwrites its own part instead of adding one.
        name = _digest("batch", *sorted(t["task_id"] for t in tasks)) + ".parquet"
        if out.errors:
            write_table(rows_to_table(out.errors, ERROR_SCHEMA), self.layout.ledger("errors", name))
        if out.rows:
            write_table(rows_to_table(out.rows, COUNTERFACTUAL_SCHEMA), self.layout.ledger("rows", name))

    def _maybe_die(self) -> None:
        after = self.config.compute.kill_actor_once_after_batches
        if after is None or self.batches_done != after:
            return
        import fsspec

        from prism_ray.data.storage import makedirs

        makedirs(self.layout.uri("_ledger"))
        try:  # exclusive create: of all actors that get here, exactly one dies, once per output
            with fsspec.open(self.layout.fault_marker, "xb") as f:
                f.write(f"killed pid {os.getpid()} after {after} batches at {_now().isoformat()}\n".encode())
        except FileExistsError:
            return
        log.warning("fault injection: actor pid %d exits now", os.getpid())
        os._exit(1)  # no cleanup, no exception: like an OOM kill or a lost node

    def _metadata(self, tasks: list[dict], out: _Outcome) -> pa.Table:
        verdict = {r["slot_id"]: ("accepted" if r["accepted"] else "rejected") for r in out.rows}
        slots = [(e["slot_id"], e["subgroup"]) for t in tasks for e in t["edits"]]
        share = {s: out.seconds[s] / max(len(slots), 1) for s in STAGES}
        return pa.table(
            {
                "slot_id": [s for s, _ in slots],
                "subgroup": [g for _, g in slots],
                "outcome": [verdict.get(s, "error") for s, _ in slots],
                "sources": [1.0 / len(t["edits"]) for t in tasks for _ in t["edits"]],
                **{f"{stage}_seconds": [share[stage]] * len(slots) for stage in STAGES},
            }
        )


# --- driver: sources, state, tasks -----------------------------------------------------------


def _selector_mask(table: pa.Table, subgroup) -> pa.ChunkedArray | pa.Array:
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
    caption: dict[str, str]  # uri -> source prompt
    row: dict[str, dict]  # uri -> manifest row (for edit captions)
    errors: list[dict]


def load_sources(config: AugmentConfig) -> Sources:
    from prism_ray.data.manifest import read_sources, select_rows
    from prism_ray.data.storage import read_table

    if config.mode == "samples":
        return Sources({g.name: [] for g in config.subgroups}, {}, {}, [])
    table = select_rows(read_table(config.data.manifest), config.data)
    masks = {g.name: _selector_mask(table, g) for g in config.subgroups}
    union = pa.array(np.zeros(table.num_rows, dtype=bool))
    for mask in masks.values():
        union = pc.or_(union, mask)
    member = {name: np.asarray(pc.filter(mask, union)) for name, mask in masks.items()}
    sources, row_errors = read_sources(config.data, table.filter(union))
    out = Sources({g.name: [] for g in config.subgroups}, {}, {}, [])
    for s in sources:
        out.caption.setdefault(s.image_uri, s.caption)
        out.row.setdefault(s.image_uri, s.row)
        for name in out.by_subgroup:
            if member[name][s.index]:
                out.by_subgroup[name].append(s.image_uri)
    out.errors = [dict(e.as_row(), subgroup=None, slot_id=None) for e in row_errors]
    return out


def make_pools(config: AugmentConfig, sources: Sources) -> list[SlotPool]:
    common = dict(results_hash=config.results_hash(), seed=config.seed)
    if config.mode == "samples":
        return [SlotPool(g.name, prompt=g.prompt, filtered=False, **common) for g in config.subgroups]
    return [
        SlotPool(g.name, sources=sources.by_subgroup[g.name], edits=g.interventions, **common)
        for g in config.subgroups
    ]


@dataclass
class LedgerState:
    """What is done: rows (one per slot, PNG verified), errors, and which ledger parts hold them."""

    rows: dict[str, dict]  # slot_id -> row
    errors: list[dict]
    parts: list[str]  # consumed ledger part paths (fs paths)
    images: set[str]  # keys of PNGs present under images/
    dropped_rows: int = 0  # rows whose PNG was missing (re-planned)

    def done(self) -> dict[str, dict[str, bool]]:
        out: dict[str, dict[str, bool]] = defaultdict(dict)
        for sid, row in self.rows.items():
            out[row["subgroup"]][sid] = bool(row["accepted"])
        return out

    def failed(self) -> tuple[set[str], set[str]]:
        """(failed slot ids, failed source URIs): never re-planned."""
        slots, srcs = set(), set()
        for e in self.errors:
            if e.get("slot_id"):
                slots.add(e["slot_id"])
            elif e.get("source_uri") and e["stage"] in ("read", "invert"):
                srcs.add(e["source_uri"])
        return slots - set(self.rows), srcs


def _read_parts(fs, folder: str) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq

    if not fs.exists(folder):
        return [], []
    rows, parts = [], []
    for path in sorted(fs.find(folder)):
        try:
            with fs.open(path, "rb") as f:
                rows += pq.read_table(f).to_pylist()
        except Exception as err:  # a part cut short by a killed actor: its work is simply redone
            log.warning("ledger part %s unreadable (%s); ignoring it", path, err)
        parts.append(path)
    return rows, parts


def load_state(layout: Layout, results_hash: str) -> LedgerState:
    from prism_ray.data.storage import exists, read_table

    fs, root = layout.fs()
    rows = read_table(layout.manifest).to_pylist() if exists(layout.manifest) else []
    errors = read_table(layout.errors).to_pylist() if exists(layout.errors) else []
    part_rows, row_parts = _read_parts(fs, f"{root}/_ledger/rows")
    part_errors, error_parts = _read_parts(fs, f"{root}/_ledger/errors")
    rows += part_rows
    errors += part_errors
    other = {r["config_hash"] for r in rows + errors if r.get("config_hash")} - {results_hash}
    if other:
        raise ValueError(
            f"output '{layout.root}' holds results of another configuration (config_hash {sorted(other)}, "
            f"this one is {results_hash}); choose a new output URI"
        )
    images_dir = f"{root}/images"
    images = {posixpath.relpath(p, root) for p in fs.find(images_dir)} if fs.exists(images_dir) else set()
    state = LedgerState({}, [], row_parts + error_parts, images)
    for row in rows:
        if row["slot_id"] in state.rows:
            continue
        if Layout.image_key(row["subgroup"], row["cf_id"]) not in images:
            state.dropped_rows += 1  # a row without its PNG is not done
            continue
        state.rows[row["slot_id"]] = row
    state.errors = _dedupe_errors(errors)
    return state


def build_tasks(
    config: AugmentConfig, progress: dict[str, SubgroupProgress], sources: Sources, round_index: int
) -> tuple[list[dict], list[dict]]:
    """Planned slots -> tasks (one per source, all its edits of this round) + caption errors."""
    from prism_ray.data.captions import get_adapter

    h = config.results_hash()
    planned = [slot for state in progress.values() for slot in state.planned]
    errors: list[dict] = []
    if config.mode == "samples":
        tasks = []
        for slot in planned:
            seed = int(_digest("sample-seed", config.seed, slot.subgroup, slot.sample_index, size=15), 16)
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
                                   subgroup=slot.subgroup, config_hash=h, created_at=_now()))
                continue
            edits.append(dict(slot_id=slot.slot_id, subgroup=slot.subgroup, intervention=slot.edit,
                              edit_prompt=edit_prompt, rank=slot.rank))
        if edits:
            task_id = _digest("task", round_index, uri, *sorted(e["slot_id"] for e in edits))
            tasks.append(dict(task_id=task_id, source_uri=uri, source_prompt=source_prompt, edits=edits))
    return tasks, errors


# --- driver: running a round -----------------------------------------------------------------


class Tally:
    """Per-subgroup accepted/rejected/error counts and stage seconds, fed by the actors' metadata."""

    def __init__(self, names: list[str]):
        self.counts = {n: Counter() for n in names}
        self.seconds = Counter()
        self.sources = 0.0

    def add(self, meta: pa.Table) -> None:
        for sub, outcome in zip(meta.column("subgroup").to_pylist(), meta.column("outcome").to_pylist()):
            self.counts[sub][outcome] += 1
        self.sources += float(pc.sum(meta.column("sources")).as_py() or 0.0)
        for stage in STAGES:
            self.seconds[stage] += float(pc.sum(meta.column(f"{stage}_seconds")).as_py() or 0.0)

    def line(self) -> str:
        parts = []
        for name, c in self.counts.items():
            attempted = c["accepted"] + c["rejected"]
            parts.append(
                f"{name}: {c['accepted']} accepted / {attempted} attempted"
                f" ({c['rejected']} rejected, {c['error']} errors)"
            )
        return " | ".join(parts)

    def total(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.counts.values())


def plan_line(progress: dict[str, SubgroupProgress]) -> str:
    planned = [(n, p) for n, p in progress.items() if p.planned]
    return ", ".join(f"{n} +{len(p.planned)} at p={p.acceptance:.2f}" for n, p in planned)


def run_round_ray(config: AugmentConfig, tasks: list[dict], tally: Tally) -> None:
    """One Ray Data pass over the tasks; only per-slot metadata comes back to the driver."""
    import ray

    compute = config.compute
    # Small rounds get smaller batches, so that every actor has work ("keep all actors busy").
    batch_size = max(1, min(compute.batch_size, math.ceil(len(tasks) / compute.num_actors)))
    num_blocks = max(1, math.ceil(len(tasks) / batch_size))
    # Partitioned as it is created: a `repartition` all-to-all step would need a CPU slot of its
    # own, which a pool of actors holding every CPU never frees (a deadlock on small clusters).
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=num_blocks)
    remote_args: dict[str, Any] = {}
    if compute.num_gpus_per_actor:
        remote_args["num_gpus"] = compute.num_gpus_per_actor
    if compute.env_vars:
        remote_args["runtime_env"] = {"env_vars": dict(compute.env_vars)}
    ds = ds.map_batches(
        AugmentWorker,
        fn_constructor_kwargs={"config": config},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=compute.num_actors),
        num_cpus=compute.num_cpus_per_actor,
        **remote_args,
    )
    last = 0.0
    for meta in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        tally.add(meta)
        if time.monotonic() - last > 5.0:
            log.info("  %s", tally.line())
            last = time.monotonic()


def run_round_inprocess(config: AugmentConfig, tasks: list[dict], tally: Tally) -> None:
    """The same worker, in this process and without Ray (debugging, and tests of the worker itself)."""
    worker = AugmentWorker(config)
    size = config.compute.batch_size
    for begin in range(0, len(tasks), size):
        tally.add(worker(pa.table({"task": [json.dumps(t) for t in tasks[begin : begin + size]]})))


# --- driver: finalisation --------------------------------------------------------------------


def finalise(config: AugmentConfig, layout: Layout, pools: list[SlotPool], extra_errors: list[dict]) -> dict:
    """Trim to quotas, write manifest + errors, then drop consumed ledger parts and orphan PNGs."""
    from prism_ray.data.storage import write_table

    state = load_state(layout, config.results_hash())
    quotas = {g.name: g.quota for g in config.subgroups}
    done = state.done()
    kept_rows, per_group = [], {}
    for pool in pools:
        finished = done.get(pool.subgroup, {})
        kept, accepted = kept_prefix(pool, quotas[pool.subgroup], finished)
        rows = [state.rows[s.slot_id] for s in kept]
        kept_rows += rows
        per_group[pool.subgroup] = {
            "quota": quotas[pool.subgroup],
            "accepted": accepted,
            "rejected": len(rows) - accepted,
            "surplus_dropped": len(finished) - len(rows),
        }
    write_table(rows_to_table(kept_rows, COUNTERFACTUAL_SCHEMA), layout.manifest)
    errors = _dedupe_errors(state.errors + extra_errors)
    write_table(rows_to_table(errors, ERROR_SCHEMA), layout.errors)

    fs, root = layout.fs()
    for path in state.parts:
        fs.rm(path)
    keep = {Layout.image_key(r["subgroup"], r["cf_id"]) for r in kept_rows}
    orphans = sorted(state.images - keep)
    if orphans:
        fs.rm([f"{root}/{k}" for k in orphans])
    return {
        "subgroups": per_group,
        "rows": len(kept_rows),
        "errors": len(errors),
        "images_removed": len(orphans),
        "rows_without_png_dropped": state.dropped_rows,
    }


def _dedupe_errors(errors: list[dict]) -> list[dict]:
    seen, out = set(), []
    for e in errors:
        key = (e.get("source_uri"), e.get("slot_id"), e["stage"], e["reason"], e.get("subgroup"))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


# --- the job ---------------------------------------------------------------------------------


def augment(config: AugmentConfig, *, runner=None) -> dict:
    """Run rounds until every subgroup meets its quota (or runs out of sources); returns the run summary.

    `runner(config, tasks, tally)` executes one round; default: the Ray Data pipeline
    (`run_round_ray`, needs `ray.init` first, as the CLI does).
    """
    from prism_ray.data.storage import makedirs

    runner = runner or run_round_ray
    started, t0 = _now(), time.perf_counter()
    config_hash = config.config_hash()
    layout = Layout.of(config.output)
    if layout.root != config.output:  # actors may run elsewhere: give them an absolute output path
        config = config.model_copy(update={"output": layout.root})
    makedirs(layout.root)
    results_hash = config.results_hash()
    t = time.perf_counter()
    sources = load_sources(config)
    pools = make_pools(config, sources)
    quotas = {g.name: g.quota for g in config.subgroups}
    policy = PlannerPolicy.from_config(config.planner)
    driver_seconds = Counter(load_sources=time.perf_counter() - t)
    extra_errors = list(sources.errors)
    for e in extra_errors:
        e.update(config_hash=results_hash, created_at=_now())
    tally = Tally(list(quotas))
    rounds: list[dict] = []
    progress: dict[str, SubgroupProgress] = {}
    for round_index in range(config.planner.max_rounds + 1):
        t = time.perf_counter()
        state = load_state(layout, results_hash)
        failed_slots, failed_sources = state.failed()
        progress = plan_round(pools, quotas, state.done(), failed_slots, failed_sources, policy)
        tasks, caption_errors = build_tasks(config, progress, sources, round_index)
        driver_seconds["plan"] += time.perf_counter() - t
        if caption_errors:  # recorded now, so the next plan skips those slots
            _write_driver_errors(layout, caption_errors, round_index)
        running = [n for n, p in progress.items() if p.status == "running"]
        if not running or round_index == config.planner.max_rounds:
            break
        if not tasks:
            continue  # every planned slot failed its caption: plan again without them
        n_slots = sum(len(task["edits"]) for task in tasks)
        log.info(
            "round %d: %d tasks, %d attempts (%s)",
            round_index + 1, len(tasks), n_slots,
            plan_line(progress),
        )
        t = time.perf_counter()
        before = {n: Counter(c) for n, c in tally.counts.items()}
        runner(config, tasks, tally)
        seconds = time.perf_counter() - t
        rounds.append({
            "round": round_index + 1,
            "tasks": len(tasks),
            "attempts_planned": n_slots,
            "seconds": seconds,
            "subgroups": {n: dict(tally.counts[n] - before[n]) for n in quotas},
        })
        log.info("round %d done in %.1fs: %s", round_index + 1, seconds, tally.line())

    for name, p in progress.items():
        if p.status == "running":
            p.status = "incomplete"  # max_rounds reached
    t = time.perf_counter()
    final = finalise(config, layout, pools, extra_errors)
    driver_seconds["finalise"] += time.perf_counter() - t
    wall = time.perf_counter() - t0
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
            "status": status,
            "shortfall": max(0, info["quota"] - info["accepted"]),
            "this_run": dict(tally.counts[name]),
        }
    summary = {
        "job": "augment",
        "mode": config.mode,
        "output": layout.root,
        "config_hash": config_hash,
        "results_hash": results_hash,
        "started_at": started.isoformat(),
        "wall_seconds": wall,
        "rounds": rounds,
        "subgroups": subgroups,
        "manifest_rows": final["rows"],
        "error_rows": final["errors"],
        "attempts_this_run": attempts,
        "errors_this_run": tally.total("error"),
        "images_removed": final["images_removed"],
        "rows_without_png_dropped": final["rows_without_png_dropped"],
        "throughput": {
            "attempts_per_second": attempts / work_seconds if work_seconds else None,
            "accepted_per_second": tally.total("accepted") / work_seconds if work_seconds else None,
            "sources_per_second": tally.sources / work_seconds if work_seconds else None,
            "round_seconds": work_seconds,
        },
        "actor_stage_seconds": dict(tally.seconds),
        "actor_seconds_per_attempt": {s: tally.seconds[s] / attempts for s in STAGES} if attempts else {},
        "driver_stage_seconds": dict(driver_seconds),
        "compute": config.compute.model_dump(mode="json"),
    }
    _write_json(summary, layout.summary)
    for name, info in subgroups.items():
        log.info(
            "%s: %s, %d/%d accepted, %d rejected (acceptance %s)%s", name, info["status"], info["accepted"],
            info["quota"], info["rejected"],
            "n/a" if info["acceptance_rate"] is None else f"{info['acceptance_rate']:.2f}",
            f", SHORTFALL {info['shortfall']}" if info["shortfall"] else "",
        )
    return summary


def _write_driver_errors(layout: Layout, errors: list[dict], round_index: int) -> None:
    from prism_ray.data.storage import write_table

    name = _digest("driver", round_index, *sorted(e["slot_id"] for e in errors)) + ".parquet"
    write_table(rows_to_table(errors, ERROR_SCHEMA), layout.ledger("errors", name))


def _write_json(data: dict, uri: str) -> None:
    import fsspec

    with fsspec.open(uri, "w") as f:
        json.dump(data, f, indent=2, default=str)
