"""`FinetuneConfig`: the fine-tuning job (model, data, training knobs, compute, run storage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prism_ray.config import BaseConfig
from prism_ray.data.config import DataConfig
from prism_ray.models.config import ModelConfig


class TrainConfig(BaseConfig):
    """Optimisation knobs; defaults are PRISM's (AdamW lr 1e-5, betas (0.9, 0.999), wd 1e-2, eps 1e-8)."""

    max_steps: int = Field(1000, ge=1, description="optimizer steps in total (a resumed run continues the count)")
    micro_batch_size: int = Field(1, ge=1, description="images per worker per forward pass")
    gradient_accumulation_steps: int = Field(1, ge=1)
    global_batch_size: int | None = Field(
        None, ge=1, description="if set: micro_batch_size x accumulation x workers must equal it (accumulation derived)"
    )
    learning_rate: float = Field(1e-5, gt=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-2, ge=0.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    lr_schedule: Literal["constant", "warmup", "warmup_decay"] = Field(
        "constant", description="none / DeepSpeed WarmupLR / WarmupDecayLR (linear decay to 0 at max_steps)"
    )
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gradient clipping; None = off")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer-state offload to CPU (GPU runs only)")
    latents: Literal["mean", "sample"] = Field("mean", description="VAE posterior mean (PRISM) or a sample")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="None = the model's scheduler config (epsilon for SD1.5)"
    )
    num_train_timesteps: int = Field(1000, ge=1)
    cache_latents: bool = Field(False, description="precompute VAE latents + text embeddings once with Ray Data")
    ema: bool = False
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0)
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers", "eager"] = "sdpa"
    seed: int = Field(0, ge=0)
    log_every: int = Field(1, ge=1, description="steps between metric reports / progress lines")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (the last step always saves)")
    validation_every: int | None = Field(None, ge=1, description="steps between validation images; None = off")
    validation_prompts: list[str] = Field(default_factory=list)
    validation_steps: int = Field(10, ge=1, description="DDIM steps for validation images")
    validation_guidance: float = Field(7.5, ge=0.0)


class ComputeConfig(BaseConfig):
    """Launch settings (kept apart from the job's knobs): Ray Train workers and failure handling."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0, description="leave CPUs free for Ray Data when streaming")
    data_concurrency: int = Field(1, ge=1, description="Ray Data actors for latent caching")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint; -1 = forever")
    kill_worker_once_at_step: int | None = Field(
        None, ge=1, description="fault injection for tests: rank 0 exits hard once, in the middle of this step"
    )


class RunStorageConfig(BaseConfig):
    """Where the run lives: `<storage_path>/<name>` holds checkpoints, metrics, validation images, the model."""

    storage_path: str = Field(..., min_length=1, description="local folder or URI (s3://, gs://, ...)")
    name: str = Field(..., min_length=1, description="re-running with the same name resumes")
    export: bool = True
    export_path: str | None = Field(None, description="default: <storage_path>/<name>/model")


class FinetuneConfig(BaseConfig):
    """The whole fine-tuning job, passed as one object to the Ray Train workers."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    run: RunStorageConfig
