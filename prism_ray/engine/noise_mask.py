"""Edit-region masks from noise-prediction differences along the inversion trajectory.

Prompt-to-prompt's local blend finds the edit region in the cross-attention maps of the changed
words; that needs a U-Net whose attention is word-specific and sharp (SD v1.5). Where it is not
(the tiny phantom family attends diffusely: the 0.3-threshold attention mask covers the whole
latent), the region can be read from what the U-Net would *do* differently under the two captions,
as DiffEdit does (Couairon et al., ICLR 2023): |eps(z_t, edit) - eps(z_t, source)|, averaged over
channels and noise levels. Here the noisy latents are the inversion's own DDIM trajectory z*_t, so
the mask is deterministic and costs (K + 1) conditional U-Net calls per sampled step, no guidance
(the unconditional half cancels in the difference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prism_ray.engine.scheduler import DDIMSteps, make_ddim_scheduler
from prism_ray.engine.settings import Window, window_bounds


def trajectory_points(num_steps: int, window: Window, samples: int) -> list[int]:
    """Indices into the (T + 1)-long trajectory (0 = the image's latent, T = z_T) to sample.

    `samples` points evenly spaced over [start * T, end * T], never 0 (z_0 has no timestep); repeated
    indices collapse (few steps), so fewer points may come back.
    """
    start, end = window_bounds(window)
    lo, hi = max(1, round(start * num_steps)), max(1, round(end * num_steps))
    if samples == 1:
        return [round((lo + hi) / 2)]
    return sorted({round(lo + (hi - lo) * j / (samples - 1)) for j in range(samples)})


@torch.no_grad()
def noise_difference_masks(
    unet,
    trajectory: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    window: Window = (0.1, 0.9),
    samples: int = 10,
    threshold: float = 0.5,
    quantile: float = 0.95,
    pool_radius: int = 1,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Where the edits would change the image -> bool masks (N, K, 1, h, w).

    trajectory (T + 1, N, C, h, w): the inversion's latents z_0 ... z_T (z_i at timesteps[T - i]);
    text (N, K + 1, 77, D): per image the source prompt's embedding, then its K edits'. For each
    sampled z_i: d = mean over channels |eps(z_i, edit_k) - eps(z_i, source)|; summed over samples,
    (2r + 1)^2 max-pooled (stride 1, as local blend pools its maps), divided by its `quantile` over the
    latent (1.0 = the max; below it a few extreme cells no longer shrink a broad region, as DiffEdit
    removes extreme values before rescaling), > threshold. A v-prediction U-Net's outputs are turned into
    eps first (`DDIMSteps.epsilon`).
    """
    num_steps = len(timesteps)
    if trajectory.shape[0] != num_steps + 1:
        raise ValueError(f"trajectory: expected {num_steps + 1} latents for {num_steps} steps, got {trajectory.shape[0]}")
    steps = DDIMSteps(make_ddim_scheduler(num_steps, prediction_type=prediction_type))
    n, b = text.shape[:2]
    dtype = next(unet.parameters()).dtype
    device = text.device
    context = text.flatten(0, 1).to(dtype)
    total = None
    for i in trajectory_points(num_steps, window, samples):
        z = trajectory[i].to(device, dtype)[:, None].expand(-1, b, -1, -1, -1).flatten(0, 1)
        t = int(timesteps[num_steps - i])
        eps = steps.epsilon(unet(z, t, encoder_hidden_states=context).sample.float(), t, z.float())
        eps = eps.view(n, b, *eps.shape[1:])
        diff = (eps[:, 1:] - eps[:, :1]).abs().mean(2)  # (N, K, h, w)
        total = diff if total is None else total + diff
    r = pool_radius
    pooled = F.max_pool2d(total, 2 * r + 1, stride=1, padding=r)
    scale = pooled.flatten(2).quantile(quantile, dim=2)[..., None, None]  # (N, K, 1, 1)
    scale = scale.clamp_min(torch.finfo(pooled.dtype).tiny)  # identical prompts: d = 0, empty mask
    return (pooled / scale > threshold)[:, :, None]
