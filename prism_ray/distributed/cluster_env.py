"""What a submitted job gets from this checkout, and whether its config's paths work there.

The upload is the repo less cluster/runtime_env.yaml's excludes (and .gitignore/.rayignore, as Ray's
packaging walks it); the job's env vars are that file's, then compute.env_vars. `check_cluster_paths`
refuses, before anything is uploaded, what the job could not use: a relative output (it would land
in the job's temporary working dir), a relative input the upload leaves behind (runs/, outputs/,
git-ignored files), a hub id when the job runs with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

import yaml

# The matchers Ray's working_dir upload itself uses (a private module of the pinned Ray), so that
# "would it be uploaded?" has one answer.
from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

from prism_ray.config import ConfigError
from prism_ray.results.layout import is_local_path

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
CONFIG_ENV = "PRISM_RAY_CONFIG"  # the resolved config travels in this env var


def cluster_runtime_env() -> dict:
    """cluster/runtime_env.yaml: the excludes and env vars every job of this checkout runs with."""
    try:
        env = yaml.safe_load(RUNTIME_ENV.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        reason = str(getattr(err, "strerror", None) or err).strip().splitlines()[0]
        raise ConfigError(f"{RUNTIME_ENV}: {reason}") from None
    return {"excludes": list(env.get("excludes") or []), "env_vars": dict(env.get("env_vars") or {})}


def job_env_vars(config) -> dict[str, str]:
    """The job's env vars: cluster/runtime_env.yaml's, then compute.env_vars, which win (the driver needs
    them too: s3://)."""
    compute = getattr(config, "compute", None)
    return {**cluster_runtime_env()["env_vars"], **(getattr(compute, "env_vars", None) or {})}


def runtime_env(config_yaml: str, env_vars: dict[str, str]) -> dict:
    """Working dir = the repo (less cluster/runtime_env.yaml's excludes); the job's env vars and the resolved
    config in env_vars."""
    return {"working_dir": str(REPO), "excludes": cluster_runtime_env()["excludes"],
            "env_vars": {**env_vars, CONFIG_ENV: config_yaml}}


# --- paths the cluster must be able to use ---------------------------------------------------

# Config fields by what the job does with them; dotted names, `*` for a list index.
OUTPUT_FIELDS = ("output", "out", "run.storage_path", "run.export_path")
INPUT_FIELDS = ("data.manifest", "data.image_root", "counterfactuals", "samples", "images.*")
MODEL_FIELDS = ("model", "model.path", "model.clip_path", "model.weights", "classifiers.*.path",
                "filter.off_target.classifier")
TINY = "tiny"  # models.loading.TINY, the shipped family (that module imports torch)
TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads HF_HUB_OFFLINE


def _leaves(tree, prefix: str = ""):
    """(dotted name, value) of every scalar in a config dump (`classifiers.0.path`)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        yield prefix, tree
        return
    for key, value in items:
        yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))


def _not_uploaded(rel: str) -> str | None:
    """Why REPO/rel does not reach the job's working dir, None if it does. Ray's own matchers, as its
    upload walks the tree: runtime_env excludes and every folder's .gitignore / .rayignore on the way down."""
    target = Path(os.path.normpath(REPO / rel))
    if not target.is_relative_to(REPO):
        return "it is outside the repo"
    quiet = logging.getLogger(f"{__name__}.upload")  # the matchers log every ignore file they read
    quiet.setLevel(logging.WARNING)
    gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    matchers, node = [_get_excludes(REPO, cluster_runtime_env()["excludes"])], REPO
    parts = target.relative_to(REPO).parts
    for depth, part in enumerate(parts):
        matchers += get_excludes_from_ignore_files(node, include_gitignore=gitignore, logger=quiet)
        node = node / part
        if any(match(node) for match in matchers):
            folder = "/" if depth < len(parts) - 1 or node.is_dir() else ""
            return f"{node.relative_to(REPO)}{folder} is excluded from the upload"
    return None if target.exists() else f"no such file in {REPO}"


def _is_hub_id(path: str) -> bool:
    """`org/name` that is no local folder: what models.loading.resolve_model_root downloads from the hub."""
    return not path.startswith(("/", ".", "~")) and path.count("/") == 1 and not (REPO / path).exists()


def path_problem(field: str, value: str, env_vars: dict[str, str]) -> str | None:
    """The one-line reason the cluster cannot use `value` of config field `field`, None if it can."""
    if not is_local_path(value):
        return None  # a storage URI
    path = value.removeprefix("file://")
    if os.path.isabs(path) or path.startswith("~"):
        return None  # the cluster's own filesystem: a shared mount, or not; only the cluster knows
    use = "pass an absolute path on shared storage or a storage URI (s3://...)"
    if any(fnmatch.fnmatchcase(field, f) for f in OUTPUT_FIELDS):
        return (f"config field '{field}': relative path {value!r} would be written into the job's temporary "
                f"working dir on the cluster; {use}")
    model = any(fnmatch.fnmatchcase(field, f) for f in MODEL_FIELDS)
    if model and path == TINY:
        return None
    if model and _is_hub_id(path):
        if env_vars.get("HF_HUB_OFFLINE", "").strip().upper() not in TRUE:
            return None
        return (f"config field '{field}': {value!r} is a hub id, but the job runs with HF_HUB_OFFLINE=1 "
                "(cluster/runtime_env.yaml, compute.env_vars); pass a model folder on shared storage or a "
                "storage URI (s3://...)")
    why = _not_uploaded(path)
    if why is None:
        return None
    return f"config field '{field}': relative path {value!r} is not uploaded with the job ({why}); {use}"


def check_cluster_paths(config, env_vars: dict[str, str]) -> None:
    """Raise ConfigError (one line naming the field) if the job on the cluster could not use a path of
    `config`; `env_vars` is the job's environment (job_env_vars)."""
    fields = (*OUTPUT_FIELDS, *INPUT_FIELDS, *MODEL_FIELDS)
    problems = [(name, problem) for name, value in _leaves(config.model_dump(mode="json"))
                if isinstance(value, str) and value and any(fnmatch.fnmatchcase(name, f) for f in fields)
                and (problem := path_problem(name, value, env_vars))]
    if problems:
        more = ", ".join(f"'{name}'" for name, _ in problems[1:])
        raise ConfigError(problems[0][1] + (f"; also {more}" if more else ""))


# --- what the job is sent -------------------------------------------------------------------


def entrypoint(job: str, sid: str) -> str:
    script = f"jobs/{job.replace('-', '_')}.py"
    config = f".prism-config-{sid}.yaml"  # one file per submission: working dirs are shared by content
    return f'printf "%s\\n" "${CONFIG_ENV}" > {config} && python {script} --config {config}'


def job_metadata(job: str, config_paths: Sequence[str], overrides: Sequence[str]) -> dict[str, str]:
    """What `prism-ray jobs` shows instead of the config-shipping entrypoint: the job as it was asked for
    (`augment --config configs/augment_tiny.yaml --set ...`, config paths relative to the repo when in it)."""
    args = [job]
    for path in config_paths:
        resolved = Path(path).resolve()
        args += ["--config", str(resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved)]
    for override in overrides:
        args += ["--set", override]
    return {"prism_job": job, "prism_command": shlex.join(args)}
