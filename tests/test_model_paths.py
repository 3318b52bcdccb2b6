"""Issue 28.17: a wrong model path is a config error naming its field, found before a job creates anything."""

from __future__ import annotations

import pytest

from prism_ray.config import ConfigError, build_config


def test_the_finetune_refuses_a_wrong_model_path_before_its_run_folder(tmp_path):
    from prism_ray.pipelines.finetune import FinetuneConfig, plan_run

    (tmp_path / "model" / "unet").mkdir(parents=True)  # a half-copied model folder
    base = {"data": {"manifest": str(tmp_path / "m.parquet")},
            "run": {"storage_path": str(tmp_path / "runs"), "name": "t"}}
    for path, why in [(tmp_path / "nowhere", "no such folder"), (tmp_path / "model", "missing component folder")]:
        config = build_config(FinetuneConfig, {**base, "model": {"path": str(path)}})
        with pytest.raises(ConfigError, match=f"config field 'model.path': .*{why}"):
            plan_run(config)
    assert not (tmp_path / "runs").exists()


def test_the_classifier_refuses_a_wrong_start_folder_before_its_run_folder(tmp_path):
    from prism_ray.pipelines.classifier import ClassifierConfig, plan_run

    config = build_config(ClassifierConfig, {
        "data": {"manifest": str(tmp_path / "m.parquet")},
        "heads": {"female": "Sex=Female"},
        "model": {"weights": str(tmp_path / "nowhere")},
        "run": {"storage_path": str(tmp_path / "runs"), "name": "t"},
    })
    with pytest.raises(ConfigError, match="config field 'model.weights': .*no such folder"):
        plan_run(config)
    assert not (tmp_path / "runs").exists()
