"""Typed job configs: YAML files plus `--set key=value` overrides, validated, hashable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

C = TypeVar("C", bound="BaseConfig")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the field."""


class BaseConfig(BaseModel):
    """Frozen, strict-about-unknown-keys base for every config section."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of the whole config (goes into every output row)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# --- shared sections -------------------------------------------------------------------------


class ModelConfig(BaseConfig):
    """Where the SD components and the filter CLIP come from (local path, fsspec URI or hub id)."""

    path: str = Field("tiny", description="diffusers folder; 'tiny' = the project's tiny family")
    clip_path: str | None = Field(None, description="CLIP folder; default: <path>/clip if present")
    cache_dir: str | None = Field(None, description="local cache for fsspec/hub downloads")
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    allow_tf32: bool = Field(False, description="TF32 matmuls change NTI numerics; off by default")


class InversionConfig(BaseConfig):
    """DDIM + null-text inversion knobs; defaults reproduce ALGORITHM.md section 2-4."""

    method: Literal["null_text", "ddim", "negative_prompt", "direct"] = "null_text"
    num_inference_steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0)
    num_inner_steps: int = Field(10, ge=0)
    learning_rate: float = Field(1e-2, gt=0.0)
    lr_decay_steps: float = Field(100.0, gt=0.0, description="lr = learning_rate * (1 - i / lr_decay_steps)")
    early_stop_epsilon: float = Field(1e-5, ge=0.0)
    early_stop_slope: float = Field(2e-5, ge=0.0, description="threshold = epsilon + i * slope")
    batch_size: int = Field(4, ge=1, description="images inverted together")
    allow_tf32: bool = Field(False, description="TF32 matmuls/convolutions during inversion; change NTI numerics")


Window = float | tuple[float, float]


def window_bounds(window: Window) -> tuple[float, float]:
    """ALGORITHM.md window -> (start, end) fractions: f means [0, f); (a, b) means [a, b). ValueError if out of range."""
    start, end = (0.0, float(window)) if isinstance(window, (int, float)) else (float(window[0]), float(window[1]))
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"window {window!r}: expected a fraction in [0, 1] or [start, end] with 0 <= start <= end <= 1")
    return start, end


def _check_window(window: Window) -> Window:
    window_bounds(window)
    return window


class EditConfig(BaseConfig):
    """Prompt-to-prompt settings; PRISM defaults: Refine + Reweight x2, cross 0.8, self 0.5.

    Windows (ALGORITHM.md section 5): a fraction f controls steps [0, f); a pair [a, b] steps
    [a*T, b*T). `cross_replace_steps` may also be a per-word table, e.g. `{default_: 0.8, Devices: 0.4}`:
    the word's window replaces the default on its tokens in every edit prompt that contains it.
    """

    controller: Literal["refine", "replace", "none"] = "refine"
    reweight: float | None = Field(2.0, gt=0.0, description="edit-word equalizer; None = off")
    cross_replace_steps: Window | dict[str, Window] = Field(0.8, description="window, or {default_: window, word: window}")
    self_replace_steps: Window = Field(0.5, description="self-attention replacement window")
    local_blend: bool = False
    blend_mask: Literal["attention", "noise"] = Field(
        "attention",
        description="attention: P2P's cross-attention mask of the changed words; noise: DiffEdit-style "
        "|eps(edit) - eps(source)| along the inversion trajectory (for U-Nets with diffuse attention)",
    )
    blend_threshold: float = Field(0.3, ge=0.0, le=1.0, description="attention mask threshold (reference 0.3)")
    blend_start: float = Field(0.2, ge=0.0, le=1.0, description="blend applies after step int(start*T)")
    noise_mask_threshold: float = Field(0.5, ge=0.0, le=1.0, description="noise mask threshold (DiffEdit: 0.5)")
    noise_mask_quantile: float = Field(0.95, gt=0.0, le=1.0, description="the map is divided by this quantile (1 = max)")
    noise_mask_window: Window = Field((0.1, 0.9), description="trajectory span sampled, 0 = image, 1 = z_T")
    noise_mask_samples: int = Field(10, ge=1, description="trajectory points averaged for the noise mask")
    self_attention_max_queries: int = Field(32 * 32, ge=1)
    edit_batch_size: int = Field(2, ge=1, description="images edited together (each with K edits)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="the editing pass's U-Net calls under autocast (bfloat16/float16 on a GPU for speed); "
        "inversion always runs in fp32, latents and scheduler steps stay fp32",
    )

    @field_validator("self_replace_steps", "noise_mask_window")
    @classmethod
    def _plain_window(cls, value: Window) -> Window:
        return _check_window(value)

    @field_validator("cross_replace_steps")
    @classmethod
    def _cross_windows(cls, value: Window | dict[str, Window]) -> Window | dict[str, Window]:
        if not isinstance(value, dict):
            return _check_window(value)
        for word, window in value.items():
            if not word or (word != "default_" and " " in word.strip()):
                raise ValueError(f"word {word!r}: expected one word (or 'default_')")
            try:
                _check_window(window)
            except ValueError as err:
                raise ValueError(f"word {word!r}: {err}") from None
        return value


class FilterConfig(BaseConfig):
    """Which counterfactuals to keep, from the scores of `ClipScorer.score` (+ the reconstruction error).

    PRISM keeps S_CLIP >= 0.1. LANCE additionally requires CLIP image-image similarity and
    image-text similarity of the edit above thresholds (it uses 0.7 / 0.2 / 0.2); those two
    are off (None) by default, as is prism_ray's own `reconstruction_error_max`.
    """

    s_clip_min: float = Field(0.1, ge=-1.0, le=1.0)
    image_image_min: float | None = Field(None, ge=-1.0, le=1.0)
    image_text_min: float | None = Field(None, ge=-1.0, le=1.0)
    reconstruction_error_max: float | None = Field(
        None,
        ge=0.0,
        description="reject every edit of a source whose unedited reconstruction has a relative squared "
        "latent error above this (the inversion failed); None = off, as in PRISM",
    )

    def accept(self, scores: Mapping[str, Any]) -> np.ndarray:
        """Boolean (N,) array: every active threshold met (score >= minimum, error <= maximum).
        NaN is rejected."""
        checks = [
            ("s_clip", self.s_clip_min, np.greater_equal),
            ("clip_image_image", self.image_image_min, np.greater_equal),
            ("clip_image_text", self.image_text_min, np.greater_equal),
            ("reconstruction_error", self.reconstruction_error_max, np.less_equal),
        ]
        keep = None
        for key, bound, meets in checks:
            if bound is None:
                continue
            if key not in scores:
                raise ValueError(f"scores lack {key!r}, needed by the filter threshold on it")
            ok = meets(np.asarray(scores[key], dtype=np.float64), bound)
            keep = ok if keep is None else keep & ok
        return keep


class DataConfig(BaseConfig):
    """Input manifest and how its labels become captions."""

    manifest: str = Field(..., min_length=1, description="Parquet or CSV manifest, any fsspec URI")
    image_column: str = "image_uri"
    image_root: str | None = Field(None, description="prefix for relative image URIs")
    adapter: str = "chexpert"
    adapter_options: dict[str, Any] = Field(default_factory=dict)
    split: str | None = Field(None, description="keep rows whose 'split' column equals this")
    limit: int | None = Field(None, ge=1)


# --- loading ---------------------------------------------------------------------------------


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    extra = f"; and {err.error_count() - 1} more" if err.error_count() > 1 else ""
    return f"config field '{field}': {first['msg']}{shown}{extra}"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config field '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`["a.b=3", "c=[1, 2]"]` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override '{item}': empty key")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(cls: type[C], data: dict | None = None, overrides: Sequence[str] = ()) -> C:
    """Validate `data` + overrides into `cls`; any problem is one ConfigError line naming the field."""
    merged = _merge(data or {}, parse_overrides(overrides))
    try:
        return cls.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Load a YAML file (optional) and apply `key=value` overrides."""
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"config file '{path}': {err.strerror}") from None
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}': top level must be a mapping")
    return build_config(cls, data, overrides)

