"""Ray and DeepSpeed adapters: the only modules that import them, each a short wrapper over the core."""


VERBOSE_ENV = "PRISM_RAY_VERBOSE"  # set by `prism-ray -v`: Ray's own INFO lines and progress bars back on


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start a local Ray.

    Workers' prints (the jobs' progress lines) reach the driver; Ray's own INFO logging and Ray
    Data's progress bars do not, unless PRISM_RAY_VERBOSE is set.
    """
    import os

    import ray

    verbose = bool(os.environ.get(VERBOSE_ENV))
    # Ray Train tees workers' prints into its logger as well: every progress line would show twice.
    # (Local workers inherit this; a cluster gets it from cluster/runtime_env.yaml.)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not verbose:
        ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            log_to_driver=True,
            logging_config=ray.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        )
