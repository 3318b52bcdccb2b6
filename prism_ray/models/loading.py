"""Load SD components and the filter CLIP from a diffusers-layout folder (path, fsspec URI or hub id)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
import yaml

log = logging.getLogger(__name__)

# Only these are ever fetched or read: configs, tokenizer files and safetensors weights.
# Pickled weights (*.bin, *.ckpt, *.pt) are never downloaded and never unpickled.
ALLOWED_PATTERNS = ("*.json", "*.txt", "*.safetensors", "*.model", "*.md")
SD_SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
TINY = "tiny"


@dataclass
class SDComponents:
    """The frozen and trainable parts of a Stable Diffusion v1.x model."""

    tokenizer: Any  # transformers.CLIPTokenizer
    text_encoder: Any  # transformers.CLIPTextModel
    vae: Any  # diffusers.AutoencoderKL
    unet: Any  # diffusers.UNet2DConditionModel
    scheduler: Any  # the scheduler stored in the folder (the engine builds its own DDIM)
    root: Path
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Image side the U-Net was built for (512 for SD1.5)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        """What the U-Net predicts, from the model's scheduler config: "epsilon" (SD v1.x) or "v_prediction" (SD 2.x)."""
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def model_id(self) -> str:
        """Short content id of the U-Net weights' location (goes into counterfactual ids)."""
        return hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:12]


@dataclass
class ClipComponents:
    """A CLIP model (image + text towers with projections) and its tokenizer, for scoring."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any
    image_size: int
    root: Path
    device: torch.device


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"dtype '{dtype}': expected float32, bfloat16 or float16") from None


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRISM_RAY_CACHE", Path.home() / ".cache" / "prism_ray"))


def _copy_fsspec_folder(uri: str, cache_dir: Path) -> Path:
    """Copy the allowed files of a remote diffusers folder into a local cache (once)."""
    local = cache_dir / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = local / ".complete"
    if done.exists():
        return local
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.exists(root):
        raise FileNotFoundError(f"model '{uri}': no such folder")
    files = [p for p in fs.find(root) if any(Path(p).match(pat) for pat in ALLOWED_PATTERNS)]
    if not files:
        raise FileNotFoundError(f"model '{uri}': no config or safetensors files found")
    for remote in files:
        rel = posixpath.relpath(remote, root)
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get(remote, str(target))
    done.write_text(uri)
    return local


def resolve_model_root(path: str, cache_dir: str | Path | None = None) -> Path:
    """Turn a local path, an fsspec URI or a hub id into a local diffusers folder."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if path == TINY:
        from prism_ray.models.tiny import tiny_family_path

        return tiny_family_path(cache)
    if "://" in path and not path.startswith("file://"):
        return _copy_fsspec_folder(path, cache)
    local = Path(path.removeprefix("file://")).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"model '{path}': not a folder")
        return local
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model '{path}': no such folder (and not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download  # hub ids only; imported on use

    return Path(snapshot_download(path, allow_patterns=list(ALLOWED_PATTERNS), cache_dir=str(cache / "hub")))


def _require(root: Path, sub: str) -> Path:
    folder = root / sub
    if not (folder / "config.json").exists() and not (folder / "scheduler_config.json").exists():
        if sub != "tokenizer" or not folder.exists():
            raise FileNotFoundError(f"model '{root}': missing component folder '{sub}/'")
    return folder


def check_model_folder(path: str, cache_dir: str | Path | None = None) -> Path:
    """The resolved local folder of an SD model, with every component present; FileNotFoundError
    naming the folder otherwise. Jobs call it on the driver, before any worker loads the model."""
    root = resolve_model_root(path, cache_dir)
    for sub in SD_SUBFOLDERS:
        _require(root, sub)
    return root


def require_supported_prediction(root: Path) -> str:
    """The model's scheduler `prediction_type` if the editing engine supports it ("epsilon" or "v_prediction",
    which the engine turns into noise where the DDIM step needs it); a one-line ValueError naming the field
    otherwise. Jobs call it on the driver, before any worker loads the model."""
    from prism_ray.engine.scheduler import check_prediction_type

    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    try:
        return check_prediction_type(config.get("prediction_type", "epsilon"))
    except ValueError as err:
        raise ValueError(f"model '{root}': {err}") from None


def quiet_progress_bars() -> None:
    """No per-file "Loading weights" bars: every actor and worker loads models, and the bars
    drown the jobs' own progress lines. Without CUDA, DeepSpeed (imported by diffusers' and transformers'
    integrations) would pick its CPU accelerator and warn that it did: name it, so it does not warn."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def load_sd_components(
    path: str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> SDComponents:
    """Load tokenizer, text encoder, VAE, U-Net and scheduler; VAE and text encoder are frozen."""
    from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_progress_bars()
    root = check_model_folder(path, cache_dir)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True, dtype=dt)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", use_safetensors=True, torch_dtype=dt)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", use_safetensors=True, torch_dtype=dt)
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    scheduler = _scheduler_from_config(scheduler_config, SchedulerMixin)
    for module in (text_encoder, vae, unet):
        module.to(dev).eval()
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    return SDComponents(tokenizer, text_encoder, vae, unet, scheduler, root, dev, dt)


def _scheduler_from_config(config: dict, base: type) -> Any:
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"), None)
    if cls is None or not issubclass(cls, base):
        raise ValueError(f"scheduler: unknown class {config.get('_class_name')!r}")
    return cls.from_config(config)


def load_clip(
    path: str,
    *,
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
) -> ClipComponents:
    """Load a CLIP model (transformers layout, safetensors) and its tokenizer for scoring."""
    from transformers import CLIPModel, CLIPTokenizer

    quiet_progress_bars()
    root = resolve_model_root(path, cache_dir)
    if (root / "clip" / "config.json").exists():  # a diffusers folder carrying its filter CLIP
        root = root / "clip"
    if not (root / "config.json").exists():
        raise FileNotFoundError(f"clip model '{path}': no config.json")
    dev = resolve_device(device)
    model = CLIPModel.from_pretrained(root, use_safetensors=True).to(dev).eval()
    model.requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(root)
    return ClipComponents(model, tokenizer, int(model.config.vision_config.image_size), root, dev)


METHOD_DEFAULTS_FILE = "prism_ray_method.yaml"  # a family's recommended method settings, by config section


def family_method_defaults(root: str | Path) -> dict[str, dict]:
    """The recommended method settings a model folder carries (`prism_ray_method.yaml`), else {}.

    Sections name config sections (`inversion`, `edit`); `pipelines` apply them to the fields a user
    left unset. Plain YAML, never executed; a malformed file is a config error naming it.
    """
    path = Path(root) / METHOD_DEFAULTS_FILE
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected sections of settings, e.g. 'inversion: {{num_inference_steps: 20}}'")
    return data


def weights_digest(*roots: str | Path, chunk: int = 1 << 23) -> str:
    """sha256 over every weight and config file under `roots` (relative names + bytes), 16 hex digits.

    Results ids include it, so outputs of a re-exported model at the same path never pass for the
    old model's. Reads the weights once (~1 GB/s: a few seconds for SD v1.5 + CLIP ViT-L).
    """
    h = hashlib.sha256()
    for root in roots:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt"))
        for path in files:
            h.update(str(path.relative_to(root)).encode() + b"\0")
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
    return h.hexdigest()[:16]
