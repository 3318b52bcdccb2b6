"""The audit report's inputs: example rows picked in one streaming pass, their images, and the HTML call."""

from __future__ import annotations

import io
import logging

import numpy as np

from prism_ray.results.layout import Layout, digest
from prism_ray.scoring.audit_stats import P_CF, P_ORIG
from prism_ray.scoring.classification import flipped

log = logging.getLogger("prism_ray.audit")


def pick_examples(
    rows_uri: str,
    cells: list[tuple[str, str]],
    interventions: list[str],
    strongest: int,
    random: int,
    threshold: float,
    seed: int,
) -> dict[tuple[str, str], list[dict]]:
    """One streaming pass: per (intervention, attribute) cell the `strongest` rows whose decision changed,
    largest |Δp| first; per (intervention, "random") `random` rows by a seeded hash of their id."""
    import heapq

    import fsspec
    import pyarrow.parquet as pq

    attributes = sorted({a for _, a in cells})
    columns = ["row_id", "intervention", "source_uri", "image_uri", "edit_prompt", "s_clip"]
    columns += [p + a for a in attributes for p in (P_ORIG, P_CF)]
    heaps: dict[tuple[str, str], list] = {cell: [] for cell in cells}
    heaps.update({(i, "random"): [] for i in interventions})
    fs, path = fsspec.core.url_to_fs(rows_uri)
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=16384, columns=columns):
            for row in batch.to_pylist():
                if not row["image_uri"]:
                    continue
                key = (row["intervention"], "random")
                if key in heaps and random:
                    rank = int(digest("example", seed, row["row_id"], size=12), 16)
                    _push(heaps[key], (-rank, row["row_id"], row), random)
                for a in attributes:
                    cell = (row["intervention"], a)
                    if cell not in heaps or strongest == 0:
                        continue
                    before, after = row[P_ORIG + a], row[P_CF + a]
                    if before is None or after is None or not flipped(before, after, threshold):
                        continue
                    _push(heaps[cell], (abs(after - before), row["row_id"], row), strongest)
    del heapq
    return {
        cell: [r for *_, r in sorted(heap, key=lambda x: x[0], reverse=True)] for cell, heap in heaps.items()
    }


def _push(heap: list, item: tuple, size: int) -> None:
    import heapq

    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


def _example(config, row: dict, attributes: list[str], why: str):
    from PIL import Image

    from prism_ray.data.images import decode_image, make_square
    from prism_ray.data.storage import read_image_bytes
    from prism_ray.report.grids import Example

    cf = np.asarray(Image.open(io.BytesIO(read_image_bytes(row["image_uri"]))).convert("L"))
    decode = config.data.decode
    source = make_square(
        decode_image(read_image_bytes(row["source_uri"]), row["source_uri"], decode),
        decode.square,
        decode.alpha_background,
    )
    source = np.asarray(Image.fromarray(source).convert("L").resize(cf.shape[::-1], Image.BICUBIC))
    scores = ", ".join(
        f"{a} {row[P_ORIG + a]:.2f}→{row[P_CF + a]:.2f}" for a in attributes if P_ORIG + a in row
    )
    caption = f"{why}: {row['source_uri'].rsplit('/', 1)[-1]}; {scores}; S_CLIP {row['s_clip']:.2f}"
    return Example(original=source, counterfactual=cf, caption=caption)


def write_report(config, layout: Layout, summary: dict, tables) -> None:
    """report.html: the statistics, flagged cells with their strongest examples, random examples per edit."""
    from prism_ray.data.storage import read_image_bytes  # noqa: F401 - fail early if storage is broken
    from prism_ray.report.audit_report import render_audit_report

    if not config.save_images:
        examples = {}
    else:
        cochange = tables.cochange.to_pylist()
        targets = {r["intervention"]: config.target_of(r["intervention"]) for r in cochange}
        cells = sorted(
            {
                (r["intervention"], r["attribute"])
                for r in cochange
                if r["subgroup"] == "all" and (r["flagged"] or r["attribute"] == targets[r["intervention"]])
            }
        )
        picked = pick_examples(
            layout.uri("rows.parquet"),
            cells,
            config.interventions,
            config.report.strongest,
            config.report.random,
            config.stats.threshold,
            config.seed,
        )
        examples = {}
        budget = config.report.max_images
        for (intervention, attribute), rows in picked.items():
            shown = [attribute] if attribute != "random" else [targets.get(intervention, "")]
            title = f"do({intervention}): " + (
                "random" if attribute == "random" else f"{attribute}, strongest changes"
            )
            grid = []
            for row in rows[: max(budget, 0)]:
                try:
                    grid.append(
                        _example(config, row, shown, "random" if attribute == "random" else "strongest")
                    )
                except (OSError, ValueError) as err:  # a moved source: the report goes on without it
                    log.warning("audit report: example %s skipped: %s", row["row_id"], err)
            budget -= len(grid)
            if grid:
                examples[title] = grid
    run_info = {
        "model": summary["model"],
        "classifiers": ", ".join(summary["classifiers"]),
        "data": config.data.manifest,
        "interventions": ", ".join(f"do({i})" for i in config.interventions),
        "editing": (
            f"{config.inversion.method} inversion, {config.inversion.num_inference_steps} steps, "
            f"prompt-to-prompt {config.edit.controller}, local blend "
            + (
                f"{config.edit.blend_mask} mask at threshold {_blend_threshold(config.edit):g} "
                "(co-changes outside the mask are pasted back from the source)"
                if config.edit.local_blend
                else "off"
            )
        ),
        "sources audited": summary["accounting"]["tasks"],
        "rows (source × intervention)": summary["rows"],
        "error rows": summary["error_rows"],
        "input rows": summary["accounting"]["input_rows"],
        "flagged co-changes": len(summary["flagged"]),
        "decision threshold": config.stats.threshold,
    }
    render_audit_report(
        layout.uri("report.html"),
        run_info=run_info,
        cochange=tables.cochange,
        per_intervention=tables.interventions,
        examples=examples,
        alpha=config.stats.alpha,
        min_effect=config.stats.min_effect,
        max_images=max(config.report.max_images, 1) * 3,
    )


def _blend_threshold(edit) -> float:
    return edit.noise_mask_threshold if edit.blend_mask == "noise" else edit.blend_threshold
