"""Ray Data adapters of fine-tuning's data: manifest rows -> examples, and cached VAE latents + text context."""

from __future__ import annotations

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from prism_ray.engine.images import to_model_pixels, vae_latent_moments
from prism_ray.engine.text import encode_prompts
from prism_ray.pipelines.finetune import FinetuneConfig, FinetunePlan
from prism_ray.training.examples import latent_cache_key, prepare_batch


def examples_dataset(config: FinetuneConfig, plan: FinetunePlan) -> ray.data.Dataset:
    """The plan's rows -> Ray Dataset of {uri, pixels (3, R, R) uint8, caption}; bad rows go to `<run>/errors/`."""
    return ray.data.from_arrow(plan.rows).map_batches(
        prepare_batch,
        batch_format="pyarrow",
        fn_kwargs={
            "data": config.data,
            "resolution": plan.resolution,
            "min_side": plan.min_side,
            "errors_uri": plan.errors_uri,
            "config_hash": config.config_hash(),
        },
    )


class EncodeLatents:
    """Ray Data actor: frozen VAE + text encoder loaded once; pixels + captions -> latent moments + context."""

    def __init__(self, config: FinetuneConfig):
        from prism_ray.models.loading import load_sd_components

        m = config.model
        device = "cuda" if config.compute.use_gpu else "cpu"
        self.sd = load_sd_components(m.path, device=device, dtype=m.dtype, cache_dir=m.cache_dir)
        self.keep_std = config.train.latents == "sample"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mean, std = vae_latent_moments(self.sd.vae, to_model_pixels(batch["pixels"]))  # (N, 4, h, w) each
        context = encode_prompts(
            self.sd.tokenizer, self.sd.text_encoder, list(batch["caption"])
        )  # (N, 77, D)
        out = {
            "uri": batch["uri"],
            "latents": mean.float().cpu().numpy(),
            "context": context.float().cpu().numpy(),
        }
        if self.keep_std:
            out["latents_std"] = std.float().cpu().numpy()
        return out


def cache_latents(dataset: ray.data.Dataset, config: FinetuneConfig, plan: FinetunePlan | None = None) -> ray.data.Dataset:
    """Encode every good row once with Ray Data actors and keep the result in the object store.

    With `plan`, the result is also stored under `<storage_path>/latent_cache/<key>` (key:
    `training.examples.latent_cache_key`: VAE/text weights, rows, resolution, settings) and a later run
    with the same key reads it back instead of encoding again.
    """
    if plan is None:
        return _encode(dataset, config)
    import fsspec

    key = latent_cache_key(str(plan.model_root), plan.rows, resolution=plan.resolution,
                           latents=config.train.latents, data=config.data, dtype=config.model.dtype)
    uri = f"{plan.storage_path}/latent_cache/{key}"
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(f"{path}/_COMPLETE"):  # written last: a cache cut short is never read
        return ray.data.read_parquet(uri)
    encoded = _encode(dataset, config)
    encoded.write_parquet(uri)
    fs.pipe(f"{path}/_COMPLETE", key.encode())
    return encoded


def _encode(dataset: ray.data.Dataset, config: FinetuneConfig) -> ray.data.Dataset:
    c = config.compute
    return dataset.map_batches(
        EncodeLatents,
        fn_constructor_kwargs={"config": config},
        batch_size=16,
        compute=ActorPoolStrategy(size=c.data_concurrency),
        num_gpus=1 if c.use_gpu else 0,
        num_cpus=1,
    ).materialize()
