"""The reference DDIM scheduler and its deterministic prev/next steps (docs/method.md §4)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

# SD v1.5's noise schedule: DDPM training and DDIM sampling/inversion use these same betas.
NUM_TRAIN_TIMESTEPS = 1000
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

REFERENCE_DDIM = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    **SD_BETAS,
    clip_sample=False,
    set_alpha_to_one=False,  # the "final" alpha is alpha_bar at t=0
    steps_offset=1,
)


# What a U-Net's output may be (the scheduler config's `prediction_type`): noise (SD v1.x) or the velocity
# v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x_0 (SD 2.x; Salimans & Ho 2022, "Progressive Distillation").
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(prediction_type: str) -> str:
    """`prediction_type` if the engine can use it; a one-line ValueError naming the field otherwise."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler.prediction_type {prediction_type!r}: the editing engine supports 'epsilon' and 'v_prediction'"
        )
    return prediction_type


def make_ddim_scheduler(num_inference_steps: int = 50, **overrides) -> DDIMScheduler:
    """DDIM with the reference betas; 50 steps give timesteps 981, 961, ..., 1. `overrides` may set
    `prediction_type` (the model's, see `DDIMSteps.epsilon`)."""
    scheduler = DDIMScheduler(**{**REFERENCE_DDIM, **overrides})
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def make_ddpm_scheduler(prediction_type: str = "epsilon", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DDPMScheduler:
    """The training-time (DDPM) schedule with the same betas the DDIM sampler uses."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type, **SD_BETAS)


class DDIMSteps:
    """Deterministic (eta = 0) DDIM steps on a fixed timestep grid, written out as in the paper.

    The steps take the noise eps; `epsilon` turns the U-Net's output into it for the scheduler's
    `prediction_type` (every call site that reads a U-Net goes through it).
    """

    def __init__(self, scheduler: DDIMScheduler):
        if scheduler.num_inference_steps is None:
            raise ValueError("scheduler: call set_timesteps() first")
        self.prediction_type = check_prediction_type(scheduler.config.prediction_type)
        self.timesteps = scheduler.timesteps.clone()  # (T,) descending, e.g. 981..1
        self.stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        self._alphas = self.alphas_cumprod.tolist()  # Python floats: a step reads no tensor
        self.final_alpha = float(scheduler.final_alpha_cumprod)

    def alpha(self, t: int) -> float:
        return self._alphas[t] if t >= 0 else self.final_alpha

    def epsilon(self, output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """The U-Net's output at timestep t for the input `sample` -> the noise eps the DDIM steps use.

        epsilon: unchanged. v_prediction: v = sqrt(a) * eps - sqrt(1 - a) * x_0 and x_t = sqrt(a) * x_0 +
        sqrt(1 - a) * eps give eps = sqrt(a) * v + sqrt(1 - a) * x_t (a = alpha_bar_t, x_t = `sample`). Linear
        in the output for a fixed sample, so classifier-free guidance may combine either before or after it.
        """
        if self.prediction_type == "epsilon":
            return output
        a = self.alpha(int(t))
        return a**0.5 * output + (1 - a) ** 0.5 * sample

    @staticmethod
    def _move(eps: torch.Tensor, sample: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
        x0 = (sample - (1 - a_from) ** 0.5 * eps) / a_from**0.5
        return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps

    def prev_step(self, eps: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """Denoise x_t -> x_{t - stride}."""
        return self._move(eps, sample, self.alpha(int(t)), self.alpha(int(t) - self.stride))

    def prev_mean(self, eps: torch.Tensor, t: int, sample: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The stochastic (eta = 1, DDPM-posterior) step x_t -> x_{t - stride} without its noise: (mean, sigma).

        mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps, sigma^2 = (1 - a_prev) / (1 - a_t) *
        (1 - a_t / a_prev), x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t); the step is mean + sigma * z.
        """
        a_t, a_prev = self.alpha(int(t)), self.alpha(int(t) - self.stride)
        sigma2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        return a_prev**0.5 * x0 + max(1 - a_prev - sigma2, 0.0) ** 0.5 * eps, sigma2**0.5

    def next_step(self, eps: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """Invert x_{t - stride} -> x_t, with eps predicted at the target timestep t."""
        return self._move(eps, sample, self.alpha(int(t) - self.stride), self.alpha(int(t)))
