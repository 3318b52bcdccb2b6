"""`prism-ray` command line: one subcommand per job, each `--config FILE ... --set key=value ...`.

On a Ray cluster: `prism-ray submit JOB --config FILE ... [--address URL] [--no-wait]`, then
`prism-ray status|logs|stop ID` and `prism-ray jobs` (address: --address, RAY_ADDRESS, or the local
dashboard; token auth: RAY_AUTH_TOKEN).

Exit codes: 0 done; 1 the job failed (one line on stderr); 2 a config error; 3 the job ran but
fell short of its goal (e.g. a quota shortfall: outputs and run summary are written, a re-run continues).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from prism_ray.console import configure_logging

# The Ray runners the jobs run on from the command line. The pipelines never pick one (they import
# nothing of prism_ray.distributed: the import-linter contract in pyproject.toml); library callers and
# tests pass theirs, e.g. `augment.in_process`.
RAY_ACTORS = "prism_ray.distributed.rounds:ray_runner"  # long-lived Ray actors (augment, audit)
RAY_TRAIN_DEEPSPEED = "prism_ray.distributed.trainer:fit"  # the U-Net fine-tune on Ray Train + DeepSpeed
RAY_TRAIN_CLASSIFIER = "prism_ray.distributed.classifier_loop:fit"  # the classifier on Ray Train (DDP)


@dataclass(frozen=True)
class Job:
    """A job: its config class, the pipeline function that runs it and the runner it runs on, each
    imported only when it runs."""

    help: str
    config: str  # "module:Class"
    run: str  # "module:function" taking the config and the runner
    # "module:attr" passed as run(config, runner=...); a mapping of them is passed as a dict of the
    # loaded runners (a job made of other jobs); None: the job runs in this process and takes no runner.
    runner: str | Mapping[str, str] | None = None


JOBS: dict[str, Job] = {
    "demo": Job(
        "end-to-end demo on phantoms: dataset -> fine-tune -> counterfactuals -> filter -> report",
        "prism_ray.pipelines.demo:DemoConfig",
        "prism_ray.pipelines.demo:run",
        {"finetune": RAY_TRAIN_DEEPSPEED, "augment": RAY_ACTORS},
    ),
    "finetune": Job(
        "fine-tune the U-Net with Ray Train + DeepSpeed and export a diffusers folder",
        "prism_ray.pipelines.finetune:FinetuneConfig",
        "prism_ray.pipelines.finetune:run",
        RAY_TRAIN_DEEPSPEED,
    ),
    "augment": Job(
        "counterfactual augmentation sets on long-lived Ray actors (an exact quota of accepted edits per subgroup)",
        "prism_ray.pipelines.augment:AugmentConfig",
        "prism_ray.pipelines.augment:run",
        RAY_ACTORS,
    ),
    "audit": Job(
        "dataset-wide bias audit: every image x every intervention + a control, co-change statistics, HTML report",
        "prism_ray.pipelines.audit:AuditConfig",
        "prism_ray.pipelines.audit:run",
        RAY_ACTORS,
    ),
    "phantom": Job(
        "write a synthetic phantom chest X-ray dataset with ground-truth attributes",
        "prism_ray.pipelines.phantom:PhantomJobConfig",
        "prism_ray.pipelines.phantom:run",
    ),
    "edit": Job(
        "counterfactuals of a few images in this process: prism-ray edit IMAGE... --prompt CAPTION --do 'A=0' --out DIR",
        "prism_ray.pipelines.edit:EditJobConfig",
        "prism_ray.pipelines.edit:run",
    ),
    "classifier": Job(
        "train a multi-head attribute classifier with Ray Train (DDP; DeepSpeed optional) and export it",
        "prism_ray.pipelines.classifier:ClassifierConfig",
        "prism_ray.pipelines.classifier:run",
        RAY_TRAIN_CLASSIFIER,
    ),
    "experiment": Job(
        "does the augmentation help? classifiers on original / + SD samples / + counterfactuals, over seeds",
        "prism_ray.pipelines.experiment:ExperimentConfig",
        "prism_ray.pipelines.experiment:run",
        RAY_TRAIN_CLASSIFIER,  # the classifier job's, for every arm x seed
    ),
    "tiny-family": Job(
        "write a tiny SD-shaped model family (random weights) to a folder",
        "prism_ray.pipelines.tiny_family:TinyFamilyConfig",
        "prism_ray.pipelines.tiny_family:run",
    ),
    "rehearsal-family": Job(
        "write SD v1.5- and CLIP ViT-L/14-shaped folders (random weights) to rehearse the real path",
        "prism_ray.pipelines.rehearsal_family:RehearsalFamilyConfig",
        "prism_ray.pipelines.rehearsal_family:run",
    ),
}


def _load(ref: str):
    """Import `module:name`; a broken installation shows its real ImportError, not a missing job."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def load_runner(job: Job):
    """The job's runner (`Job.runner` imported: Ray comes in here), or None for an in-process job."""
    if job.runner is None:
        return None
    if isinstance(job.runner, str):
        return _load(job.runner)
    return {part: _load(ref) for part, ref in job.runner.items()}


# Cluster commands: they take no config of their own, so they are not JOBS.
CLUSTER_COMMANDS = {
    "submit": "run a job on a Ray cluster (Job Submission SDK); the config is checked here first",
    "status": "status of a submitted job",
    "logs": "logs of a submitted job",
    "stop": "stop a submitted job",
    "jobs": "list the cluster's jobs: id, status, start time, entrypoint",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prism-ray")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", action="append", default=[], metavar="FILE.yaml",
        help="YAML config file, repeatable: later files win section by section (job + compute files)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field (dotted keys for sections), repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"prism-ray {_version()}")
    sub = parser.add_subparsers(dest="job", metavar="JOB")
    for name, job in JOBS.items():
        p = sub.add_parser(name, help=job.help, description=job.help)
        _add_config_args(p)
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config (every default; missing required fields as <required>) and exit")
        if name == "edit":
            p.add_argument("images", nargs="*", metavar="IMAGE", help="image files or URIs (PNG, JPEG, DICOM, ...)")
            p.add_argument("--prompt", help="the images' caption (the fine-tune's caption language)")
            p.add_argument("--do", action="append", default=[], metavar="'ATTRIBUTE=VALUE'", help="an intervention, repeatable")
            p.add_argument("--edit-prompt", action="append", default=[], help="an edit caption given as it is, repeatable")
            p.add_argument("--model", help="diffusers folder, URI or hub id (default: the tiny family)")
            p.add_argument("--out", help="output folder")
    for name, text in CLUSTER_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        if name == "submit":
            p.add_argument("submit_job", metavar="JOB", choices=list(JOBS), help="one of: " + ", ".join(JOBS))
            _add_config_args(p)
            p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
        elif name != "jobs":
            p.add_argument("submission_id", metavar="ID", help="submission id (prism-<job>-<config hash>)")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        p.add_argument("--address", help="Ray dashboard URL (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    return parser


def run_job(name: str, config_paths: list[str], overrides: list[str], print_config: bool = False) -> int:
    from prism_ray.config import ConfigError, describe_config, load_config
    from prism_ray.distributed import (  # the package holds no Ray import itself
        RayStartError,
        WorkerOutOfMemory,
    )
    from prism_ray.results.ledger import LedgerError
    from prism_ray.results.summary import RunIncomplete

    job = JOBS[name]
    config_cls, run = _load(job.config), _load(job.run)
    try:
        if print_config:
            print(describe_config(config_cls, config_paths, overrides), end="")
            return 0
        config = load_config(config_cls, config_paths, overrides)
    except ConfigError as err:
        print(f"prism-ray {name}: {err}", file=sys.stderr)
        return 2
    runner = load_runner(job)  # after the config checks: a config error exits without importing Ray
    try:
        run(config, runner=runner)
    except ConfigError as err:  # a check that needs the data (e.g. a selector matching no row)
        print(f"prism-ray {name}: {err}", file=sys.stderr)
        return 2
    except RunIncomplete as err:
        print(f"prism-ray {name}: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, LedgerError, RayStartError, WorkerOutOfMemory) as err:
        print(f"prism-ray {name}: {err}", file=sys.stderr)
        return 1
    return 0


def run_cluster_command(args: argparse.Namespace) -> int:
    """`submit` resolves the job's config here (a config error exits 2 before any request) and, once
    the cluster answers, checks its paths (exit 2 before any upload); the rest talk to the cluster
    only. Ray is imported only now."""
    from prism_ray.config import ConfigError, load_config

    config = None
    if args.job == "submit":
        try:
            config = load_config(_load(JOBS[args.submit_job].config), args.config, args.overrides)
        except ConfigError as err:
            print(f"prism-ray submit: {err}", file=sys.stderr)
            return 2
    from prism_ray.distributed import submit

    try:
        if args.job == "submit":
            return submit.submit(args.submit_job, config, args.address, wait=not args.no_wait,
                                 config_paths=args.config, overrides=args.overrides)
        if args.job == "status":
            return submit.status(args.submission_id, args.address)
        if args.job == "logs":
            return submit.logs(args.submission_id, args.address, follow_logs=args.follow)
        if args.job == "stop":
            return submit.stop(args.submission_id, args.address)
        return submit.list_jobs(args.address)
    except ConfigError as err:  # a path the cluster could not use: checked before anything is uploaded
        print(f"prism-ray {args.job}: {err}", file=sys.stderr)
        return 2
    except submit.SubmitError as err:
        print(f"prism-ray {args.job}: {err}", file=sys.stderr)
        return 1


def _edit_overrides(args: argparse.Namespace) -> list[str]:
    """`prism-ray edit`'s flags as config overrides (JSON values are YAML), before any --set."""
    import json

    given = {"images": args.images or None, "prompt": args.prompt, "do": args.do or None,
             "edit_prompts": args.edit_prompt or None, "model.path": args.model, "out": args.out}
    return [f"{key}={json.dumps(value)}" for key, value in given.items() if value is not None]


def main(argv: list[str] | None = None) -> int:
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)  # the job's own lines, whatever Ray later does to the root logger
    if args.verbose:
        os.environ["PRISM_RAY_VERBOSE"] = "1"  # Ray's own INFO lines and progress bars (distributed.init_ray)
    if args.job == "edit":
        args.overrides = _edit_overrides(args) + args.overrides
    if args.job is None:
        parser.print_help()
        return 0
    if args.job in CLUSTER_COMMANDS:
        return run_cluster_command(args)
    return run_job(args.job, args.config, args.overrides, args.print_config)


if __name__ == "__main__":
    sys.exit(main())
