"""Ray Train launch of fine-tuning: a TorchTrainer over the worker loop, resumed by run name."""

from __future__ import annotations

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from prism_ray.distributed import init_ray
from prism_ray.distributed.latents import cache_latents, examples_dataset
from prism_ray.distributed.train_loop import train_loop_per_worker
from prism_ray.pipelines.deepspeed_config import check_resources
from prism_ray.pipelines.finetune import FinetuneConfig, FinetunePlan


def fit(config: FinetuneConfig, plan: FinetunePlan) -> str:
    """Train with `compute.num_workers` Ray Train workers; the URI of the final checkpoint folder.

    The runner of `prism_ray.pipelines.finetune.run`, which has already checked the config, the model
    and the manifest. A worker failure restarts the group from the latest checkpoint
    (`compute.max_failures` times); re-running with the same `run.name` resumes too.
    """
    init_ray()  # joins the cluster of `ray job submit`, else starts a local Ray
    check_resources(config, ray.cluster_resources())
    dataset = examples_dataset(config, plan)
    if config.train.cache_latents:
        dataset = cache_latents(dataset, config, plan)  # stored once, reused by later runs

    c = config.compute
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "deepspeed": plan.deepspeed, "run_path": plan.run_path},
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker={"CPU": c.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=plan.storage_path,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"finetune: run '{plan.run_path}' ended without a checkpoint")
    path = result.checkpoint.path  # relative to the storage filesystem: no scheme for s3://, gs://, ...
    if "://" in plan.storage_path and "://" not in path:
        path = plan.storage_path.split("://", 1)[0] + "://" + path
    return path
