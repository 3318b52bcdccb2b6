"""The rehearsal family has SD v1.5's and CLIP ViT-L/14's shapes: configs field by field, parameter counts.

The expected values are written here from the released config.json files (runwayml/stable-diffusion-v1-5
unet/ vae/ text_encoder/, openai/clip-vit-large-patch14), not read from the module under test.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from prism_ray.models import rehearsal

UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT = {
    "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "max_position_embeddings": 77,
    "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-05,
}
VISION = {
    "hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 224, "intermediate_size": 4096,
    "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
    "layer_norm_eps": 1e-05, "num_channels": 3,
}
# Released parameter counts (torch numel over the safetensors of each component).
PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863, "clip": 427_616_513}


def test_full_scale_configs_are_sd15_and_clip_l14_field_by_field():
    configs = rehearsal.component_configs("full", 512)
    for name, expected in (("unet", UNET), ("vae", VAE), ("text", TEXT), ("vision", VISION)):
        for key, value in expected.items():
            assert configs[name][key] == value, f"{name}.{key}: {configs[name][key]!r} != {value!r}"
    assert configs["clip"]["projection_dim"] == 768


def test_full_scale_parameter_counts_are_the_released_ones():
    counts = rehearsal.parameter_counts("full")  # on the meta device: no memory
    for name, expected in PARAMETERS.items():
        assert abs(counts[name] - expected) <= 0.01 * expected, f"{name}: {counts[name]:,} vs {expected:,}"
    assert counts == PARAMETERS  # exact, in fact


def test_reduced_scale_keeps_the_layout_and_the_attention_dims():
    full, reduced = rehearsal.component_configs("full"), rehearsal.component_configs("reduced", 64)
    for key in ("down_block_types", "up_block_types", "layers_per_block", "attention_head_dim", "cross_attention_dim"):
        assert reduced["unet"][key] == full["unet"][key], key
    assert len(reduced["unet"]["block_out_channels"]) == 4 and reduced["unet"]["sample_size"] == 8
    assert len(reduced["vae"]["block_out_channels"]) == 4  # x8 latents, as SD's
    for key in ("hidden_size", "max_position_embeddings", "vocab_size", "num_attention_heads"):
        assert reduced["text"][key] == full["text"][key], key
    for key in ("image_size", "patch_size", "hidden_size"):
        assert reduced["vision"][key] == full["vision"][key], key
    counts = rehearsal.parameter_counts("reduced")
    assert sum(counts.values()) < 0.2 * sum(PARAMETERS.values())


def test_the_tokenizer_has_sd15s_size_special_ids_and_77_token_window():
    tok = rehearsal.build_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    ids = tok("chest x-ray showing pleural effusion and support devices", padding="max_length",
              max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert tok("pleural").input_ids[1:-1] == tok("pleural effusion").input_ids[1:2]  # words are whole tokens


@pytest.mark.parametrize("bad", [("huge", 512), ("full", 500), ("full", 32)])
def test_bad_scale_or_resolution_is_refused(bad):
    with pytest.raises(ValueError):
        rehearsal.component_configs(*bad)


@pytest.mark.slow
def test_a_reduced_family_loads_through_the_loaders_and_is_seeded(tmp_path):
    from prism_ray.models.loading import load_clip, load_sd_components, weights_digest

    a = rehearsal.build_rehearsal_family(tmp_path / "a", scale="reduced", resolution=64, seed=3)
    b = rehearsal.build_rehearsal_family(tmp_path / "b", scale="reduced", resolution=64, seed=3)
    assert weights_digest(a["model"], a["clip"]) == weights_digest(b["model"], b["clip"])  # identical bytes
    sd = load_sd_components(str(a["model"]), device="cpu")
    assert sd.resolution == 64 and sd.tokenizer.model_max_length == 77 and sd.vae_scale_factor == 8
    assert type(sd.scheduler).__name__ == "PNDMScheduler"  # SD v1.5's folder scheduler
    clip = load_clip(str(a["clip"]), device="cpu")
    assert clip.image_size == 224 and clip.model.config.vision_config.patch_size == 14
    index = json.loads((a["model"] / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    digest = hashlib.sha256((a["model"] / "unet" / "config.json").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((b["model"] / "unet" / "config.json").read_bytes()).hexdigest()


def test_sd15s_16_cross_attention_layers_and_the_reference_blend_layers():
    """On SD v1.5's U-Net (meta device): 16 controlled cross-attention layers at the reference's map sizes,
    and local blend averaging the reference's five 16 x 16 layers (down_cross[2:4] + up_cross[:3])."""
    from collections import Counter

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from prism_ray.engine.attention import blend_layers, controlled_layer_names, cross_attention_resolutions

    with init_empty_weights():
        unet = UNet2DConditionModel(**rehearsal.component_configs("full")["unet"])
    names = controlled_layer_names(unet)
    assert sum(".attn2." in n for n in names) == 16 and sum(".attn1." in n for n in names) == 16
    sizes = cross_attention_resolutions(unet, 64)
    assert Counter(sizes.values()) == {64: 5, 32: 5, 16: 5, 8: 1}
    layers, side = blend_layers(unet, 64)
    assert side == 16 and sorted(layers) == sorted(
        [f"down_blocks.2.attentions.{i}.transformer_blocks.0.attn2.processor" for i in range(2)]
        + [f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2.processor" for i in range(3)])
