"""The fine-tuning core without Ray: DeepSpeed config values and errors, the loss, frozen parts, examples, export."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from prism_ray.config import ConfigError, build_config
from prism_ray.engine.text import encode_prompts
from prism_ray.pipelines.deepspeed_config import build_deepspeed_config, check_resources
from prism_ray.pipelines.finetune import FinetuneConfig
from prism_ray.training.diffusion import (
    diffusion_loss,
    make_noise_scheduler,
    module_digest,
    sample_images,
    step_generator,
    training_loss,
)
from prism_ray.training.examples import prepare_examples
from prism_ray.training.export import export_diffusers

BASE = {"data": {"manifest": "m.parquet"}, "run": {"storage_path": "/tmp/runs", "name": "t"}}


def cfg(*overrides: str) -> FinetuneConfig:
    return build_config(FinetuneConfig, BASE, overrides)


# --- DeepSpeed config ------------------------------------------------------------------------


def test_deepspeed_defaults_are_prisms_adamw():
    ds = build_deepspeed_config(cfg())
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 1
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["type"] == "AdamW"
    params = ds["optimizer"]["params"]
    assert params["lr"] == 1e-5 and params["betas"] == [0.9, 0.999]
    assert params["weight_decay"] == 1e-2 and params["eps"] == 1e-8
    assert ds["zero_optimization"] == {"stage": 0}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "scheduler" not in ds
    assert params["torch_adam"] and "fused" not in params  # CPU: torch's foreach AdamW


def test_gpu_runs_use_torch_fused_adamw_unless_offloaded():
    params = build_deepspeed_config(cfg("compute.use_gpu=true"))["optimizer"]["params"]
    assert params["torch_adam"] and params["fused"] is True
    offloaded = cfg("compute.use_gpu=true", "train.zero_stage=2", "train.offload_optimizer=true")
    assert "fused" not in build_deepspeed_config(offloaded)["optimizer"]["params"]
    assert cfg("train.compile=true").train.compile and not cfg().train.compile


def test_model_allow_tf32_is_gone_with_a_pointer_to_the_precision_knob():
    with pytest.raises(ConfigError, match=r"model\.allow_tf32 was removed.*inversion\.precision"):
        cfg("model.allow_tf32=true")


def test_deepspeed_zero2_bf16_warmup_on_cpu():
    c = cfg(
        "compute.num_workers=4",
        "train.micro_batch_size=2",
        "train.gradient_accumulation_steps=3",
        "train.zero_stage=2",
        "train.precision=bf16",
        "train.lr_schedule=warmup",
        "train.warmup_steps=50",
        "train.max_grad_norm=null",
    )
    ds = build_deepspeed_config(c)
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.0
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_scatter"] is False  # gloo has no reduce_scatter
    assert ds["scheduler"] == {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-5, "warmup_num_steps": 50, "warmup_type": "linear"},
    }
    # world size given explicitly overrides compute.num_workers
    assert build_deepspeed_config(c, world_size=2)["train_batch_size"] == 12


def test_deepspeed_zero3_fp16_gpu_decay_and_global_batch():
    c = cfg(
        "compute.use_gpu=true",
        "compute.num_workers=8",
        "train.precision=fp16",
        "train.zero_stage=3",
        "train.offload_optimizer=true",
        "train.micro_batch_size=4",
        "train.global_batch_size=128",
        "train.lr_schedule=warmup_decay",
        "train.warmup_steps=10",
        "train.max_steps=100",
    )
    ds = build_deepspeed_config(c)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 128
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["reduce_scatter"] is True
    assert ds["scheduler"]["type"] == "WarmupDecayLR" and ds["scheduler"]["params"]["total_num_steps"] == 100


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.precision=fp16"], "train.precision"),
        (["model.dtype=float16"], "model.dtype"),
        (["train.offload_optimizer=true", "train.zero_stage=2"], "train.offload_optimizer"),
        (["compute.use_gpu=true", "train.offload_optimizer=true"], "train.offload_optimizer"),
        (["train.zero_stage=3", "train.ema=true"], "train.ema"),
        (["train.zero_stage=3", "train.validation_every=5", "train.validation_prompts=[a]"], "train.validation_every"),
        (["train.validation_every=5"], "train.validation_prompts"),
        (["compute.num_workers=3", "train.micro_batch_size=2", "train.global_batch_size=16"], "train.global_batch_size"),
        (["train.global_batch_size=8", "train.gradient_accumulation_steps=3"], "train.gradient_accumulation_steps"),
        (["train.attention=xformers"], "train.attention"),
        (["train.lr_schedule=warmup_decay", "train.warmup_steps=10", "train.max_steps=10"], "train.warmup_steps"),
    ],
)
def test_invalid_combinations_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        build_deepspeed_config(cfg(*overrides))


def test_resource_check_before_workers_start():
    check_resources(cfg("compute.num_workers=2", "compute.cpus_per_worker=0.5"), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="'compute.num_workers'.*need 4 CPUs"):
        check_resources(cfg("compute.num_workers=4"), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="'compute.num_workers'.*GPU"):
        check_resources(cfg("compute.num_workers=2", "compute.use_gpu=true"), {"CPU": 16.0, "GPU": 1.0})


def test_field_errors_come_from_the_config_loader():
    with pytest.raises(ConfigError, match="'train.zero_stage'"):
        cfg("train.zero_stage=4")


# --- the loss --------------------------------------------------------------------------------


def _fixed_batch(sd, n=2):
    g = torch.Generator().manual_seed(1)
    images = torch.rand((n, 3, sd.resolution, sd.resolution), generator=g) * 2 - 1
    return images, ["chest x-ray showing cardiomegaly", "chest x-ray showing pleural effusion"][:n]


def test_loss_decreases_and_frozen_parts_stay_bit_identical(tiny_family):
    from prism_ray.models.loading import load_sd_components

    sd = load_sd_components(str(tiny_family), device="cpu")  # a private copy: we train its U-Net
    vae_before, text_before = module_digest(sd.vae), module_digest(sd.text_encoder)
    scheduler = make_noise_scheduler("epsilon")
    images, captions = _fixed_batch(sd)
    sd.unet.train()
    optimizer = torch.optim.AdamW(sd.unet.parameters(), lr=2e-3, weight_decay=1e-2)
    losses = []
    for _ in range(8):
        # Same noise and timesteps every step: a fixed batch must be fit.
        out = training_loss(sd, scheduler, images, captions, generator=step_generator(0, 0, 0))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert module_digest(sd.vae) == vae_before
    assert module_digest(sd.text_encoder) == text_before
    assert not any(p.requires_grad for p in sd.vae.parameters())


def test_v_prediction_target_and_cached_latents_match_the_pixel_path(tiny_sd):
    images, captions = _fixed_batch(tiny_sd)
    from prism_ray.training.diffusion import image_latents

    z = image_latents(tiny_sd.vae, images)
    ctx = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, captions)
    assert ctx.shape == (2, 77, tiny_sd.text_encoder.config.hidden_size)
    for kind in ("epsilon", "v_prediction"):
        s = make_noise_scheduler(kind)
        with torch.no_grad():
            cached = diffusion_loss(tiny_sd.unet, s, z, ctx, step_generator(3, 0, 7)).loss
            pixels = training_loss(tiny_sd, s, images, captions, generator=step_generator(3, 0, 7)).loss
        assert torch.equal(cached, pixels)
    with torch.no_grad():
        eps = diffusion_loss(tiny_sd.unet, make_noise_scheduler("epsilon"), z, ctx, step_generator(3, 0, 7)).loss
    assert not torch.equal(eps, cached)  # v-target differs from the noise target


def test_sample_latents_differ_from_mean(tiny_sd):
    from prism_ray.training.diffusion import image_latents

    images, _ = _fixed_batch(tiny_sd)
    mean = image_latents(tiny_sd.vae, images, "mean")
    sample = image_latents(tiny_sd.vae, images, "sample", torch.Generator().manual_seed(0))
    assert mean.shape == sample.shape == (2, 4, tiny_sd.resolution // 4, tiny_sd.resolution // 4)
    assert not torch.equal(mean, sample)


def test_prepare_examples_flags_bad_rows(tmp_path):
    from prism_ray.data.storage import write_png

    write_png(np.full((80, 96), 128, np.uint8), str(tmp_path / "ok.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [
        {"image_uri": "ok.png", "caption": "chest x-ray"},
        {"image_uri": "missing.png", "caption": "chest x-ray"},
        {"image_uri": "bad.png", "caption": "chest x-ray"},
        {"image_uri": "ok.png", "caption": "  "},
    ]
    out = prepare_examples(
        rows, image_column="image_uri", image_root=str(tmp_path), resolution=64, caption_fn=lambda r: r["caption"]
    )
    assert out[0]["error"] == "" and out[0]["pixels"].shape == (3, 64, 64) and out[0]["pixels"].dtype == np.uint8
    assert int(out[0]["pixels"][0, 0, 0]) == 128
    assert out[1]["error"] == "image: file not found"
    assert out[2]["error"].startswith("image: corrupt")
    assert out[3]["error"] == "caption: empty caption"


def test_export_loads_and_sampling_runs(tiny_family, tiny_sd, tmp_path):
    from prism_ray.models.loading import load_sd_components

    state = {k: v + 0.01 for k, v in tiny_sd.unet.state_dict().items()}
    out = export_diffusers(tiny_family, state, str(tmp_path / "export"), metadata={"step": 3})
    loaded = load_sd_components(out, device="cpu")
    assert torch.equal(loaded.unet.state_dict()["conv_in.weight"], state["conv_in.weight"])
    assert module_digest(loaded.vae) == module_digest(tiny_sd.vae)
    images = sample_images(loaded.unet, loaded, ["chest x-ray"], num_inference_steps=2)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8


def test_core_imports_without_ray_or_deepspeed():
    code = (
        "import sys, prism_ray.training.diffusion, prism_ray.training.callbacks, prism_ray.training.examples,"
        " prism_ray.training.export, prism_ray.pipelines.deepspeed_config, prism_ray.pipelines.finetune;"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shipped_tiny_config_is_valid():
    from pathlib import Path

    from prism_ray.config import load_config

    configs = Path(__file__).parents[1] / "configs"
    config = load_config(FinetuneConfig, [configs / "finetune_tiny.yaml", configs / "compute" / "finetune_cpu.yaml"])
    ds = build_deepspeed_config(config)
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 4
