"""Ray Train launch of fine-tuning: a TorchTrainer over the worker loop, resumed by run name."""

from __future__ import annotations

import ray

from prism_ray.distributed import init_ray
from prism_ray.distributed.latents import cache_latents, examples_dataset
from prism_ray.distributed.torch_fit import fit_torch
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
    loop_config = {"config": config, "deepspeed": plan.deepspeed, "run_path": plan.run_path}
    return fit_torch("finetune", train_loop_per_worker, loop_config, config, plan, {"train": dataset})
