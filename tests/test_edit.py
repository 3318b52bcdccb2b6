"""`prism-ray edit`: two phantom PNGs, the shipped tiny family, in this process, in well under a minute."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from prism_ray.config import ConfigError, build_config
from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
from prism_ray.pipelines.edit import EditJobConfig, run
from prism_ray.results.summary import RunIncomplete


def test_edit_two_phantoms_with_the_shipped_family(tmp_path):
    data = write_phantom_dataset(str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=24, seed=1))
    from prism_ray.data.storage import read_table

    rows = [r for r in read_table(data.manifest_uri).to_pylist() if r["Support Devices"] == 1.0][:2]
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop_back.png")  # a symlink loop (ELOOP)
    (tmp_path / "loop_back.png").symlink_to(tmp_path / "loop.png")
    start = time.perf_counter()
    config = build_config(EditJobConfig, {
        "images": [rows[0]["image_uri"], str(tmp_path / "missing.png"), str(tmp_path / "loop.png"),
                   rows[1]["image_uri"]],
        "prompt": "Chest X-ray showing Support Devices",
        "do": ["Support Devices=0"],
        "out": str(tmp_path / "edits"),
        "model": {"device": "cpu"},
        "inversion": {"num_inference_steps": 20, "learning_rate": 0.05},
        "edit": {"local_blend": True, "blend_mask": "noise"},
    })
    with pytest.raises(RunIncomplete, match=r"2 of 4 images failed \(first: .*loop.png\); the others were edited"):
        run(config)  # the CLI exits 3: outputs written, some inputs not edited
    out = tmp_path / "edits"
    seconds = time.perf_counter() - start
    report = json.loads((out / "edits.json").read_text())
    assert len(report["edits"]) == 2
    assert {e["edit_prompt"] for e in report["edits"]} == set(config.edit_captions())
    assert config.edit_captions() == ["Normal chest X-ray with no significant findings"]  # do(devices = 0)
    # The missing file and the symlink loop: reported, not fatal; the images after them are still edited.
    assert [(f["stage"], f["image"]) for f in report["failures"]] == [
        ("read", str(tmp_path / "missing.png")), ("read", str(tmp_path / "loop.png"))]
    assert "ELOOP" in report["failures"][1]["reason"]
    for e in report["edits"]:
        folder = out / e["folder"].rsplit("/", 1)[-1]
        cf = np.asarray(Image.open(folder / "edit_0.png"))
        src = np.asarray(Image.open(folder / "source.png"))
        assert cf.shape == src.shape == (64, 64, 3) and np.abs(cf.astype(int) - src.astype(int)).mean() > 1
    assert (out / "sheet.png").exists() and "S_CLIP" in (out / "index.md").read_text()
    assert seconds < 60, seconds


def test_edit_needs_an_edit_and_a_caption_the_adapter_writes(tmp_path):
    with pytest.raises(ConfigError, match="do: give at least one"):
        build_config(EditJobConfig, {"images": ["a.png"], "prompt": "x", "out": str(tmp_path)})
    config = build_config(EditJobConfig, {"images": ["a.png"], "prompt": "a photo", "do": ["Support Devices=0"],
                                          "out": str(tmp_path)})
    with pytest.raises(ValueError, match="not a caption the 'chexpert' adapter writes"):
        config.edit_captions()


def test_the_edit_command_line(tmp_path):
    import subprocess
    import sys

    data = write_phantom_dataset(str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=20, seed=3))
    from prism_ray.data.storage import read_table

    image = [r for r in read_table(data.manifest_uri).to_pylist() if r["Support Devices"] == 1.0][0]["image_uri"]
    out = subprocess.run(
        [sys.executable, "-m", "prism_ray.cli", "edit", image, "--prompt", "Chest X-ray showing Support Devices",
         "--do", "Support Devices=0", "--out", str(tmp_path / "e"), "--set", "model.device=cpu",
         "--set", "inversion.num_inference_steps=4", "--set", "inversion.num_inner_steps=1"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "e" / "edits.json").read_text())["edits"][0]["image"] == image


def test_the_family_recommended_settings_fill_only_what_the_user_left_unset(tmp_path):
    """The shipped tiny family carries its tuned schedule (20 steps, lr 0.05, noise blend); an explicit
    value wins, a value never given comes from the family, the rest stays at the reference defaults."""
    data = write_phantom_dataset(str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=12, seed=1))
    from prism_ray.data.storage import read_table

    row = next(r for r in read_table(data.manifest_uri).to_pylist() if r["Support Devices"] == 1.0)
    config = build_config(EditJobConfig, {
        "images": [row["image_uri"]], "prompt": "Chest X-ray showing Support Devices", "do": ["Support Devices=0"],
        "out": str(tmp_path / "edits"), "model": {"device": "cpu"},
        "inversion": {"num_inference_steps": 4, "num_inner_steps": 1},  # the user's, kept
    })
    out = run(config)
    settings = json.loads((out / "edits.json").read_text())["settings"]
    assert settings["inversion"]["num_inference_steps"] == 4 and settings["inversion"]["num_inner_steps"] == 1
    assert settings["inversion"]["learning_rate"] == 0.05  # the family's
    assert settings["edit"]["blend_mask"] == "noise" and settings["edit"]["local_blend"] is True
    assert settings["inversion"]["guidance_scale"] == 7.5  # neither: the reference default


def test_with_unset_defaults_names_a_bad_family_file():
    from prism_ray.config import with_unset_defaults

    config = build_config(EditJobConfig, {"images": ["a.png"], "prompt": "x", "do": ["A=0"], "out": "o",
                                          "inversion": {"learning_rate": 0.2}})
    same = with_unset_defaults(config, {"inversion": {"learning_rate": 0.05, "num_inference_steps": 20}}, "f.yaml")
    assert (same.inversion.learning_rate, same.inversion.num_inference_steps) == (0.2, 20)
    with pytest.raises(ConfigError, match=r"f.yaml: section 'inversion': config field 'num_inference_steps'"):
        with_unset_defaults(config, {"inversion": {"num_inference_steps": 0}}, "f.yaml")
    with pytest.raises(ConfigError, match="'nope' is not a section"):
        with_unset_defaults(config, {"nope": {"x": 1}}, "f.yaml")


def test_a_wrong_model_path_is_a_config_error_before_the_output_exists(tmp_path):
    config = build_config(EditJobConfig, {"images": ["a.png"], "prompt": "Chest X-ray showing Support Devices",
                                          "do": ["Support Devices=0"], "out": str(tmp_path / "edits"),
                                          "model": {"path": str(tmp_path / "no-such-model"), "device": "cpu"}})
    with pytest.raises(ConfigError, match=r"config field 'model.path'"):
        run(config)
    assert not (tmp_path / "edits").exists()
