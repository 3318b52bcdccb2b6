"""Infrastructure beside the fine-tuning loop: metrics, validation images, checkpoint files, NaN guard, EMA."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prism_ray.data.schemas import TRAIN_METRICS_SCHEMA, rows_to_table
from prism_ray.data.storage import join_uri, write_png, write_table
from prism_ray.results.clock import utc_now

STATE_FILE = (
    "trainer_state.json"  # {"step", "start_step", "config_hash"}: written last, marks a complete folder
)
UNET_FILE = "unet.safetensors"  # the full fp32 U-Net, written by rank 0 at every checkpoint
EMA_FILE = "ema_unet.safetensors"


# --- NaN guard -------------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def check_finite_loss(loss: float, *, step: int, first_step: int) -> None:
    """Raise `NonFiniteLossError` naming the steps if `loss` (their mean) is NaN or inf.

    The policy is to stop, never to skip: skipping one micro-step would need all workers to agree on
    every micro-step (a host sync each). Instead the loop calls this at each of its sync points
    (logged steps and before every checkpoint) with the loss accumulated since the previous one;
    a NaN anywhere in that window survives the sum, so no checkpoint is ever written from weights
    a non-finite loss has touched, and the last checkpoint is a good place to resume from with a
    lower learning rate.
    """
    if not math.isfinite(loss):
        window = f"step {step}" if first_step == step else f"steps {first_step}-{step}"
        raise NonFiniteLossError(
            f"non-finite training loss ({loss}) in {window}; the last checkpoint holds the weights before it "
            "(lower train.learning_rate or use train.precision=fp32/bf16, then re-run with the same run.name)"
        )


# --- metrics ---------------------------------------------------------------------------------


@dataclass
class MetricsLog:
    """Rank 0's metric rows and progress lines; `flush` appends them as one Parquet part under `<run>/metrics/`."""

    config_hash: str
    max_steps: int
    rows: list[dict] = field(default_factory=list)
    _since: float = field(default_factory=time.perf_counter)

    def record(self, *, step: int, loss: float, lr: float, grad_norm: float, images: int) -> dict:
        """One row for `step`; `images` processed (all workers) since the previous record give the rate."""
        now = time.perf_counter()
        row = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_second": images / max(now - self._since, 1e-9),
            "config_hash": self.config_hash,
        }
        self._since = now
        self.rows.append(row)
        print(
            f"step {step}/{self.max_steps} loss {loss:.4f} lr {lr:.3g} "
            f"img/s {row['images_per_second']:.2f} grad_norm {grad_norm:.3g}",
            flush=True,
        )
        return {k: v for k, v in row.items() if k != "config_hash"}

    def flush(self, run_path: str) -> None:
        if not self.rows:
            return
        name = f"part-{self.rows[0]['step']:08d}-{self.rows[-1]['step']:08d}.parquet"
        write_table(rows_to_table(self.rows, TRAIN_METRICS_SCHEMA), join_uri(run_path, "metrics", name))
        self.rows.clear()


# --- validation images -----------------------------------------------------------------------


def write_validation_images(unet, sd, train, run_path: str, step: int) -> list[str]:
    """DDIM samples of `train.validation_prompts` -> `<run>/validation/step_<step>/prompt_<i>.png`."""
    from prism_ray.training.diffusion import sample_images

    images = sample_images(
        unet,
        sd,
        train.validation_prompts,
        num_inference_steps=train.validation_steps,
        guidance_scale=train.validation_guidance,
        seed=train.seed,
    )
    uris = [
        join_uri(run_path, "validation", f"step_{step:08d}", f"prompt_{i:02d}.png")
        for i in range(len(images))
    ]
    for image, uri in zip(images, uris, strict=True):
        write_png(image, uri)
    return uris


# --- EMA -------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the U-Net's weights (diffusers' `EMAModel`), saved by parameter name."""

    def __init__(self, module: torch.nn.Module, decay: float):
        from diffusers.training_utils import EMAModel

        self._ema = EMAModel(module.parameters(), decay=decay)

    def step(self, module: torch.nn.Module) -> None:
        self._ema.step(module.parameters())

    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        names = [name for name, _ in module.named_parameters()]
        return {
            n: p.detach().to("cpu", torch.float32, copy=True) for n, p in zip(names, self._ema.shadow_params, strict=True)
        }

    def load_state_dict(self, saved: Mapping[str, torch.Tensor], module: torch.nn.Module) -> None:
        self._ema.shadow_params = [saved[name].to(p.device, p.dtype) for name, p in module.named_parameters()]


# --- checkpoint files ------------------------------------------------------------------------


def cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def write_checkpoint_files(
    folder: str | Path,
    *,
    step: int,
    start_step: int,
    config_hash: str,
    unet_state: Mapping[str, torch.Tensor],
    ema_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Rank 0's part of a checkpoint folder: the U-Net (and EMA) as safetensors, then the state file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file(cpu_state(unet_state), str(folder / UNET_FILE))
    if ema_state is not None:
        save_file(cpu_state(ema_state), str(folder / EMA_FILE))
    state = {"step": step, "start_step": start_step, "config_hash": config_hash}
    (folder / STATE_FILE).write_text(json.dumps(state))


def read_checkpoint_state(checkpoint_uri: str) -> dict:
    import fsspec

    with fsspec.open(join_uri(checkpoint_uri, STATE_FILE), "r") as f:
        return json.load(f)


def checkpoint_unet_state(checkpoint_uri: str, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 U-Net weights of a checkpoint folder (local or any fsspec URI); no unpickling."""
    import fsspec
    from safetensors.torch import load

    with fsspec.open(join_uri(checkpoint_uri, EMA_FILE if use_ema else UNET_FILE), "rb") as f:
        return load(f.read())


def latest_checkpoint(run_path: str) -> str | None:
    """The complete `checkpoint_*` folder under the run with the highest step, or None.

    Ray restores the latest checkpoint it *registered*; after a hard crash the run's snapshot may not
    list the last one that was persisted, so resuming also looks at storage.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(run_path)
    best, best_step = None, -1
    for folder in sorted(fs.glob(f"{root}/checkpoint_*")):
        state_path = f"{folder}/{STATE_FILE}"
        if not fs.exists(state_path):
            continue  # not (completely) written
        step = int(json.loads(fs.cat_file(state_path))["step"])
        if step > best_step:
            best, best_step = folder, step
    return None if best is None else fs.unstrip_protocol(best) if "://" in run_path else best


def record_resume(run_path: str, *, step: int, checkpoint: str, unet_sha256: str | None) -> str:
    """`<run>/events/resume-<step>-<time>.json`: where the run resumed and a digest of the restored U-Net."""
    import fsspec

    event = {
        "event": "resume",
        "step": step,
        "checkpoint": checkpoint,
        "unet_sha256": unet_sha256,
        "time": utc_now().isoformat(),
    }
    uri = join_uri(run_path, "events", f"resume-{step:08d}-{time.time_ns()}.json")
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(event, indent=2))
    print(f"resumed from step {step} ({checkpoint})", flush=True)
    return uri
