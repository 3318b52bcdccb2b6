"""The prompt-to-prompt editing pass (docs/method.md §8-§10): invert once, edit many, several images per call.

For each image the batch is [source, edit_1 .. edit_K], all starting from the inverted z_T; the source
branch is computed once per step and shared by the K edits. `edit_batch_size` images go through each
U-Net call; the layout of the guided batch is documented in `prism_ray.engine.attention`.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from prism_ray.engine import seq_aligner
from prism_ray.engine.attention import (
    AttentionController,
    ControlState,
    LocalBlend,
    MaskBlend,
    RefineControl,
    ReplaceControl,
    ReweightControl,
    blend_layers,
    controlled,
)
from prism_ray.engine.errors import ItemError
from prism_ray.engine.images import decode
from prism_ray.engine.inversion import invert_many, relative_squared_error
from prism_ray.engine.kernels import inversion_unet, prepare_models
from prism_ray.engine.masks import edit_region, latent_mask
from prism_ray.engine.memory import fit_batch_sizes
from prism_ray.engine.noise_mask import noise_difference_masks
from prism_ray.engine.precision import resolve_precision
from prism_ray.engine.sampling import sample_latents
from prism_ray.engine.scheduler import check_prediction_type, make_ddim_scheduler
from prism_ray.engine.settings import EditConfig, EngineComputeConfig, InversionConfig
from prism_ray.engine.text import encode_prompts
from prism_ray.engine.types import InversionResult

STAGE = "edit"  # the errors table's stage for everything that fails in here

BlendWords = tuple[Sequence[str], Sequence[str]]  # (source-prompt words, edit-prompt words)


def _edit_words(source: str, edit: str) -> list[str]:
    """Words of `edit` not in `source` (prism_ray.data.captions.edit_words, imported lazily to keep this light)."""
    from prism_ray.data.captions import edit_words

    return edit_words(source, edit)


@dataclass
class EditResult:
    """Edits of the images that succeeded; `indices[r]` is the input position of row r."""

    indices: list[int]
    edits: np.ndarray  # (N_ok, K, R, R, 3) uint8
    reconstructions: np.ndarray  # (N_ok, R, R, 3) uint8: the source branch
    latents: torch.Tensor  # (N_ok, K + 1, C, h, w) final latents, source branch first
    seconds: list[float]  # wall time attributed to each row (its share of its batch)
    reconstruction_errors: list[float] = field(default_factory=list)  # source branch vs z_0, relative squared
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (input index, stage, reason)
    blend_masks: torch.Tensor | None = None  # (N_ok, K, h, w) bool: last local-blend mask, if any


@dataclass
class _Plan:
    """One image's validated prompt-to-prompt settings (K edits), before stacking into a batch."""

    mapper: torch.Tensor | None  # replace (K, 77, 77) or refine (K, 77) long
    refine_alphas: torch.Tensor | None  # (K, 77)
    equalizer: torch.Tensor | None  # (K, 77)
    cross_alpha: torch.Tensor  # (T + 1, K, 1, 1, 77)
    blend_source: torch.Tensor  # (K, 77)
    blend_edit: torch.Tensor  # (K, 77)
    blend_enabled: torch.Tensor  # (K,) bool


class Editor:
    """Prompt-to-prompt editing of inverted images with the reference DDIM steps and guidance.

    `compute` (memory budget, kernels) changes how fast, not what: it prepares the models once here
    (`kernels.prepare_models`) and caps the batch sizes (`memory.fit_batch_sizes`).
    """

    def __init__(
        self,
        sd,
        edit_config: EditConfig | None = None,
        inversion_config: InversionConfig | None = None,
        compute: EngineComputeConfig | None = None,
    ):
        self.sd = sd
        self.config = edit_config or EditConfig()
        self.inversion_config = inversion_config or InversionConfig()
        self.compute = compute or EngineComputeConfig()
        check_prediction_type(sd.prediction_type)  # epsilon or v_prediction, else a one-line ValueError
        self.precision = resolve_precision(self.inversion_config, self.config, sd.device)
        prepare_models(sd, self.compute)
        self.inversion_unet = inversion_unet(sd, self.compute)

    def batch_sizes(self, num_edits: int) -> tuple[int, int]:
        """(inversion, edit) images per call: the configured sizes, capped by `compute.gpu_memory_gb`."""
        return fit_batch_sizes(
            self.sd,
            self.precision,
            self.inversion_config.batch_size,
            self.config.edit_batch_size,
            num_edits,
            self.compute.gpu_memory_gb,
        )

    # --- validation: one image's settings --------------------------------------------------------

    def plan(
        self,
        source: str,
        edits: Sequence[str],
        num_steps: int,
        blend_words: Sequence[BlendWords | None] | None = None,
        reweight_words: Sequence[Sequence[str] | None] | None = None,
    ) -> _Plan:
        """Mappers, equalizer, alpha table and blend words for one image; ValueError on a bad prompt/word."""
        cfg, tok = self.config, self.sd.tokenizer
        k = len(edits)
        for name, given in (("blend_words", blend_words), ("reweight_words", reweight_words)):
            if given is not None and len(given) != k:
                raise ValueError(f"{name}: {len(given)} entries for {k} edit prompts")
        mapper = alphas = eq = None
        if cfg.controller == "replace":
            mapper = torch.stack([seq_aligner.replace_mapper(source, e, tok) for e in edits])
        elif cfg.controller == "refine":
            pairs = [seq_aligner.refine_mapper(source, e, tok) for e in edits]
            mapper, alphas = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        if reweight_words is not None and cfg.reweight is None:
            raise ValueError("reweight_words given but edit_config.reweight is None")
        if cfg.reweight is not None:
            words = [
                _edit_words(source, e) if reweight_words is None or reweight_words[i] is None else reweight_words[i]
                for i, e in enumerate(edits)
            ]
            eq = torch.stack([seq_aligner.equalizer(e, w, cfg.reweight, tok) for e, w in zip(edits, words, strict=True)])
        # The config's word table is job-wide: a word applies to the edits that contain it.
        cross_alpha = seq_aligner.cross_replace_alphas(num_steps, edits, cfg.cross_replace_steps, tok, require_words=False)
        src_w, edit_w = torch.zeros(k, seq_aligner.MAX_TOKENS), torch.zeros(k, seq_aligner.MAX_TOKENS)
        enabled = torch.zeros(k, dtype=torch.bool)
        for i, e in enumerate(edits):
            given = None if blend_words is None else blend_words[i]
            if given is None and not cfg.local_blend:
                continue
            if given is None:  # default: the words that differ; none differ -> nothing to localise
                words_s, words_e = _edit_words(e, source), _edit_words(source, e)
                if not words_s and not words_e:
                    continue
            else:
                words_s, words_e = given
                if not words_s and not words_e:
                    raise ValueError(f"local blend for edit {e!r}: blend_words has no words")
            if words_s:
                src_w[i, seq_aligner.words_token_indices(source, words_s, tok)] = 1.0
            if words_e:
                edit_w[i, seq_aligner.words_token_indices(e, words_e, tok)] = 1.0
            enabled[i] = True
        return _Plan(mapper, alphas, eq, cross_alpha, src_w, edit_w, enabled)

    def controller(
        self,
        plans: list[_Plan],
        num_steps: int,
        latent_size: int,
        noise_mask: torch.Tensor | None = None,
        region: torch.Tensor | None = None,
    ) -> AttentionController | None:
        """Stack per-image plans into one controller for a batch (None when nothing would be controlled).

        noise_mask (N, K, 1, h, w): the batch's `noise_masks`, required when `blend_mask` is "noise".
        region (N, 1, 1, h, w) bool: where each image's edits may change (user edit mask minus keep mask,
        `engine.masks`); the final mask is region ∩ the derived blend mask, or the region alone for edits
        without local blend.
        """
        cfg = self.config
        n, k = len(plans), plans[0].cross_alpha.shape[1]
        cross = None
        if cfg.controller == "replace":
            cross = ReplaceControl(torch.stack([p.mapper for p in plans]))
        elif cfg.controller == "refine":
            cross = RefineControl(torch.stack([p.mapper for p in plans]), torch.stack([p.refine_alphas for p in plans]))
        if cfg.reweight is not None:
            cross = ReweightControl(torch.stack([p.equalizer for p in plans]), cross)
        blend = None
        enabled = torch.stack([p.blend_enabled for p in plans])  # (N, K)
        if enabled.any() and cfg.blend_mask == "noise":
            if noise_mask is None:
                raise ValueError("blend_mask 'noise': controller() needs the batch's noise_mask")
            keep_all = ~enabled.to(noise_mask.device)[:, :, None, None, None]
            mask = noise_mask | keep_all
            if region is not None:
                mask = mask & region.to(mask.device)
            blend = MaskBlend(mask=mask, start_step=int(cfg.blend_start * num_steps))
        elif enabled.any():
            layers, side = blend_layers(self.sd.unet, latent_size)
            blend = LocalBlend(
                source_words=torch.stack([p.blend_source for p in plans]),
                edit_words=torch.stack([p.blend_edit for p in plans]),
                enabled=enabled,
                layers=layers,
                resolution=side,
                start_step=int(cfg.blend_start * num_steps),
                threshold=cfg.blend_threshold,
                region=region,
            )
        elif region is not None:  # no derived mask: the user's region alone
            mask = region.expand(n, k, 1, latent_size, latent_size)
            blend = MaskBlend(mask=mask, start_step=int(cfg.blend_start * num_steps))
        self_window = seq_aligner.step_window(cfg.self_replace_steps, num_steps)
        if cross is None and blend is None and self_window[0] >= self_window[1]:
            return None
        return AttentionController(
            num_images=n,
            num_edits=k,
            cross=cross,
            cross_alpha=torch.stack([p.cross_alpha for p in plans], 1),  # (T + 1, N, K, 1, 1, 77)
            self_window=self_window,
            self_max_queries=cfg.self_attention_max_queries,
            blend=blend,
        ).to(self.sd.device)

    def autocast(self):
        """The editing pass's dtype (the precision policy's `edit_dtype`) as an autocast context."""
        return self.precision.edit_autocast(self.sd.device)

    def noise_masks(self, inversion: InversionResult, text: torch.Tensor, plans: list[_Plan]) -> torch.Tensor | None:
        """With `blend_mask` "noise" and local blend on for some edit: `noise_difference_masks` of the
        batch (text (N, K + 1, 77, D), source first); otherwise None."""
        cfg = self.config
        if cfg.blend_mask != "noise" or not any(bool(p.blend_enabled.any()) for p in plans):
            return None
        with self.autocast():
            return noise_difference_masks(
                self.sd.unet,
                inversion.latents,
                inversion.timesteps,
                text,
                window=cfg.noise_mask_window,
                samples=cfg.noise_mask_samples,
                threshold=cfg.noise_mask_threshold,
                quantile=cfg.noise_mask_quantile,
                prediction_type=self.sd.prediction_type,
            )

    @staticmethod
    def _stack_regions(regions, chunk: list[int], size: int) -> torch.Tensor | None:
        """The chunk's regions as (n, 1, 1, h, w) bool (None = everywhere); None when no image has one."""
        if regions is None or all(regions[j] is None for j in chunk):
            return None
        everywhere = torch.ones(size, size, dtype=torch.bool)
        picked = [everywhere if regions[j] is None else regions[j].bool().cpu() for j in chunk]
        return torch.stack(picked)[:, None, None]

    def with_config(self, config: EditConfig) -> Editor:
        """The same loaded and prepared models under another EditConfig (per-intervention settings)."""
        if config == self.config:
            return self
        other = copy.copy(self)
        other.config = config
        other.precision = resolve_precision(self.inversion_config, config, self.sd.device)
        return other

    # --- the denoising loop -------------------------------------------------------------------

    @torch.no_grad()
    def denoise(
        self,
        inversion: InversionResult,
        text: torch.Tensor,
        controller: AttentionController | None,
        state: ControlState,
    ) -> torch.Tensor:
        """All branches from z_T to z_0. text (N * (K + 1), 77, D) image-major -> latents (N, K + 1, C, h, w)."""
        unet, device = self.sd.unet, self.sd.device
        n = inversion.latents.shape[1]
        b = text.shape[0] // n  # K + 1 branches per image
        x_T = inversion.z_T.to(device, torch.float32)[:, None].repeat(1, b, 1, 1, 1)  # (N, K + 1, C, h, w)
        residuals = None if inversion.residuals is None else inversion.residuals.to(device, torch.float32)

        def begin(i: int) -> None:
            state.step = i  # the controller's processors read the step during this U-Net call

        def end(i: int, z: torch.Tensor) -> torch.Tensor:
            x = z.view_as(x_T)
            if controller is not None:
                x = controller.step_callback(x, state)
            if residuals is not None:  # direct inversion: after the callback, source branch only
                x = x.clone()
                x[:, 0] += residuals[i]
            return x.flatten(0, 1)

        with controlled(unet, controller, state) if controller is not None else nullcontext():
            z = sample_latents(
                unet,
                text,
                inversion.uncond_embeddings,  # (T, N, 77, D): each image's row serves its K + 1 branches
                x_T.flatten(0, 1),
                len(inversion.timesteps),
                self.guidance(len(inversion.timesteps), n, b),
                autocast_dtype=self.precision.edit_dtype,
                on_step_begin=begin,
                on_step_end=end,
                prediction_type=self.sd.prediction_type,
                step_noise=inversion.noise,  # edit-friendly DDPM: the same noise in every branch
            )
        return z.view_as(x_T)

    def guidance(self, num_steps: int, n: int, branches: int) -> float | torch.Tensor:
        """The guidance scale of every branch at every step: the inversion's, or with `edit_guidance` a
        (T, N * branches) table whose edit branches follow it (the source branch, 0, keeps the inversion's)."""
        base, edit = self.inversion_config.guidance_scale, self.config.edit_guidance
        if edit is None:
            return base
        first, last = (edit, edit) if isinstance(edit, (int, float)) else edit
        ramp = torch.linspace(first, last, num_steps, dtype=torch.float64) if num_steps > 1 else torch.tensor([first])
        table = ramp[:, None, None].repeat(1, n, branches)  # (T, N, K + 1)
        table[:, :, 0] = base
        return table.flatten(1).float()

    def edit(
        self,
        inversion: InversionResult,
        source_prompts: Sequence[str],
        edit_prompts: Sequence[Sequence[str]],
        blend_words: Sequence[Sequence[BlendWords | None] | None] | None = None,
        reweight_words: Sequence[Sequence[Sequence[str] | None] | None] | None = None,
        regions: Sequence[torch.Tensor | None] | None = None,
    ) -> EditResult:
        """Edit N inverted images, each with K edit prompts (the same K for all).

        blend_words[j][e] = (source words, edit words) turns local blend on for that edit (with
        `local_blend` on, None means: words that differ between the two prompts). reweight_words[j][e]:
        the edit prompt's words scaled by `reweight` (default: words of the edit not in the source).
        regions[j]: (h, w) bool on the latent grid, where image j's edits may change (`masks.edit_region`:
        user edit mask minus keep mask); None = anywhere.
        Items whose prompts/words are invalid or whose latents become NaN are reported in `errors`
        (stage "edit") and left out; the others complete.
        """
        n = inversion.latents.shape[1]
        if len(source_prompts) != n or len(edit_prompts) != n:
            raise ValueError(f"source_prompts/edit_prompts: {len(source_prompts)}/{len(edit_prompts)} for {n} images")
        if any(isinstance(e, str) for e in edit_prompts):
            raise ValueError("edit_prompts: expected one list of edit prompts per image")
        k = len(edit_prompts[0]) if n else 0
        if n and (k == 0 or any(len(e) != k for e in edit_prompts)):
            raise ValueError(f"edit_prompts: every image needs the same number (>= 1) of edits, got {[len(e) for e in edit_prompts]}")
        latent_size = int(inversion.latents.shape[-1])
        if regions is not None:
            if len(regions) != n:
                raise ValueError(f"regions: {len(regions)} for {n} images")
            for r in regions:
                if r is not None and tuple(r.shape) != (latent_size, latent_size):
                    raise ValueError(f"regions: expected ({latent_size}, {latent_size}) latent masks, got {tuple(r.shape)}")
        num_steps = len(inversion.timesteps)
        if not torch.equal(make_ddim_scheduler(num_steps).timesteps.cpu(), inversion.timesteps.cpu()):
            raise ValueError("inversion.timesteps: not the reference DDIM grid for its number of steps")

        errors: list[ItemError] = []
        plans: dict[int, _Plan] = {}
        for j in range(n):  # validate each item before batching
            try:
                plans[j] = self.plan(
                    source_prompts[j],
                    list(edit_prompts[j]),
                    num_steps,
                    None if blend_words is None else blend_words[j],
                    None if reweight_words is None else reweight_words[j],
                )
            except ValueError as err:
                errors.append(ItemError(j, STAGE, str(err)))

        good = sorted(plans)
        latents, seconds, rec_errors = {}, {}, {}
        masks, any_blend = {}, False
        batch = self.batch_sizes(k)[1]
        prompt_cache: dict[str, torch.Tensor] = {}  # each distinct edit prompt encoded once per call
        for begin in range(0, len(good), batch):
            chunk = good[begin : begin + batch]
            start = time.perf_counter()
            sub = inversion.select(chunk)
            edits = encode_prompts(
                self.sd.tokenizer, self.sd.text_encoder, [p for j in chunk for p in edit_prompts[j]], prompt_cache
            )
            source = sub.cond_embeddings.to(edits.device, edits.dtype)  # the context the inversion used
            text = torch.cat([source[:, None], edits.view(len(chunk), k, *edits.shape[1:])], 1)  # (n, K + 1, 77, D)
            chunk_plans = [plans[j] for j in chunk]
            region = self._stack_regions(regions, chunk, latent_size)
            noise = self.noise_masks(sub, text, chunk_plans)
            controller = self.controller(chunk_plans, num_steps, latent_size, noise, region)
            state = ControlState()
            x = self.denoise(sub, text.flatten(0, 1), controller, state)
            elapsed = time.perf_counter() - start
            # How well each source inverted: the unedited source branch vs its encoded latent.
            rec = relative_squared_error(x[:, 0], sub.latents[0].to(x.device))
            finite = torch.isfinite(x.flatten(1)).all(1)  # NaN per image, after the loop
            rec, finite = rec.tolist(), finite.tolist()  # sync point: once per batch
            for r, j in enumerate(chunk):
                if not finite[r]:
                    errors.append(ItemError(j, STAGE, "NaN/inf in the edited latents"))
                    continue
                latents[j], seconds[j], rec_errors[j] = x[r], elapsed / len(chunk), rec[r]
                if state.blend_mask is not None:
                    masks[j] = state.blend_mask[r, :, 0]
                else:  # no local blend in this batch: the edit is kept everywhere
                    masks[j] = torch.ones(k, *x.shape[-2:], dtype=torch.bool, device=x.device)
                any_blend = any_blend or state.blend_mask is not None

        ok = sorted(latents)
        res = self.sd.resolution
        if ok:
            stacked = torch.stack([latents[j] for j in ok])  # (N_ok, K + 1, C, h, w)
            start = time.perf_counter()
            images = decode(self.sd.vae, stacked.flatten(0, 1)).reshape(len(ok), k + 1, res, res, 3)
            decode_share = (time.perf_counter() - start) / len(ok)
        else:
            stacked = torch.zeros(0, k + 1, 0, 0, 0)
            images, decode_share = np.zeros((0, k + 1, res, res, 3), np.uint8), 0.0
        errors.sort(key=lambda e: e.index)
        return EditResult(
            indices=ok,
            edits=images[:, 1:],
            reconstructions=images[:, 0],
            latents=stacked.cpu(),
            seconds=[seconds[j] + decode_share for j in ok],
            reconstruction_errors=[rec_errors[j] for j in ok],
            errors=[e.as_tuple() for e in errors],
            blend_masks=torch.stack([masks[j] for j in ok]).cpu() if any_blend and ok else None,
        )


# --- invert + edit, for callers such as the Ray actor -----------------------------------------


@dataclass
class EditedItem:
    """One source image's edits."""

    index: int  # position in the caller's input
    source_prompt: str
    edit_prompts: list[str]
    edits: np.ndarray  # (K, R, R, 3) uint8
    reconstruction: np.ndarray  # (R, R, 3) uint8
    inversion_seconds: float
    edit_seconds: float
    reconstruction_error: float  # unedited source branch vs the encoded source: ||z - z0||^2 / ||z0||^2


def _per_edit(seq, members: list[tuple[int, list[int]]]):
    """Per-image, per-edit arguments (blend/reweight words) picked for one editing pass's (image, edits)."""
    if seq is None:
        return None
    return [None if seq[i] is None else [seq[i][e] for e in edits] for i, edits in members]


def edit_many(
    editor: Editor,
    images,
    source_prompts: Sequence[str],
    edit_prompts: Sequence[Sequence[str]],
    *,
    blend_words=None,
    reweight_words=None,
    offsets: tuple[int, int, int, int] = (0, 0, 0, 0),
    edit_masks=None,
    keep_masks=None,
    edit_configs: Sequence[Sequence[EditConfig]] | None = None,
) -> tuple[list[EditedItem], list[tuple[int, str, str]]]:
    """Images + source prompts + edit prompts each -> (edited items, errors (index, stage, reason)).

    Inverts once per image (`editor.inversion_config`, batched by its `batch_size`) and edits
    (`edit_batch_size`); an item failing at any stage is reported and the others complete. Indices refer
    to the input. Images may have different numbers of edits.
    edit_masks[i] / keep_masks[i]: image i's user masks ((H, W[, C]) arrays of any resolution, nonzero = in,
    None = no mask; `engine.masks`): its edits change only inside the edit mask and never inside the keep mask.
    edit_configs[i][e]: the EditConfig of image i's edit e (per-intervention settings,
    `EditConfig.for_intervention`; default `editor.config`). Edits sharing a config share an editing pass;
    every pass starts from the same inversion, and its source branch does not depend on the config.
    """
    n = len(images)
    for name, seq in (("source_prompts", source_prompts), ("edit_prompts", edit_prompts), ("edit_masks", edit_masks),
                      ("keep_masks", keep_masks), ("edit_configs", edit_configs)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name}: {len(seq)} entries for {n} images")
    if edit_configs is not None and any(len(c) != len(e) for c, e in zip(edit_configs, edit_prompts, strict=True)):
        raise ValueError("edit_configs: one EditConfig per edit prompt")
    errors: list[tuple[int, str, str]] = []
    regions: dict[int, torch.Tensor | None] = {}
    if edit_masks is not None or keep_masks is not None:
        size = int(editor.sd.unet.config.sample_size)
        for i in range(n):
            shape = tuple(images[i].shape[-2:]) if isinstance(images[i], torch.Tensor) else tuple(images[i].shape[:2])
            given = []
            try:
                # `what` is read by the except below: which of the two masks failed
                for what, masks in (("edit mask", edit_masks), ("keep mask", keep_masks)):  # noqa: B007
                    mask = None if masks is None else masks[i]
                    given.append(None if mask is None else latent_mask(mask, shape, size, offsets))
            except ValueError as err:  # this image's mask only
                errors.append((i, STAGE, f"{what}: {err}"))
                continue
            regions[i] = edit_region(*given, size)
    todo = [i for i in range(n) if i not in {e[0] for e in errors}]
    k = max((len(edit_prompts[i]) for i in todo), default=1)
    config = editor.inversion_config.model_copy(update={"batch_size": editor.batch_sizes(k)[0]})
    inversion, bad = invert_many(
        editor.sd, [images[i] for i in todo], [source_prompts[i] for i in todo], config, offsets=offsets,
        policy=editor.precision, unet=editor.inversion_unet,
    )
    errors += [(todo[j], stage, reason) for j, stage, reason in bad]
    inverted = [i for i in todo if i not in {e[0] for e in errors}]
    row_of = {i: r for r, i in enumerate(inverted)}  # input index -> row of `inversion`

    # Edits that share a config and a count go through one editing pass: (config, count) -> [(image, edits)].
    configs: dict[str, EditConfig] = {}
    buckets: dict[tuple[str, int], list[tuple[int, list[int]]]] = defaultdict(list)
    for i in inverted:
        groups: dict[str, list[int]] = defaultdict(list)
        for e in range(len(edit_prompts[i])):
            cfg = editor.config if edit_configs is None else edit_configs[i][e]
            key = cfg.model_dump_json()
            configs[key] = cfg
            groups[key].append(e)
        for key, edits in groups.items():
            buckets[(key, len(edits))].append((i, edits))
    done: dict[int, dict] = {i: {"edits": {}, "seconds": 0.0} for i in inverted}
    for (key, _), members in buckets.items():
        members = [(i, edits) for i, edits in members if i in done]  # an image failed in an earlier pass
        if not members:
            continue
        result = editor.with_config(configs[key]).edit(
            inversion.select([row_of[i] for i, _ in members]),
            [source_prompts[i] for i, _ in members],
            [[edit_prompts[i][e] for e in edits] for i, edits in members],
            blend_words=_per_edit(blend_words, members),
            reweight_words=_per_edit(reweight_words, members),
            regions=[regions.get(i) for i, _ in members] if regions else None,
        )
        for r, stage, reason in result.errors:
            errors.append((members[r][0], stage, reason))
            done.pop(members[r][0], None)
        for row, r in enumerate(result.indices):
            i, edits = members[r]
            if i not in done:
                continue
            item = done[i]
            item["edits"].update({e: result.edits[row, j] for j, e in enumerate(edits)})
            item.setdefault("reconstruction", result.reconstructions[row])
            item.setdefault("error", result.reconstruction_errors[row])
            item["seconds"] += result.seconds[row]
    items = [
        EditedItem(
            index=i,
            source_prompt=source_prompts[i],
            edit_prompts=list(edit_prompts[i]),
            edits=np.stack([item["edits"][e] for e in range(len(edit_prompts[i]))]),
            reconstruction=item["reconstruction"],
            inversion_seconds=inversion.seconds[row_of[i]] if inversion.seconds else 0.0,
            edit_seconds=item["seconds"],
            reconstruction_error=item["error"],
        )
        for i, item in sorted(done.items())
    ]
    return items, sorted(errors)
