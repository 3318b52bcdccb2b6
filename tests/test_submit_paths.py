"""`prism-ray submit`'s checks on this machine: the paths a job could not use on the cluster, the token, the
metadata `prism-ray jobs` shows (no cluster needed; tests/test_submit.py runs them against a real head)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism_ray.config import ConfigError, load_config
from prism_ray.distributed import cluster_env, submit
from prism_ray.pipelines.augment import AugmentConfig
from prism_ray.pipelines.finetune import FinetuneConfig

REPO = Path(__file__).resolve().parents[1]
TINY = [REPO / "configs/augment_tiny.yaml", REPO / "configs/compute/augment_cpu.yaml"]


def _problem(cls, paths, *overrides: str) -> str | None:
    config = load_config(cls, paths, overrides)
    try:
        cluster_env.check_cluster_paths(config, cluster_env.job_env_vars(config))
    except ConfigError as err:
        return str(err)
    return None


def test_the_shipped_tiny_config_names_each_path_to_set():
    problem = _problem(AugmentConfig, TINY)
    assert problem.startswith("config field 'data.manifest': relative path 'runs/phantoms/manifest.parquet' is "
                              "not uploaded with the job (runs/ is excluded from the upload)")
    assert problem.endswith("; also 'output'") and "\n" not in problem


@pytest.mark.parametrize(("manifest", "why"), [
    ("outputs/phantoms/manifest.parquet", "outputs/ is excluded"),
    (".venv/pyvenv.cfg", ".venv/ is excluded"),
    ("../elsewhere/manifest.parquet", "outside the repo"),
    ("data/no-such-manifest.parquet", "no such file in"),
])
def test_relative_inputs_the_upload_leaves_behind_are_refused(manifest, why):
    problem = _problem(AugmentConfig, TINY, f"data.manifest={manifest}", "output=s3://bucket/out")
    assert problem.startswith(f"config field 'data.manifest': relative path '{manifest}'") and why in problem


def test_paths_the_cluster_can_use_pass():
    # a relative file that goes up with the working dir, absolute paths (the cluster's own disk), URIs
    assert _problem(AugmentConfig, TINY, "data.manifest=configs/augment_tiny.yaml", "output=s3://bucket/out") is None
    assert _problem(AugmentConfig, TINY, "data.manifest=/shared/m.parquet", "output=/shared/out") is None
    assert _problem(AugmentConfig, TINY, "data.manifest=gs://b/m.parquet", "output=file:///shared/out") is None


def test_a_relative_output_is_refused():
    problem = _problem(AugmentConfig, TINY, "data.manifest=/shared/m.parquet", "output=results/run1")
    assert problem.startswith("config field 'output': relative path 'results/run1' would be written into the job's "
                              "temporary working dir")
    run = _problem(FinetuneConfig, [REPO / "configs/finetune_tiny.yaml"], "data.manifest=/shared/m.parquet")
    assert run.startswith("config field 'run.storage_path': relative path 'runs'")


def test_hub_ids_are_refused_when_the_job_runs_offline():
    sd15 = [REPO / "configs/augment_sd15.yaml"]
    assert cluster_env.cluster_runtime_env()["env_vars"]["HF_HUB_OFFLINE"] == "1"
    problem = _problem(AugmentConfig, sd15)
    assert problem.startswith("config field 'model.clip_path': 'openai/clip-vit-large-patch14' is a hub id, but the "
                              "job runs with HF_HUB_OFFLINE=1")
    assert _problem(AugmentConfig, sd15, "compute.env_vars.HF_HUB_OFFLINE='0'") is None  # compute.env_vars win
    assert _problem(AugmentConfig, sd15, "model.clip_path=s3://bucket/clip") is None
    finetune = _problem(FinetuneConfig, [REPO / "configs/finetune_sd15.yaml"], "run.storage_path=s3://bucket/runs",
                        "data.manifest=s3://bucket/m.parquet")
    assert finetune.startswith("config field 'model.path': 'runwayml/stable-diffusion-v1-5' is a hub id")


def test_the_job_gets_cluster_runtime_env_and_compute_env_vars():
    config = load_config(AugmentConfig, TINY, ["compute.env_vars.HF_HUB_OFFLINE='0'", "compute.env_vars.X=y"])
    env = cluster_env.runtime_env("a: 1", cluster_env.job_env_vars(config))
    assert env["working_dir"] == str(REPO) and {"runs", "outputs", ".venv"} <= set(env["excludes"])
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "0" and env["env_vars"]["X"] == "y"
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false" and env["env_vars"][cluster_env.CONFIG_ENV] == "a: 1"


def test_metadata_is_the_job_as_asked_for(tmp_path):
    outside = tmp_path / "mine.yaml"
    meta = cluster_env.job_metadata("augment", [str(TINY[0]), str(outside)], ["output=s3://b/o", "subgroups.0.quota=2"])
    assert meta == {"prism_job": "augment", "prism_command": f"augment --config configs/augment_tiny.yaml --config "
                    f"{outside} --set output=s3://b/o --set subgroups.0.quota=2"}


def test_the_token_is_found_where_ray_keeps_it(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.auth_token() == ("", "")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert submit.auth_token() == ("from-file", "~/.ray/auth_token")
    (tmp_path / "other").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "other"))
    assert submit.auth_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_token() == ("from-env", "RAY_AUTH_TOKEN")
