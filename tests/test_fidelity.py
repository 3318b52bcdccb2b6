"""Pixel-space fidelity of reconstructions: PSNR/SSIM against plain formulas, and images unlike the
training data flagged while held-out phantoms pass."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from prism_ray.config import build_config
from prism_ray.scoring.metrics import psnr, ssim


def plain_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM written out window by window (11x11 Gaussian, sigma 1.5, valid region)."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    t = np.arange(11) - 5
    w = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_psnr_and_ssim_match_plain_formulas():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 20), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse))
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(plain_ssim(a, b), abs=1e-9)
    rgb = np.repeat(a[:, :, None], 3, axis=2)
    assert ssim(rgb, np.repeat(b[:, :, None], 3, axis=2)) == pytest.approx(plain_ssim(a, b), abs=1e-9)


def off_domain_images(size: int = 64) -> dict[str, np.ndarray]:
    """Images nothing like a chest X-ray: a smooth gradient, text, natural-image-like noise."""
    gradient = np.tile(np.linspace(0, 255, size, dtype=np.float64)[None], (size, 1))
    text = Image.new("L", (size, size), 230)
    draw = ImageDraw.Draw(text)
    for row in range(0, size, 12):
        draw.text((2, row), "PRISM ray 0123", fill=20)
    rng = np.random.default_rng(1)
    noise = np.cumsum(np.cumsum(rng.normal(size=(size, size)), axis=0), axis=1)  # 1/f^2-like texture
    noise = (noise - noise.min()) / (noise.max() - noise.min()) * 255
    rgb = lambda g: np.repeat(np.asarray(g, np.uint8)[:, :, None], 3, axis=2)  # noqa: E731
    return {"gradient": rgb(gradient), "text": rgb(text), "noise": rgb(noise)}


def test_images_unlike_the_training_data_reconstruct_below_the_threshold(tmp_path):
    from prism_ray.data.storage import read_image, read_table
    from prism_ray.phantom.dataset import PhantomDatasetConfig, write_phantom_dataset
    from prism_ray.pipelines import augment
    from prism_ray.pipelines.counterfactuals import MethodEngine

    config = build_config(augment.AugmentConfig, {
        "model": {"device": "cpu"},
        "data": {"manifest": "unused.parquet"},
        "subgroups": [{"name": "g", "interventions": ["Support Devices=0"], "quota": 1}],
        "inversion": {"num_inference_steps": 20, "learning_rate": 0.05},
        # The shipped family's VAE alone reaches 30.9 dB on held-out phantoms: below 30 dB the model
        # does not fit the image. (SD v1.5 on its own data would use a threshold of its own.)
        "filter": {"fit_warning_psnr": 30.0},
        "output": str(tmp_path / "out"),
    })
    data = write_phantom_dataset(str(tmp_path / "d"), PhantomDatasetConfig(n_subjects=20, seed=11))
    phantoms = [read_image(r["image_uri"]) for r in read_table(data.manifest_uri).to_pylist()
                if r["split"] == "test"][:4]
    odd = off_domain_images()
    images = phantoms + list(odd.values())
    prompt = "Chest X-ray showing Support Devices"
    tasks = [{"source_uri": str(i), "source_prompt": prompt,
              "edits": [{"edit_prompt": "Normal chest X-ray with no significant findings", "rank": 0}]}
             for i in range(len(images))]
    edited, errors = MethodEngine(config).counterfactuals(images, tasks)
    assert not errors and len(edited) == len(images)
    fidelity = {item.index: float(item.scores["reconstruction_psnr"][0]) for item in edited}
    threshold = config.filter.fit_warning_psnr
    assert all(fidelity[i] >= threshold for i in range(len(phantoms))), fidelity
    assert all(fidelity[i] < threshold for i in range(len(phantoms), len(images))), fidelity
    rows = [{"source_uri": str(i), "reconstruction_psnr": v} for i, v in fidelity.items()]
    fit = augment.model_fit(rows, threshold)
    assert fit["below"] == len(odd) and fit["warning"]  # 3 of 7 sources: the run summary warns
    strict = config.filter.model_copy(update={"reconstruction_psnr_min": threshold})
    accepted = {item.index: bool(strict.accept({**item.scores, "s_clip": np.ones(1)})[0]) for item in edited}
    assert [accepted[i] for i in range(len(images))] == [True] * len(phantoms) + [False] * len(odd)
