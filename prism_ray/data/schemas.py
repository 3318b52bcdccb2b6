"""The pyarrow schemas of every table prism_ray writes (outputs: docs/results.md, docs/jobs.md), in one place."""

from __future__ import annotations

import pyarrow as pa

# One row per counterfactual attempt (accepted or rejected by the CLIP filter).
COUNTERFACTUAL_SCHEMA = pa.schema(
    [
        pa.field("cf_id", pa.string(), nullable=False),  # sha of source bytes + edit + model + config hash
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),  # sha256 of the source image bytes
        pa.field("subgroup", pa.string()),
        pa.field("source_prompt", pa.string(), nullable=False),
        pa.field("edit_prompt", pa.string(), nullable=False),
        pa.field("intervention", pa.string()),  # e.g. "Support Devices=0"
        pa.field("image_uri", pa.string()),  # the counterfactual PNG
        pa.field("reconstruction_uri", pa.string()),
        pa.field("s_clip", pa.float32()),
        pa.field("clip_image_image", pa.float32()),
        pa.field("clip_image_text", pa.float32()),
        pa.field("l1", pa.float32()),  # on [0, 1]
        pa.field("l1_255", pa.float32()),
        pa.field("accepted", pa.bool_(), nullable=False),
        # ||z - z0||^2 / ||z0||^2: the unedited source branch's final latent vs the encoded source
        pa.field("reconstruction_error", pa.float32()),
        # pixel-space fidelity vs the source as the model saw it: the unedited reconstruction (dB, SSIM)
        # and the VAE round trip alone (dB); low values = the model does not fit this image
        pa.field("reconstruction_psnr", pa.float32()),
        pa.field("reconstruction_ssim", pa.float32()),
        pa.field("vae_psnr", pa.float32()),
        # filter.off_target: heads the edit changed that its intervention does not allow (count, names),
        # and every head's probability for the source and the edit (JSON objects)
        pa.field("off_target", pa.float32()),
        pa.field("off_target_heads", pa.string()),
        pa.field("classifier_source", pa.string()),
        pa.field("classifier_edit", pa.string()),
        pa.field("inversion_seconds", pa.float32()),
        pa.field("edit_seconds", pa.float32()),
        pa.field("model_id", pa.string()),
        pa.field("config_hash", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("ms", tz="UTC")),
        # augment job: the planned attempt (known before the source is read), its place in the
        # subgroup's deterministic order, and the generator seed of a text-to-image sample.
        pa.field("slot_id", pa.string()),
        pa.field("attempt_rank", pa.int64()),
        pa.field("sample_seed", pa.int64()),
        # in_quota: part of the subgroup's exact quota set (the sequential prefix, see pipelines.quota);
        # beyond_quota: finished after the quota was met, kept, counts first if the quota is raised;
        # set_aside: finished for a subgroup/selector/intervention this run's config no longer has.
        pa.field("quota_status", pa.string()),
        # the source as decoded (after EXIF rotation), and how it was made square: none | center_crop | pad
        pa.field("source_width", pa.int64()),
        pa.field("source_height", pa.int64()),
        pa.field("square", pa.string()),
    ]
)

# One row per item that failed somewhere (never kills the job).
ERROR_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # read | caption | invert | edit | score | write
        pa.field("reason", pa.string(), nullable=False),
        pa.field("subgroup", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("created_at", pa.timestamp("ms", tz="UTC")),
        pa.field("slot_id", pa.string()),  # augment job: the failed attempt; null = the whole source
    ]
)

# One row per optimisation step of fine-tuning (rank 0).
TRAIN_METRICS_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("epoch", pa.int64()),
        pa.field("loss", pa.float32()),
        pa.field("lr", pa.float32()),
        pa.field("grad_norm", pa.float32()),
        pa.field("images_per_second", pa.float32()),
        pa.field("config_hash", pa.string()),
    ]
)


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table from dict rows; missing nullable fields become null, unknown keys are an error."""
    names = set(schema.names)
    for row in rows:
        unknown = set(row) - names
        if unknown:
            raise ValueError(f"row has field(s) not in the schema: {sorted(unknown)}")
    return pa.Table.from_pylist(rows, schema=schema)
