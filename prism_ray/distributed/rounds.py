"""The Ray runner of round-based jobs (augment, audit): one ActorPool for the whole job."""

from __future__ import annotations

from prism_ray.distributed import init_ray
from prism_ray.distributed.actors import ActorPool


def ray_runner(step_factory, compute) -> ActorPool:
    """`pipelines.augment.run`'s default runner: `compute` is an ActorPoolConfig."""
    init_ray()
    return ActorPool(
        step_factory,
        size=compute.num_actors,
        num_cpus=compute.num_cpus_per_actor,
        num_gpus=compute.num_gpus_per_actor,
        max_retries=compute.max_retries,
        env_vars=compute.env_vars,
        torch_threads=compute.torch_threads,
    )
