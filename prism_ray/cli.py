"""`prism-ray` command line: one subcommand per job, each `--config FILE --set key=value ...`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """A job: its config class and the library function that runs it (imported on use)."""

    help: str
    config: str  # "module:Class"
    run: str  # "module:function" taking the config
    needs_ray: bool = True


JOBS: dict[str, Job] = {
    "demo": Job(
        "end-to-end demo on phantoms: dataset -> fine-tune -> counterfactuals -> filter -> report",
        "prism_ray.pipelines.demo:DemoConfig",
        "prism_ray.pipelines.demo:run_demo",
    ),
    "finetune": Job(
        "fine-tune the U-Net with Ray Train + DeepSpeed and export a diffusers folder",
        "prism_ray.pipelines.finetune:FinetuneConfig",
        "prism_ray.distributed.trainer:finetune",
    ),
    "augment": Job(
        "bulk counterfactual augmentation sets with Ray Data (quota of accepted edits per subgroup)",
        "prism_ray.pipelines.augment:AugmentConfig",
        "prism_ray.distributed.augment_old:augment",
    ),
    "phantom": Job(
        "write a synthetic phantom chest X-ray dataset with ground-truth attributes",
        "prism_ray.phantom.render:PhantomJobConfig",
        "prism_ray.phantom.render:run_phantom_job",
        needs_ray=False,
    ),
    "tiny-family": Job(
        "write a tiny SD-shaped model family (random weights) to a folder",
        "prism_ray.models.tiny:TinyFamilyConfig",
        "prism_ray.models.tiny:run_tiny_family",
        needs_ray=False,
    ),
}


def _load(ref: str):
    module, name = ref.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def available_jobs() -> dict[str, Job]:
    """Jobs whose implementation is present in this installation."""
    return {name: job for name, job in JOBS.items() if _load(job.config) and _load(job.run)}


def build_parser(jobs: dict[str, Job]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="job", metavar="JOB")
    for name, job in jobs.items():
        p = sub.add_parser(name, help=job.help, description=job.help)
        p.add_argument("--config", help="YAML config file")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field (dotted keys for sections), repeatable",
        )
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def init_ray_from_env() -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start a local Ray."""
    import os

    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def run_job(name: str, config_path: str | None, overrides: list[str], print_config: bool = False) -> int:
    from prism_ray.config import ConfigError, load_config

    job = JOBS[name]
    config_cls, run = _load(job.config), _load(job.run)
    try:
        config = load_config(config_cls, config_path, overrides)
    except ConfigError as err:
        print(f"prism-ray {name}: {err}", file=sys.stderr)
        return 2
    if print_config:
        import yaml

        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    if job.needs_ray:
        init_ray_from_env()
    try:
        run(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"prism-ray {name}: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    jobs = available_jobs()
    parser = build_parser(jobs)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.job is None:
        parser.print_help()
        return 0
    return run_job(args.job, args.config, args.overrides, args.print_config)


if __name__ == "__main__":
    sys.exit(main())
