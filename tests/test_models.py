"""The tiny family is a complete SD-shaped diffusers folder that loads through the production loader."""

import json
from pathlib import Path

import fsspec
import pytest
import torch

from prism_ray.models.loading import load_clip, load_sd_components, resolve_model_root


def test_tiny_family_layout(tiny_family):
    index = json.loads((tiny_family / "model_index.json").read_text())
    for part in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
        assert part in index and (tiny_family / part).is_dir()
    # Safetensors only: nothing that would need unpickling.
    assert not list(tiny_family.rglob("*.bin")) and not list(tiny_family.rglob("*.pt"))
    assert list((tiny_family / "unet").glob("*.safetensors"))
    # The SD1.5 tokenizer files, not a tokenizer.json shortcut.
    assert {p.name for p in (tiny_family / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}


def test_tiny_family_loads_and_denoises(tiny_sd):
    sd = tiny_sd
    assert sd.resolution == 64 and sd.vae_scale_factor == 4
    # Frozen parts are frozen; the U-Net is the only trainable module.
    assert not any(p.requires_grad for p in sd.vae.parameters())
    assert not any(p.requires_grad for p in sd.text_encoder.parameters())
    ids = sd.tokenizer(
        ["Chest X-ray showing Cardiomegaly, Support Devices"],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    # Caption words are single tokens, as prompt-to-prompt word indexing expects of CLIP.
    tokens = sd.tokenizer.convert_ids_to_tokens(ids[0, :10])
    assert tokens[:6] == ["<|startoftext|>", "chest</w>", "x</w>", "-</w>", "ray</w>", "showing</w>"]
    context = sd.text_encoder(ids)[0]
    assert context.shape == (1, 77, 32)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = sd.vae.encode(image).latent_dist.mean * sd.scaling_factor
    assert latents.shape == (1, 4, 16, 16)
    with torch.no_grad():
        eps = sd.unet(latents, torch.tensor([981]), encoder_hidden_states=context).sample
    assert eps.shape == latents.shape and torch.isfinite(eps).all()
    # Cross-attention at two U-Net resolutions (16x16 and 8x8) plus the mid block.
    cross = [n for n in sd.unet.attn_processors if "attn2" in n]
    assert {n.split(".")[0] for n in cross} == {"down_blocks", "mid_block", "up_blocks"}
    assert len(cross) == 7


def test_clip_shares_the_text_tower(tiny_family, tiny_sd):
    clip = load_clip(str(tiny_family), device="cpu")
    assert clip.image_size == 64
    assert torch.equal(
        clip.model.text_model.embeddings.token_embedding.weight,
        tiny_sd.text_encoder.embeddings.token_embedding.weight,
    )


def test_fsspec_uri_is_copied_to_cache(tiny_family, tmp_path):
    fs = fsspec.filesystem("memory")
    for path in tiny_family.rglob("*"):
        if path.is_file():
            fs.pipe(f"/models/tiny/{path.relative_to(tiny_family)}", path.read_bytes())
    root = resolve_model_root("memory://models/tiny", cache_dir=tmp_path)
    assert str(root).startswith(str(tmp_path))
    sd = load_sd_components("memory://models/tiny", device="cpu", cache_dir=tmp_path)
    assert sd.resolution == 64


def test_missing_or_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model_root(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_sd_components(str(tmp_path / "half"), device="cpu")


SHIPPED = Path(__file__).resolve().parents[1] / "prism_ray" / "phantom" / "assets" / "tiny_phantom"


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="no shipped tiny_phantom family")
def test_random_family_has_the_shipped_architecture(tiny_family):
    """One architecture (models.tiny's factories): the random test family differs from the trained one only in weights."""
    for part in ("unet", "vae", "text_encoder", "clip", "scheduler"):
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        ours, shipped = (json.loads((root / part / name).read_text()) for root in (tiny_family, SHIPPED))
        for config in (ours, shipped):
            for key in ("_diffusers_version", "transformers_version", "scaling_factor"):  # VAE scale: trained = 1/std
                config.pop(key, None)
        assert ours == shipped, part
