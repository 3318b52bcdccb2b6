"""Data passed between inversion and editing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InversionResult:
    """Everything the editing pass needs for N images inverted together.

    T = number of inference steps. Tensors live on the inversion device, float32.
    """

    latents: torch.Tensor  # (T + 1, N, C, h, w): DDIM trajectory z_0 (encoded image) ... z_T
    cond_embeddings: torch.Tensor  # (N, 77, D): source-prompt text embeddings
    uncond_embeddings: torch.Tensor  # (T, N, 77, D): per-step unconditional context for the source
    timesteps: torch.Tensor  # (T,) descending, e.g. 981 ... 1
    method: str  # null_text | ddim | negative_prompt | direct
    residuals: torch.Tensor | None = None  # (T, N, C, h, w): direct inversion's per-step correction
    noise: torch.Tensor | None = None  # (T, N, C, h, w): edit-friendly DDPM's per-step noise, every branch
    inner_steps: torch.Tensor | None = None  # (T, N) int: null-text optimisation steps used
    final_loss: torch.Tensor | None = None  # (T, N): last inner-loop loss per step
    seconds: list[float] = field(default_factory=list)  # wall time attributed to each image

    @property
    def z_T(self) -> torch.Tensor:
        return self.latents[-1]

    def select(self, index: list[int] | torch.Tensor) -> InversionResult:
        """The same result restricted to some images (e.g. drop failed ones)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.latents.device)
        pick = lambda x, dim: None if x is None else x.index_select(dim, idx.to(x.device))  # noqa: E731
        return InversionResult(
            latents=pick(self.latents, 1),
            cond_embeddings=pick(self.cond_embeddings, 0),
            uncond_embeddings=pick(self.uncond_embeddings, 1),
            timesteps=self.timesteps,
            method=self.method,
            residuals=pick(self.residuals, 1),
            noise=pick(self.noise, 1),
            inner_steps=pick(self.inner_steps, 1),
            final_loss=pick(self.final_loss, 1),
            seconds=[self.seconds[i] for i in idx.tolist()] if self.seconds else [],
        )
