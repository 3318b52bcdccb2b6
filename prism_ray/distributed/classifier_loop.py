"""Ray Train for the classifier job: a worker context (DDP or a DeepSpeed engine) over the core loop."""

from __future__ import annotations

import os
from typing import Any

import ray
import ray.train
import torch

from prism_ray.distributed import init_ray
from prism_ray.distributed.torch_fit import fit_torch
from prism_ray.pipelines.classifier import ClassifierConfig, ClassifierPlan, deepspeed_config, train_worker


class DeepSpeedStepper:
    """engine.backward + engine.step (clipping is in the DeepSpeed config)."""

    def __init__(self, engine):
        self.engine = engine

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)


class RayContext:
    """One Ray Train worker: its rank, gradient averaging, checkpoints reported to Ray (rank 0's folder)."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def wrap(self, model, optimizer, config: ClassifierConfig):
        from prism_ray.training.classifier import TorchStepper

        device = ray.train.torch.get_device() if config.compute.use_gpu else torch.device("cpu")
        model.to(device)
        for state in optimizer.state.values():  # a restored AdamW state follows its parameters
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.to(device)
        if config.compute.strategy == "deepspeed":
            if not config.compute.use_gpu:
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed

            # Ray Train already made the process group; DeepSpeed reuses it.
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(config), dist_init_required=False
            )
            return engine, DeepSpeedStepper(engine)
        ddp = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP when world > 1
        return ddp, TorchStepper(ddp, optimizer, config.train.max_grad_norm)

    def mean(self, values: torch.Tensor) -> list[float]:
        import torch.distributed as dist

        values = values.detach().float().cpu().clone()  # gloo reduces CPU tensors
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= dist.get_world_size()
        return values.tolist()  # sync point

    def restore(self, run_path: str) -> str | None:
        from prism_ray.training.callbacks import latest_checkpoint

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            return (
                checkpoint.path
                if "://" not in run_path
                else run_path.split("://")[0] + "://" + checkpoint.path
            )
        return latest_checkpoint(run_path)

    def save(self, metrics: dict, folder: str | None, step: int) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder is not None else None
        name = f"checkpoint_{step:08d}" if checkpoint is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    train_worker(loop_config["config"], loop_config["plan"], RayContext())


def fit(config: ClassifierConfig, plan: ClassifierPlan) -> str:
    """Train with `compute.num_workers` Ray Train workers; the URI of the final checkpoint folder."""
    init_ray()
    return fit_torch("classifier", train_loop_per_worker, {"config": config, "plan": plan}, config, plan)
