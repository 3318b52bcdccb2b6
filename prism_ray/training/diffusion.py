"""The fine-tuning math without Ray or DeepSpeed: latents, text embeddings, the diffusion loss, export."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# DDPM training schedule of SD1.5 (ALGORITHM.md section 2): same betas as the DDIM sampler.
TRAIN_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CAPTION_COLUMN = "caption"
# Components copied verbatim into an exported model folder (the U-Net is written fresh).
EXPORT_COPY = ("model_index.json", "tokenizer", "text_encoder", "vae", "scheduler", "clip")


# --- schedule and conditioning ---------------------------------------------------------------


def make_noise_scheduler(prediction_type: str = "epsilon", num_train_timesteps: int = 1000):
    """DDPM with betas 0.00085 -> 0.012 (scaled_linear) and `num_train_timesteps` steps."""
    from diffusers import DDPMScheduler

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type, **TRAIN_SCHEDULE)


def model_prediction_type(model_scheduler: Any, override: str | None = None) -> str:
    """The training target: `override` if given, else the model folder's scheduler config (default epsilon)."""
    if override is not None:
        return override
    return str(getattr(model_scheduler, "config", {}).get("prediction_type", "epsilon"))


@torch.no_grad()
def text_embeddings(tokenizer, text_encoder, captions: Sequence[str]) -> torch.Tensor:
    """Captions -> the text encoder's last hidden state (B, 77, D), padded to the model length as SD does."""
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


@torch.no_grad()
def latent_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, R, R) in [-1, 1] -> (mean, std) of the latent posterior, both times the scaling factor."""
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return posterior.mean * scale, posterior.std * scale


def latents_from_moments(
    mean: torch.Tensor, std: torch.Tensor | None, mode: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`mode="mean"` (PRISM) returns the mean; `"sample"` draws mean + std * eps (works on cached moments)."""
    if mode == "mean":
        return mean
    if mode != "sample":
        raise ValueError(f"latents {mode!r}: expected 'mean' or 'sample'")
    if std is None:
        raise ValueError("latents 'sample' needs the posterior std")
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu").to(mean.device)
    return mean + std * eps


def image_latents(vae, images: torch.Tensor, mode: str = "mean", generator: torch.Generator | None = None):
    """Frozen-VAE latents of (N, 3, R, R) images: posterior mean x scaling factor, or a sample."""
    mean, std = latent_moments(vae, images)
    return latents_from_moments(mean, std, mode, generator)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """One CPU generator per (seed, worker, step): a resumed run draws the same noise a straight run would."""
    key = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


# --- the loss --------------------------------------------------------------------------------


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, fp32, carries the U-Net's graph
    timesteps: torch.Tensor  # (B,)


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """The denoising objective on (cached or fresh) latents: noise, random t, DDPM add_noise, MSE.

    The target is the noise for `epsilon` and the velocity for `v_prediction`, per the scheduler's
    config. Noise and timesteps come from `generator` on CPU so that runs are reproducible on any device.
    """
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    latents = latents.to(device, torch.float32)
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(device)  # (B, 4, h, w)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")
    pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states.to(device, dtype)).sample
    # MSE in fp32 even when the U-Net runs in bf16/fp16.
    return LossOutput(F.mse_loss(pred.float(), target.float(), reduction="mean"), timesteps)


def training_loss(
    sd,
    noise_scheduler,
    images: torch.Tensor,
    captions: Sequence[str],
    *,
    latents: str = "mean",
    generator: torch.Generator | None = None,
    unet=None,
) -> LossOutput:
    """Full step from pixels: frozen VAE + text encoder, then `diffusion_loss` on `unet` (default sd.unet)."""
    z = image_latents(sd.vae, images, latents, generator)
    context = text_embeddings(sd.tokenizer, sd.text_encoder, captions)
    return diffusion_loss(unet if unet is not None else sd.unet, noise_scheduler, z, context, generator)


def configure_unet(unet, *, gradient_checkpointing: bool = False, attention: str = "sdpa") -> None:
    """Trainable U-Net setup: gradient checkpointing and the attention processor (SDPA, xformers, eager)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.requires_grad_(True)
    unet.train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if attention == "sdpa":
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ValueError("train.attention 'sdpa': this torch has no scaled_dot_product_attention")
        unet.set_attn_processor(AttnProcessor2_0())
    elif attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()  # raises a clear error if xformers is missing
    elif attention == "eager":
        unet.set_attn_processor(AttnProcessor())
    else:
        raise ValueError(f"train.attention {attention!r}: expected sdpa, xformers or eager")


# --- rows -> training examples ---------------------------------------------------------------


def caption_source(columns: Sequence[str], adapter_name: str, adapter_options: Mapping[str, Any]):
    """A `row -> caption` function: the manifest's `caption` column if present, else the dataset adapter."""
    if CAPTION_COLUMN in columns:
        return lambda row: row.get(CAPTION_COLUMN)
    from prism_ray.data.captions import get_adapter

    return get_adapter(adapter_name, **dict(adapter_options)).caption


def prepare_examples(
    rows: Sequence[Mapping[str, Any]],
    *,
    image_column: str,
    image_root: str | None,
    resolution: int,
    caption_fn,
) -> list[dict]:
    """Manifest rows -> {uri, pixels (3, R, R) uint8, caption, error}; a bad row gets an `error`, never raises.

    Missing/corrupt images, empty captions and rows the caption policy rejects are reported per row
    (zero pixels, empty caption) so that the caller can count and skip them.
    """
    from prism_ray.data.storage import ImageReadError, read_image, resolve_uri

    out = []
    blank = np.zeros((3, resolution, resolution), np.uint8)
    for row in rows:
        uri = str(row.get(image_column) or "")
        example = {"uri": uri, "pixels": blank, "caption": "", "error": ""}
        try:
            caption = caption_fn(row)
            if caption is None or not str(caption).strip():
                raise ValueError("empty caption")
            if not uri:
                raise ImageReadError(uri, "empty image URI")
            image = read_image(resolve_uri(uri, image_root))
            x = _to_training_pixels(image, resolution)
        except ImageReadError as err:
            example["error"] = f"image: {err.reason}"
        except ValueError as err:  # empty caption, RowRejected (a ValueError) from the adapter
            example["error"] = f"caption: {err}"
        else:
            example.update(pixels=x, caption=str(caption))
        out.append(example)
    return out


def _to_training_pixels(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (3, R, R): the method's square crop + resize, kept as bytes to move cheaply."""
    from prism_ray.engine.images import preprocess

    x = preprocess([image], resolution)[0]  # (3, R, R) in [-1, 1]
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def pixels_to_model_input(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, R, R) -> float (N, 3, R, R) in [-1, 1] (`x / 127.5 - 1`, ALGORITHM.md section 1)."""
    return torch.tensor(np.asarray(pixels)).float() / 127.5 - 1.0  # copies: Ray hands out read-only arrays


# --- validation images -----------------------------------------------------------------------


@torch.no_grad()
def sample_images(
    unet,
    sd,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 10,
    guidance_scale: float = 7.5,
    seed: int = 0,
) -> np.ndarray:
    """A few deterministic DDIM steps with classifier-free guidance -> uint8 (N, R, R, 3) for the prompts."""
    from prism_ray.engine.scheduler import DDIMSteps, make_ddim_scheduler
    from prism_ray.engine.images import decode

    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    steps = DDIMSteps(make_ddim_scheduler(num_inference_steps))
    cond = text_embeddings(sd.tokenizer, sd.text_encoder, list(prompts)).to(device, dtype)
    uncond = text_embeddings(sd.tokenizer, sd.text_encoder, [""] * len(prompts)).to(device, dtype)
    latent_side = sd.resolution // sd.vae_scale_factor
    shape = (len(prompts), unet.config.in_channels, latent_side, latent_side)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = unet.training
    unet.eval()
    try:
        for t in steps.timesteps:
            eps = unet(torch.cat([z, z]).to(dtype), t, torch.cat([uncond, cond])).sample.float()  # (2N, 4, h, w)
            eps_u, eps_c = eps.chunk(2)
            z = steps.prev_step(eps_u + guidance_scale * (eps_c - eps_u), int(t), z)
    finally:
        unet.train(was_training)
    return decode(sd.vae, z)


# --- weights and export ----------------------------------------------------------------------


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names and fp32 values, in name order: equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    return state_dict_digest(module.state_dict())


def export_diffusers(
    model_root: str | Path,
    unet_state_dict: Mapping[str, torch.Tensor],
    out_uri: str,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Write a diffusers folder: the original components copied, plus the fine-tuned U-Net (safetensors).

    `out_uri` is a local path or any fsspec URI; the folder loads with `load_sd_components`.
    """
    import fsspec
    from diffusers import UNet2DConditionModel

    root = Path(model_root)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
    missing, unexpected = unet.load_state_dict(dict(unet_state_dict), strict=False)
    if missing or unexpected:
        raise ValueError(f"export: U-Net weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with tempfile.TemporaryDirectory(prefix="prism-export-") as tmp:
        local = Path(tmp) / "model"
        local.mkdir()
        for name in EXPORT_COPY:
            src = root / name
            if src.is_dir():
                shutil.copytree(src, local / name, ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.ckpt"))
            elif src.is_file():
                shutil.copy2(src, local / name)
        unet.save_pretrained(local / "unet", safe_serialization=True)
        if metadata:
            (local / "prism_finetune.json").write_text(json.dumps(dict(metadata), indent=2, default=str))
        fs, path = fsspec.core.url_to_fs(out_uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.makedirs(path, exist_ok=True)
        fs.put(str(local) + "/", path, recursive=True)
    return out_uri
