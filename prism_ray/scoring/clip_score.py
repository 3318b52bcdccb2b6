"""CLIP scores of counterfactuals (directional S_CLIP, image-image, image-text) and the filter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prism_ray.scoring.filter import FilterConfig

# OpenAI CLIP's image normalisation (the same for ViT-B/32 and ViT-L/14).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MAX_LENGTH = 77

# A direction shorter than this (between unit-norm embeddings) is numerical noise, not an edit.
_ZERO_DIRECTION = 1e-6


# The filter is the job config's own section: one definition of the thresholds and their rule.
FilterThresholds = FilterConfig


class ClipScorer:
    """Embeds images and prompts with a transformers CLIPModel and scores counterfactual edits.

    `model`: a `transformers.CLIPModel`; `tokenizer`: its `CLIPTokenizer`. `image_size` defaults
    to `model.config.vision_config.image_size`. `device=None` keeps the model where it is;
    otherwise the model is moved there. Images are uint8 arrays (N, H, W, 3), (N, H, W, 1) or
    grayscale (N, H, W); all returned embeddings are L2-normalised float32.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_size: int | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size if image_size is not None else model.config.vision_config.image_size)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.batch_size = batch_size

    @classmethod
    def from_components(cls, clip: Any, **kwargs: Any) -> ClipScorer:
        """From a `prism_ray.models.loading.ClipComponents` (model, tokenizer, image_size, device)."""
        return cls(clip.model, clip.tokenizer, image_size=clip.image_size, device=clip.device, **kwargs)

    # -- preprocessing ------------------------------------------------------------------

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W[, C]) -> normalised float32 (N, 3, S, S) on the scorer's device.

        As CLIP does: resize the shorter side to S (bicubic, antialiased), center-crop S x S,
        then normalise with CLIP's mean/std.
        """
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {x.dtype}")
        if x.ndim == 3:  # (N, H, W) grayscale
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3), got {tuple(x.shape)}")
        x = x.to(self.device).permute(0, 3, 1, 2).float() / 255.0  # (N, C, H, W)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        s = self.image_size
        h, w = x.shape[-2:]
        if min(h, w) != s:
            # Shorter side -> S, keeping the aspect ratio (int() as torchvision's / CLIP's Resize).
            new_h, new_w = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            # Bicubic overshoots; CLIP's PIL pipeline resizes in uint8, which clips to the range.
            x = x.clamp(0.0, 1.0)
            h, w = new_h, new_w
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        x = x[..., top : top + s, left : left + s]
        return (x - self.mean) / self.std

    # -- embeddings ---------------------------------------------------------------------

    @staticmethod
    def _projected(out: Any) -> torch.Tensor:
        # transformers 5 returns BaseModelOutputWithPooling with the projection in
        # pooler_output; older versions return the projected tensor itself.
        if isinstance(out, torch.Tensor):
            return out
        if hasattr(out, "pooler_output"):
            return out.pooler_output
        return out[1]

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (N, ...) -> L2-normalised projected image embeddings (N, D), float32."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[i : i + self.batch_size]).to(self.dtype)
            out.append(self._projected(self.model.get_image_features(pixel_values=pixels)).float())
        if not out:
            raise ValueError("no images given")
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts (P,) -> L2-normalised projected text embeddings (P, D), float32.

        Each distinct prompt is encoded once per call (edits share their source prompt).
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, not one string")
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        unique = list(dict.fromkeys(prompts))
        out = []
        for i in range(0, len(unique), self.batch_size):
            tokens = self.tokenizer(
                unique[i : i + self.batch_size],
                padding="max_length",
                max_length=CLIP_MAX_LENGTH,
                truncation=True,
                return_tensors="pt",
            )
            feats = self.model.get_text_features(
                input_ids=tokens.input_ids.to(self.device),
                attention_mask=tokens.attention_mask.to(self.device),
            )
            out.append(self._projected(feats).float())
        embeds = F.normalize(torch.cat(out), dim=-1)  # (U, D)
        index = {p: j for j, p in enumerate(unique)}
        return embeds[torch.tensor([index[p] for p in prompts], device=embeds.device)]

    # -- scores -------------------------------------------------------------------------

    @staticmethod
    def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise cosine (N,); 0 where either vector is (numerically) zero."""
        na, nb = a.norm(dim=-1), b.norm(dim=-1)
        valid = (na > _ZERO_DIRECTION) & (nb > _ZERO_DIRECTION)
        cos = (a * b).sum(-1) / (na * nb).clamp_min(_ZERO_DIRECTION**2)
        return torch.where(valid, cos, torch.zeros_like(cos))

    @staticmethod
    def _broadcast(prompts: str | Sequence[str], n: int, name: str) -> list[str]:
        if isinstance(prompts, str):
            return [prompts] * n
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"{name} has {len(prompts)} prompts for {n} images")
        return prompts

    def _check_pair(self, orig_images: Any, cf_images: Any) -> int:
        if len(orig_images) not in (1, len(cf_images)):
            raise ValueError(
                f"orig_images ({len(orig_images)}) and cf_images ({len(cf_images)}) differ in count"
            )
        return len(cf_images)

    def _orig_embeds(self, orig_images: Any, n: int) -> torch.Tensor:
        """One source for all n counterfactuals is embedded once and shared; else one per row."""
        return self.image_embeds(orig_images).expand(n, -1)

    def _embed_all(self, orig_images, cf_images, orig_prompts, edit_prompts):
        n = self._check_pair(orig_images, cf_images)
        orig_prompts = self._broadcast(orig_prompts, n, "orig_prompts")
        edit_prompts = self._broadcast(edit_prompts, n, "edit_prompts")
        e_orig, e_cf = self._orig_embeds(orig_images, n), self.image_embeds(cf_images)
        t = self.text_embeds(orig_prompts + edit_prompts)  # one call: shared prompts encoded once
        return e_orig, e_cf, t[:n], t[n:]

    def s_clip(
        self,
        orig_images: np.ndarray,
        cf_images: np.ndarray,
        orig_prompts: str | Sequence[str],
        edit_prompts: str | Sequence[str],
    ) -> np.ndarray:
        """Directional CLIP similarity (Gal et al. 2022, StyleGAN-NADA), (N,) float32:

            S_CLIP = cos(E_I(I_cf) - E_I(I_orig), E_T(P_edit) - E_T(P_orig)).

        A zero direction (identical images, or identical prompts) has no angle; S_CLIP is
        defined as 0 there, which the default filter (>= 0.1) rejects.
        """
        e_orig, e_cf, t_orig, t_edit = self._embed_all(orig_images, cf_images, orig_prompts, edit_prompts)
        return self._cosine(e_cf - e_orig, t_edit - t_orig).cpu().numpy()

    def image_image_similarity(self, orig_images: np.ndarray, cf_images: np.ndarray) -> np.ndarray:
        """cos(E_I(I_orig), E_I(I_cf)), (N,) float32: how much of the source image survived."""
        n = self._check_pair(orig_images, cf_images)
        return self._cosine(self._orig_embeds(orig_images, n), self.image_embeds(cf_images)).cpu().numpy()

    def image_text_similarity(self, cf_images: np.ndarray, edit_prompts: str | Sequence[str]) -> np.ndarray:
        """cos(E_I(I_cf), E_T(P_edit)), (N,) float32: does the edit image show the edit prompt."""
        prompts = self._broadcast(edit_prompts, len(cf_images), "edit_prompts")
        return self._cosine(self.image_embeds(cf_images), self.text_embeds(prompts)).cpu().numpy()

    def score(
        self,
        orig_images: np.ndarray,
        cf_images: np.ndarray,
        orig_prompts: str | Sequence[str],
        edit_prompts: str | Sequence[str],
    ) -> dict[str, np.ndarray]:
        """All three scores from one embedding pass, keyed as the output manifest's columns:
        `s_clip`, `clip_image_image`, `clip_image_text`, each (N,) float32.

        `orig_images` may be one image (1, ...) shared by all N counterfactuals: it is embedded once."""
        e_orig, e_cf, t_orig, t_edit = self._embed_all(orig_images, cf_images, orig_prompts, edit_prompts)
        return {
            "s_clip": self._cosine(e_cf - e_orig, t_edit - t_orig).cpu().numpy(),
            "clip_image_image": self._cosine(e_orig, e_cf).cpu().numpy(),
            "clip_image_text": self._cosine(e_cf, t_edit).cpu().numpy(),
        }
