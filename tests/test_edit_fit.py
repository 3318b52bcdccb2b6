"""`prism-ray edit` says when the model does not fit an image (a colour picture comes back as a chest X-ray):
each image whose unedited reconstruction is below `filter.fit_warning_psnr` (the augment job's threshold)
gets the model-fit warning in the printed output, edits.json and index.md."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from test_fidelity import off_domain_images

from prism_ray.config import build_config
from prism_ray.data.storage import read_table
from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
from prism_ray.pipelines.edit import EditJobConfig, run
from prism_ray.scoring.filter import fit_warning


def test_fit_warning_is_the_threshold_of_one_image():
    assert fit_warning(30.2, 25.0) is None and fit_warning(None, 25.0) is None
    assert fit_warning(float("nan"), 25.0) is None  # unknown: no claim either way
    assert "below 25.0 dB PSNR (18.3 dB)" in fit_warning(18.3, 25.0) and "may not fit" in fit_warning(18.3, 25.0)


def test_edit_warns_per_image_when_the_model_does_not_fit_it(tmp_path, capsys):
    data = write_phantom_dataset(str(tmp_path / "data"), PhantomDatasetConfig(n_subjects=12, seed=4))
    phantom = next(r for r in read_table(data.manifest_uri).to_pylist() if r["Support Devices"] == 1.0)
    gradient = tmp_path / "gradient.png"
    Image.fromarray(off_domain_images()["gradient"]).save(gradient)
    rng = np.random.default_rng(2)  # a colour picture: smooth blobs of different hue per channel
    colour = np.stack([np.kron(rng.integers(0, 256, (4, 4)), np.ones((16, 16))) for _ in range(3)], axis=2)
    Image.fromarray(colour.astype(np.uint8)).save(tmp_path / "photo.png")
    config = build_config(EditJobConfig, {
        "images": [phantom["image_uri"], str(gradient), str(tmp_path / "photo.png")],
        "prompt": "Chest X-ray showing Support Devices", "do": ["Support Devices=0"],
        "out": str(tmp_path / "edits"), "model": {"device": "cpu"},
    })  # fmt: skip
    out = run(config)
    printed = capsys.readouterr().out
    edits = {e["image"].rsplit("/", 1)[-1]: e for e in json.loads((out / "edits.json").read_text())["edits"]}
    threshold = config.filter.fit_warning_psnr
    phantom_name = phantom["image_uri"].rsplit("/", 1)[-1]
    assert edits[phantom_name]["reconstruction_psnr"] >= threshold and edits[phantom_name]["fit_warning"] is None
    index = (out / "index.md").read_text()
    # The colour picture is far below the threshold (~13 dB); the grey gradient reconstructs at ~29 dB with the
    # tiny family, above the default 25 dB (a family-specific threshold would catch it): warned iff below.
    assert edits["photo.png"]["reconstruction_psnr"] < threshold
    for name in ("gradient.png", "photo.png"):
        warned = edits[name]["reconstruction_psnr"] < threshold
        assert edits[name]["fit_warning"] == fit_warning(edits[name]["reconstruction_psnr"], threshold)
        assert (f"edit: warning: {name} reconstructs below {threshold:.1f} dB PSNR" in printed) == warned
        assert (f"- {name}: reconstructs below {threshold:.1f} dB PSNR" in index) == warned
    assert f"edit: warning: {phantom_name}" not in printed and f"- {phantom_name}:" not in index
    assert "**Model-fit warnings**" in index and "| model fit |" in index
    assert f"| {phantom_name} |" in index and "| ok |" in index and "| warning |" in index
