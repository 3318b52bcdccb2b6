"""The per-batch step of counterfactual jobs: read -> invert once -> edit many -> score -> filter -> PNGs + ledger rows.

`CounterfactualStep(config, results_hash)` loads its models once; `step(tasks)` turns a batch of
tasks (one per source, all its edits) into PNGs and one ledger part, and returns per-slot
metadata (never pixels). It runs the same in a test process, in `pipelines.augment`'s in-process
runner and inside a Ray actor (`distributed.actors`).

Exceptions are classified here, at the batch boundary:
- item errors (`ValueError`: an unreadable image, a caption, NaN latents, an engine `ItemError`)
  become error rows and the rest of the batch carries on;
- transient/resource errors (`is_transient`: CUDA OOM, `MemoryError`, a storage `OSError` that can
  go away) are raised: no ledger part is written, so the whole batch is retried under the same ids;
- anything else is a bug and crashes with its traceback.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from prism_ray.data.schemas import COUNTERFACTUAL_SCHEMA, ERROR_SCHEMA, rows_to_table
from prism_ray.data.storage import is_transient_storage_error
from prism_ray.faults import fault_point
from prism_ray.results.clock import utc_now
from prism_ray.results.layout import Layout, digest
from prism_ray.results.ledger import write_part

log = logging.getLogger("prism_ray.counterfactuals")

STAGES = ("read", "invert", "edit", "score", "write")
# Per-edit scores the engine returns that become manifest columns (the fidelity ones are per source).
SCORE_COLUMNS = ("s_clip", "clip_image_image", "clip_image_text", "l1", "l1_255", "reconstruction_error",
                 "reconstruction_psnr", "reconstruction_ssim", "vae_psnr", "off_target", "on_target")
TEXT_SCORE_COLUMNS = ("off_target_heads", "classifier_source", "classifier_edit")  # with filter.off_target on


def is_transient(err: BaseException) -> bool:
    """Worth retrying the batch: out of (GPU) memory, or a storage error that can go away (a lost
    connection, a full disk: `data.storage.is_transient_storage_error`, which also decides what a read
    writes off as the image's fault)."""
    import torch

    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return is_transient_storage_error(err)



@dataclass
class Edited:
    """One source's K edits as the engine returns them (input order of `task['edits']`)."""

    index: int  # position in the engine call's input
    images: np.ndarray  # (K, R, R, 3) uint8
    scores: dict[str, np.ndarray]  # each (K,): s_clip, clip_image_image, clip_image_text, l1, l1_255, reconstruction_error
    inversion_seconds: float = 0.0
    edit_seconds: float = 0.0  # for all K edits
    score_seconds: float = 0.0
    source: np.ndarray | None = None  # (R, R, 3) uint8: the source as the model saw it (square, resized)
    reconstruction: np.ndarray | None = None  # (R, R, 3) uint8: the unedited reconstruction (the audit's control)


class Engine(Protocol):
    """What the step needs of the method: the real one is `MethodEngine`; tests pass fakes."""

    vae_scale_factor: int  # latent stride: the smallest usable image is 8 latents wide

    def counterfactuals(
        self, pixels: list[np.ndarray], tasks: list[dict]
    ) -> tuple[list[Edited], list[tuple[int, str, str]]]: ...

    def samples(self, tasks_edits: list[dict]) -> np.ndarray: ...


class MethodEngine:
    """The method on loaded models: null-text inversion + prompt-to-prompt (`engine.editor`), CLIP scores."""

    def __init__(self, config, device: str | None = None):
        from prism_ray.models.loading import load_sd_components

        m = config.model
        self.config = config
        self.sd = load_sd_components(m.path, device=device or m.device, dtype=m.dtype, cache_dir=m.cache_dir)
        self.vae_scale_factor = self.sd.vae_scale_factor
        if config.mode == "counterfactual":
            from prism_ray.engine.editor import Editor
            from prism_ray.models.loading import require_supported_prediction

            require_supported_prediction(self.sd.root)
            self.classifier = None
            if config.filter.off_target.classifier:
                from prism_ray.models.classifier import classifier_labels, load_classifier
                from prism_ray.models.loading import resolve_model_root

                root = resolve_model_root(config.filter.off_target.classifier, m.cache_dir)
                self.classifier = load_classifier(root, device=self.sd.device)
                self.heads = classifier_labels(self.classifier)
                if config.filter.off_target.require_target:  # fail before any GPU time: every intervention's heads
                    from prism_ray.scoring.filter import target_checks

                    specs = [i for g in getattr(config, "subgroups", []) for i in g.interventions]
                    for spec in specs + list(getattr(config, "interventions", [])):
                        target_checks(spec, self.heads, config.filter.off_target)
            from prism_ray.models.loading import load_clip
            from prism_ray.scoring.clip_score import ClipScorer

            clip = load_clip(m.clip_path or m.path, device=self.sd.device, cache_dir=m.cache_dir)
            self.scorer = ClipScorer.from_components(clip)
            # compute (augment's ActorPoolConfig): the memory budget and kernels; other jobs use the defaults.
            self.editor = Editor(self.sd, config.edit, config.inversion, getattr(config, "compute", None))

    def counterfactuals(self, pixels, tasks):
        from prism_ray.engine.editor import edit_many
        from prism_ray.engine.images import from_model_pixels, preprocess
        from prism_ray.scoring.metrics import l1, psnr, ssim

        # The engine batches images with the same number of edits K: group by K.
        by_k: dict[int, list[int]] = defaultdict(list)
        for i, task in enumerate(tasks):
            by_k[len(task["edits"])].append(i)
        out: list[Edited] = []
        errors: list[tuple[int, str, str]] = []
        for idx in by_k.values():
            prompts = [[e["edit_prompt"] for e in tasks[i]["edits"]] for i in idx]
            masks = [tasks[i].get("mask_pixels") or {} for i in idx]  # user edit/keep masks (read_batch)
            configs = [[self.config.edit.for_intervention(e.get("intervention")) for e in tasks[i]["edits"]] for i in idx]
            got, bad = edit_many(
                self.editor, [pixels[i] for i in idx], [tasks[i]["source_prompt"] for i in idx], prompts,
                edit_masks=[m.get("edit") for m in masks], keep_masks=[m.get("keep") for m in masks],
                edit_configs=configs,
            )
            errors += [(idx[j], stage, reason) for j, stage, reason in bad]
            for item in got:
                i = idx[item.index]
                start = time.perf_counter()
                # The source as the model saw it (square, model resolution): what L1 and CLIP compare to.
                x = preprocess([pixels[i]], self.sd.resolution)[0]  # (3, R, R) in [-1, 1]
                orig = from_model_pixels(x).permute(1, 2, 0).numpy()  # (R, R, 3) uint8
                origs = np.repeat(orig[None], len(item.edits), axis=0)  # (K, R, R, 3)
                try:
                    # The source is one image for all K edits: embedded once.
                    scores = self.scorer.score(orig[None], item.edits, tasks[i]["source_prompt"], item.edit_prompts)
                except ValueError as err:  # e.g. a prompt the scorer cannot take: these slots only
                    errors.append((i, "score", str(err)))
                    continue
                scores["reconstruction_error"] = np.full(len(item.edits), item.reconstruction_error)
                # Pixel-space fidelity of the unedited reconstruction and of the VAE round trip alone:
                # a latent error can be small while the VAE paints its training texture over an image
                # unlike its data; these see it.
                fidelity = {
                    "reconstruction_psnr": psnr(item.reconstruction, orig),
                    "reconstruction_ssim": ssim(item.reconstruction, orig),
                    "vae_psnr": psnr(self._round_trip(x), orig),
                }
                scores.update({k: np.full(len(item.edits), v) for k, v in fidelity.items()})
                if self.classifier is not None:
                    scores.update(self._off_target(orig, item.edits, tasks[i]["edits"]))
                scores["l1"], scores["l1_255"] = l1(item.edits, origs, "unit"), l1(item.edits, origs, "255")
                out.append(Edited(i, item.edits, scores, item.inversion_seconds, item.edit_seconds,
                                  time.perf_counter() - start, source=orig, reconstruction=item.reconstruction))
        return out, errors

    def _off_target(self, orig: np.ndarray, edits: np.ndarray, slots: list[dict]) -> dict[str, np.ndarray]:
        """Classifier probabilities of the source and each edit, the heads each edit changed that its
        intervention does not allow (`scoring.filter.off_target_heads`) and, with `require_target`, whether
        the classifier sees the intervention happen (`scoring.filter.on_target`)."""
        import json

        from prism_ray.models.classifier import predict_proba
        from prism_ray.scoring.filter import off_target_heads, on_target

        rule = self.config.filter.off_target
        p = predict_proba(self.classifier, np.concatenate([orig[None], edits]))  # (1 + K, H)
        allowed = [rule.allowed_heads(slot["intervention"]) for slot in slots]
        wrong = off_target_heads(p[0], p[1:], self.heads, allowed, rule.max_shift)
        seen = {}
        if rule.require_target:
            seen["on_target"] = np.array([on_target(p[0], q, self.heads, slot["intervention"], rule)
                                          for q, slot in zip(p[1:], slots, strict=True)], dtype=np.int64)
        return {
            **seen,
            "off_target": np.array([len(w) for w in wrong]),
            "off_target_heads": np.array([",".join(w) for w in wrong], dtype=object),
            "classifier_source": np.array([json.dumps(dict(zip(self.heads, np.round(p[0], 4).tolist(), strict=True)))] * len(slots),
                                          dtype=object),
            "classifier_edit": np.array([json.dumps(dict(zip(self.heads, np.round(q, 4).tolist(), strict=True))) for q in p[1:]],
                                        dtype=object),
        }

    def _round_trip(self, x) -> np.ndarray:
        """The source through the VAE alone (encode, decode), uint8 (R, R, 3)."""
        import torch

        from prism_ray.engine.images import decode, encode

        with torch.no_grad():
            return decode(self.sd.vae, encode(self.sd.vae, x[None].to(self.sd.device, self.sd.vae.dtype)))[0]

    def samples(self, edits):
        import torch

        from prism_ray.engine.sampling import generate_images

        cfg = self.config.sampling
        # One generator per item, seeded from its slot: a sample does not depend on its batch-mates.
        generators = [torch.Generator("cpu").manual_seed(e["sample_seed"]) for e in edits]
        return generate_images(
            self.sd, [e["prompt"] for e in edits], num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale, generators=generators,
        )


def read_batch(tasks: list[dict], decode, vae_scale_factor: int) -> tuple[list[tuple[dict, str, np.ndarray]], list]:
    """Each task's source -> (task, sha256 of its bytes, square pixels), or (task, reason) when it cannot be read.

    Sets `task['source_size']` and `task['square']`, and `task['mask_pixels']` ({"edit" | "keep": bool square
    mask}) for the user masks in `task['masks']` (`augment.mask_uris`); the reason names the manifest row when
    the task has one, and for a mask its config field and file.
    """
    from prism_ray.data.images import decode_image, default_min_side, make_square
    from prism_ray.data.manifest import row_label
    from prism_ray.data.masks import read_mask
    from prism_ray.data.storage import read_image_bytes

    min_side = decode.min_side or default_min_side(vae_scale_factor)
    good, failed = [], []
    for task in tasks:
        try:
            data = read_image_bytes(task["source_uri"])
            image = decode_image(data, task["source_uri"], decode, min_side=min_side)
        except ValueError as err:  # ImageReadError: this source only
            reason = getattr(err, "reason", str(err))
            if task.get("row") is not None:
                reason = f"{row_label(task['row'], task['source_uri'])}: {reason}"
            failed.append((task, reason))
            continue
        h, w = image.shape[:2]
        task["source_size"] = (w, h)
        task["square"] = "none" if h == w else decode.square
        try:
            task["mask_pixels"] = {}
            # `field_name` is read by the except below: the config field of the mask that failed
            for kind, (field_name, uri) in (task.get("masks") or {}).items():  # noqa: B007
                task["mask_pixels"][kind] = read_mask(uri, (w, h), decode)
        except ValueError as err:  # ImageReadError: this source only
            failed.append((task, f"{row_label(task.get('row'), task['source_uri'])}: {field_name}: {err}"))
            continue
        good.append((task, hashlib.sha256(data).hexdigest(), make_square(image, decode.square, decode.alpha_background)))
    return good, failed


@dataclass
class BatchReport:
    """What a batch sends back to the driver: one outcome per planned slot, stage seconds, nothing else."""

    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # slot_id -> (subgroup, accepted|rejected|error)
    sources: int = 0
    seconds: Counter = field(default_factory=Counter)


class CounterfactualStep:
    """Loads the models once; each call is one batch of tasks -> PNGs, then one ledger part."""

    def __init__(self, config, results_hash: str, model_id: str = "", engine: Engine | None = None):
        self.config = config
        self.results_hash = results_hash
        self.model_id = model_id  # digest of the model weights (also part of results_hash)
        self.layout = Layout.of(config.output)
        self.model_loads = 0
        if engine is None:
            engine = MethodEngine(config)
            self.model_loads += 1
        self.engine = engine
        self.batches = 0

    def __call__(self, tasks: list[dict]) -> BatchReport:
        fault_point("step.start")
        rows: list[dict] = []
        errors: list[dict] = []
        seconds: Counter = Counter()
        if self.config.mode == "samples":
            self._samples(tasks, rows, errors, seconds)
        else:
            self._counterfactuals(tasks, rows, errors, seconds)
        fault_point("step.before_ledger")  # PNGs are written, the ledger part is not
        # Named by the batch's tasks: a retried batch overwrites its own part instead of adding one.
        name = digest("batch", *sorted(t["task_id"] for t in tasks)) + ".parquet"
        if errors:
            write_part(self.layout, "errors", name, rows_to_table(errors, ERROR_SCHEMA))
        if rows:
            write_part(self.layout, "rows", name, rows_to_table(rows, COUNTERFACTUAL_SCHEMA))
        self.batches += 1
        verdict = {r["slot_id"]: "accepted" if r["accepted"] else "rejected" for r in rows}
        report = BatchReport(sources=sum(1 for t in tasks if t.get("source_uri")), seconds=seconds)
        for task in tasks:
            for e in task["edits"]:
                report.outcomes[e["slot_id"]] = (e["subgroup"], verdict.get(e["slot_id"], "error"))
        return report

    # -- counterfactual mode ----------------------------------------------------------------

    def _read(self, tasks, errors, seconds) -> list[tuple[dict, str, np.ndarray]]:
        start = time.perf_counter()
        good, failed = read_batch(tasks, self.config.data.decode, self.engine.vae_scale_factor)
        errors += [self._error(task, "read", reason) for task, reason in failed]
        seconds["read"] += time.perf_counter() - start
        return good

    def _counterfactuals(self, tasks, rows, errors, seconds) -> None:
        sources = self._read(tasks, errors, seconds)
        if not sources:
            return
        start = time.perf_counter()
        edited, failed = self.engine.counterfactuals([p for _, _, p in sources], [t for t, _, _ in sources])
        engine_seconds = time.perf_counter() - start
        score_seconds = sum(e.score_seconds for e in edited)
        invert_seconds = min(sum(e.inversion_seconds for e in edited), engine_seconds - score_seconds)
        seconds["invert"] += invert_seconds
        seconds["edit"] += max(engine_seconds - score_seconds - invert_seconds, 0.0)
        seconds["score"] += score_seconds
        for i, stage, reason in failed:
            task = sources[i][0]
            # Inversion depends only on the source: every slot of it fails. Later stages fail per slot.
            errors += [self._error(task, stage, reason)] if stage == "invert" else self._slot_errors(task, stage, reason)
        for item in edited:
            task, source_id, _ = sources[item.index]
            accepted = self.config.filter.accept(item.scores)
            for k, edit in enumerate(task["edits"]):
                # Unique per source path and bytes, edit, and results hash (model weights + method config).
                cf_id = digest("cf", task["source_uri"], source_id, edit["subgroup"], edit["intervention"],
                               edit["edit_prompt"], self.results_hash)
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
                    **{key: float(item.scores[key][k]) for key in SCORE_COLUMNS if key in item.scores},
                    **{key: item.scores[key][k] for key in TEXT_SCORE_COLUMNS if key in item.scores},
                    "accepted": bool(accepted[k]),
                    "source_width": task["source_size"][0],
                    "source_height": task["source_size"][1],
                    "square": task["square"],
                    "inversion_seconds": item.inversion_seconds,
                    "edit_seconds": item.edit_seconds / len(task["edits"]),
                }
                self._write_png(item.images[k], row, rows, seconds)

    # -- samples mode (the "SD samples" arm: text-to-image, not filtered) -----------------

    def _samples(self, tasks, rows, errors, seconds) -> None:
        edits = [e for task in tasks for e in task["edits"]]
        size = self.config.sampling.batch_size
        for begin in range(0, len(edits), size):
            chunk = edits[begin : begin + size]
            start = time.perf_counter()
            images = self.engine.samples(chunk)  # (B, R, R, 3) uint8
            seconds["edit"] += time.perf_counter() - start
            for e, image in zip(chunk, images, strict=True):
                row = {
                    "cf_id": digest("sample", e["subgroup"], e["prompt"], e["sample_seed"], self.results_hash),
                    "slot_id": e["slot_id"],
                    "attempt_rank": e["rank"],
                    "source_uri": "",
                    "source_id": "",
                    "subgroup": e["subgroup"],
                    "source_prompt": "",
                    "edit_prompt": e["prompt"],
                    "sample_seed": e["sample_seed"],
                    "accepted": True,
                    "edit_seconds": (time.perf_counter() - start) / len(chunk),
                }
                self._write_png(image, row, rows, seconds)

    # -- rows -----------------------------------------------------------------------------

    def _write_png(self, image: np.ndarray, row: dict, rows: list[dict], seconds: Counter) -> None:
        from prism_ray.data.storage import write_png

        start = time.perf_counter()
        key = Layout.image_key(row["subgroup"], row["cf_id"])
        write_png(image, self.layout.uri(key))  # a storage error is transient: the batch is retried
        seconds["write"] += time.perf_counter() - start
        row.update(image_uri=self.layout.uri(key), model_id=self.model_id, config_hash=self.results_hash,
                   created_at=utc_now())
        rows.append(row)

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
            "created_at": utc_now(),
        }

    def _slot_errors(self, task: dict, stage: str, reason: str) -> list[dict]:
        return [self._error(task, stage, reason, edit) for edit in task["edits"]]
