"""Tests for prism_ray.scoring.metrics: L1, LPIPS, CPG and flip rates on known values."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prism_ray.scoring.metrics import (
    LPIPS,
    cpg,
    flip_rate,
    l1,
    non_target_flip_rate,
    uint8_to_lpips_input,
)

# -- L1 ----------------------------------------------------------------------------------


def test_l1_known_single_image_both_scales():
    a = np.zeros((2, 2, 3), np.uint8)
    b = np.zeros((2, 2, 3), np.uint8)
    b[0, 0, :] = 255  # 3 of 12 values differ by 255
    b[1, 1, 0] = 51  # 1 value differs by 51
    assert l1(a, b, scale="255") == pytest.approx((3 * 255 + 51) / 12)
    assert l1(a, b) == pytest.approx((3 * 1.0 + 0.2) / 12)
    assert l1(b, a) == l1(a, b)


def test_l1_batch_is_per_image():
    a = np.zeros((3, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 10
    b[2, :2] = 255  # half of image 2 differs by 255
    out = l1(a, b, scale="255")
    assert out.shape == (3,)
    np.testing.assert_allclose(out, [0.0, 10.0, 127.5])
    np.testing.assert_allclose(l1(a, b), [0.0, 10 / 255, 0.5])


def test_l1_rejects_non_uint8_and_mismatch():
    a = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError):
        l1(a.astype(np.float32), a)
    with pytest.raises(ValueError):
        l1(a, np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError):
        l1(a, a, scale="percent")


# -- LPIPS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_model():
    return LPIPS.random(seed=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    return a, b


def test_lpips_identical_is_zero(lpips_model, images):
    a, _ = images
    np.testing.assert_allclose(lpips_model.distance(a, a), 0.0, atol=1e-7)


def test_lpips_symmetric_and_positive(lpips_model, images):
    a, b = images
    d_ab, d_ba = lpips_model.distance(a, b), lpips_model.distance(b, a)
    assert d_ab.shape == (3,)
    assert np.all(d_ab > 0)
    np.testing.assert_allclose(d_ab, d_ba, rtol=1e-5)


def test_lpips_batching_does_not_change_values(lpips_model, images):
    a, b = images
    one_by_one = lpips_model.distance(a, b, batch_size=1)
    np.testing.assert_allclose(one_by_one, lpips_model.distance(a, b), rtol=1e-5)


def test_lpips_matches_straightforward_formula(lpips_model, images):
    a, b = images
    x0, x1 = uint8_to_lpips_input(a), uint8_to_lpips_input(b)
    # Written out independently: ScalingLayer, trunk taps, unit-normalise channels,
    # squared difference, 1x1 weights, spatial mean, sum over layers.
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    with torch.no_grad():
        f0 = lpips_model.net((x0 - shift) / scale)
        f1 = lpips_model.net((x1 - shift) / scale)
        expected = torch.zeros(len(a))
        assert [f.shape[1] for f in f0] == [64, 192, 384, 256, 256]
        for k in range(5):
            n0 = f0[k] / (f0[k].norm(dim=1, keepdim=True) + 1e-10)
            n1 = f1[k] / (f1[k].norm(dim=1, keepdim=True) + 1e-10)
            w = lpips_model.state_dict()[f"lin{k}.model.1.weight"].view(-1)  # (C,)
            per_pixel = torch.einsum("nchw,c->nhw", (n0 - n1) ** 2, w)
            expected += per_pixel.mean(dim=(1, 2))
    np.testing.assert_allclose(lpips_model(x0, x1).numpy(), expected.numpy(), rtol=1e-5)


def test_lpips_uint8_helper_range_and_grayscale():
    gray = np.array([[0, 255], [127, 128]], np.uint8)
    x = uint8_to_lpips_input(gray)
    assert x.shape == (1, 3, 2, 2)
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(x[:, 0], x[:, 2])


def test_lpips_loads_weights_by_key_from_safetensors(tmp_path, lpips_model, images):
    a, b = images
    sd = lpips_model.state_dict()
    # torchvision's alexnet layout: features.* plus a classifier we must ignore.
    alex = {k[len("net.") :]: v.clone() for k, v in sd.items() if k.startswith("net.features.")}
    assert set(alex) == {f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")}
    alex["classifier.1.weight"] = torch.zeros(4, 9216)
    lins = {f"lin{k}.model.1.weight": sd[f"lin{k}.model.1.weight"].clone() for k in range(5)}
    save_file(alex, tmp_path / "alexnet.safetensors")
    save_file(lins, tmp_path / "alex_lpips.safetensors")
    torch.save(lins, tmp_path / "alex.pth")  # the reference ships the .pth form

    for lin_path in ("alex_lpips.safetensors", "alex.pth"):
        loaded = LPIPS.from_weights(tmp_path / "alexnet.safetensors", tmp_path / lin_path)
        np.testing.assert_array_equal(loaded.distance(a, b), lpips_model.distance(a, b))
    other = LPIPS.random(seed=1)
    assert not np.allclose(other.distance(a, b), lpips_model.distance(a, b))


def test_lpips_rejects_bad_linear_weights(tmp_path, lpips_model):
    model = LPIPS.random(seed=0)
    bad = {f"lin{k}.model.1.weight": lin.model[1].weight.clone() for k, lin in enumerate(lpips_model.lins)}
    bad["lin2.model.1.weight"][0, 0] = -1.0
    with pytest.raises(ValueError, match="negative"):
        model.load_linear_state_dict(bad)
    del bad["lin2.model.1.weight"]
    with pytest.raises(ValueError, match="lin2"):
        model.load_linear_state_dict(bad)
    with pytest.raises(ValueError, match="format"):
        (tmp_path / "w.npz").write_bytes(b"")
        LPIPS.from_weights(tmp_path / "w.npz", tmp_path / "w.npz")


# -- CPG and flip rates ------------------------------------------------------------------


def test_cpg_and_flip_rate_hand_computed():
    p_orig = np.array([0.2, 0.6, 0.9, 0.4])
    p_cf = np.array([0.7, 0.5, 0.1, 0.45])
    assert cpg(p_cf, p_orig) == pytest.approx((0.5 + 0.1 + 0.8 + 0.05) / 4)
    # decisions at 0.5: orig F T T F, cf T T F F -> 2 of 4 change
    assert flip_rate(p_cf, p_orig) == pytest.approx(0.5)
    # at 0.42: orig F T T F, cf T T F T -> 3 of 4
    assert flip_rate(p_cf, p_orig, threshold=0.42) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        cpg(p_cf, p_orig[:3])
    with pytest.raises(ValueError):
        cpg(p_cf * 2, p_orig)


def test_non_target_flip_rate_hand_computed():
    probs_orig = np.array(
        [
            [0.9, 0.1, 0.2],
            [0.8, 0.7, 0.3],
            [0.1, 0.2, 0.6],
            [0.2, 0.4, 0.9],
        ]
    )
    probs_cf = np.array(
        [
            [0.1, 0.1, 0.2],  # target flips only
            [0.2, 0.3, 0.3],  # attr 1 flips
            [0.9, 0.6, 0.4],  # attrs 1 and 2 flip
            [0.3, 0.45, 0.8],  # nothing flips
        ]
    )
    out = non_target_flip_rate(probs_cf, probs_orig, target_index=0)
    assert out.rate == pytest.approx(0.5)
    assert np.isnan(out.per_attribute[0])
    np.testing.assert_allclose(out.per_attribute[1:], [0.5, 0.25])
    # Per-attribute thresholds: attr 1 at 0.42 also flips edit 3 (0.4 -> 0.45).
    out = non_target_flip_rate(probs_cf, probs_orig, target_index=0, threshold=np.array([0.5, 0.42, 0.5]))
    assert out.rate == pytest.approx(0.75)
    with pytest.raises(ValueError):
        non_target_flip_rate(probs_cf, probs_orig, target_index=3)
