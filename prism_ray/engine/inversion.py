"""DDIM inversion and the source-reconstruction methods (docs/method.md §5-§7), batched across images.

Methods (`InversionConfig.method`), each returning an `InversionResult` for the editing pass:
- `null_text`: null-text inversion, Mokady et al. 2023 ("Null-text Inversion for Editing Real Images").
- `ddim`: plain DDIM inversion; the editor uses the empty-prompt embedding at every step.
- `negative_prompt`: the source prompt as the unconditional context, Miyake et al. 2023.
- `direct`: direct inversion, Ju et al. 2023 ("PnP Inversion"), per-step residuals added to the source branch.
- `ddpm`: edit-friendly DDPM inversion, Huberman-Spiegelglas et al. 2024: independent noisy latents and the
  per-step noise that makes stochastic sampling pass through them, added to every branch.

Direct-inversion convention (what the editor must do): at editing step i (t = timesteps[i]), with the
source branch's latent x_src and the guided DDIM prev_step computed for every branch exactly as without
direct inversion (unconditional context = `uncond_embeddings[i]`, i.e. the plain "" embedding), and after
the step's latent callback (local blend) as in the PnP-Inversion code, do

    x_src <- x_src + residuals[i]          # residuals: (T, N, C, h, w); source branch only

Then x_src equals `latents[T - 1 - i]` up to float rounding at every step, so the source branch ends at
z_0. The edit branches never get the residual.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from prism_ray.engine.errors import ItemError
from prism_ray.engine.images import encode, preprocess
from prism_ray.engine.precision import PrecisionPolicy, resolve_precision, tf32_mode
from prism_ray.engine.sampling import sample_latents
from prism_ray.engine.scheduler import DDIMSteps, make_ddim_scheduler
from prism_ray.engine.settings import InversionConfig
from prism_ray.engine.text import encode_prompts, null_embedding
from prism_ray.engine.types import InversionResult

STAGE = "invert"  # the errors table's stage for everything that fails in here


# --- small helpers ---------------------------------------------------------------------------


def _eps(unet, steps: DDIMSteps, z: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    """U-Net noise prediction: z (N, C, h, w), context (N, 77, D) -> (N, C, h, w); a v-prediction U-Net's
    output is turned into noise (`DDIMSteps.epsilon`)."""
    return steps.epsilon(unet(z, t, encoder_hidden_states=context).sample, t, z)


def _guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_eps(
    unet, z: torch.Tensor, t: int, uncond: torch.Tensor, cond: torch.Tensor, scale: float, steps: DDIMSteps | None = None
):
    """Classifier-free guidance with one U-Net call on [uncond; cond], as the editing pass batches it.
    `steps` converts a v-prediction U-Net's output (None: the U-Net predicts noise)."""
    n, zz = z.shape[0], torch.cat([z, z])
    eps = unet(zz, t, encoder_hidden_states=torch.cat([uncond, cond])).sample  # (2N, C, h, w)
    if steps is not None:
        eps = steps.epsilon(eps, t, zz)
    return _guide(eps[:n], eps[n:], scale)


def _expand(embedding: torch.Tensor, n: int) -> torch.Tensor:
    """(1 or N, 77, D) -> (N, 77, D), float32."""
    if embedding.ndim != 3 or embedding.shape[0] not in (1, n):
        raise ValueError(f"uncond_init: expected (1 or {n}, 77, D), got {tuple(embedding.shape)}")
    return embedding.float().expand(n, -1, -1).clone()


@contextmanager
def _frozen(module: torch.nn.Module):
    """Parameters without grad for the duration (only the null-text embedding is optimised); restores after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _require_fp32(unet) -> None:
    dtype = next(unet.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"model.dtype: inversion runs in float32 (fp16 gives NaNs), the U-Net is {dtype}")


def make_steps(config: InversionConfig, prediction_type: str = "epsilon") -> DDIMSteps:
    """The reference DDIM grid for `config.num_inference_steps` (981 ... 1 for 50), for a U-Net that predicts
    `prediction_type` (the model's: `SDComponents.prediction_type`)."""
    return DDIMSteps(make_ddim_scheduler(config.num_inference_steps, prediction_type=prediction_type))


# --- the methods -----------------------------------------------------------------------------


@torch.no_grad()
def ddim_invert(unet, steps: DDIMSteps, z0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """DDIM inversion, conditional only (w = 1): z0 (N, C, h, w) -> latents (T + 1, N, C, h, w), z_0 ... z_T."""
    T = len(steps.timesteps)
    latents = [z0.float()]
    z = latents[0]
    for i in range(T):
        t = int(steps.timesteps[T - 1 - i])  # ascending: 1, 21, ..., 981
        z = steps.next_step(_eps(unet, steps, z, t, cond), t, z)
        latents.append(z)
    return torch.stack(latents)


def ddpm_trajectory(steps: DDIMSteps, z0: torch.Tensor, seed: int) -> torch.Tensor:
    """Edit-friendly DDPM's latents: z_t = sqrt(a_t) z0 + sqrt(1 - a_t) n_t with independent n_t ~ N(0, I) at
    every grid timestep -> (T + 1, N, C, h, w), z_0 ... z_T like a DDIM trajectory. Each image draws its noise
    from `seed` and its own latent's bytes, so it does not depend on the batch it is inverted in."""
    import hashlib

    T = len(steps.timesteps)
    out = torch.empty((T + 1, *z0.shape), dtype=torch.float32, device=z0.device)
    out[0] = z0.float()
    for k in range(z0.shape[0]):
        digest = hashlib.sha256(z0[k].detach().float().cpu().numpy().tobytes() + seed.to_bytes(8, "little"))
        g = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest.digest()[:8], "little") >> 1)
        noise = torch.randn((T, *z0.shape[1:]), generator=g).to(z0.device)
        for j in range(1, T + 1):
            a = steps.alpha(int(steps.timesteps[T - j]))
            out[j, k] = a**0.5 * out[0, k] + (1 - a) ** 0.5 * noise[j - 1]
    return out


@torch.no_grad()
def ddpm_invert(
    unet,
    steps: DDIMSteps,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond_init: torch.Tensor,
    config: InversionConfig,
    policy: PrecisionPolicy | None = None,
) -> InversionResult:
    """Edit-friendly DDPM inversion: noise[i] = latents[T-1-i] - the stochastic step's mean from latents[T-i].

    Sampling with `DDIMSteps.prev_mean` + noise[i] from z_T under the source prompt (guided, "" null)
    passes through every latent of `ddpm_trajectory` and ends at z_0; editing adds the same noise to the
    edit branches, which keeps the source's structure (docs/method.md §7). Like direct inversion, the
    guided pass runs at the editing pass's precision.
    """
    return _trajectory_corrections(
        unet, steps, latents, cond, uncond_init, config, policy, lambda eps, t, z: steps.prev_mean(eps, t, z)[0],
        method="ddpm", field="noise",
    )


def _trajectory_corrections(unet, steps, latents, cond, uncond_init, config, policy, step, *, method: str, field: str):
    """What step i must add to land on latents[T-1-i] from latents[T-i]: latents[T-1-i] - step(guided eps,
    t, latents[T-i]) for every i, the guided pass at the editing pass's precision (direct and DDPM
    inversion). Returns the InversionResult of `method` with the corrections (T, N, C, h, w) as its
    `field` and the "" context at every step."""
    _require_fp32(unet)
    T, n = len(steps.timesteps), latents.shape[1]
    policy = policy or resolve_precision(config, device=latents.device)
    cond = cond.float()
    uncond = _expand(uncond_init, n)
    out = []
    for i, t in enumerate(steps.timesteps.tolist()):
        z_t = latents[T - i]
        with policy.edit_autocast(latents.device):
            eps = guided_eps(unet, z_t, t, uncond, cond, config.guidance_scale, steps)
        out.append(latents[T - 1 - i] - step(eps.float(), t, z_t))
    return InversionResult(
        latents=latents,
        cond_embeddings=cond,
        uncond_embeddings=uncond[None].repeat(T, 1, 1, 1),
        timesteps=steps.timesteps.clone(),
        method=method,
        **{field: torch.stack(out)},
    )


class _StopFlag:
    """Whether every image has met its early-stop rule, read without waiting for the device.

    `post(active)` starts an asynchronous copy of `active.any()` into host memory (pinned, with an event,
    on CUDA; an immediate copy on CPU); `all_stopped()` reads the newest copy that has landed and never
    blocks. On a GPU the loop can therefore run a step or two past the point where every image stopped;
    those steps change nothing (stopped images are frozen), they only cost time.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[torch.Tensor, object]] = []
        self.stopped = False

    def post(self, active: torch.Tensor) -> None:
        host = torch.empty(1, dtype=torch.bool, pin_memory=self.cuda)
        host.copy_(active.any()[None], non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((host, event))

    def all_stopped(self) -> bool:
        while self.pending and (self.pending[0][1] is None or self.pending[0][1].query()):
            host, _ = self.pending.pop(0)
            self.stopped = not host.numpy()[0]  # host memory the copy has filled: no device sync
        return self.stopped


def _adam_step(param, grad, exp_avg, exp_avg_sq, step: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """torch.optim.Adam's update (defaults, no weight decay) written out -> the new parameter values.

    The same operations as `torch.optim.Adam`'s single-tensor path, with the step count a Python int
    (torch keeps it in a tensor that `.item()` reads every step) and no `param.grad` bookkeeping.
    """
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    return param.addcdiv(exp_avg, denom, value=-lr / bias_correction1)


def null_text_invert(
    unet,
    steps: DDIMSteps,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond_init: torch.Tensor,
    config: InversionConfig,
    policy: PrecisionPolicy | None = None,
) -> InversionResult:
    """Null-text optimisation (docs/method.md §6), N images at once.

    latents (T + 1, N, C, h, w) from `ddim_invert`; cond (N, 77, D); uncond_init (1 or N, 77, D), the ""
    embedding. The loss is the sum over images of each image's mean MSE, so every image gets exactly its
    own gradient; Adam is element-wise and new each step, so this is N independent optimisations. An
    image that met its early-stop rule is frozen (its row keeps its value) for the rest of the step.

    Nothing in the loop reads a device tensor on the host: losses, the early-stop mask, step counts and
    the freeze stay on the device, and the exit once every image has stopped polls a flag the device
    copies to the host asynchronously (`_StopFlag`). `policy.inner_dtype` runs the inner steps' U-Net
    forward/backward (the unconditional branch) under autocast; everything else stays fp32.
    """
    _require_fp32(unet)
    T, n = len(steps.timesteps), latents.shape[1]
    if latents.shape[0] != T + 1:
        raise ValueError(f"latents: expected {T + 1} steps, got {latents.shape[0]}")
    device = latents.device
    policy = policy or resolve_precision(config, device=device)
    scale = config.guidance_scale
    cond = cond.float()
    uncond = _expand(uncond_init, n)
    inner_steps = torch.zeros(T, n, dtype=torch.long, device=device)
    final_loss = torch.full((T, n), float("nan"), device=device)
    stored = []
    z_cur = latents[-1]
    with _frozen(unet):
        for i, t in enumerate(steps.timesteps.tolist()):
            target = latents[T - 1 - i]  # (N, C, h, w)
            uncond = uncond.detach().clone().requires_grad_(True)  # warm start from the previous step
            exp_avg, exp_avg_sq = torch.zeros_like(uncond), torch.zeros_like(uncond)  # a new Adam each step
            lr = config.learning_rate * (1.0 - i / config.lr_decay_steps)
            threshold = config.early_stop_epsilon + i * config.early_stop_slope
            with torch.no_grad():
                eps_cond = _eps(unet, steps, z_cur, t, cond)
            active = torch.ones(n, dtype=torch.bool, device=device)
            flag = _StopFlag(device)
            for j in range(config.num_inner_steps):
                if j and flag.all_stopped():
                    break  # every image met its early-stop rule
                with policy.inner_autocast(device):
                    eps_u = _eps(unet, steps, z_cur, t, uncond)
                z_rec = steps.prev_step(_guide(eps_u.float(), eps_cond, scale), t, z_cur)
                loss = (z_rec - target).pow(2).flatten(1).mean(1)  # (N,)
                (grad,) = torch.autograd.grad(loss.sum(), uncond)  # only the embedding, never the U-Net
                with torch.no_grad():
                    stepped = _adam_step(uncond, grad, exp_avg, exp_avg_sq, j + 1, lr)
                    uncond.copy_(torch.where(active[:, None, None], stepped, uncond))  # finished images stay
                    loss = loss.detach()
                    inner_steps[i] += active
                    final_loss[i] = torch.where(active, loss, final_loss[i])
                    active &= ~(loss < threshold)  # checked after the step, as the reference does
                flag.post(active)
            uncond = uncond.detach()
            stored.append(uncond.clone())
            with torch.no_grad():  # advance with the stored embedding (eps_cond is the same call's)
                z_cur = steps.prev_step(_guide(_eps(unet, steps, z_cur, t, uncond), eps_cond, scale), t, z_cur)
    return InversionResult(
        latents=latents,
        cond_embeddings=cond,
        uncond_embeddings=torch.stack(stored),
        timesteps=steps.timesteps.clone(),
        method="null_text",
        inner_steps=inner_steps.cpu(),  # sync point: once per inversion
        final_loss=final_loss.cpu(),
    )


def ddim_result(steps: DDIMSteps, latents: torch.Tensor, cond: torch.Tensor, uncond_init: torch.Tensor):
    """Plain DDIM inversion: the editor uses the "" embedding at every step."""
    T, n = len(steps.timesteps), latents.shape[1]
    uncond = _expand(uncond_init, n)
    return InversionResult(
        latents=latents,
        cond_embeddings=cond.float(),
        uncond_embeddings=uncond[None].repeat(T, 1, 1, 1),
        timesteps=steps.timesteps.clone(),
        method="ddim",
    )


def negative_prompt_invert(steps: DDIMSteps, latents: torch.Tensor, cond: torch.Tensor) -> InversionResult:
    """Negative-prompt inversion (Miyake et al. 2023): uncond_i = the source prompt's embedding, no optimisation."""
    T = len(steps.timesteps)
    cond = cond.float()
    return InversionResult(
        latents=latents,
        cond_embeddings=cond,
        uncond_embeddings=cond[None].repeat(T, 1, 1, 1),
        timesteps=steps.timesteps.clone(),
        method="negative_prompt",
    )


@torch.no_grad()
def direct_invert(
    unet,
    steps: DDIMSteps,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond_init: torch.Tensor,
    config: InversionConfig,
    policy: PrecisionPolicy | None = None,
) -> InversionResult:
    """Direct inversion (Ju et al. 2023): residuals[i] = latents[T-1-i] - guided prev_step from latents[T-i].

    The source branch that adds residuals[i] after its guided step i stays on the DDIM trajectory, so it
    reconstructs z_0 to float precision with the plain "" unconditional embedding (module docstring).
    The guided pass runs at the editing pass's precision (`policy.edit_dtype`): the residual then also
    absorbs the rounding of the editor's own (same-dtype) source-branch prediction.
    """
    return _trajectory_corrections(
        unet, steps, latents, cond, uncond_init, config, policy, steps.prev_step, method="direct", field="residuals"
    )


@torch.no_grad()
def reconstruct(unet, steps: DDIMSteps, result: InversionResult, guidance_scale: float = 7.5) -> torch.Tensor:
    """The unedited source branch: guided denoising from z_T with the stored contexts -> z_0 (N, C, h, w).

    `steps` is the reference grid the inversion ran on (`make_steps`); its length and prediction type are read.
    """
    residuals = result.residuals

    def add_residual(i: int, z: torch.Tensor) -> torch.Tensor:
        return z + residuals[i].to(z.device)  # direct inversion: source branch only

    return sample_latents(
        unet,
        result.cond_embeddings,
        result.uncond_embeddings,  # (T, N, 77, D)
        result.z_T,
        len(steps.timesteps),
        guidance_scale,
        on_step_end=None if residuals is None else add_residual,
        prediction_type=steps.prediction_type,
        step_noise=result.noise,
    )


def relative_squared_error(z: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """Per-image ||z - z0||^2 / ||z0||^2 over (N, ...) -> (N,): the reconstruction error of an inversion.

    The latent MSE (what null-text inversion minimises and what its early-stop rule bounds: 1e-5 + i * 2e-5,
    about 1e-3 at the last of 50 steps) relative to the latent's mean square; its square root is the
    relative L2 error.
    """
    diff, ref = (z.float() - z0.float()).flatten(1), z0.float().flatten(1)
    return diff.pow(2).sum(1) / ref.pow(2).sum(1).clamp_min(1e-12)


def run_method(
    unet,
    steps: DDIMSteps,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond_init: torch.Tensor,
    config: InversionConfig,
    policy: PrecisionPolicy | None = None,
) -> InversionResult:
    """Dispatch on `config.method` once the DDIM trajectory is known."""
    if config.method == "null_text":
        return null_text_invert(unet, steps, latents, cond, uncond_init, config, policy)
    if config.method == "ddim":
        return ddim_result(steps, latents, cond, uncond_init)
    if config.method == "negative_prompt":
        return negative_prompt_invert(steps, latents, cond)
    if config.method == "direct":
        return direct_invert(unet, steps, latents, cond, uncond_init, config, policy)
    if config.method == "ddpm":
        return ddpm_invert(unet, steps, latents, cond, uncond_init, config, policy)
    raise ValueError(
        f"inversion.method '{config.method}': expected null_text, ddim, negative_prompt, direct or ddpm"
    )


# --- from images: validation, encoding, batching ---------------------------------------------


def _image_item(image, index: int, resolution: int, offsets) -> torch.Tensor:
    """One input -> (3, R, R) float in [-1, 1], or ItemError. uint8 arrays are preprocessed here;
    tensors are taken as already preprocessed."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ItemError(index, STAGE, f"preprocess: expected a uint8 (H, W[, C]) image, got {image.dtype} "
                            f"{image.shape}")
        try:
            x = preprocess([image], resolution, offsets)[0]
        except Exception as err:  # any failure of one image's crop/resize drops that image only
            raise ItemError(index, STAGE, f"preprocess: {type(err).__name__}: {err}") from err
    elif isinstance(image, torch.Tensor):
        x = image.float()
    else:
        raise ItemError(index, STAGE, f"preprocess: expected a uint8 array or a tensor, got {type(image).__name__}")
    if tuple(x.shape) != (3, resolution, resolution):
        raise ItemError(index, STAGE, f"preprocess: expected shape (3, {resolution}, {resolution}), got "
                        f"{tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ItemError(index, STAGE, "preprocess: NaN/inf in the image")
    return x


def _check_latent(z: torch.Tensor, index: int, shape: tuple[int, ...], what: str) -> None:
    if tuple(z.shape) != shape:
        raise ItemError(index, STAGE, f"{what}: expected latent shape {shape}, got {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ItemError(index, STAGE, f"{what}: NaN/inf in the latent")


def _latent_shape(sd) -> tuple[int, int, int]:
    side = int(sd.unet.config.sample_size)
    return (int(sd.unet.config.in_channels), side, side)


def _check_result(result: InversionResult, index: Sequence[int]) -> list[ItemError]:
    """Per-image check that nothing became NaN/inf during the method (e.g. a diverging optimisation)."""
    errors = []
    for k, item in enumerate(index):
        parts = [result.latents[:, k], result.uncond_embeddings[:, k]]
        for extra in (result.residuals, result.noise):
            if extra is not None:
                parts.append(extra[:, k])
        if not all(torch.isfinite(p).all() for p in parts):
            errors.append(ItemError(item, STAGE, f"{result.method}: NaN/inf in the inversion result"))
    return errors


def concat_results(results: list[InversionResult]) -> InversionResult:
    """Join results of image batches inverted with the same settings along the image axis."""
    if len(results) == 1:
        return results[0]

    def cat(name: str, dim: int) -> torch.Tensor | None:
        if getattr(results[0], name) is None:
            return None
        return torch.cat([getattr(r, name) for r in results], dim)

    return InversionResult(
        latents=cat("latents", 1),
        cond_embeddings=cat("cond_embeddings", 0),
        uncond_embeddings=cat("uncond_embeddings", 1),
        timesteps=results[0].timesteps,
        method=results[0].method,
        residuals=cat("residuals", 1),
        noise=cat("noise", 1),
        inner_steps=cat("inner_steps", 1),
        final_loss=cat("final_loss", 1),
        seconds=[s for r in results for s in r.seconds],
    )


def invert_latents(
    sd,
    z0: torch.Tensor,
    prompts: list[str],
    config: InversionConfig,
    policy: PrecisionPolicy | None = None,
    unet=None,
) -> InversionResult:
    """Encoded images z0 (N, C, h, w) + source prompts -> InversionResult (one batch, no per-item dropping).

    `policy` (default: `config.precision` resolved for the model's device) sets TF32 and autocast;
    `unet` replaces sd.unet for the inversion's calls (e.g. a compiled one, `kernels.inversion_unet`)."""
    if len(prompts) != z0.shape[0]:
        raise ValueError(f"prompts: {len(prompts)} prompts for {z0.shape[0]} images")
    unet = sd.unet if unet is None else unet
    _require_fp32(unet)
    policy = policy or resolve_precision(config, device=sd.device)
    start = time.perf_counter()
    with tf32_mode(policy.matmul_tf32, policy.cudnn_tf32):
        cache: dict[str, torch.Tensor] = {}
        cond = encode_prompts(sd.tokenizer, sd.text_encoder, prompts, cache).float()
        uncond_init = null_embedding(sd.tokenizer, sd.text_encoder, cache).float()
        steps = make_steps(config, sd.prediction_type)
        z0 = z0.to(sd.device, torch.float32)
        if config.method == "ddpm":
            latents = ddpm_trajectory(steps, z0, config.noise_seed)
        else:
            latents = ddim_invert(unet, steps, z0, cond)
        result = run_method(unet, steps, latents, cond, uncond_init, config, policy)
    result.seconds = [(time.perf_counter() - start) / z0.shape[0]] * z0.shape[0]
    return result


@torch.no_grad()
def _encode_items(sd, images, offsets) -> tuple[list[int], torch.Tensor | None, list[ItemError], float]:
    """Validate and VAE-encode every input; returns (good indices, their latents, errors, seconds)."""
    start = time.perf_counter()
    good, tensors, errors = [], [], []
    for index, image in enumerate(images):
        try:
            tensors.append(_image_item(image, index, sd.resolution, offsets))
            good.append(index)
        except ItemError as err:
            errors.append(err)
    if not good:
        return [], None, errors, time.perf_counter() - start
    z0 = encode(sd.vae, torch.stack(tensors)).float()  # (N_good, C, h, w): posterior mean x scaling factor
    keep = []
    for k, index in enumerate(good):
        try:
            _check_latent(z0[k], index, _latent_shape(sd), "encode")
            keep.append(k)
        except ItemError as err:
            errors.append(err)
    return [good[k] for k in keep], z0[keep], errors, time.perf_counter() - start


def invert(
    sd,
    images,
    prompts: list[str],
    config: InversionConfig | None = None,
    *,
    offsets: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> InversionResult:
    """Images (uint8 (H, W[, C]) arrays, or preprocessed (3, R, R) tensors / one (N, 3, R, R) tensor) and their
    source prompts -> InversionResult. Raises `ItemError` for the first bad item; see `invert_many`."""
    config = config or InversionConfig()
    if len(prompts) != len(images):
        raise ValueError(f"prompts: {len(prompts)} prompts for {len(images)} images")
    good, z0, errors, seconds = _encode_items(sd, images, offsets)
    if errors:
        raise min(errors, key=lambda e: e.index)
    result = invert_latents(sd, z0, prompts, config)
    bad = _check_result(result, good)
    if bad:
        raise bad[0]
    result.seconds = [s + seconds / len(good) for s in result.seconds]
    return result


def invert_many(
    sd,
    images,
    prompts: list[str],
    config: InversionConfig | None = None,
    *,
    latents: torch.Tensor | None = None,
    offsets: tuple[int, int, int, int] = (0, 0, 0, 0),
    policy: PrecisionPolicy | None = None,
    unet=None,
) -> tuple[InversionResult | None, list[tuple[int, str, str]]]:
    """Invert what can be inverted, `config.batch_size` images at a time; drop and report the rest.

    Give `images` (as for `invert`) or, with `images=None`, already encoded `latents` (N, C, h, w).
    Returns (result for the good items in input order or None if there are none, errors as
    (index, stage, reason) sorted by index). `result.select`-style: the k-th image of the result is the
    k-th input index not in the errors. `policy` and `unet` as for `invert_latents`.
    """
    config = config or InversionConfig()
    if (images is None) == (latents is None):
        raise ValueError("invert_many: give exactly one of images or latents")
    n = len(images) if images is not None else latents.shape[0]
    if len(prompts) != n:
        raise ValueError(f"prompts: {len(prompts)} prompts for {n} images")
    if images is not None:
        good, z0, errors, seconds = _encode_items(sd, images, offsets)
        share = seconds / max(len(good), 1)
    else:
        good, errors, share = [], [], 0.0
        for index in range(n):
            try:
                _check_latent(latents[index], index, _latent_shape(sd), "latents")
                good.append(index)
            except ItemError as err:
                errors.append(err)
        z0 = latents[good].float() if good else None
    results = []
    for begin in range(0, len(good), config.batch_size):
        chunk = good[begin : begin + config.batch_size]
        result = invert_latents(sd, z0[begin : begin + len(chunk)], [prompts[i] for i in chunk], config, policy, unet)
        bad = _check_result(result, chunk)
        if bad:
            errors.extend(bad)
            ok = [k for k, i in enumerate(chunk) if i not in {e.index for e in bad}]
            result = result.select(ok) if ok else None
        if result is not None:
            result.seconds = [s + share for s in result.seconds]
            results.append(result)
    errors.sort(key=lambda e: e.index)
    return (concat_results(results) if results else None), [e.as_tuple() for e in errors]
