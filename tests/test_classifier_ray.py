"""The classifier job on a real local Ray: two CPU Ray Train workers (DDP over gloo) learn a phantom attribute."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_two_worker_ray_train_learns_effusion_well_above_chance(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from prism_ray.config import build_config
    from prism_ray.data.storage import read_image
    from prism_ray.distributed.classifier_loop import fit
    from prism_ray.models.classifier import load_classifier, predict_proba
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
    from prism_ray.pipelines.classifier import ClassifierConfig, run
    from prism_ray.scoring.classification import auroc, balanced_accuracy

    data = write_phantom_dataset(
        str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=200, seed=5, p_effusion=0.5)
    )
    config = build_config(
        ClassifierConfig,
        {
            "data": {"manifest": data.manifest_uri},
            "heads": {"pleural_effusion": "Pleural Effusion"},
            "train": {
                "max_steps": 40,
                "batch_size": 16,
                "eval_every": 20,
                "log_every": 20,
                "checkpoint_every": 20,
            },
            "compute": {"num_workers": 2, "cpus_per_worker": 1, "torch_threads": 1},
            "run": {"storage_path": str(tmp_path / "runs"), "name": "ray-clf"},
        },
    )
    result = run(config, runner=fit)  # Ray Train, the runner of `prism-ray classifier`
    assert result.final_step == 40
    assert sorted(p.name for p in (tmp_path / "runs" / "ray-clf").glob("checkpoint_0*")) == [
        "checkpoint_00000020",
        "checkpoint_00000040",
    ]
    rows = [r for r in pq.read_table(data.manifest_uri).to_pylist() if r["split"] == "test"]
    probs = predict_proba(
        load_classifier(result.model_path), np.stack([read_image(r["image_uri"]) for r in rows])
    )
    y = np.array([r["Pleural Effusion"] for r in rows])
    assert auroc(y, probs[:, 0]) > 0.85 and balanced_accuracy(y, probs[:, 0]) > 0.7  # chance: 0.5


def test_two_worker_group_dro_all_reduces_the_group_losses(ray_local, tmp_path):
    """Group DRO under DDP: each worker updates q from the group losses of both workers' batches (one
    all-reduce a step), so the run finishes in lockstep with one q, its 4 training groups off uniform."""
    from prism_ray.config import build_config
    from prism_ray.distributed.classifier_loop import fit
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
    from prism_ray.pipelines.classifier import ClassifierConfig, run
    from prism_ray.training.callbacks import STATE_FILE
    from prism_ray.training.classifier import read_classifier_checkpoint

    data = write_phantom_dataset(str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=120, seed=5))
    heads = {"pleural_effusion": "Pleural Effusion", "support_devices": "Support Devices"}
    config = build_config(
        ClassifierConfig,
        {
            "data": {"manifest": data.manifest_uri},
            "heads": heads,
            "train": {
                "max_steps": 10,
                "batch_size": 8,
                "eval_every": 5,
                "log_every": 5,
                "checkpoint_every": 10,
                "objective": "group_dro",
                "dro_step_size": 0.5,
                "group_heads": list(heads),
                "select": "valid_worst_group",
            },
            "compute": {"num_workers": 2, "cpus_per_worker": 1, "torch_threads": 1},
            "run": {"storage_path": str(tmp_path / "runs"), "name": "ray-dro"},
        },
    )
    result = run(config, runner=fit)
    state = read_classifier_checkpoint(result.checkpoint_path, STATE_FILE)
    q = np.array(state["group_dro_q"])
    assert result.final_step == 10 and result.select == "valid_worst_group"
    assert q.sum() == pytest.approx(1.0) and (q > 0).sum() == 4 and q.max() > 0.26
    assert 0.0 <= result.best_valid_worst_group <= 1.0
