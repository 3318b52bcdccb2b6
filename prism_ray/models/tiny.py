"""The tiny model family: a complete SD-shaped diffusers folder with small components, built in seconds."""

from __future__ import annotations

import json
import shutil
import string
import tempfile
from pathlib import Path

import torch

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
TINY_VAE_CHANNELS = (16, 32, 32)


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
    # The trainer numbers tokens in an order that changes from process to process (its hash maps are
    # randomly seeded); renumber them (special tokens first, then by text) so a seeded family built from
    # this tokenizer is the same family in every process.
    rest = sorted(token for token in model["vocab"] if token not in SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *rest])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


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


# --- the architecture: one factory per component, defaults = the shipped tiny_phantom family ---------


def tiny_text_config(*, vocab_size: int, bos_token_id: int, eos_token_id: int):
    """CLIP text tower, width 32: SD's text encoder and the filter CLIP's text side."""
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


def tiny_vae(
    *,
    resolution: int = 64,
    block_out_channels: tuple[int, int, int] = TINY_VAE_CHANNELS,
    scaling_factor: float = 0.18215,
):
    """AutoencoderKL with 3 blocks (x4 down: 64 -> 16 latents), 4 latent channels, fully convolutional.

    `scaling_factor`: SD's by default; the trained family stores 1 / std of its training latents.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(16, block_out_channels[0]),
        sample_size=resolution,
        scaling_factor=scaling_factor,
        mid_block_add_attention=False,  # fully convolutional: trains on crops, decodes any size
    )


TINY_UNET_CHANNELS = (32, 64)


def tiny_unet(*, resolution: int = 64, cross_attention_dim: int = 32, block_out_channels=TINY_UNET_CHANNELS):
    """UNet2DConditionModel with cross-attention at two resolutions (16^2, 8^2 for 64 px) plus the mid block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=resolution // 4,  # the VAE downsamples x4
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        # diffusers reads `attention_head_dim` as the number of heads (SD1.5's 8 heads over 320+
        # channels). Here 2 heads of 16/32 channels: 8 heads of 4/8 channels trained 1.9x slower on CPU
        # (scaled-dot-product attention dominated the step) for no use to a model this small.
        attention_head_dim=2,
        norm_num_groups=32,
    )


def tiny_clip(text_config, *, resolution: int = 64):
    """The filter CLIP: `text_config`'s text tower (as CLIP ViT-L/14's is SD1.5's) + a 3-layer ViT, patch 8."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=resolution,
        patch_size=8,
        projection_dim=32,
    )
    return CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(), projection_dim=32))


def build_tiny_family(
    out_dir: str | Path,
    *,
    seed: int = TINY_SEED,
    resolution: int = 64,
    words: list[str] | None = None,
) -> Path:
    """Write a diffusers-layout SD folder (random weights) plus a matching `clip/` filter model.

    The architecture of the shipped trained family (`tiny_*` above) with random weights; the same
    files real SD v1.5 has.
    """
    from transformers import CLIPTextModel

    if resolution % 16:
        raise ValueError(f"resolution {resolution}: must be a multiple of 16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tokenizer = build_tiny_tokenizer(words)
    text_config = tiny_text_config(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    text_encoder = CLIPTextModel(text_config).eval()
    vae = tiny_vae(resolution=resolution)
    unet = tiny_unet(resolution=resolution, cross_attention_dim=text_config.hidden_size)
    clip = tiny_clip(text_config, resolution=resolution).eval()
    clip.text_model.load_state_dict(text_encoder.state_dict())  # one text tower, as for the trained family
    save_family_folder(out, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, clip=clip)
    return out


def save_family_folder(out: Path, *, tokenizer, text_encoder, vae, unet, clip) -> None:
    """Write SD v1.5's folder layout (reference DDIM scheduler, model_index.json) plus `clip/`, fp32 safetensors."""
    from diffusers import DDIMScheduler

    from prism_ray.engine.scheduler import REFERENCE_DDIM
    from prism_ray.models.loading import quiet_progress_bars

    quiet_progress_bars()
    out.mkdir(parents=True, exist_ok=True)
    save_sd_tokenizer(tokenizer, out / "tokenizer")
    for name, module in (("text_encoder", text_encoder), ("vae", vae), ("unet", unet), ("clip", clip)):
        module.to("cpu").save_pretrained(out / name, safe_serialization=True)
    save_sd_tokenizer(tokenizer, out / "clip")
    DDIMScheduler(**REFERENCE_DDIM).save_pretrained(out / "scheduler")  # docs/method.md §4
    write_model_index(out)


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
