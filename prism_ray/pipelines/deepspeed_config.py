"""The DeepSpeed config of a fine-tuning job, from one pure function, plus launch checks against the cluster."""

from __future__ import annotations

from collections.abc import Mapping

from prism_ray.config import ConfigError
from prism_ray.pipelines.finetune import FinetuneConfig

# DeepSpeed names of our `train.lr_schedule` values ("constant" = no scheduler section).
LR_SCHEDULERS = {"warmup": "WarmupLR", "warmup_decay": "WarmupDecayLR"}


def gradient_accumulation(cfg: FinetuneConfig, world_size: int) -> int:
    """Accumulation steps; derived from `train.global_batch_size` when that is set."""
    t = cfg.train
    if t.global_batch_size is None:
        return t.gradient_accumulation_steps
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"config field 'train.global_batch_size': {t.global_batch_size} is not divisible by "
            f"micro_batch_size x num_workers = {t.micro_batch_size} x {world_size}"
        )
    derived = t.global_batch_size // per_step
    if t.gradient_accumulation_steps not in (1, derived):
        raise ConfigError(
            f"config field 'train.gradient_accumulation_steps': {t.gradient_accumulation_steps} contradicts "
            f"global_batch_size {t.global_batch_size} (which needs {derived})"
        )
    return derived


def check_combinations(cfg: FinetuneConfig) -> None:
    """Reject settings that cannot work together; one ConfigError naming the field."""
    t, c = cfg.train, cfg.compute
    if not c.use_gpu:
        if t.precision == "fp16":
            raise ConfigError("config field 'train.precision': fp16 needs a GPU (use bf16 or fp32 on CPU)")
        if cfg.model.dtype == "float16":
            raise ConfigError("config field 'model.dtype': float16 needs a GPU (use float32 or bfloat16 on CPU)")
        if t.offload_optimizer:
            raise ConfigError("config field 'train.offload_optimizer': offloading only applies to GPU runs")
        if t.attention == "xformers":
            raise ConfigError("config field 'train.attention': xformers needs a GPU (use sdpa)")
        if cfg.model.device not in ("auto", "cpu"):
            raise ConfigError(f"config field 'model.device': {cfg.model.device!r} with compute.use_gpu=false")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("config field 'train.offload_optimizer': needs train.zero_stage >= 1")
    if t.zero_stage == 3:
        # Partitioned parameters: our EMA and validation sampling read whole tensors on rank 0.
        if t.ema:
            raise ConfigError("config field 'train.ema': not supported with train.zero_stage=3 (use stage 0-2)")
        if t.validation_every is not None:
            raise ConfigError("config field 'train.validation_every': not supported with train.zero_stage=3")
    if t.validation_every is not None and not t.validation_prompts:
        raise ConfigError("config field 'train.validation_prompts': empty, but train.validation_every is set")
    if t.lr_schedule == "warmup_decay" and t.warmup_steps >= t.max_steps:
        raise ConfigError(
            f"config field 'train.warmup_steps': {t.warmup_steps} leaves no decay before max_steps {t.max_steps}"
        )


def build_deepspeed_config(cfg: FinetuneConfig, world_size: int | None = None) -> dict:
    """DeepSpeed's JSON config for `cfg` with `world_size` workers (default: compute.num_workers)."""
    check_combinations(cfg)
    t = cfg.train
    world = cfg.compute.num_workers if world_size is None else world_size
    if world < 1:
        raise ConfigError(f"config field 'compute.num_workers': must be >= 1 (got {world})")
    accumulation = gradient_accumulation(cfg, world)

    ds: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.micro_batch_size * accumulation * world,
        "gradient_clipping": float(t.max_grad_norm) if t.max_grad_norm is not None else 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.learning_rate,
                "betas": [t.adam_beta1, t.adam_beta2],
                "eps": t.adam_epsilon,
                "weight_decay": t.weight_decay,
                # torch.optim.AdamW, not DeepSpeed's FusedAdam: that is a JIT-built CUDA op (nvcc and ninja
                # on every worker). DeepSpeed passes the remaining keys to AdamW, so `fused` below selects
                # torch's own fused CUDA kernel (one launch for all parameters).
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": _zero_section(cfg),
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if cfg.compute.use_gpu and not t.offload_optimizer:  # offloaded states live on the CPU
        ds["optimizer"]["params"]["fused"] = True
    if t.lr_schedule != "constant":
        params = {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": t.learning_rate,
            "warmup_num_steps": t.warmup_steps,
            "warmup_type": "linear",
        }
        if t.lr_schedule == "warmup_decay":
            params["total_num_steps"] = t.max_steps
        ds["scheduler"] = {"type": LR_SCHEDULERS[t.lr_schedule], "params": params}
    return ds


def _zero_section(cfg: FinetuneConfig) -> dict:
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage == 0:
        return zero
    # gloo (CPU) has no reduce_scatter: stage 1-2 then reduce gradients with all-reduce instead.
    zero.update(
        {
            "contiguous_gradients": True,
            "overlap_comm": cfg.compute.use_gpu,
            "reduce_scatter": cfg.compute.use_gpu,
        }
    )
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero


def check_resources(cfg: FinetuneConfig, available: Mapping[str, float]) -> None:
    """Fail before any worker starts when the cluster (e.g. `ray.cluster_resources()`) cannot host the job."""
    c = cfg.compute
    need_cpu = c.num_workers * c.cpus_per_worker
    have_cpu = float(available.get("CPU", 0.0))
    if need_cpu > have_cpu + 1e-9:
        raise ConfigError(
            f"config field 'compute.num_workers': {c.num_workers} workers x {c.cpus_per_worker} CPU "
            f"need {need_cpu:g} CPUs, the cluster has {have_cpu:g}"
        )
    if c.use_gpu:
        have_gpu = float(available.get("GPU", 0.0))
        if c.num_workers > have_gpu:
            raise ConfigError(
                f"config field 'compute.num_workers': {c.num_workers} GPU workers, the cluster has {have_gpu:g} GPUs"
            )
