"""The one guided DDIM sampling loop: matches diffusers' DDIM step, per-item generators, hooks, errors."""

import pytest
import torch

from prism_ray.engine.sampling import generate_images, initial_latents, sample_latents, text_to_latents
from prism_ray.engine.scheduler import make_ddim_scheduler
from prism_ray.engine.text import encode_prompts

PROMPTS = ["chest x-ray showing cardiomegaly", "chest x-ray showing pleural effusion", "normal chest x-ray"]
T = 5


def _contexts(sd, prompts):
    return encode_prompts(sd.tokenizer, sd.text_encoder, prompts), encode_prompts(sd.tokenizer, sd.text_encoder, [""])


@torch.no_grad()
def test_matches_diffusers_ddim_step(calm_sd):
    """Oracle: diffusers' own DDIMScheduler.step (eta = 0) on the same guided eps, written out here."""
    cond, uncond = _contexts(calm_sd, PROMPTS)
    z_T = initial_latents([torch.Generator().manual_seed(i) for i in range(3)], (4, 16, 16))
    scheduler = make_ddim_scheduler(T)
    z = z_T.clone()
    for t in scheduler.timesteps:
        eps_u = calm_sd.unet(z, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
        eps_c = calm_sd.unet(z, t, encoder_hidden_states=cond).sample
        z = scheduler.step(eps_u + 7.5 * (eps_c - eps_u), t, z, eta=0.0).prev_sample
    ours = sample_latents(calm_sd.unet, cond, uncond, z_T, T, 7.5)
    assert ours.shape == z_T.shape and ours.dtype == torch.float32
    assert (ours - z_T).abs().amax() > 0.1  # it moved
    torch.testing.assert_close(ours, z, rtol=0, atol=2e-5)  # float64 alphas here vs float32 there (measured 5e-6)


@torch.no_grad()
def test_batched_equals_per_item(tiny_sd):
    """One generator per item: a sample does not depend on its batch-mates or its position."""
    seeds = [11, 12, 13]
    gens = lambda s: [torch.Generator().manual_seed(x) for x in s]  # noqa: E731
    batched = text_to_latents(tiny_sd.unet, tiny_sd.tokenizer, tiny_sd.text_encoder, PROMPTS, generators=gens(seeds), num_inference_steps=3)
    for i in (2, 0):
        alone = text_to_latents(tiny_sd.unet, tiny_sd.tokenizer, tiny_sd.text_encoder, [PROMPTS[i]], generators=gens([seeds[i]]), num_inference_steps=3)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-4)
    # Different seeds give different samples.
    other = text_to_latents(tiny_sd.unet, tiny_sd.tokenizer, tiny_sd.text_encoder, PROMPTS[:1], generators=gens([99]), num_inference_steps=3)
    assert (other - batched[:1]).abs().amax() > 0.1


def test_generate_images_is_uint8_and_reproducible(tiny_sd):
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    a = generate_images(tiny_sd, PROMPTS[:2], num_inference_steps=2, guidance_scale=7.5, generators=gens())
    b = generate_images(tiny_sd, PROMPTS[:2], num_inference_steps=2, guidance_scale=7.5, generators=gens())
    assert a.shape == (2, 64, 64, 3) and a.dtype.name == "uint8"
    assert (a == b).all() and (a[0] != a[1]).any()


@torch.no_grad()
def test_per_step_grouped_uncond_and_hooks(calm_sd):
    """(T, n, 77, D) uncond with n dividing N equals the explicitly repeated contexts; hooks see every step."""
    cond, uncond = _contexts(calm_sd, PROMPTS[:2] * 2)  # N = 4 latents: 2 images x 2 branches, image-major
    cond = cond[[0, 2, 1, 3]]
    per_step = torch.stack([uncond.expand(2, -1, -1) * (1 + 0.1 * i) for i in range(T)])  # (T, 2, 77, D)
    z_T = initial_latents([torch.Generator().manual_seed(i) for i in range(4)], (4, 16, 16))
    seen = []

    def end(i, z):
        seen.append(("end", i))
        return z

    grouped = sample_latents(calm_sd.unet, cond, per_step, z_T, T, 7.5, on_step_begin=lambda i: seen.append(("begin", i)), on_step_end=end)
    explicit = sample_latents(calm_sd.unet, cond, per_step.repeat_interleave(2, 1), z_T, T, 7.5)
    torch.testing.assert_close(grouped, explicit, rtol=0, atol=0)
    assert seen == [(kind, i) for i in range(T) for kind in ("begin", "end")]
    # on_step_end's return value replaces the latents.
    zeroed = sample_latents(calm_sd.unet, cond, uncond, z_T, T, on_step_end=lambda i, z: torch.zeros_like(z))
    assert not zeroed.any()


def test_user_errors(tiny_sd):
    cond, uncond = _contexts(tiny_sd, PROMPTS)
    z = torch.zeros(3, 4, 16, 16)
    with pytest.raises(ValueError, match="generators"):
        generate_images(tiny_sd, PROMPTS, num_inference_steps=2, guidance_scale=7.5, generators=[torch.Generator()])
    with pytest.raises(ValueError, match="contexts"):
        sample_latents(tiny_sd.unet, cond, uncond.expand(2, -1, -1), z, 2)
    with pytest.raises(ValueError, match="per-step"):
        sample_latents(tiny_sd.unet, cond, uncond[None].expand(3, 3, -1, -1), z, 2)
