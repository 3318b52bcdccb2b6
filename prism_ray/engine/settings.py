"""The method's knobs: DDIM + null-text inversion and prompt-to-prompt editing (reference defaults)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from prism_ray.config import BaseConfig

# Named precision presets (docs/method.md §13): which passes may run in TF32 or bf16.
Precision = Literal["auto", "reference", "fast", "fastest"]


class InversionConfig(BaseConfig):
    """DDIM + null-text inversion knobs; defaults reproduce docs/method.md §4-§6."""

    method: Literal["null_text", "ddim", "negative_prompt", "direct", "ddpm"] = "null_text"
    num_inference_steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0)
    num_inner_steps: int = Field(10, ge=0)
    learning_rate: float = Field(1e-2, gt=0.0)
    lr_decay_steps: float = Field(100.0, gt=0.0, description="lr = learning_rate * (1 - i / lr_decay_steps)")
    early_stop_epsilon: float = Field(1e-5, ge=0.0)
    early_stop_slope: float = Field(2e-5, ge=0.0, description="threshold = epsilon + i * slope")
    batch_size: int = Field(4, ge=1, description="images inverted together")
    noise_seed: int = Field(
        0, ge=0, description="method ddpm: the noisy latents' seed (with each image's latent: batch-independent)"
    )
    precision: Precision = Field(
        "auto",
        description="reference: fp32, PyTorch's TF32 defaults; fast: TF32 inversion, bf16 edits; fastest: also "
        "the null-text inner steps under bf16 autocast (the DDIM trajectory stays fp32/TF32); auto: fast on "
        "CUDA, reference elsewhere",
    )
    allow_tf32: bool | None = Field(
        None, description="override the preset's TF32 matmuls/convolutions during inversion (None = preset)"
    )

    def identity(self) -> dict[str, Any]:
        """These settings as JSON for results ids: `noise_seed` enters only where it acts (method ddpm), so
        ids of results written before it existed stay as they were."""
        dump = self.model_dump(mode="json")
        if self.method != "ddpm":
            dump.pop("noise_seed")
        return dump


Window = float | tuple[float, float]


def window_bounds(window: Window) -> tuple[float, float]:
    """A window (docs/method.md §9.2) -> (start, end) fractions: f means [0, f); (a, b) means [a, b). ValueError if out of range."""
    start, end = (0.0, float(window)) if isinstance(window, (int, float)) else (float(window[0]), float(window[1]))
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"window {window!r}: expected a fraction in [0, 1] or [start, end] with 0 <= start <= end <= 1")
    return start, end


def _check_window(window: Window) -> Window:
    window_bounds(window)
    return window


class EditConfig(BaseConfig):
    """Prompt-to-prompt settings; PRISM defaults: Refine + Reweight x2, cross 0.8, self 0.5.

    Windows (docs/method.md §9.2): a fraction f controls steps [0, f); a pair [a, b] steps
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
    edit_guidance: float | tuple[float, float] | None = Field(
        None,
        description="classifier-free guidance of the edit branches: a scale, or (first step, last step) "
        "interpolated linearly; None = the inversion's (reference). The source branch keeps the inversion's, "
        "which null-text inversion was fitted to",
    )
    self_attention_max_queries: int = Field(32 * 32, ge=1)
    edit_batch_size: int = Field(2, ge=1, description="images edited together (each with K edits)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="override inversion.precision's dtype for the editing pass's U-Net calls (autocast; "
        "None = preset); latents and scheduler steps stay fp32",
    )
    per_intervention: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="overrides of these settings per intervention, keyed by the whole intervention "
        "('Support Devices=true') or its attribute ('Cardiomegaly'), e.g. {Cardiomegaly: {noise_mask_quantile: 0.8}}",
    )

    @model_validator(mode="after")
    def _check_overrides(self) -> EditConfig:
        for key, override in self.per_intervention.items():
            if not key.strip():
                raise ValueError("per_intervention: empty intervention key")
            fixed = set(override) & {"per_intervention", "edit_batch_size", "compute_dtype"}
            unknown = set(override) - set(type(self).model_fields)
            if fixed or unknown:
                raise ValueError(f"per_intervention.{key}: {sorted(fixed | unknown)} cannot be set per intervention")
            try:
                self._merged(override)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"per_intervention.{key}.{where}: {first['msg']}") from None
        return self

    def identity(self) -> dict[str, Any]:
        """These settings as JSON for results ids: settings added later are left out while unset, so ids of
        results written before they existed stay as they were."""
        dump = self.model_dump(mode="json")
        if not self.per_intervention:
            dump.pop("per_intervention")
        if self.edit_guidance is None:
            dump.pop("edit_guidance")
        return dump

    def _merged(self, override: dict[str, Any]) -> EditConfig:
        base = self.model_dump(exclude={"per_intervention"})
        return type(self).model_validate({**base, **override})

    def for_intervention(self, intervention: str | None) -> EditConfig:
        """The settings for one intervention: this config, with `per_intervention[intervention]` applied,
        else the overrides of its attributes ('A=1; B=0' -> A's, then B's), else as is (also for an edit
        given as a caption, without an intervention)."""
        if not self.per_intervention or not intervention:
            return self
        if intervention in self.per_intervention:
            return self._merged(self.per_intervention[intervention])
        from prism_ray.data.captions import parse_interventions  # lazily: the engine stays light

        override: dict[str, Any] = {}
        for item in parse_interventions(intervention):
            override.update(self.per_intervention.get(item.attribute, {}))
        return self._merged(override) if override else self

    @field_validator("edit_guidance")
    @classmethod
    def _guidance(cls, value: float | tuple[float, float] | None) -> float | tuple[float, float] | None:
        scales = [] if value is None else [value] if isinstance(value, (int, float)) else list(value)
        if any(not 0.0 <= w <= 50.0 for w in scales):
            raise ValueError(f"expected guidance scales in [0, 50], got {value}")
        return value

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


class EngineComputeConfig(BaseConfig):
    """How the engine uses its device (not its results): memory budget and kernels. The augment job's
    `compute` section extends this."""

    gpu_memory_gb: float | None = Field(
        24.0, gt=0.0, description="GPU memory the engine may use; inversion/edit batch sizes shrink to fit (None = no cap)"
    )
    channels_last: bool | None = Field(None, description="U-Net/VAE in channels_last memory format (None = on CUDA)")
    compile_unet: bool = Field(False, description="torch.compile the inversion's U-Net calls (GPU; minutes to warm up)")
    attention: Literal["auto", "xformers"] = Field(
        "auto", description="fused attention: auto = xformers on CUDA when installed, else SDPA; xformers = required"
    )
