"""Prompt-to-prompt attention control (Hertz et al. 2022) through diffusers attention processors.

Settings are immutable (`AttentionController` holding a `ReplaceControl` / `RefineControl` /
`ReweightControl` and an optional `LocalBlend` or `MaskBlend`); everything that changes while denoising lives in a
fresh `ControlState` per batch; `controlled(unet, controller, state)` installs one
`PromptToPromptProcessor` per attention layer with `unet.set_attn_processor` and restores the previous
processors on exit. Nothing is monkeypatched.

Batch layout (B = N * (K + 1) branches for N images with K edits each; the U-Net batch is 2B):

    rows [0, B)   unconditional context, rows [B, 2B) conditional context, and within each half
    row j * (K + 1) + k  =  image j, branch k   (k = 0: the source branch, k = 1..K: edit k)

The controller only touches the conditional half, viewed as (N, K + 1, heads, Q, keys): every image
is its own prompt-to-prompt group [src_j, edit_j1 .. edit_jK] with its own mappers, so several images
share one U-Net call. The unconditional half always goes through fused attention.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Blocks of UNet2DConditionModel whose attention layers prompt-to-prompt controls (SD1.5: 16 self + 16 cross).
CONTROLLED_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")


@functools.cache
def xformers_available() -> bool:
    """Checked once; xformers is only used when installed and the tensors are on CUDA."""
    return importlib.util.find_spec("xformers") is not None


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """(B, heads, Q, d) x (B, heads, K, d) -> (B, heads, Q, d) without materialising the probabilities."""
    if q.is_cuda and mask is None and xformers_available():
        import xformers.ops  # imported where used: an optional dependency

        out = xformers.ops.memory_efficient_attention(
            q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), scale=scale
        )  # xformers layout (B, L, heads, d)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale)


# --- cross-attention edits (immutable settings, tensors with leading (N, K) = image, edit) -----------------


@dataclass(frozen=True)
class ReplaceControl:
    """Replace a word (same word count): the source's attention seen through a 77 x 77 token mapper."""

    mapper: torch.Tensor  # (N, K, 77, 77): new[..., n] = sum_w src[..., w] * mapper[w, n]

    def __call__(self, src: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        # src (N, heads, Q, 77), own (N, K, heads, Q, 77) -> (N, K, heads, Q, 77)
        return torch.einsum("nhqw,nkwc->nkhqc", src, self.mapper.to(src.dtype))

    def to(self, device) -> ReplaceControl:
        return ReplaceControl(self.mapper.to(device))


@dataclass(frozen=True)
class RefineControl:
    """Refine (words added/removed): aligned tokens copy the source column, inserted tokens keep their own."""

    mapper: torch.Tensor  # (N, K, 77) long: source token for each edit token
    alphas: torch.Tensor  # (N, K, 77): 1 aligned, 0 inserted

    def __call__(self, src: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        n, k, h, q, c = own.shape
        index = self.mapper[:, :, None, None, :].expand(n, k, h, q, c)
        gathered = torch.gather(src[:, None].expand(n, k, h, q, c), -1, index)  # (N, K, heads, Q, 77)
        alphas = self.alphas[:, :, None, None, :].to(src.dtype)
        return gathered * alphas + own * (1 - alphas)

    def to(self, device) -> RefineControl:
        return RefineControl(self.mapper.to(device), self.alphas.to(device))


@dataclass(frozen=True)
class ReweightControl:
    """Scale some tokens' attention (no renormalisation), after Replace/Refine or on the source map."""

    equalizer: torch.Tensor  # (N, K, 77)
    inner: ReplaceControl | RefineControl | None = None

    def __call__(self, src: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        base = self.inner(src, own) if self.inner is not None else src[:, None].expand_as(own)
        return base * self.equalizer[:, :, None, None, :].to(src.dtype)

    def to(self, device) -> ReweightControl:
        return ReweightControl(self.equalizer.to(device), None if self.inner is None else self.inner.to(device))


CrossControl = ReplaceControl | RefineControl | ReweightControl


# --- local blend -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalBlend:
    """Keep the edit inside the region the blend words attend to (Hertz et al. 2022, section 3.3).

    Mask for edit (j, k): the cross-attention maps of the `layers` (all at `resolution`), summed over
    steps so far (as the reference's attention store) and averaged over heads and layers, summed over
    the blend words' tokens, 3 x 3 max-pooled (stride 1, padding 1), resized (nearest) to the latent
    size, divided by its max, > threshold; union of the source branch's mask (source words) and the
    edit branch's mask (edit words); intersected with the user's `region` when one is given
    (`engine.masks`). From step `start_step` on: x = x_src + mask * (x - x_src).
    The maps are the ones after the cross-attention edit, as the reference stores them.
    """

    source_words: torch.Tensor  # (N, K, 77): 1 on the source prompt's blend-word tokens for edit k
    edit_words: torch.Tensor  # (N, K, 77): 1 on edit k's blend-word tokens
    enabled: torch.Tensor  # (N, K) bool: edits without local blend keep mask = 1
    layers: frozenset[str]  # attention-processor names of the cross layers whose maps are used
    resolution: int  # side of those layers' maps
    start_step: int  # blend at step i when i >= start_step (= int(blend_start * T))
    threshold: float = 0.3
    pool_radius: int = 1  # 3 x 3 max-pool
    region: torch.Tensor | None = None  # (N, 1, 1, h, w) bool: user edit mask minus keep mask

    def masks(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """maps (N, K + 1, res * res, 77) summed maps -> bool masks (N, K, 1, h, w)."""
        n, b, _, c = maps.shape
        maps = maps.view(n, b, self.resolution, self.resolution, c).float()
        src = (maps[:, :1] * self.source_words[:, :, None, None, :]).sum(-1)  # (N, K, res, res)
        edit = (maps[:, 1:] * self.edit_words[:, :, None, None, :]).sum(-1)  # (N, K, res, res)
        both = torch.stack([src, edit], 2).flatten(0, 1)  # (N * K, 2, res, res)
        r = self.pool_radius
        both = F.max_pool2d(both, 2 * r + 1, stride=1, padding=r)
        both = F.interpolate(both, size=size)  # nearest, as the reference
        both = both / both.amax(dim=(2, 3), keepdim=True)
        mask = (both > self.threshold).any(1, keepdim=True)  # union of source and edit masks
        mask = mask.view(n, -1, 1, *size) | ~self.enabled[:, :, None, None, None]
        return mask if self.region is None else mask & self.region

    def current(self, state: ControlState, size: tuple[int, int]) -> torch.Tensor:
        """The mask for this step from the maps stored so far -> (N, K, 1, h, w) bool."""
        if state.blend_maps is None:
            raise RuntimeError("local blend: no cross-attention maps were stored (layers/resolution mismatch?)")
        return self.masks(state.blend_maps, size)

    def to(self, device) -> LocalBlend:
        return dataclasses.replace(
            self,
            source_words=self.source_words.to(device),
            edit_words=self.edit_words.to(device),
            enabled=self.enabled.to(device),
            region=None if self.region is None else self.region.to(device),
        )


@dataclass(frozen=True)
class MaskBlend:
    """Local blend with a mask fixed before denoising (the editor's noise-difference mask, the user's region).

    Same update as `LocalBlend` from `start_step` on: x = x_src + mask * (x - x_src); reads no maps.
    """

    mask: torch.Tensor  # (N, K, 1, h, w) bool; edits without local blend are all True
    start_step: int
    layers: frozenset[str] = frozenset()  # no attention maps needed

    def current(self, state: ControlState, size: tuple[int, int]) -> torch.Tensor:
        if tuple(self.mask.shape[-2:]) != tuple(size):
            raise RuntimeError(f"local blend: mask is {tuple(self.mask.shape[-2:])}, latents are {tuple(size)}")
        return self.mask

    def to(self, device) -> MaskBlend:
        return dataclasses.replace(self, mask=self.mask.to(device))


# --- the controller and its per-batch state --------------------------------------------------


@dataclass
class ControlState:
    """Everything that changes during one batch's denoising; make a new one per batch."""

    step: int = 0  # set by the denoising loop before each U-Net call
    blend_maps: torch.Tensor | None = None  # (N, K + 1, res * res, 77): sum over steps, blend layers, heads
    blend_terms: int = 0  # how many (step, layer, head) maps are in the sum
    blend_mask: torch.Tensor | None = None  # (N, K, 1, h, w) bool: the last mask applied
    layers_called: set[str] = field(default_factory=set)  # processors that ran (for tests/diagnostics)
    explicit_calls: int = 0  # calls that materialised attention probabilities

    def add_blend_maps(self, probs: torch.Tensor) -> None:
        """probs (N, K + 1, heads, Q, 77) of one blend layer at this step."""
        summed = probs.sum(2).float()
        self.blend_maps = summed if self.blend_maps is None else self.blend_maps + summed
        self.blend_terms += probs.shape[2]


@dataclass(frozen=True)
class AttentionController:
    """Prompt-to-prompt settings for N images x (1 source + K edits), T denoising steps."""

    num_images: int
    num_edits: int
    cross: CrossControl | None  # None: cross-attention left alone (maps still read by local blend)
    cross_alpha: torch.Tensor  # (T + 1, N, K, 1, 1, 77): the time/word alpha table per image
    self_window: tuple[int, int]  # self-attention replaced for steps [start, end)
    self_max_queries: int = 32 * 32  # larger self-attention maps are never replaced (SD: 64 x 64)
    blend: LocalBlend | MaskBlend | None = None
    _cross_steps: tuple[bool, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        expected = (self.num_images, self.num_edits)
        if tuple(self.cross_alpha.shape[1:3]) != expected:
            raise ValueError(f"cross_alpha: expected (T + 1, {expected[0]}, {expected[1]}, 1, 1, 77), "
                             f"got {tuple(self.cross_alpha.shape)}")
        active = self.cross_alpha.flatten(1).gt(0).any(1).tolist() if self.cross is not None else []
        object.__setattr__(self, "_cross_steps", tuple(active))

    @property
    def batch_size(self) -> int:
        """Branches per context half: N * (K + 1)."""
        return self.num_images * (self.num_edits + 1)

    def cross_active(self, step: int) -> bool:
        return step < len(self._cross_steps) and self._cross_steps[step]

    def self_active(self, step: int, queries: int) -> bool:
        return self.self_window[0] <= step < self.self_window[1] and queries <= self.self_max_queries

    def needs_maps(self, name: str) -> bool:
        return self.blend is not None and name in self.blend.layers

    def edit_cross(self, probs: torch.Tensor, step: int) -> torch.Tensor:
        """probs (N, K + 1, heads, Q, 77) -> the same with the edit branches replaced by
        control(source) * alpha + own * (1 - alpha)."""
        src, own = probs[:, 0], probs[:, 1:]
        alpha = self.cross_alpha[step].to(probs.dtype)  # (N, K, 1, 1, 77)
        edited = torch.lerp(own, self.cross(src, own), alpha)  # control(src) * alpha + own * (1 - alpha)
        probs[:, 1:] = edited  # probs is the processor's own fresh tensor
        return probs

    def step_callback(self, latents: torch.Tensor, state: ControlState) -> torch.Tensor:
        """After the scheduler step: local blend. latents (N, K + 1, C, h, w)."""
        if self.blend is None or state.step < self.blend.start_step:
            return latents
        mask = self.blend.current(state, tuple(latents.shape[-2:]))  # (N, K, 1, h, w)
        state.blend_mask = mask
        src = latents[:, :1]
        edits = src + mask.to(latents.dtype) * (latents[:, 1:] - src)
        return torch.cat([src, edits], 1)

    def to(self, device) -> AttentionController:
        return dataclasses.replace(
            self,
            cross=None if self.cross is None else self.cross.to(device),
            cross_alpha=self.cross_alpha.to(device),
            blend=None if self.blend is None else self.blend.to(device),
        )


# --- the attention processor -----------------------------------------------------------------


class PromptToPromptProcessor:
    """One attention layer under prompt-to-prompt control (same projections as AttnProcessor2_0).

    Attention probabilities are materialised only when the controller acts on this layer at this step;
    otherwise (and always for the unconditional half) fused attention runs.
    """

    def __init__(self, name: str, controller: AttentionController, state: ControlState):
        self.name = name
        self.controller = controller
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, queries, _ = hidden_states.shape
        if batch != 2 * self.controller.batch_size:
            raise RuntimeError(
                f"{self.name}: batch of {batch} rows, but the controller expects 2 x {self.controller.batch_size} "
                f"([uncond; cond] x {self.controller.num_images} images x (1 + {self.controller.num_edits}) branches)"
            )
        mask = None
        if attention_mask is not None:
            keys = (encoder_hidden_states if is_cross else hidden_states).shape[1]
            mask = attn.prepare_attention_mask(attention_mask, keys, batch).view(batch, attn.heads, -1, keys)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (2B, heads, Q, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (2B, heads, keys, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        self.state.layers_called.add(self.name)
        out = self._attend(query, key, value, mask, attn.scale, is_cross)  # (2B, heads, Q, d)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(self, q, k, v, mask, scale: float, is_cross: bool) -> torch.Tensor:
        ctl, step = self.controller, self.state.step
        queries = q.shape[2]
        if is_cross:
            acts = ctl.cross_active(step) or ctl.needs_maps(self.name)
        else:
            acts = ctl.self_active(step, queries)
        if not acts:
            return fused_attention(q, k, v, mask, scale)
        self.state.explicit_calls += 1
        half = ctl.batch_size
        mask_u, mask_c = (None, None) if mask is None else (mask[:half], mask[half:])
        uncond = fused_attention(q[:half], k[:half], v[:half], mask_u, scale)
        group = (ctl.num_images, ctl.num_edits + 1)
        if is_cross:
            cond = self._cross(q[half:], k[half:], v[half:], mask_c, scale, group)
        else:
            cond = self._self(q[half:], k[half:], v[half:], mask_c, scale, group)
        return torch.cat([uncond, cond])

    def _cross(self, q, k, v, mask, scale, group) -> torch.Tensor:
        ctl, step = self.controller, self.state.step
        scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, heads, Q, 77)
        if mask is not None:
            scores = scores + mask.float()
        probs = scores.softmax(-1).view(*group, *scores.shape[1:])  # (N, K + 1, heads, Q, 77)
        if ctl.cross_active(step):
            with torch.autocast(probs.device.type, enabled=False):  # control maths in fp32 in a bf16 pass
                probs = ctl.edit_cross(probs, step)
        if ctl.needs_maps(self.name):
            side = ctl.blend.resolution
            if probs.shape[3] != side * side:
                raise RuntimeError(f"{self.name}: local blend expects {side}x{side} maps, got {probs.shape[3]} queries")
            self.state.add_blend_maps(probs)
        return probs.flatten(0, 1).to(v.dtype) @ v  # (B, heads, Q, d)

    def _self(self, q, k, v, mask, scale, group) -> torch.Tensor:
        # Inside the window every branch of an image uses the source's self-attention map: only the
        # source's map is computed, then applied to each branch's own values.
        n, b = group
        q_src = q.view(n, b, *q.shape[1:])[:, 0]  # (N, heads, Q, d)
        k_src = k.view(n, b, *k.shape[1:])[:, 0]
        scores = (q_src @ k_src.transpose(-1, -2)).float() * scale  # (N, heads, Q, Q)
        if mask is not None:
            scores = scores + mask.view(n, b, *mask.shape[1:])[:, 0].float()
        probs = scores.softmax(-1).to(v.dtype)
        out = probs[:, None] @ v.view(n, b, *v.shape[1:])  # (N, K + 1, heads, Q, d)
        return out.flatten(0, 1)


# --- installing it ---------------------------------------------------------------------------


def controlled_layer_names(unet) -> list[str]:
    """Names (as in `unet.attn_processors`) of every attention layer of the down, mid and up blocks."""
    return [name for name in unet.attn_processors if name.startswith(CONTROLLED_BLOCKS)]


@contextmanager
def controlled(unet, controller: AttentionController, state: ControlState):
    """Install prompt-to-prompt processors on every attention layer; restore the previous ones on exit.

    Yields the controlled layer names. Raises if the U-Net has no attention layer to control (a
    silent no-op would return unedited images).
    """
    previous = dict(unet.attn_processors)
    names = controlled_layer_names(unet)
    if not names:
        raise RuntimeError("controlled: the U-Net has no attention layers in its down/mid/up blocks; nothing to control")
    if controller.blend is not None and not controller.blend.layers <= set(names):
        raise ValueError(f"local blend layers not in the U-Net: {sorted(controller.blend.layers - set(names))}")
    processors = {
        name: PromptToPromptProcessor(name, controller, state) if name in names else proc
        for name, proc in previous.items()
    }
    unet.set_attn_processor(processors)
    try:
        yield names
    finally:
        unet.set_attn_processor(dict(previous))  # set_attn_processor pops from the dict it gets


# --- which layers local blend reads ----------------------------------------------------------


def cross_attention_resolutions(unet, latent_size: int) -> dict[str, int]:
    """Map side of every cross-attention layer of a UNet2DConditionModel for a latent_size^2 input.

    Down block i works at latent_size / 2^i, the mid block at the coarsest size, up block j mirrors
    down block (n - 1 - j); every block but the last downsamples (diffusers' standard layout).
    """
    n = len(unet.config.block_out_channels)
    out = {}
    for name in controlled_layer_names(unet):
        if ".attn2." not in name:
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = n - 1 - int(parts[1])
        else:
            level = n - 1
        out[name] = latent_size // 2**level
    return out


def blend_layers(unet, latent_size: int) -> tuple[frozenset[str], int]:
    """The cross-attention layers local blend averages, and their map side.

    SD1.5 (64 x 64 latents) uses its 16 x 16 layers, i.e. latent_size // 4 (the reference's
    down_cross[2:4] + up_cross[:3]). A U-Net without layers at that size (the tiny family: 16 x 16
    latents, cross-attention at 16 and 8) uses the finest size below the latent size (8 x 8: three
    layers plus the mid block), or the latent size itself if that is all there is.
    """
    sizes = cross_attention_resolutions(unet, latent_size)
    if not sizes:
        raise ValueError("local blend: the U-Net has no cross-attention layers")
    available = set(sizes.values())
    below = [s for s in available if s < latent_size]
    side = latent_size // 4 if latent_size // 4 in available else (max(below) if below else max(available))
    return frozenset(name for name, s in sizes.items() if s == side), side
