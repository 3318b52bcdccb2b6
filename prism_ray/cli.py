"""`prism-ray` command line: one subcommand per job, each `--config FILE ... --set key=value ...`.

Exit codes: 0 done; 1 the job failed (one line on stderr); 2 a config error; 3 the job ran but
fell short of its goal (e.g. a quota shortfall: outputs and run summary are written, a re-run continues).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """A job: its config class and the pipeline function that runs it, imported only when it runs."""

    help: str
    config: str  # "module:Class"
    run: str  # "module:function" taking the config


JOBS: dict[str, Job] = {
    "demo": Job(
        "end-to-end demo on phantoms: dataset -> fine-tune -> counterfactuals -> filter -> report",
        "prism_ray.pipelines.demo:DemoConfig",
        "prism_ray.pipelines.demo:run",
    ),
    "finetune": Job(
        "fine-tune the U-Net with Ray Train + DeepSpeed and export a diffusers folder",
        "prism_ray.pipelines.finetune:FinetuneConfig",
        "prism_ray.pipelines.finetune:run",
    ),
    "augment": Job(
        "counterfactual augmentation sets on long-lived Ray actors (an exact quota of accepted edits per subgroup)",
        "prism_ray.pipelines.augment:AugmentConfig",
        "prism_ray.pipelines.augment:run",
    ),
    "phantom": Job(
        "write a synthetic phantom chest X-ray dataset with ground-truth attributes",
        "prism_ray.pipelines.phantom:PhantomJobConfig",
        "prism_ray.pipelines.phantom:run",
    ),
    "tiny-family": Job(
        "write a tiny SD-shaped model family (random weights) to a folder",
        "prism_ray.pipelines.tiny_family:TinyFamilyConfig",
        "prism_ray.pipelines.tiny_family:run",
    ),
}


def _load(ref: str):
    """Import `module:name`; a broken installation shows its real ImportError, not a missing job."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="job", metavar="JOB")
    for name, job in JOBS.items():
        p = sub.add_parser(name, help=job.help, description=job.help)
        p.add_argument(
            "--config", action="append", default=[], metavar="FILE.yaml",
            help="YAML config file, repeatable: later files win section by section (job + compute files)",
        )
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config field (dotted keys for sections), repeatable",
        )
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def run_job(name: str, config_paths: list[str], overrides: list[str], print_config: bool = False) -> int:
    from prism_ray.config import ConfigError, load_config
    from prism_ray.results.ledger import LedgerError
    from prism_ray.results.summary import RunIncomplete

    job = JOBS[name]
    config_cls, run = _load(job.config), _load(job.run)
    try:
        config = load_config(config_cls, config_paths, overrides)
    except ConfigError as err:
        print(f"prism-ray {name}: {err}", file=sys.stderr)
        return 2
    if print_config:
        print(config.to_yaml(), end="")
        return 0
    try:
        run(config)
    except ConfigError as err:  # a check that needs the data (e.g. a selector matching no row)
        print(f"prism-ray {name}: {err}", file=sys.stderr)
        return 2
    except RunIncomplete as err:
        print(f"prism-ray {name}: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, LedgerError) as err:
        print(f"prism-ray {name}: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.job is None:
        parser.print_help()
        return 0
    return run_job(args.job, args.config, args.overrides, args.print_config)


if __name__ == "__main__":
    sys.exit(main())
