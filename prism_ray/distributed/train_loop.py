"""The Ray Train worker loop of fine-tuning: DeepSpeed on the U-Net, frozen VAE/text encoder beside it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prism_ray.console import Progress
from prism_ray.engine.images import to_model_pixels, vae_latent_moments
from prism_ray.engine.text import encode_prompts
from prism_ray.faults import fault_point
from prism_ray.pipelines.finetune import FinetuneConfig
from prism_ray.training.callbacks import (
    EMA,
    MetricsLog,
    check_finite_loss,
    checkpoint_unet_state,
    latest_checkpoint,
    read_checkpoint_state,
    record_resume,
    write_checkpoint_files,
    write_validation_images,
)
from prism_ray.training.diffusion import (
    configure_unet,
    diffusion_loss,
    latents_from_moments,
    make_noise_scheduler,
    model_prediction_type,
    module_digest,
    step_generator,
)
from prism_ray.training.step import gradient_norm, mean_loss_and_grad_norm

DS_TAG = "deepspeed"  # DeepSpeed's checkpoint tag inside every Ray checkpoint folder


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker; `loop_config` = {"config": FinetuneConfig, "deepspeed": dict, "run_path": str}."""
    import ray.train

    config: FinetuneConfig = loop_config["config"]
    t, run_path = config.train, loop_config["run_path"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # A first run on a machine also builds DeepSpeed's C++ ops here (minutes on a CPU): say so.
    with Progress("finetune: loading the model and starting DeepSpeed (a first run builds its ops)",
                  emit=lambda line: print(line, flush=True)) if rank == 0 else contextlib.nullcontext():
        engine, sd, noise_scheduler, device = setup_worker(config, loop_config["deepspeed"])
        ema = EMA(engine.module, t.ema_decay) if t.ema and rank == 0 else None
        start_step = restore(engine, ema, run_path, rank, t.zero_stage)
    log = MetricsLog(config.config_hash(), t.max_steps) if rank == 0 else None
    batches = micro_batches(ray.train.get_dataset_shard("train"), t.micro_batch_size)
    accumulation = engine.gradient_accumulation_steps()
    loss_sum = torch.zeros((), device=device)  # summed on device since the last sync point
    window_start, step = start_step + 1, start_step

    # DeepSpeed records the global gradient norm only where its own optimizer wrapper clips (fp16/bf16,
    # ZeRO >= 1); plain fp32 without ZeRO clips through torch and keeps no norm: measure it here.
    own_norm = not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())
    for step in range(start_step + 1, t.max_steps + 1):
        lr = float(engine.get_lr()[0])  # the rate this step uses (a host-side float, no device sync)
        logged = step % t.log_every == 0 or step == t.max_steps
        save = step % t.checkpoint_every == 0 or step == t.max_steps
        norm = None
        for micro in range(accumulation):
            # One generator per (seed, rank, micro-step): a resumed run draws the noise a straight run would.
            gen = step_generator(t.seed, rank, (step - 1) * accumulation + micro)
            latents, context = model_inputs(next(batches), sd, t.latents, gen)
            loss = diffusion_loss(engine, noise_scheduler, latents, context, gen).loss
            engine.backward(loss)
            if own_norm and (logged or save) and micro == accumulation - 1:
                norm = gradient_norm(engine.module)  # reduced over workers already, before clipping
            engine.step()
            loss_sum += loss.detach()
        if ema is not None:
            ema.step(engine.module)
        fault_point("finetune.step")  # tests: a worker dies here (after the step, before its checkpoint)

        metrics: dict = {"step": step}
        if logged or save:
            loss_value, grad_norm = mean_loss_and_grad_norm(
                loss_sum, (step - window_start + 1) * accumulation, engine, norm
            )
            check_finite_loss(loss_value, step=step, first_step=window_start)  # same value on every rank
            if log is not None:
                images = (step - window_start + 1) * accumulation * t.micro_batch_size * world
                metrics = log.record(step=step, loss=loss_value, lr=lr, grad_norm=grad_norm, images=images)
            loss_sum.zero_()
            window_start = step + 1
        if t.validation_every is not None and step % t.validation_every == 0 and rank == 0:
            write_validation_images(engine.module, sd, t, run_path, step)
        if save:
            save_checkpoint(engine, ema, metrics, step=step, start_step=start_step, rank=rank, config=config)
            if log is not None:
                log.flush(run_path)
        elif logged:
            ray.train.report(metrics)

    if step == start_step:  # resumed at or past max_steps: nothing to train, keep the report count equal
        ray.train.report({"step": step})


# --- beside the loop -------------------------------------------------------------------------


def setup_worker(config: FinetuneConfig, ds_config: dict):
    """Load the model, make the U-Net trainable and wrap it in a DeepSpeed engine (Ray's process group)."""
    if not config.compute.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported in this process
    import deepspeed
    import ray.train.torch

    from prism_ray.models.loading import load_sd_components

    t, m = config.train, config.model
    device = ray.train.torch.get_device() if config.compute.use_gpu else torch.device("cpu")
    sd = load_sd_components(m.path, device=device, dtype=m.dtype, cache_dir=m.cache_dir)
    configure_unet(sd.unet, gradient_checkpointing=t.gradient_checkpointing, attention=t.attention)
    prediction_type = model_prediction_type(sd.scheduler, t.prediction_type)
    noise_scheduler = make_noise_scheduler(prediction_type, t.num_train_timesteps)
    # Ray Train already created the torch process group (gloo on CPU, nccl on GPU); DeepSpeed reuses it.
    trainable = [p for p in sd.unet.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=sd.unet, model_parameters=trainable, config=ds_config,
                                      dist_init_required=False)
    if t.compile:  # torch.compile of engine.module in place: parameter names and checkpoints unchanged
        engine.compile()
    use_weights_only_loading(engine)
    return engine, sd, noise_scheduler, device


def micro_batches(shard, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless micro-batches from a worker's shard, epoch after epoch (equal shards keep workers in step)."""
    while True:
        n = 0
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
            n += 1
            yield batch
        if n == 0:
            raise ValueError(f"config field 'train.micro_batch_size': {batch_size} > usable rows per worker")


def model_inputs(batch: dict[str, np.ndarray], sd, mode: str, gen: torch.Generator):
    """A micro-batch -> (latents (B, 4, h, w), context (B, 77, D)): from the latent cache, or encoded now."""
    if "latents" in batch:
        mean, std = torch.from_numpy(batch["latents"].copy()), batch.get("latents_std")
        std = None if std is None else torch.from_numpy(std.copy())
        return latents_from_moments(mean, std, mode, gen), torch.from_numpy(batch["context"].copy())
    mean, std = vae_latent_moments(sd.vae, to_model_pixels(batch["pixels"]))
    return latents_from_moments(mean, std, mode, gen), encode_prompts(
        sd.tokenizer, sd.text_encoder, list(batch["caption"])
    )


def full_fp32_state(engine) -> dict[str, torch.Tensor]:
    """The whole U-Net in fp32 (ZeRO's masters where they exist); under ZeRO 1-3 every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        state[name] = (p if full is None else full).detach().to("cpu", torch.float32)
    return state


def save_checkpoint(
    engine, ema, metrics: dict, *, step: int, start_step: int, rank: int, config: FinetuneConfig
):
    """Every rank saves its DeepSpeed shard; rank 0 adds the fp32 U-Net, EMA and state; Ray merges the folders."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="prism-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        unet_state = full_fp32_state(engine)
        if rank == 0:
            ema_state = ema.state_dict(engine.module) if ema is not None else None
            write_checkpoint_files(
                tmp,
                step=step,
                start_step=start_step,
                config_hash=config.config_hash(),
                unet_state=unet_state,
                ema_state=ema_state,
            )
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if any(Path(tmp).iterdir()) else None,
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )


def restore(engine, ema: EMA | None, run_path: str, rank: int, zero_stage: int) -> int:
    """Load the latest checkpoint (Ray's, else the newest complete one on storage); the step to start after."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        path = latest_checkpoint(run_path)
        checkpoint = None if path is None else ray.train.Checkpoint(path)
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as ckpt_dir:
        engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
        start_step = int(read_checkpoint_state(ckpt_dir)["step"])
        if ema is not None:
            ema.load_state_dict(checkpoint_unet_state(ckpt_dir, use_ema=True), engine.module)
    if rank == 0:
        # Partitioned (ZeRO-3) parameters are not whole on rank 0: no digest then.
        digest = module_digest(engine.module) if zero_stage < 3 else None
        record_resume(run_path, step=start_step, checkpoint=checkpoint.path, unet_sha256=digest)
    return start_step


def use_weights_only_loading(engine) -> None:
    """Make `engine.load_checkpoint` unpickle only tensors, containers and three DeepSpeed data classes.

    DeepSpeed 0.19's `TorchCheckpointEngine.load` hard-codes `weights_only=False`; its ZeRO 0-2 files need
    only these three classes beyond `weights_only=True`. (Its universal-checkpoint loaders bypass the
    engine; we never load those.)
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"expected TorchCheckpointEngine, got {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
