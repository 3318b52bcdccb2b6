"""Manifest rows -> training examples (uint8 pixels + caption); bad rows become error rows, never exceptions."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from prism_ray.data.images import DecodeConfig, make_square
from prism_ray.data.schemas import ERROR_SCHEMA, rows_to_table
from prism_ray.data.storage import ImageReadError, join_uri, read_image, read_table, resolve_uri, write_table
from prism_ray.engine.images import from_model_pixels, preprocess
from prism_ray.results.clock import utc_now

CAPTION_COLUMN = "caption"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def caption_source(columns: Sequence[str], adapter_name: str, adapter_options: Mapping[str, Any]):
    """A `row -> caption` function: the manifest's `caption` column if present, else the dataset adapter."""
    if CAPTION_COLUMN in columns:
        return lambda row: row.get(CAPTION_COLUMN)
    from prism_ray.data.captions import get_adapter

    return get_adapter(adapter_name, **dict(adapter_options)).caption


def prepare_examples(
    rows: Sequence[Mapping[str, Any]],
    *,
    image_column: str,
    image_root: str | None,
    resolution: int,
    caption_fn,
    decode: DecodeConfig | None = None,
    min_side: int = 8,
) -> list[dict]:
    """Manifest rows -> {uri, pixels (3, R, R) uint8, caption, error}; a bad row gets an `error`.

    Item errors only: a missing/corrupt image (`ImageReadError`) or a caption the row cannot have
    (empty, or the adapter's `RowRejected`, both `ValueError`s) becomes `error = "<stage>: <reason>"`.
    Anything else (a storage outage, a bug) propagates: Ray retries the task or the job crashes.
    """
    out = []
    blank = np.zeros((3, resolution, resolution), np.uint8)
    for row in rows:
        uri = str(row.get(image_column) or "")
        example = {"uri": uri, "pixels": blank, "caption": "", "error": ""}
        try:
            caption = caption_fn(row)
            if caption is None or not str(caption).strip():
                raise ValueError("empty caption")
        except ValueError as err:
            out.append(example | {"error": f"caption: {err}"})
            continue
        try:
            if not uri:
                raise ImageReadError(uri, "empty image URI")
            decode = decode or DecodeConfig()
            image = read_image(resolve_uri(uri, image_root), decode, min_side=min_side)
            image = make_square(image, decode.square, decode.alpha_background)
        except ImageReadError as err:
            out.append(example | {"error": f"image: {err.reason}"})
            continue
        # The method's square crop + resize, kept as bytes so that examples move cheaply through Ray.
        pixels = from_model_pixels(preprocess([image], resolution)[0]).numpy()  # (3, R, R) uint8
        out.append(example | {"pixels": pixels, "caption": str(caption)})
    return out


def prepare_batch(
    batch: pa.Table, *, data, resolution: int, errors_uri: str, config_hash: str, min_side: int = 8
) -> dict:
    """One batch of manifest rows -> the good examples as columns; the bad ones written to `errors_uri`.

    `data` is the job's `DataConfig`. This is the whole per-batch step: a Ray Data `map_batches`
    runs it as is.
    """
    caption_fn = caption_source(batch.column_names, data.adapter, data.adapter_options)
    examples = prepare_examples(
        batch.to_pylist(),
        image_column=data.image_column,
        image_root=data.image_root,
        resolution=resolution,
        decode=data.decode,
        min_side=min_side,
        caption_fn=caption_fn,
    )
    bad = [e for e in examples if e["error"]]
    if bad:
        write_error_rows(bad, errors_uri, config_hash)
    good = [e for e in examples if not e["error"]]
    return {
        "uri": np.array([e["uri"] for e in good], dtype=object),
        "pixels": np.stack([e["pixels"] for e in good])
        if good
        else np.zeros((0, 3, resolution, resolution), np.uint8),
        "caption": np.array([e["caption"] for e in good], dtype=object),
    }


def write_error_rows(bad: list[dict], errors_uri: str, config_hash: str) -> None:
    """One Parquet part under `errors_uri`, named by its content: the same rows in a later epoch overwrite it."""
    now = utc_now()
    rows = []
    for e in bad:
        stage, reason = e["error"].split(":", 1)  # stage: image | caption
        # PIL puts object addresses into messages; drop them so a reason reads the same every epoch.
        rows.append(
            {
                "source_uri": e["uri"],
                "stage": stage,
                "reason": _ADDRESS.sub("", reason).strip(),
                "config_hash": config_hash,
                "created_at": now,
            }
        )
    key = hashlib.sha256("\n".join(f"{r['source_uri']}\t{r['stage']}\t{r['reason']}" for r in rows).encode())
    write_table(
        rows_to_table(rows, ERROR_SCHEMA), join_uri(errors_uri, f"part-{key.hexdigest()[:16]}.parquet")
    )


def skipped_rows(errors_uri: str) -> dict[str, int]:
    """Counts of skipped manifest rows by `stage: reason`, each (source, stage) counted once."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(errors_uri)
    if not fs.exists(path):
        return {}
    reasons: dict[tuple[str, str], str] = {}
    for part in sorted(fs.glob(path + "/*.parquet")):
        table = read_table(fs.unstrip_protocol(part), columns=["source_uri", "stage", "reason"])
        for row in table.to_pylist():
            reasons[(row["source_uri"], row["stage"])] = f"{row['stage']}: {row['reason']}"
    counts: dict[str, int] = {}
    for reason in reasons.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def latent_cache_key(
    model_root: str, rows: pa.Table, *, resolution: int, latents: str, data, dtype: str = "float32"
) -> str:
    """16 hex digits naming cached VAE latents + text context: the digest of the VAE, text encoder and
    tokenizer files, the manifest rows, the resolution, the latents mode, the models' dtype and the data
    settings (`data`, the job's `DataConfig`). Equal keys = the same cache, so a later run reuses it."""
    from pathlib import Path

    from prism_ray.models.loading import weights_digest

    root = Path(model_root)
    h = hashlib.sha256(weights_digest(root / "vae", root / "text_encoder", root / "tokenizer").encode())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    h.update(sink.getvalue().to_pybytes())
    settings = {"resolution": resolution, "latents": latents, "dtype": dtype, "data": data.model_dump(mode="json")}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]
