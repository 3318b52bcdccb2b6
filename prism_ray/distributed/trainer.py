"""Ray Train + DeepSpeed launch of the fine-tuning step: data shards, checkpoints, resume, export."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from prism_ray.data.config import DataConfig
from prism_ray.pipelines.deepspeed_config import build_deepspeed_config, check_resources
from prism_ray.pipelines.finetune import FinetuneConfig
from prism_ray.data.schemas import ERROR_SCHEMA, TRAIN_METRICS_SCHEMA, rows_to_table
from prism_ray.data.storage import join_uri, read_table, write_png, write_table
from prism_ray.training.diffusion import (
    caption_source,
    configure_unet,
    diffusion_loss,
    export_diffusers,
    latent_moments,
    latents_from_moments,
    make_noise_scheduler,
    model_prediction_type,
    module_digest,
    pixels_to_model_input,
    prepare_examples,
    sample_images,
    step_generator,
    text_embeddings,
)

log = logging.getLogger(__name__)

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
DS_TAG = "deepspeed"  # DeepSpeed checkpoint tag inside every Ray checkpoint folder
STATE_FILE = "trainer_state.json"
UNET_FILE = "unet.safetensors"  # ZeRO stage 0: the full U-Net, written by rank 0
EMA_FILE = "ema_unet.safetensors"


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    run_path: str  # <storage_path>/<name>: checkpoints, metrics/, validation/, errors/, model/
    final_step: int
    start_step: int  # > 0 when the run resumed from a checkpoint
    model_path: str | None  # exported diffusers folder (None if run.export is false)
    checkpoint_path: str | None
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> manifest rows skipped


# --- driver side -----------------------------------------------------------------------------


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune the U-Net on `config.data` with Ray Train + DeepSpeed; resume by name; export a diffusers folder.

    Everything that can be checked on the driver (DeepSpeed combinations, cluster resources,
    the manifest) fails here, before any worker starts.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from prism_ray.models.loading import resolve_model_root

    ds_config = build_deepspeed_config(config)
    if not ray.is_initialized():
        raise RuntimeError("finetune: call ray.init() first (jobs/finetune.py does)")
    check_resources(config, ray.cluster_resources())
    storage_path = _absolute_storage(config.run.storage_path)
    run_path = join_uri(storage_path, config.run.name)
    model_root = resolve_model_root(config.model.path, config.model.cache_dir)

    dataset = build_dataset(config, resolution=_model_resolution(model_root), run_path=run_path)
    if config.train.cache_latents:
        dataset = cache_latents(dataset, config)

    c = config.compute
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "deepspeed": ds_config, "run_path": run_path},
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker={"CPU": c.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"finetune: run '{run_path}' ended without a checkpoint")

    with result.checkpoint.as_directory() as ckpt_dir:
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
        model_path = None
        if config.run.export:
            model_path = config.run.export_path or join_uri(run_path, "model")
            weights = consolidated_unet_state(Path(ckpt_dir), use_ema=config.train.ema)
            export_diffusers(
                model_root,
                weights,
                model_path,
                metadata={"step": state["step"], "config_hash": config.config_hash(), "ema": config.train.ema},
            )
    skipped = skipped_rows(run_path)
    if skipped:
        print(f"finetune: skipped {sum(skipped.values())} manifest rows: {skipped}", flush=True)
    return FinetuneResult(
        run_path=run_path,
        final_step=int(state["step"]),
        start_step=int(state.get("start_step", 0)),
        model_path=model_path,
        checkpoint_path=result.checkpoint.path,
        skipped=skipped,
    )


def _absolute_storage(path: str) -> str:
    """Ray wants absolute local paths; URIs (s3://, gs://, ...) pass through."""
    if "://" in path and not path.startswith("file://"):
        return path
    return str(Path(path.removeprefix("file://")).expanduser().resolve())


def _model_resolution(root: Path) -> int:
    unet = json.loads((root / "unet" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


# --- data ------------------------------------------------------------------------------------


def build_dataset(config: FinetuneConfig, *, resolution: int, run_path: str):
    """Manifest -> Ray Dataset of {uri, pixels (3, R, R) uint8, caption}; bad rows go to `<run>/errors/`."""
    import ray

    data = config.data
    table = read_table(data.manifest)
    if data.image_column not in table.column_names:
        raise ValueError(f"config field 'data.image_column': manifest has no column {data.image_column!r}")
    if data.split is not None:
        if "split" not in table.column_names:
            raise ValueError("config field 'data.split': manifest has no 'split' column")
        table = table.filter(pc.equal(table["split"], data.split))
    if data.limit is not None:
        table = table.slice(0, data.limit)
    if table.num_rows == 0:
        raise ValueError(f"config field 'data.manifest': no rows to train on in {data.manifest!r}")
    # Check the caption source once here, so a wrong adapter fails before any worker starts.
    caption_source(table.column_names, data.adapter, data.adapter_options)
    return ray.data.from_arrow(table).map_batches(
        prepare_batch,
        batch_format="pyarrow",
        fn_kwargs={
            "data": data,
            "resolution": resolution,
            "errors_uri": join_uri(run_path, "errors"),
            "config_hash": config.config_hash(),
        },
    )


def prepare_batch(batch: pa.Table, *, data: DataConfig, resolution: int, errors_uri: str, config_hash: str) -> dict:
    """Ray Data UDF over the core `prepare_examples`: keeps good rows, writes bad ones to the errors table."""
    caption_fn = caption_source(batch.column_names, data.adapter, data.adapter_options)
    examples = prepare_examples(
        batch.to_pylist(),
        image_column=data.image_column,
        image_root=data.image_root,
        resolution=resolution,
        caption_fn=caption_fn,
    )
    bad = [e for e in examples if e["error"]]
    if bad:
        _write_errors(bad, errors_uri, config_hash)
    good = [e for e in examples if not e["error"]]
    return {
        "uri": np.array([e["uri"] for e in good], dtype=object),
        "pixels": np.stack([e["pixels"] for e in good]) if good else np.zeros((0, 3, resolution, resolution), np.uint8),
        "caption": np.array([e["caption"] for e in good], dtype=object),
    }


def _write_errors(bad: list[dict], errors_uri: str, config_hash: str) -> None:
    now = datetime.now(timezone.utc)
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
    # Named by content: the same bad rows seen again in a later epoch overwrite the same file.
    key = hashlib.sha256("\n".join(f"{r['source_uri']}\t{r['stage']}\t{r['reason']}" for r in rows).encode())
    write_table(rows_to_table(rows, ERROR_SCHEMA), join_uri(errors_uri, f"part-{key.hexdigest()[:16]}.parquet"))


def skipped_rows(run_path: str) -> dict[str, int]:
    """Counts of skipped manifest rows by `stage: reason`, each (source, stage) counted once."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(join_uri(run_path, "errors"))
    if not fs.exists(path):
        return {}
    reasons: dict[tuple[str, str], str] = {}
    for part in sorted(fs.glob(path + "/*.parquet")):
        table = read_table(fs.unstrip_protocol(part))
        for row in table.select(["source_uri", "stage", "reason"]).to_pylist():
            reasons[(row["source_uri"], row["stage"])] = f"{row['stage']}: {row['reason']}"
    counts: dict[str, int] = {}
    for reason in reasons.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


class EncodeLatents:
    """Ray Data actor: frozen VAE + text encoder loaded once; pixels + captions -> cached latents + context."""

    def __init__(self, config: FinetuneConfig):
        from prism_ray.models.loading import load_sd_components

        device = "cuda" if config.compute.use_gpu else "cpu"
        self.sd = load_sd_components(config.model.path, device=device, dtype=config.model.dtype, cache_dir=config.model.cache_dir)
        self.keep_std = config.train.latents == "sample"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mean, std = latent_moments(self.sd.vae, pixels_to_model_input(batch["pixels"]))  # (N, 4, h, w)
        context = text_embeddings(self.sd.tokenizer, self.sd.text_encoder, list(batch["caption"]))  # (N, 77, D)
        out = {"uri": batch["uri"], "latents": mean.float().cpu().numpy(), "context": context.float().cpu().numpy()}
        if self.keep_std:
            out["latents_std"] = std.float().cpu().numpy()
        return out


def cache_latents(dataset, config: FinetuneConfig):
    """Encode every good row once with Ray Data actors and keep the result in the object store."""
    from ray.data import ActorPoolStrategy

    c = config.compute
    return dataset.map_batches(
        EncodeLatents,
        fn_constructor_kwargs={"config": config},
        batch_size=16,
        compute=ActorPoolStrategy(size=c.data_concurrency),
        num_gpus=1 if c.use_gpu else 0,
        num_cpus=1,
    ).materialize()


def micro_batches(shard, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless micro-batches from a worker's shard, epoch after epoch (equal shards keep workers in step)."""
    while True:
        n = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
            n += 1
            yield batch
        if n == 0:
            raise ValueError(
                f"config field 'train.micro_batch_size': {batch_size} is more than the usable rows per worker"
            )


# --- worker side -----------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed on the U-Net only, frozen VAE/text encoder beside it."""
    config: FinetuneConfig = loop_config["config"]
    if not config.compute.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported in this process
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from prism_ray.models.loading import load_sd_components

    t = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_path = loop_config["run_path"]
    if config.compute.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")

    sd = load_sd_components(config.model.path, device=device, dtype=config.model.dtype, cache_dir=config.model.cache_dir)
    configure_unet(sd.unet, gradient_checkpointing=t.gradient_checkpointing, attention=t.attention)
    noise_scheduler = make_noise_scheduler(model_prediction_type(sd.scheduler, t.prediction_type), t.num_train_timesteps)
    # Ray Train already created the torch process group (gloo on CPU, nccl on GPU); DeepSpeed reuses it.
    engine, _, _, _ = deepspeed.initialize(
        model=sd.unet,
        model_parameters=[p for p in sd.unet.parameters() if p.requires_grad],
        config=loop_config["deepspeed"],
        dist_init_required=False,
    )
    ema = _make_ema(engine.module, t.ema_decay) if t.ema and rank == 0 else None

    start_step = 0
    # Ray restores the latest *registered* checkpoint; after a hard crash the run's snapshot may not
    # list the last one that was persisted, so fall back to the newest complete one on storage.
    checkpoint = ray.train.get_checkpoint() or latest_checkpoint_on_storage(run_path)
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
            start_step = int(json.loads((Path(ckpt_dir) / STATE_FILE).read_text())["step"])
            if ema is not None:
                _load_ema(ema, engine.module, Path(ckpt_dir))
        if rank == 0:
            _record_resume(run_path, start_step, checkpoint.path, engine, t.zero_stage)

    cached = t.cache_latents
    batches = micro_batches(ray.train.get_dataset_shard("train"), t.micro_batch_size)
    accumulation = engine.gradient_accumulation_steps()
    images_per_step = t.micro_batch_size * accumulation * world
    metric_rows: list[dict] = []
    config_hash = config.config_hash()
    step = start_step
    last_saved = start_step

    for step in range(start_step + 1, t.max_steps + 1):
        started = time.perf_counter()
        lr = float(engine.get_lr()[0])  # the rate this step uses (schedulers advance after the step)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro in range(accumulation):
            batch = next(batches)
            # One generator per (seed, rank, micro-step): a resumed run draws the noise a straight run would.
            gen = step_generator(t.seed, rank, (step - 1) * accumulation + micro)
            if cached:
                mean = torch.tensor(batch["latents"])
                std = torch.tensor(batch["latents_std"]) if "latents_std" in batch else None
                latents = latents_from_moments(mean, std, t.latents, gen)
                context = torch.tensor(batch["context"])
            else:
                mean, std = latent_moments(sd.vae, pixels_to_model_input(batch["pixels"]))
                latents = latents_from_moments(mean, std, t.latents, gen)
                context = text_embeddings(sd.tokenizer, sd.text_encoder, list(batch["caption"]))
            out = diffusion_loss(engine, noise_scheduler, latents, context, gen)
            engine.backward(out.loss)
            engine.step()
            loss_sum += out.loss.detach().double().cpu()
        if ema is not None:
            ema.step(engine.module.parameters())
        elapsed = time.perf_counter() - started
        if step == config.compute.kill_worker_once_at_step and rank == 0:
            _maybe_die(run_path)

        metrics = None
        if step % t.log_every == 0 or step == t.max_steps:
            loss = _mean_over_workers(loss_sum / accumulation, device)
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                "images_per_second": images_per_step / elapsed,
                "images_per_second_per_worker": images_per_step / elapsed / world,
            }
            if rank == 0:
                metric_rows.append(
                    {
                        "step": step,
                        "loss": metrics["loss"],
                        "lr": metrics["lr"],
                        "grad_norm": metrics["grad_norm"],
                        "images_per_second": metrics["images_per_second"],
                        "config_hash": config_hash,
                    }
                )
                print(
                    f"step {step}/{t.max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} "
                    f"img/s {metrics['images_per_second']:.2f} grad_norm {metrics['grad_norm']:.3g}",
                    flush=True,
                )

        if t.validation_every is not None and step % t.validation_every == 0 and rank == 0:
            _write_validation_images(engine.module, sd, config, run_path, step)

        if step % t.checkpoint_every == 0 or step == t.max_steps:
            _save_and_report(engine, ema, metrics or {"step": step}, step, start_step, rank, config)
            if rank == 0:
                _flush_metrics(metric_rows, run_path)
            last_saved = step
        elif metrics is not None:
            ray.train.report(metrics)

    if step == start_step:  # resumed at or past max_steps: nothing to train, keep the report count equal
        ray.train.report({"step": step})
    elif last_saved != step and rank == 0:
        _flush_metrics(metric_rows, run_path)
    if dist.is_initialized():
        dist.barrier()


def _mean_over_workers(value: torch.Tensor, device: torch.device) -> float:
    import torch.distributed as dist

    value = value.to(device)
    if dist.is_initialized():
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return float(value)


def latest_checkpoint_on_storage(run_path: str):
    """The `checkpoint_*` folder under the run with the highest step in its state file, or None."""
    import fsspec
    import ray.train

    fs, root = fsspec.core.url_to_fs(run_path)
    best, best_step = None, -1
    for folder in sorted(fs.glob(f"{root}/checkpoint_*")):
        state_path = f"{folder}/{STATE_FILE}"
        if not fs.exists(state_path):
            continue  # not (completely) written
        step = int(json.loads(fs.cat_file(state_path))["step"])
        if step > best_step:
            best, best_step = folder, step
    if best is None:
        return None
    protocol = run_path.split("://", 1)[0] + "://" if "://" in run_path else ""
    return ray.train.Checkpoint(protocol + best if protocol else best)


def _maybe_die(run_path: str) -> None:
    """Fault injection: exit this worker process hard, once per run folder (an exclusive marker file)."""
    import fsspec

    marker = join_uri(run_path, "events", "fault_injected")
    fs, path = fsspec.core.url_to_fs(marker)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    try:
        with fs.open(path, "xb") as f:
            f.write(b"killed")
    except FileExistsError:
        return
    print(f"fault injection: worker exits hard at {marker}", flush=True)
    os._exit(1)


def _save_and_report(engine, ema, metrics: dict, step: int, start_step: int, rank: int, config: FinetuneConfig):
    """Every rank saves its DeepSpeed state; Ray merges the ranks' folders into one checkpoint."""
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="prism-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        if rank == 0:
            state = {"step": step, "start_step": start_step, "config_hash": config.config_hash()}
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            if config.train.zero_stage == 0:
                save_file(_cpu_state(engine.module.state_dict()), str(Path(tmp) / UNET_FILE))
            if ema is not None:
                save_file(_ema_state(ema, engine.module), str(Path(tmp) / EMA_FILE))
        has_files = any(Path(tmp).iterdir())
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None,
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )


def _cpu_state(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _make_ema(module, decay: float):
    from diffusers.training_utils import EMAModel

    return EMAModel(module.parameters(), decay=decay)


def _ema_state(ema, module) -> dict[str, torch.Tensor]:
    names = [name for name, _ in module.named_parameters()]
    return {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in zip(names, ema.shadow_params)}


def _load_ema(ema, module, ckpt_dir: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(ckpt_dir / EMA_FILE))
    ema.shadow_params = [saved[name].to(p.device, p.dtype) for name, p in module.named_parameters()]


def _record_resume(run_path: str, step: int, checkpoint_path: str, engine, zero_stage: int) -> None:
    """`<run>/events/resume-<step>-<time>.json`: where the run resumed and a digest of the restored U-Net."""
    import fsspec

    event = {
        "event": "resume",
        "step": step,
        "checkpoint": checkpoint_path,
        # Partitioned (ZeRO-3) parameters are not whole on rank 0; no digest then.
        "unet_sha256": module_digest(engine.module) if zero_stage < 3 else None,
        "time": datetime.now(timezone.utc).isoformat(),
    }
    uri = join_uri(run_path, "events", f"resume-{step:08d}-{time.time_ns()}.json")
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(event, indent=2))
    print(f"resumed from step {step} ({checkpoint_path})", flush=True)


def _flush_metrics(rows: list[dict], run_path: str) -> None:
    """Append the rows since the last flush as one Parquet part under `<run>/metrics/`."""
    if not rows:
        return
    name = f"part-{rows[0]['step']:08d}-{rows[-1]['step']:08d}.parquet"
    write_table(rows_to_table(rows, TRAIN_METRICS_SCHEMA), join_uri(run_path, "metrics", name))
    rows.clear()


def _write_validation_images(unet, sd, config: FinetuneConfig, run_path: str, step: int) -> None:
    t = config.train
    images = sample_images(
        unet,
        sd,
        t.validation_prompts,
        num_inference_steps=t.validation_steps,
        guidance_scale=t.validation_guidance,
        seed=t.seed,
    )
    for i, image in enumerate(images):
        write_png(image, join_uri(run_path, "validation", f"step_{step:08d}", f"prompt_{i:02d}.png"))


# --- export ----------------------------------------------------------------------------------


def consolidated_unet_state(ckpt_dir: Path, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 U-Net weights from a checkpoint folder: EMA, rank 0's copy (stage 0) or ZeRO shards merged."""
    from safetensors.torch import load_file

    if use_ema:
        return load_file(str(ckpt_dir / EMA_FILE))
    if (ckpt_dir / UNET_FILE).exists():
        return load_file(str(ckpt_dir / UNET_FILE))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=DS_TAG)
    return _cpu_state(state)
