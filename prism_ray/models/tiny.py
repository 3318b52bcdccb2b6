"""The tiny model family: a complete SD-shaped diffusers folder with small components, built in seconds."""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from pathlib import Path

import torch
from pydantic import Field

from prism_ray.config import BaseConfig

# Words of every caption template and common edit prompts; each becomes a single token so that
# prompt-to-prompt word -> token mapping behaves as with the real CLIP vocabulary.
CAPTION_WORDS = """
chest x-ray showing normal with no significant findings finding of a an the patient subject
years old year-old male female man woman white black asian hispanic latino other unknown
enlarged cardiomediastinum cardiomegaly lung opacity lesion edema consolidation pneumonia
atelectasis pneumothorax pleural effusion fracture support devices device and without lots
severe mild moderate large small heart pacemaker tube tubes line lines ecg electrodes wire
dermoscopic image melanoma nevus melanocytic mel nv hair hairs gel bubbles bubble ruler rulers
ink artifacts artifact skin lesion photo radiograph frontal lateral view older younger
""".split()

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
TINY_SEED = 0


def build_tiny_tokenizer(words: list[str] | None = None):
    """A CLIP BPE tokenizer whose vocabulary holds the caption words whole, plus every byte."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    words = sorted(set(CAPTION_WORDS if words is None else words))
    reference = CLIPTokenizer()  # empty vocab; we only borrow CLIP's normaliser and pre-tokeniser
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=SPECIAL_TOKENS[1]))
    bpe.normalizer = reference.backend_tokenizer.normalizer
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # never reached: training stops when every word is one token
        special_tokens=list(SPECIAL_TOKENS),
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    # Single characters as whole words give every printable character its "x</w>" token too.
    corpus = words + list(string.ascii_lowercase + string.digits + string.punctuation)
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)


def save_sd_tokenizer(tokenizer, folder: Path) -> None:
    """Write vocab.json + merges.txt + tokenizer_config.json, the files SD v1.5's tokenizer has."""
    folder.mkdir(parents=True, exist_ok=True)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    lines = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
        "unk_token": SPECIAL_TOKENS[1],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def tiny_text_config(vocab_size: int, eos_token_id: int, bos_token_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,  # prompt-to-prompt token maps are 77 x 77, as in SD
        projection_dim=32,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def build_tiny_family(
    out_dir: str | Path,
    *,
    seed: int = TINY_SEED,
    resolution: int = 64,
    words: list[str] | None = None,
) -> Path:
    """Write a diffusers-layout SD folder (random weights) plus a matching `clip/` filter model.

    Shapes: images `resolution`^2, VAE with 3 blocks (x4 downsampling), U-Net with cross-attention
    at two resolutions plus the mid block, text width 32; the same files real SD v1.5 has.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionConfig

    if resolution % 16:
        raise ValueError(f"resolution {resolution}: must be a multiple of 16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = build_tiny_tokenizer(words)
    save_sd_tokenizer(tokenizer, out / "tokenizer")
    text_config = tiny_text_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id)
    text_encoder = CLIPTextModel(text_config).eval()
    text_encoder.save_pretrained(out / "text_encoder")

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(out / "vae")

    unet = UNet2DConditionModel(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_config.hidden_size,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet.save_pretrained(out / "unet")

    # The reference DDIM settings (ALGORITHM.md section 2); SD1.5 ships the same betas.
    DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(out / "scheduler")

    # Filter CLIP: same text tower as the SD text encoder (as CLIP ViT-L/14 is for SD1.5).
    clip_config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=resolution,
            patch_size=8,
            projection_dim=32,
        ).to_dict(),
        projection_dim=32,
    )
    clip = CLIPModel(clip_config).eval()
    clip.text_model.load_state_dict(text_encoder.state_dict())
    clip.save_pretrained(out / "clip")
    save_sd_tokenizer(tokenizer, out / "clip")

    write_model_index(out)
    return out


def write_model_index(out: Path) -> None:
    """The StableDiffusionPipeline model_index.json of an SD v1.x folder (no safety checker)."""
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2))


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def tiny_family_path(cache_dir: Path, seed: int = TINY_SEED) -> Path:
    """The shipped trained tiny family if the package carries one, else a random one built once."""
    shipped = Path(__file__).resolve().parents[1] / "phantom" / "assets" / "tiny_phantom"
    if (shipped / "model_index.json").exists():
        return shipped
    target = cache_dir / f"tiny-random-{seed}"
    if (target / "model_index.json").exists():
        return target
    # Build next to the target and rename, so concurrent workers never see a half-written folder.
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tiny-"))
    build_tiny_family(tmp, seed=seed)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class TinyFamilyConfig(BaseConfig):
    """`prism-ray tiny-family`: where to write a random-weight tiny family."""

    out: str = Field(..., min_length=1, description="output folder")
    seed: int = Field(TINY_SEED, ge=0)
    resolution: int = Field(64, ge=16, le=1024, multiple_of=16)


def run_tiny_family(config: TinyFamilyConfig) -> Path:
    path = build_tiny_family(config.out, seed=config.seed, resolution=config.resolution)
    print(f"tiny family written to {path}")
    return path
