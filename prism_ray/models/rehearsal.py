"""A rehearsal family: SD v1.5's exact architecture and an OpenAI CLIP ViT-L/14-shaped scorer, random weights.

No weights can be downloaded on a machine without internet, but the shapes of SD v1.5 and CLIP
ViT-L/14 are public. This module writes both from configs spelled out here (the values of the
released `config.json` files), so that every shape-dependent path of the project (16 cross-attention
layers, 77-token prompts against a 49,408-token vocabulary, 224 px CLIP preprocessing, DeepSpeed over
an 860M-parameter U-Net, GB-size weights digests, the fine-tune's export) runs end to end before a
user's cluster does (docs/rehearsal.md).

`scale="full"` is the real shape. `scale="reduced"` keeps SD v1.5's layer layout (4 U-Net levels with
2 layers each, 16 attention layers, 8 heads, 768-wide cross-attention and text, 77 tokens, the SD
tokenizer's vocabulary size, the x8 VAE, 224 px / patch 14 CLIP) at narrow widths and 2 transformer
layers, for CI. The vocabulary's content is synthetic: the caption words as whole tokens, every
byte, and filler tokens up to SD's 49,408 entries with the special tokens at SD's ids.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Literal

import torch

Scale = Literal["full", "reduced"]

# --- the released configs (runwayml/stable-diffusion-v1-5, openai/clip-vit-large-patch14) ------------

SD15_UNET: dict = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE: dict = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIP ViT-L/14's text tower: SD v1.5's text encoder and the scorer's text side. eos_token_id = 2 is
# the released value: transformers then pools at the highest token id, which is <|endoftext|>.
CLIP_L14_TEXT: dict = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

CLIP_L14_VISION: dict = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 224,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}

CLIP_L14: dict = {"projection_dim": 768, "logit_scale_init_value": 2.6592}

SD15_SCHEDULER: dict = {  # the folder's own scheduler (the engine builds its reference DDIM from it)
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

CLIP_PREPROCESSOR: dict = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": {"shortest_edge": 224},
}

VOCAB_SIZE = 49408
SPECIAL_IDS = {"<|startoftext|>": 49406, "<|endoftext|>": 49407}

# Parameter counts of the released weights, for the checks below and the tests.
SD15_PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
CLIP_L14_PARAMETERS = 427_616_513

# The reduced scale: the same layout at narrow widths, 2 transformer layers per tower.
REDUCED = {
    "unet": {"block_out_channels": [32, 64, 128, 128]},
    "vae": {"block_out_channels": [32, 64, 64, 64]},
    "text": {"num_hidden_layers": 2},
    "vision": {"num_hidden_layers": 2},
}


def component_configs(scale: Scale = "full", resolution: int = 512) -> dict[str, dict]:
    """The unet / vae / text / vision / clip config values of a rehearsal family at `scale`.

    `resolution` (a multiple of 64) sets the U-Net's and VAE's `sample_size` only: the architecture
    does not depend on it, a CPU rehearsal needs smaller images than SD's 512 px.
    """
    if scale not in ("full", "reduced"):
        raise ValueError(f"scale {scale!r}: expected 'full' or 'reduced'")
    if resolution % 64 or not 64 <= resolution <= 1024:
        raise ValueError(f"resolution {resolution}: must be a multiple of 64 in [64, 1024]")
    configs = {
        "unet": dict(copy.deepcopy(SD15_UNET), sample_size=resolution // 8),
        "vae": dict(copy.deepcopy(SD15_VAE), sample_size=resolution),
        "text": copy.deepcopy(CLIP_L14_TEXT),
        "vision": copy.deepcopy(CLIP_L14_VISION),
        "clip": copy.deepcopy(CLIP_L14),
    }
    if scale == "reduced":
        for name, changes in REDUCED.items():
            configs[name].update(copy.deepcopy(changes))
    return configs


def _bpe_merges(words: list[str], pieces) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens and merges, in an order fixed by `words` alone, that make every pre-tokenized piece one token.

    Each piece (CLIP style: the last symbol carries `</w>`) is run through the merges so far; while it is
    more than one token, the merge of its first two tokens is appended. A merge appended later has a
    higher rank than every earlier one, so it never changes a piece that already was one token.
    """
    rank: dict[tuple[str, str], int] = {}
    tokens: list[str] = []

    def encode(symbols: list[str]) -> list[str]:
        while len(symbols) > 1:
            pairs = [(rank.get(pair, len(rank)), i) for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))]
            best, i = min(pairs)
            if best == len(rank):
                break
            symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
        return symbols

    for piece in sorted({p for w in words for p in pieces(w)}):
        symbols = encode(list(piece[:-1]) + [piece[-1] + "</w>"])
        while len(symbols) > 1:
            rank[(symbols[0], symbols[1])] = len(rank)
            tokens.append(symbols[0] + symbols[1])
            symbols = encode(symbols)
    return tokens, sorted(rank, key=rank.get)


def build_tokenizer():
    """A CLIP BPE tokenizer with SD v1.5's vocabulary size, special-token ids and 77-token limit.

    Its content: every byte (alone and word-final), the caption words of the tiny family as whole
    tokens, and unreachable filler tokens up to 49,408 entries, <|startoftext|> = 49406 and
    <|endoftext|> = 49407 as in SD. Built without a trainer, so the files are the same in every build.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    from prism_ray.models.tiny import CAPTION_WORDS

    reference = CLIPTokenizer()  # empty vocab: CLIP's normaliser and pre-tokeniser only
    backend = reference.backend_tokenizer

    def pieces(text: str) -> list[str]:
        return [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged, merges = _bpe_merges(sorted(set(CAPTION_WORDS)), pieces)
    words = list(dict.fromkeys([*alphabet, *(c + "</w>" for c in alphabet), *merged]))
    filler = [f"<|unused{i}|>" for i in range(VOCAB_SIZE - len(SPECIAL_IDS) - len(words))]
    vocab = {token: i for i, token in enumerate(words + filler)}
    vocab.update(SPECIAL_IDS)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>",
                              unk_token="<|endoftext|>")
    for word in CAPTION_WORDS:
        for piece in pieces(word):
            if len(tokenizer(piece, add_special_tokens=False).input_ids) != 1:
                raise AssertionError(f"rehearsal tokenizer: {piece!r} is not one token")
    return tokenizer


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _modules(configs: dict[str, dict], *, meta: bool, seed: int):
    """(text_encoder, vae, unet, clip) built from `configs`; on the meta device (no memory) if `meta`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(**configs["text"])
    clip_config = CLIPConfig(text_config=configs["text"], vision_config=configs["vision"], **configs["clip"])
    builders = {
        "text_encoder": lambda: CLIPTextModel(text_config),
        "vae": lambda: AutoencoderKL(**configs["vae"]),
        "unet": lambda: UNet2DConditionModel(**configs["unet"]),
        "clip": lambda: CLIPModel(clip_config),
    }
    modules = {}
    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed + i)  # one stream per component: the same weights whatever is built before
        if meta:
            from accelerate import init_empty_weights  # (it imports DeepSpeed, which warns; only here)

            with init_empty_weights():
                modules[name] = build()
        else:
            modules[name] = build().eval()
    return modules


def parameter_counts(scale: Scale = "full") -> dict[str, int]:
    """Parameters per component, counted on the meta device (instant, no memory)."""
    return {name: count_parameters(m) for name, m in _modules(component_configs(scale), meta=True, seed=0).items()}


def build_rehearsal_family(out_dir: str | Path, *, scale: Scale = "full", resolution: int = 512,
                           seed: int = 0) -> dict[str, Path]:
    """Write `<out>/sd15` (a diffusers SD v1.5 folder) and `<out>/clip-vit-large-patch14` (the scorer).

    Random weights, fp32 safetensors, seeded: two builds with the same arguments write identical files.
    Returns {"model": ..., "clip": ...}. Full scale: about 6 GB on disk.
    """
    from diffusers import PNDMScheduler

    from prism_ray.models.loading import quiet_progress_bars
    from prism_ray.models.tiny import save_sd_tokenizer, write_model_index

    quiet_progress_bars()
    out = Path(out_dir)
    sd, scorer = out / "sd15", out / "clip-vit-large-patch14"
    configs = component_configs(scale, resolution)
    tokenizer = build_tokenizer()
    modules = _modules(configs, meta=False, seed=seed)
    save_sd_tokenizer(tokenizer, sd / "tokenizer")
    for name in ("text_encoder", "vae", "unet"):
        modules[name].save_pretrained(sd / name, safe_serialization=True)
        del modules[name]  # the full U-Net is 3.4 GB: free each component once written
    PNDMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"}).save_pretrained(
        sd / "scheduler")
    (sd / "feature_extractor").mkdir(parents=True, exist_ok=True)
    (sd / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    write_model_index(sd)
    index = json.loads((sd / "model_index.json").read_text())
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (sd / "model_index.json").write_text(json.dumps(index, indent=2))
    modules["clip"].save_pretrained(scorer, safe_serialization=True)
    save_sd_tokenizer(tokenizer, scorer)
    (scorer / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR, indent=2))
    (out / "rehearsal_family.json").write_text(json.dumps(
        {"scale": scale, "resolution": resolution, "seed": seed, "configs": configs}, indent=2))
    return {"model": sd, "clip": scorer}
