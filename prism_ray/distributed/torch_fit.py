"""One Ray Train launch for the training jobs: a TorchTrainer resumed by run name -> its final checkpoint."""

from __future__ import annotations

from collections.abc import Callable

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from prism_ray.distributed import out_of_memory, verbose


def fit_torch(job: str, loop: Callable, loop_config: dict, config, plan, datasets: dict | None = None) -> str:
    """Run `loop` on `config.compute.num_workers` workers (gloo on CPU, nccl on GPU) under `config.run.name`
    in `plan.storage_path`; a worker failure restarts the group from the latest checkpoint
    (`compute.max_failures` times). Returns the final checkpoint folder as a URI."""
    c = config.compute
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker={"CPU": c.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=plan.storage_path,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's INFO lines ("Reporting training result ..." per rank and step) only with -v
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except Exception as err:
        oom = out_of_memory(job, err, "lower train.micro_batch_size or raise train.zero_stage, or give each "
                                      "worker more memory (compute.cpus_per_worker places fewer per node)")
        if oom is None:
            raise
        raise oom from err
    if result.checkpoint is None:
        raise RuntimeError(f"{job}: run '{plan.run_path}' ended without a checkpoint")
    path = result.checkpoint.path  # relative to the storage filesystem: no scheme for s3://, gs://, ...
    if "://" in plan.storage_path and "://" not in path:
        path = plan.storage_path.split("://", 1)[0] + "://" + path
    return path
