"""The editing pass on the tiny family: reconstruction, local blend, batching, K edits, per-item errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prism_ray.engine.editor import Editor, edit_many
from prism_ray.engine.images import encode, preprocess
from prism_ray.engine.scheduler import DDIMSteps, make_ddim_scheduler
from prism_ray.engine.settings import EditConfig, InversionConfig
from prism_ray.engine.text import encode_prompts
from prism_ray.engine.types import InversionResult

T = 4  # denoising steps: enough to exercise windows and blend start, cheap on 2 shared cores
SOURCES = ["a chest x-ray of a male patient", "a chest x-ray showing cardiomegaly", "a chest x-ray"]
EDITS = [
    ["a chest x-ray of a female patient", "a chest x-ray of a male patient with pacemaker"],
    ["a chest x-ray showing edema", "a chest x-ray showing cardiomegaly and effusion"],
    ["a chest x-ray showing pneumonia", "a chest x-ray with tube"],
]


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    out = []
    for _ in range(n):
        cy, cx, r = rng.integers(20, 44, 2).tolist() + [int(rng.integers(8, 16))]
        img = 60 + 120 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) + rng.integers(0, 30, (64, 64))
        out.append(img.astype(np.uint8))
    return out


@torch.no_grad()
def _ddim_inversion(sd, prompts: list[str], direct: bool = False, scale: float = 7.5) -> InversionResult:
    """A plain DDIM inversion written here (docs/method.md §5), "" as the unconditional context;
    with `direct`, the per-step residuals of direct inversion (added to the source branch after step i)."""
    steps = DDIMSteps(make_ddim_scheduler(T))
    z = encode(sd.vae, preprocess(_images(len(prompts)), sd.resolution)).float()
    cond = encode_prompts(sd.tokenizer, sd.text_encoder, prompts).float()
    uncond = encode_prompts(sd.tokenizer, sd.text_encoder, [""]).float().expand(len(prompts), -1, -1)
    latents = [z]
    for i in range(T):
        t = int(steps.timesteps[T - 1 - i])
        z = steps.next_step(sd.unet(z, t, encoder_hidden_states=cond).sample, t, z)
        latents.append(z)
    latents = torch.stack(latents)
    residuals = None
    if direct:
        residuals = []
        for i in range(T):
            t, z_t = int(steps.timesteps[i]), latents[T - i]
            eps = sd.unet(torch.cat([z_t, z_t]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            eps_u, eps_c = eps.chunk(2)
            residuals.append(latents[T - 1 - i] - steps.prev_step(eps_u + scale * (eps_c - eps_u), t, z_t))
        residuals = torch.stack(residuals)
    return InversionResult(
        latents=latents,
        cond_embeddings=cond,
        uncond_embeddings=uncond[None].repeat(T, 1, 1, 1),
        timesteps=steps.timesteps.clone(),
        method="direct" if direct else "ddim",
        residuals=residuals,
    )


@pytest.fixture(scope="module")
def inversion(tiny_sd):
    return _ddim_inversion(tiny_sd, SOURCES)


def _editor(sd, **edit) -> Editor:
    return Editor(sd, EditConfig(**edit), InversionConfig(num_inference_steps=T))


def test_edit_equal_to_source_reconstructs(tiny_sd, inversion):
    # PRISM defaults (refine + reweight x2 of the edit words, which are none here).
    result = _editor(tiny_sd).edit(inversion.select([0, 1]), SOURCES[:2], [[s] for s in SOURCES[:2]])
    assert result.indices == [0, 1] and result.errors == []
    assert result.edits.shape == (2, 1, 64, 64, 3) and result.reconstructions.shape == (2, 64, 64, 3)
    torch.testing.assert_close(result.latents[:, 1], result.latents[:, 0], atol=1e-6, rtol=0)
    assert np.array_equal(result.edits[:, 0], result.reconstructions)


def test_k_edits_per_image(tiny_sd, inversion):
    result = _editor(tiny_sd).edit(inversion.select([0, 1]), SOURCES[:2], EDITS[:2])
    assert result.indices == [0, 1] and result.errors == []
    assert result.edits.shape == (2, 2, 64, 64, 3) and result.edits.dtype == np.uint8
    assert len(result.seconds) == 2 and min(result.seconds) > 0
    # Real edits move away from the source branch.
    assert (result.latents[:, 1:] - result.latents[:, :1]).abs().flatten(2).amax(-1).min() > 1e-3


@torch.no_grad()
def _plain_guided_sampling(sd, z_T, cond, uncond, scales) -> torch.Tensor:
    """DDIM sampling written here: step i guides with scales[i] (docs/method.md §3-§4)."""
    steps = DDIMSteps(make_ddim_scheduler(T))
    z = z_T
    for i, t in enumerate(steps.timesteps.tolist()):
        eps = sd.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond[i], cond])).sample
        eps_u, eps_c = eps.chunk(2)
        z = steps.prev_step(eps_u + scales[i] * (eps_c - eps_u), t, z)
    return z


@pytest.mark.parametrize("edit_guidance", [3.0, (10.0, 2.0)])
def test_edit_guidance_drives_the_edit_branches_only(tiny_sd, inversion, edit_guidance):
    sub, edits = inversion.select([0, 1]), EDITS[:2]
    plain = dict(controller="none", reweight=None, self_replace_steps=0.0)  # no attention control
    reference = _editor(tiny_sd, **plain).edit(sub, SOURCES[:2], edits)
    guided = _editor(tiny_sd, **plain, edit_guidance=edit_guidance).edit(sub, SOURCES[:2], edits)
    # The source branch keeps the inversion's guidance: the same reconstruction, bit for bit.
    assert torch.equal(guided.latents[:, 0], reference.latents[:, 0])
    # Without attention control each edit branch is plain guided sampling from z_T at the schedule.
    first, last = (edit_guidance, edit_guidance) if isinstance(edit_guidance, float) else edit_guidance
    scales = [first + (last - first) * i / (T - 1) for i in range(T)]
    cond = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [EDITS[0][1]]).float()
    uncond = sub.uncond_embeddings[:, :1].float()  # (T, 1, 77, D): image 0's per-step null context
    expected = _plain_guided_sampling(tiny_sd, sub.z_T[:1].float(), cond, uncond, scales)
    torch.testing.assert_close(guided.latents[0, 2], expected[0], atol=2e-4, rtol=1e-4)  # batched vs one: ~1e-4
    assert (guided.latents[:, 1:] - reference.latents[:, 1:]).abs().amax() > 1e-3
    # The inversion's own scale as the edit guidance is the reference pass.
    same = _editor(tiny_sd, **plain, edit_guidance=7.5).edit(sub, SOURCES[:2], edits)
    assert torch.equal(same.latents, reference.latents)


def test_edit_guidance_is_validated():
    with pytest.raises(ValueError, match="edit_guidance"):
        EditConfig(edit_guidance=-1.0)
    with pytest.raises(ValueError, match="edit_guidance"):
        EditConfig(per_intervention={"Cardiomegaly": {"edit_guidance": (5.0, 99.0)}})
    assert EditConfig(per_intervention={"Cardiomegaly": {"edit_guidance": (10.0, 5.0)}}).for_intervention(
        "Cardiomegaly=0"
    ).edit_guidance == (10.0, 5.0)


def test_replace_needs_equal_word_counts(tiny_sd, inversion):
    edits = [EDITS[0][1:], ["a chest x-ray showing edema"]]  # image 0: "... with pacemaker" adds words
    result = _editor(tiny_sd, controller="replace").edit(inversion.select([0, 1]), SOURCES[:2], edits)
    assert result.indices == [1] and result.errors[0][:2] == (0, "edit")
    assert "same number of words" in result.errors[0][2]
    assert (result.latents[:, 1] - result.latents[:, 0]).abs().amax() > 1e-3


def test_several_images_per_call_equal_one_per_call(tiny_sd, inversion):
    sub, edits = inversion.select([0, 1]), EDITS[:2]
    one = _editor(tiny_sd, edit_batch_size=1, local_blend=True).edit(sub, SOURCES[:2], edits)
    many = _editor(tiny_sd, edit_batch_size=2, local_blend=True).edit(sub, SOURCES[:2], edits)
    assert one.indices == many.indices == [0, 1]
    torch.testing.assert_close(many.latents, one.latents, atol=1e-4, rtol=1e-4)
    assert torch.equal(many.blend_masks, one.blend_masks)


def test_local_blend_keeps_source_outside_mask(tiny_sd, inversion):
    blend = [[(["male"], ["female"]), None], [(["cardiomegaly"], ["edema"]), None]]
    # Random weights attend almost uniformly (normalised maps lie in ~[0.91, 1]): a high threshold
    # makes the mask partial.
    editor = _editor(tiny_sd, blend_threshold=0.98, blend_start=0.0, self_replace_steps=0.0)
    result = editor.edit(inversion.select([0, 1]), SOURCES[:2], EDITS[:2], blend_words=blend)
    masks = result.blend_masks  # (N, K, h, w) bool
    assert masks is not None and masks.shape == (2, 2, 16, 16)
    blended = masks[:, 0]
    assert 0 < blended.float().mean() < 1, "the mask should cover part of the latent"
    assert bool(masks[:, 1].all())  # edits without blend: mask = 1
    outside = ~blended[:, None].expand(-1, 4, -1, -1)  # (2, C, h, w)
    src, edit = result.latents[:, 0], result.latents[:, 1]
    assert torch.equal(edit[outside], src[outside])
    assert (edit[~outside] - src[~outside]).abs().amax() > 1e-3  # and the edit happens inside


# --- local blend with the noise-difference mask ----------------------------------------------


def _hand_noise_map(sd, inv: InversionResult, sources, edits, points, quantile) -> torch.Tensor:
    """Written plainly: one U-Net call per (image, prompt, trajectory point), |eps_e - eps_s| summed
    over points, channel mean, 3 x 3 neighbourhood max by explicit shifts, divided by its quantile."""
    n_steps = len(inv.timesteps)
    maps = []
    with torch.no_grad():
        for j, (source, edit_prompts) in enumerate(zip(sources, edits, strict=True)):
            rows = []
            for edit in edit_prompts:
                total = torch.zeros(16, 16)
                for i in points:
                    z, t = inv.latents[i, j : j + 1], int(inv.timesteps[n_steps - i])
                    e_src = sd.unet(z, t, encoder_hidden_states=encode_prompts(sd.tokenizer, sd.text_encoder, [source])).sample
                    e_edit = sd.unet(z, t, encoder_hidden_states=encode_prompts(sd.tokenizer, sd.text_encoder, [edit])).sample
                    total += (e_edit - e_src).abs()[0].mean(0)
                padded = torch.nn.functional.pad(total, (1, 1, 1, 1), value=-1.0)
                pooled = torch.stack([padded[dy : dy + 16, dx : dx + 16] for dy in range(3) for dx in range(3)]).amax(0)
                rows.append(pooled / float(np.quantile(pooled.numpy(), quantile)))
            maps.append(torch.stack(rows))
    return torch.stack(maps)  # (N, K, h, w)


def test_trajectory_points():
    from prism_ray.engine.noise_mask import trajectory_points

    assert trajectory_points(50, (0.1, 0.9), 10) == [5, 9, 14, 18, 23, 27, 32, 36, 41, 45]
    assert trajectory_points(4, (0.1, 0.9), 10) == [1, 2, 3, 4]  # few steps: duplicates collapse
    assert trajectory_points(50, 0.5, 1) == [13]  # window [0, 0.5]; never index 0 (z_0 has no timestep)
    with pytest.raises(ValueError, match="window"):
        trajectory_points(50, (0.9, 0.1), 3)


def test_noise_mask_equals_hand_computation(tiny_sd, inversion):
    from prism_ray.engine.noise_mask import noise_difference_masks

    sub, edits = inversion.select([0, 1]), EDITS[:2]
    text = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [p for s, e in zip(SOURCES[:2], edits, strict=True) for p in (s, *e)])
    text = text.view(2, 3, *text.shape[1:])
    for quantile, threshold in ((1.0, 0.5), (0.9, 0.6)):
        masks = noise_difference_masks(tiny_sd.unet, sub.latents, sub.timesteps, text, window=(0.0, 1.0), samples=4,
                                       threshold=threshold, quantile=quantile)
        assert masks.shape == (2, 2, 1, 16, 16) and masks.dtype == torch.bool
        hand = _hand_noise_map(tiny_sd, sub, SOURCES[:2], edits, points=[1, 2, 3, 4], quantile=quantile)
        decided = (hand - threshold).abs() > 1e-4  # leave values on the threshold to float rounding
        assert torch.equal(masks[:, :, 0][decided], (hand > threshold)[decided])
        assert 0 < masks.float().mean() < 1


def test_noise_blend_keeps_source_outside_its_mask(tiny_sd, inversion):
    editor = _editor(tiny_sd, local_blend=True, blend_mask="noise", blend_start=0.0, self_replace_steps=0.0)
    result = editor.edit(inversion.select([0, 1]), SOURCES[:2], EDITS[:2])
    masks = result.blend_masks  # (N, K, h, w)
    assert masks is not None and masks.shape == (2, 2, 16, 16)
    assert 0 < masks.float().mean() < 1, "the mask should cover part of the latent"
    outside = ~masks[:, :, None].expand(-1, -1, 4, -1, -1)  # (N, K, C, h, w)
    src, edit = result.latents[:, :1].expand_as(result.latents[:, 1:]), result.latents[:, 1:]
    assert torch.equal(edit[outside], src[outside])
    assert (edit[~outside] - src[~outside]).abs().amax() > 1e-3
    # Only local blend's edits are masked; an edit equal to its source gets an empty mask (no change).
    same = editor.edit(inversion.select([0]), SOURCES[:1], [[SOURCES[0], EDITS[0][0]]])
    assert bool(same.blend_masks[0, 0].all())  # no words differ: local blend off for that edit
    torch.testing.assert_close(same.latents[:, 1], same.latents[:, 0], atol=1e-6, rtol=0)


def test_bad_items_are_reported_and_the_rest_complete(tiny_sd, inversion):
    bad = InversionResult(**{**inversion.__dict__, "latents": inversion.latents.clone()})
    bad.latents[-1, 2, 0, 0, 0] = float("nan")  # z_T of image 2
    reweight = [None, [["pacemaker"]], None]  # image 1: "pacemaker" is not in its edit prompt
    edits = [e[:1] for e in EDITS]
    result = _editor(tiny_sd, edit_batch_size=3).edit(bad, SOURCES, edits, reweight_words=reweight)
    assert result.indices == [0]
    assert [e[:2] for e in result.errors] == [(1, "edit"), (2, "edit")]
    assert "'pacemaker'" in result.errors[0][2] and "NaN" in result.errors[1][2]
    assert result.edits.shape == (1, 1, 64, 64, 3)
    clean = _editor(tiny_sd).edit(inversion.select([0]), SOURCES[:1], edits[:1])
    torch.testing.assert_close(result.latents, clean.latents, atol=1e-4, rtol=1e-4)


def test_direct_inversion_source_branch_reconstructs(tiny_sd):
    inversion = _ddim_inversion(tiny_sd, SOURCES[:1], direct=True)
    result = _editor(tiny_sd).edit(inversion, SOURCES[:1], EDITS[:1])
    # Float noise of the batched U-Net (~3e-6 in eps) grows through the 7.5x guidance of a random
    # U-Net; without the residuals the same source branch ends ~7 away from z_0 on this model.
    error = (result.latents[:, 0] - inversion.latents[0]).abs().amax()
    assert error < 5e-3
    assert result.reconstruction_errors[0] < 1e-4  # relative squared; the same float noise


def test_ddpm_inversion_source_branch_reconstructs_and_edits_share_its_noise(tiny_sd):
    from prism_ray.engine.inversion import invert_many

    config = InversionConfig(method="ddpm", num_inference_steps=T)
    inversion, errors = invert_many(tiny_sd, _images(2), SOURCES[:2], config)
    assert not errors and inversion.noise.shape[:2] == (T, 2)
    plain = dict(controller="none", reweight=None, self_replace_steps=0.0)
    editor = Editor(tiny_sd, EditConfig(**plain), config)
    result = editor.edit(inversion, SOURCES[:2], [[SOURCES[0], EDITS[0][0]], [SOURCES[1], EDITS[1][0]]])
    assert max(result.reconstruction_errors) < 1e-6  # the source branch passes through every noisy latent
    # An edit prompt equal to the source is the reconstruction; a different one moves away from it.
    torch.testing.assert_close(result.latents[:, 1], result.latents[:, 0], atol=1e-5, rtol=0)
    assert (result.latents[:, 2] - result.latents[:, 0]).abs().amax() > 1e-3
    # Without attention control an edit branch is the stochastic sampler with the source's noise.
    steps = DDIMSteps(make_ddim_scheduler(T))
    cond = encode_prompts(tiny_sd.tokenizer, tiny_sd.text_encoder, [EDITS[0][0]]).float()
    z = inversion.z_T[:1]
    with torch.no_grad():
        for i, t in enumerate(steps.timesteps.tolist()):
            context = torch.cat([inversion.uncond_embeddings[i, :1], cond])
            eps_u, eps_c = tiny_sd.unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample.chunk(2)
            z = steps.prev_mean(eps_u + 7.5 * (eps_c - eps_u), t, z)[0] + inversion.noise[i, :1]
    torch.testing.assert_close(result.latents[0, 2], z[0], atol=2e-4, rtol=1e-4)
    # With PRISM's attention control (the default) the source branch still reconstructs.
    default = Editor(tiny_sd, EditConfig(), config).edit(inversion, SOURCES[:2], [EDITS[0][:1], EDITS[1][:1]])
    assert max(default.reconstruction_errors) < 1e-6


@torch.no_grad()
def test_reconstruction_error_is_the_unedited_source_branch_error(tiny_sd, inversion):
    """EditResult.reconstruction_errors: ||z - z_0||^2 / ||z_0||^2 of a plain guided denoising from z_T."""
    rows = [0, 2]
    sub = inversion.select(rows)
    result = _editor(tiny_sd).edit(sub, [SOURCES[r] for r in rows], [EDITS[r] for r in rows])
    steps = DDIMSteps(make_ddim_scheduler(T))
    z = sub.latents[-1]
    for i, t in enumerate(steps.timesteps.tolist()):
        context = torch.cat([sub.uncond_embeddings[i], sub.cond_embeddings])
        eps = tiny_sd.unet(torch.cat([z, z]), t, encoder_hidden_states=context).sample
        eps_u, eps_c = eps.chunk(2)
        z = steps.prev_step(eps_u + 7.5 * (eps_c - eps_u), t, z)
    z0 = sub.latents[0]
    expected = [float(((z[r] - z0[r]) ** 2).sum() / (z0[r] ** 2).sum()) for r in range(len(rows))]
    assert result.reconstruction_errors == pytest.approx(expected, rel=1e-3)
    assert min(expected) > 1e-2  # plain DDIM at w = 7.5 does not reconstruct on the random U-Net


def test_edit_many_reports_failures_per_item(tiny_sd):
    pytest.importorskip("prism_ray.engine.inversion")
    images = _images(3)
    images[1] = images[1].astype(np.float32)  # not uint8: fails at inversion
    edits = [EDITS[0][:1], EDITS[1][:1], [SOURCES[2] + " with pacemaker"]]
    editor = Editor(tiny_sd, EditConfig(), InversionConfig(method="ddim", num_inference_steps=T))
    items, errors = edit_many(editor, images, SOURCES, edits, reweight_words=[None, None, [["tube"]]])
    assert [e[:2] for e in errors] == [(1, "invert"), (2, "edit")]
    assert [item.index for item in items] == [0]
    assert items[0].edits.shape == (1, 64, 64, 3) and items[0].reconstruction.shape == (64, 64, 3)
    assert items[0].edit_seconds > 0 and items[0].inversion_seconds > 0 and items[0].reconstruction_error > 0


def test_config_word_windows_apply_where_the_word_occurs(tiny_sd):
    """EditConfig's per-word cross windows: the word's tokens follow its own window in edits containing it;
    an edit without the word keeps the default (a job-wide table is not an error there)."""
    from prism_ray.engine import seq_aligner as sa

    editor = _editor(tiny_sd, cross_replace_steps={"default_": 0.8, "pacemaker": (0.2, 0.6)})
    edits = ["a chest x-ray of a male patient with pacemaker", "a chest x-ray of a female patient"]
    alpha = editor.plan(SOURCES[0], edits, T).cross_alpha[:, :, 0, 0]  # (T + 1, K, 77); rows [0, 4) default, [1, 3) word
    word = sa.word_token_indices(edits[0], "pacemaker", tiny_sd.tokenizer)
    other = [i for i in range(sa.MAX_TOKENS) if i not in word]
    assert alpha[:, 0, word[0]].tolist() == [0, 1, 1, 0, 0]
    assert alpha[:, 0, other].amax(dim=1).tolist() == [1, 1, 1, 1, 0]
    assert alpha[:, 1].amax(dim=1).tolist() == [1, 1, 1, 1, 0] and alpha[:, 1].amin(dim=1).tolist() == [1, 1, 1, 1, 0]


def test_config_windows_are_validated():
    from prism_ray.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="'cross_replace_steps'.*Devices"):
        build_config(EditConfig, {"cross_replace_steps": {"default_": 0.8, "Devices": [0.7, 0.2]}})
    with pytest.raises(ConfigError, match="'self_replace_steps'"):
        build_config(EditConfig, {"self_replace_steps": [0.5, 1.5]})


@pytest.fixture(scope="module")
def phantom_inversion():
    """The shipped phantom-trained family and a plain DDIM inversion (T = 8) of one device phantom."""
    from prism_ray.engine.inversion import invert_many
    from prism_ray.models.loading import load_sd_components
    from prism_ray.phantom.render import PhantomAttributes, render_phantom

    sd = load_sd_components("tiny", device="cpu")
    image = render_phantom(PhantomAttributes(cardiomegaly=True, devices=frozenset({"pacemaker"})), 7, sd.resolution)
    source = "Chest X-ray showing Cardiomegaly, Support Devices"
    result, errors = invert_many(sd, [image], [source], InversionConfig(method="ddim", num_inference_steps=8))
    assert errors == []
    return sd, result, source


@pytest.mark.parametrize(
    "control",
    [{}, {"controller": "replace", "reweight": None}, {"local_blend": True}, {"local_blend": True, "blend_mask": "noise"}],
    ids=["refine+reweight", "replace", "attention-blend", "noise-blend"],
)
def test_bf16_editing_pass_runs_every_control_and_stays_close(phantom_inversion, control):
    """EditConfig.compute_dtype = bfloat16: the U-Net runs under autocast, the control maths and latents stay
    fp32; on the trained family the images are finite and within a few 1e-3 of the fp32 pass."""
    sd, inversion, source = phantom_inversion
    edit = "Chest X-ray showing Cardiomegaly, Pleural Effusion"  # equal word counts (replace)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        editor = Editor(sd, EditConfig(compute_dtype=dtype, **control), InversionConfig(num_inference_steps=8))
        runs[dtype] = editor.edit(inversion, [source], [[edit]])
    bf16, fp32 = runs["bfloat16"], runs["float32"]
    assert bf16.errors == [] and bf16.latents.dtype == torch.float32 and torch.isfinite(bf16.latents).all()
    diff = np.abs(bf16.edits.astype(float) - fp32.edits.astype(float)).mean() / 255
    print(control, "bf16 vs fp32 mean abs pixel difference", diff)
    assert 0 < diff < 0.01
