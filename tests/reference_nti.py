"""Test oracle: null-text inversion for ONE image, written plainly from docs/method.md §4-§6 (no prism_ray.engine code).

It follows the structure of the google/prompt-to-prompt null-text notebook (Mokady et al. 2023): DDIM
inversion with the conditional embedding, then per timestep a new Adam on a warm-started unconditional
embedding, early stop after the step, and one guided step with the stored embedding. The schedule and
both DDIM moves are written out here from the betas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ReferenceNTI:
    """Single-image DDIM + null-text inversion with loops and inline formulas."""

    def __init__(self, unet, tokenizer, text_encoder, num_steps=50, guidance=7.5, num_inner_steps=10,
                 lr=1e-2, lr_decay=100.0, epsilon=1e-5, slope=2e-5):
        self.unet, self.tokenizer, self.text_encoder = unet, tokenizer, text_encoder
        self.num_steps, self.guidance, self.num_inner_steps = num_steps, guidance, num_inner_steps
        self.lr, self.lr_decay, self.epsilon, self.slope = lr, lr_decay, epsilon, slope
        # scaled_linear betas: linspace in sqrt space, squared; 1000 train steps.
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final_alpha = self.alphas_cumprod[0]  # set_alpha_to_one=False
        self.stride = 1000 // num_steps
        # "leading" spacing with steps_offset=1: 0, stride, 2 stride, ... reversed, + 1
        self.timesteps = [k * self.stride + 1 for k in reversed(range(num_steps))]

    def alpha(self, t):
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha

    def prev_step(self, eps, t, sample):
        a_t, a_prev = self.alpha(t), self.alpha(t - self.stride)
        x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    def next_step(self, eps, t, sample):
        a_from, a_to = self.alpha(t - self.stride), self.alpha(t)
        x0 = (sample - (1 - a_from) ** 0.5 * eps) / a_from**0.5
        return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps

    @torch.no_grad()
    def embed(self, prompt):
        ids = self.tokenizer([prompt], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]  # (1, 77, D)

    def noise(self, z, t, context):
        return self.unet(z, t, encoder_hidden_states=context).sample

    @torch.no_grad()
    def ddim_inversion(self, z0, cond):
        latents = [z0]
        z = z0
        for i in range(self.num_steps):
            t = self.timesteps[self.num_steps - 1 - i]
            z = self.next_step(self.noise(z, t, cond), t, z)
            latents.append(z)
        return latents

    def null_optimization(self, latents, cond, uncond):
        flags = [p.requires_grad for p in self.unet.parameters()]
        self.unet.requires_grad_(False)  # only the embedding learns; restored below
        try:
            return self._null_optimization(latents, cond, uncond)
        finally:
            for p, flag in zip(self.unet.parameters(), flags, strict=True):
                p.requires_grad_(flag)

    def _null_optimization(self, latents, cond, uncond):
        uncond_list, inner_steps = [], []
        z_cur = latents[-1]
        for i in range(self.num_steps):
            uncond = uncond.clone().detach()
            uncond.requires_grad = True
            optimizer = torch.optim.Adam([uncond], lr=self.lr * (1.0 - i / self.lr_decay))
            target = latents[len(latents) - i - 2]
            t = self.timesteps[i]
            with torch.no_grad():
                eps_cond = self.noise(z_cur, t, cond)
            used = 0
            for _ in range(self.num_inner_steps):
                eps_uncond = self.noise(z_cur, t, uncond)
                eps = eps_uncond + self.guidance * (eps_cond - eps_uncond)
                z_rec = self.prev_step(eps, t, z_cur)
                loss = F.mse_loss(z_rec, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                used += 1
                if loss.item() < self.epsilon + i * self.slope:
                    break
            uncond_list.append(uncond.detach().clone())
            inner_steps.append(used)
            with torch.no_grad():
                context = torch.cat([uncond, cond])
                eps_u, eps_c = self.noise(torch.cat([z_cur, z_cur]), t, context).chunk(2)
                z_cur = self.prev_step(eps_u + self.guidance * (eps_c - eps_u), t, z_cur)
        return uncond_list, inner_steps

    def invert(self, z0, prompt):
        """z0 (1, C, h, w) -> (latents list z_0..z_T, per-step uncond list, inner steps per step)."""
        cond = self.embed(prompt)
        latents = self.ddim_inversion(z0, cond)
        uncond, inner = self.null_optimization(latents, cond, self.embed(""))
        return latents, uncond, inner

    @torch.no_grad()
    def reconstruct(self, z_T, cond, uncond_list):
        z = z_T
        for i, t in enumerate(self.timesteps):
            eps_u, eps_c = self.noise(torch.cat([z, z]), t, torch.cat([uncond_list[i], cond])).chunk(2)
            z = self.prev_step(eps_u + self.guidance * (eps_c - eps_u), t, z)
        return z
