"""Precision presets and the null-text inner loop's host syncs, on the shipped trained tiny family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from prism_ray.engine import inversion as inv
from prism_ray.engine.memory import fit_batch_sizes
from prism_ray.engine.precision import PRESETS, resolve_precision
from prism_ray.engine.settings import EditConfig, EngineComputeConfig, InversionConfig
from prism_ray.engine.text import encode_prompts, null_embedding

SHIPPED = Path(__file__).resolve().parents[1] / "prism_ray" / "phantom" / "assets" / "tiny_phantom"
SOURCE = "Chest X-ray showing Cardiomegaly, Support Devices"
EDIT = "Chest X-ray showing Cardiomegaly"


def test_presets_resolve_per_device_and_overrides_win():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(InversionConfig(), EditConfig(), cpu) == PRESETS["reference"]
    assert resolve_precision(InversionConfig(), EditConfig(), cuda) == PRESETS["fast"]
    ref = PRESETS["reference"]
    assert (ref.matmul_tf32, ref.cudnn_tf32, ref.inner_dtype, ref.edit_dtype) == (
        False,
        True,
        torch.float32,
        torch.float32,
    )
    fast = resolve_precision(InversionConfig(precision="fast"), None, cpu)
    assert (fast.matmul_tf32, fast.inner_dtype, fast.edit_dtype) == (True, torch.float32, torch.bfloat16)
    policy = resolve_precision(
        InversionConfig(precision="fastest", allow_tf32=False), EditConfig(compute_dtype="float32")
    )
    assert (policy.matmul_tf32, policy.cudnn_tf32, policy.inner_dtype, policy.edit_dtype) == (
        False,
        False,
        torch.bfloat16,
        torch.float32,
    )


def test_memory_budget_fits_24gb_defaults_and_names_the_knob():
    """SD1.5-sized weights (4.3 GB) and 64 x 64 latents on a (pretend) CUDA device: the per-image
    estimates of engine.memory choose the batch sizes."""

    class FakeSD:  # only what fit_batch_sizes reads: the device, sizes and parameter bytes
        device = torch.device("cuda")

        class unet:
            config = type("C", (), {"sample_size": 64})

            @staticmethod
            def parameters():
                return [torch.empty(0)]

            @staticmethod
            def buffers():
                return []

        vae = text_encoder = unet

    from prism_ray.engine import memory

    sd = FakeSD()
    saved = memory.weights_gb
    memory.weights_gb = lambda sd: 4.3
    try:
        fastest = resolve_precision(InversionConfig(), EditConfig(), sd.device)
        assert fit_batch_sizes(sd, fastest, 4, 2, 4, 24.0) == (4, 2)  # the defaults fit 24 GB
        assert fit_batch_sizes(sd, fastest, 8, 8, 4, 24.0) == (4, 4)  # larger asks are capped
        reference = PRESETS["reference"]
        assert fit_batch_sizes(sd, reference, 4, 2, 4, 24.0) == (4, 1)  # fp32 edits: 13.5 GB per image
        assert fit_batch_sizes(sd, reference, 4, 2, 4, None) == (4, 2)  # no budget, no cap
        with pytest.raises(
            ValueError, match=r"^compute\.gpu_memory_gb: 16 GB cannot hold one image of the editing"
        ):
            fit_batch_sizes(sd, reference, 4, 2, 4, 16.0)
    finally:
        memory.weights_gb = saved
    assert fit_batch_sizes(type("S", (), {"device": torch.device("cpu")})(), reference, 4, 2, 4, 1.0) == (
        4,
        2,
    )
    with pytest.raises(ValueError, match="compute.attention"):
        from prism_ray.engine.attention import xformers_available
        from prism_ray.engine.kernels import prepare_models

        if xformers_available():
            pytest.skip("xformers installed")
        prepare_models(sd, EngineComputeConfig(attention="xformers", channels_last=False))


SYNC_METHODS = ("cpu", "item", "tolist", "__bool__", "__float__", "__int__")


def test_null_text_inner_loop_does_not_sync_per_inner_step(calm_sd, monkeypatch):
    """Count every host read of a tensor (.cpu/.item/.tolist/bool/float/int) during null_text_invert:
    at most one per timestep, however many inner steps run (here: none in the loop, two at the end)."""
    steps_n, inner = 4, 5
    config = InversionConfig(num_inference_steps=steps_n, num_inner_steps=inner, early_stop_epsilon=1e-6)
    steps = inv.make_steps(config)
    z0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    cond = encode_prompts(calm_sd.tokenizer, calm_sd.text_encoder, [SOURCE, EDIT])
    null = null_embedding(calm_sd.tokenizer, calm_sd.text_encoder)
    latents = inv.ddim_invert(calm_sd.unet, steps, z0, cond)
    calls = {name: 0 for name in SYNC_METHODS}
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    result = inv.null_text_invert(calm_sd.unet, steps, latents, cond, null, config)
    monkeypatch.undo()
    print("host reads during null_text_invert:", calls, "inner steps", result.inner_steps.tolist())
    assert sum(calls.values()) <= steps_n
    assert result.inner_steps.max() > 1  # the loop did run several inner steps per timestep


@pytest.fixture(scope="module")
def trained():
    if not (SHIPPED / "classifier").exists():
        pytest.skip("no shipped tiny_phantom family")
    from prism_ray.models.classifier import load_classifier
    from prism_ray.models.loading import load_clip, load_sd_components
    from prism_ray.scoring.clip_score import ClipScorer

    sd = load_sd_components("tiny", device="cpu")
    clip = load_clip(str(SHIPPED), device="cpu")
    return sd, ClipScorer(clip.model, clip.tokenizer), load_classifier(SHIPPED / "classifier")


@pytest.mark.slow
def test_fastest_keeps_reconstruction_and_decisions(trained):
    """4 device phantoms, T = 20, 10 fixed inner steps (lr 5e-2, as BENCHMARKS.md's tiny-family runs):
    `fastest` (bf16 inner steps, bf16 edits) reconstructs within 1.5x of `reference` (fp32) per image, and
    the S_CLIP filter and the classifier's target decision agree on every edit."""
    from prism_ray.engine.editor import Editor
    from prism_ray.models.classifier import classifier_labels, predict_proba
    from prism_ray.phantom.render import PhantomAttributes, render_phantom

    sd, scorer, classifier = trained
    images = [
        np.repeat(
            render_phantom(
                PhantomAttributes(cardiomegaly=True, devices=frozenset({"pacemaker"})), s, sd.resolution
            )[:, :, None],
            3,
            axis=2,
        )
        for s in range(4)
    ]
    common = {
        "num_inference_steps": 20,
        "num_inner_steps": 10,
        "learning_rate": 5e-2,
        "early_stop_epsilon": 0.0,
        "early_stop_slope": 0.0,
    }
    runs = {}
    for preset in ("reference", "fastest"):
        config = InversionConfig(precision=preset, **common)
        editor = Editor(sd, EditConfig(), config)
        inverted, errors = inv.invert_many(sd, images, [SOURCE] * 4, config, policy=editor.precision)
        assert errors == []
        rec = inv.relative_squared_error(
            inv.reconstruct(sd.unet, inv.make_steps(config), inverted), inverted.latents[0]
        )
        edited = editor.edit(inverted, [SOURCE] * 4, [[EDIT]] * 4)
        runs[preset] = rec, edited.edits[:, 0]
    (rec_fp32, edits_fp32), (rec_bf16, edits_bf16) = runs["reference"], runs["fastest"]
    print("relative squared reconstruction error: reference", rec_fp32.tolist(), "fastest", rec_bf16.tolist())
    assert (rec_bf16 <= 1.5 * rec_fp32).all()
    sources = np.stack(images)
    s_fp32 = scorer.s_clip(sources, edits_fp32, SOURCE, EDIT)
    s_bf16 = scorer.s_clip(sources, edits_bf16, SOURCE, EDIT)
    target = classifier_labels(classifier).index("support_devices")
    p_fp32, p_bf16 = (
        predict_proba(classifier, edits_fp32)[:, target],
        predict_proba(classifier, edits_bf16)[:, target],
    )
    print("S_CLIP", s_fp32, s_bf16, "target p", p_fp32, p_bf16)
    assert ((s_fp32 >= 0.1) == (s_bf16 >= 0.1)).all()
    assert ((p_fp32 >= 0.5) == (p_bf16 >= 0.5)).all()
