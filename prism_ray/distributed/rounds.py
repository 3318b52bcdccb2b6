"""The Ray runner of round-based jobs (augment, audit): one ActorPool for the whole job."""

from __future__ import annotations

import ray

from prism_ray.config import ConfigError
from prism_ray.distributed import init_ray
from prism_ray.distributed.actors import ActorPool
from prism_ray.results.layout import is_local_path


def check_output_reachable(output: str, shared: bool) -> None:
    """A local output path on a multi-node cluster is each node's own disk: refused unless declared shared."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if is_local_path(output) and len(nodes) > 1 and not shared:
        raise ConfigError(
            f"config field 'output': local path {output!r} on a {len(nodes)}-node cluster; use a storage URI "
            "(s3://...) or set compute.shared_storage=true if every node mounts it"
        )


def ray_runner(step_factory, compute, output: str) -> ActorPool:
    """`pipelines.augment.run`'s default runner: `compute` is an ActorPoolConfig, `output` the resolved root."""
    init_ray()
    check_output_reachable(output, compute.shared_storage)
    return ActorPool(
        step_factory,
        size=compute.num_actors,
        num_cpus=compute.num_cpus_per_actor,
        num_gpus=compute.num_gpus_per_actor,
        max_retries=compute.max_retries,
        env_vars=compute.env_vars,
        torch_threads=compute.torch_threads,
    )
