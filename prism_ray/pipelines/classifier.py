"""`classifier` job without Ray: config, the rows and head targets, the worker loop, export and result."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import Field

from prism_ray.config import BaseConfig, ConfigError, config_field
from prism_ray.data.config import DataConfig
from prism_ray.data.targets import head_targets
from prism_ray.pipelines.finetune import RunStorageConfig


class ClassifierModelConfig(BaseConfig):
    """Which network: a small ResNet (default) or a scaled EfficientNet, random or from a folder."""

    architecture: Literal["resnet", "efficientnet"] = "resnet"
    weights: str | None = Field(None, description="transformers image-classification folder to start from")
    resolution: int = Field(64, ge=8, description="images are squared and resized to this side")
    embedding_size: int = Field(16, ge=1, description="resnet stem width")
    hidden_sizes: tuple[int, ...] = Field((16, 32, 64, 64), min_length=1, description="resnet stage widths")
    depths: tuple[int, ...] = Field((1, 1, 1, 1), min_length=1, description="resnet blocks per stage")
    width_coefficient: float = Field(0.25, gt=0.0, description="efficientnet width vs B0")
    depth_coefficient: float = Field(0.5, gt=0.0, description="efficientnet depth vs B0")
    dropout_rate: float = Field(0.0, ge=0.0, lt=1.0, description="efficientnet head dropout")

    def arch_kwargs(self) -> dict:
        return self.model_dump(exclude={"weights", "resolution"})


class ClassifierTrainConfig(BaseConfig):
    """Optimisation, class balance and early stopping."""

    max_steps: int = Field(500, ge=1, description="optimiser steps (a resumed run continues the count)")
    batch_size: int = Field(64, ge=1, description="images per worker per step")
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    balance: Literal["loss", "sampling", "groups", "none"] = Field(
        "loss",
        description="per-head pos_weight = negatives/positives, class-balanced sampling, group-balanced "
        "sampling (every group_heads group the same mass), or none",
    )
    group_heads: list[str] = Field(
        default_factory=list,
        description="heads whose joint label is a row's group (each 1, 0 or unknown = a group of its own): "
        "for balance: groups, objective: group_dro, select: valid_worst_group",
    )
    objective: Literal["erm", "group_dro"] = Field(
        "erm", description="mean loss, or online Group DRO over the group_heads groups (Sagawa et al. 2020)"
    )
    dro_step_size: float = Field(0.01, gt=0.0, description="Group DRO's eta: q_g <- q_g exp(eta loss_g)")
    uncertain: Literal["negative", "positive", "ignore"] = Field(
        "negative", description="CheXpert -1 labels; blank cells are always 'ignore' (no loss)"
    )
    eval_every: int = Field(50, ge=1, description="steps between validation losses")
    select: Literal["valid_loss", "valid_worst_group"] = Field(
        "valid_loss",
        description="the early-stopping / exported-weights rule: lowest validation loss, or highest "
        "validation worst-group accuracy of select_head over its label x the group_heads groups",
    )
    select_head: str | None = Field(None, description="the head of valid_worst_group; default: the first")
    patience: int | None = Field(
        5, ge=1, description="evaluations without improvement before stopping; None = off"
    )
    min_delta: float = Field(0.0, ge=0.0)
    seed: int = Field(0, ge=0, description="initialisation, batch order, validation split")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(
        100, ge=1, description="steps between checkpoints (the last step always saves)"
    )


class ClassifierComputeConfig(BaseConfig):
    """Ray Train workers (not part of the results)."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    strategy: Literal["ddp", "deepspeed"] = Field(
        "ddp", description="DDP over gloo/nccl, or a DeepSpeed engine"
    )
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker; default: its CPUs")


class ClassifierConfig(BaseConfig):
    """`prism-ray classifier`: a multi-head attribute classifier from a manifest, exported for the audit and filter."""

    data: DataConfig
    heads: dict[str, str] = Field(
        ...,
        min_length=1,
        description="head name -> manifest column ('Pleural Effusion') or column=value for text ('Sex=Female')",
    )
    train_split: str = Field("train", description="rows whose 'split' equals this train")
    valid_split: str | None = Field(
        "valid", description="validation rows; None or absent: valid_fraction of train"
    )
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    model: ClassifierModelConfig = Field(default_factory=ClassifierModelConfig)
    train: ClassifierTrainConfig = Field(default_factory=ClassifierTrainConfig)
    compute: ClassifierComputeConfig = Field(default_factory=ClassifierComputeConfig)
    run: RunStorageConfig

    def check(self) -> None:
        if self.data.split is not None:
            raise ConfigError(
                "config field 'data.split': the classifier job reads train_split and valid_split"
            )
        t = self.train
        unknown = [
            h for h in t.group_heads + [t.select_head or next(iter(self.heads))] if h not in self.heads
        ]
        if unknown:
            field = "train.group_heads" if unknown[0] in t.group_heads else "train.select_head"
            raise ConfigError(
                f"config field '{field}': {unknown[0]!r} is not one of the heads {list(self.heads)}"
            )
        if len(set(t.group_heads)) != len(t.group_heads):
            raise ConfigError(f"config field 'train.group_heads': duplicates in {t.group_heads}")
        uses = {
            "balance: groups": t.balance == "groups",
            "objective: group_dro": t.objective == "group_dro",
            "select: valid_worst_group": t.select == "valid_worst_group",
        }
        needs = [what for what, on in uses.items() if on]
        if needs and not t.group_heads:
            raise ConfigError(
                f"config field 'train.group_heads': {', '.join(needs)} needs the heads whose labels define "
                "the groups"
            )

    def group_columns(self) -> tuple[int, ...]:
        """Indices of `train.group_heads` among the heads (the columns of the targets)."""
        heads = list(self.heads)
        return tuple(heads.index(h) for h in self.train.group_heads)

    def select_column(self) -> int:
        """Index of the head whose validation worst-group accuracy `train.select: valid_worst_group` uses."""
        return list(self.heads).index(self.train.select_head or next(iter(self.heads)))


def deepspeed_config(config: ClassifierConfig) -> dict:
    """DeepSpeed's JSON config for `compute.strategy: deepspeed`: plain data parallel (ZeRO stage 0, fp32)
    over the job's AdamW, clipping as `train.max_grad_norm`; a classifier this size needs no sharding."""
    t = config.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": t.batch_size * config.compute.num_workers,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# --- rows and targets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """Images (resolved URIs) and their (N, H) targets."""

    uris: list[str]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.uris)


@dataclass(frozen=True)
class ClassifierPlan:
    """What the driver settled before any worker starts."""

    run_path: str
    storage_path: str
    heads: tuple[str, ...]
    train: Rows
    valid: Rows
    pos_weight: np.ndarray  # (H,) from all training rows

    @property
    def errors_uri(self) -> str:
        return f"{self.run_path}/errors"


def split_rows(config: ClassifierConfig):
    """(train table, valid table) of the manifest: by the 'split' column, else a seeded fraction of train."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from prism_ray.data.manifest import prepare_manifest

    manifest = prepare_manifest(config.data)
    table = manifest.table
    has_split = "split" in table.column_names
    train = table.filter(pc.equal(table.column("split"), config.train_split)) if has_split else table
    if config.valid_split is not None and has_split:
        valid = table.filter(pc.equal(table.column("split"), config.valid_split))
        if valid.num_rows:
            return train, valid, manifest.errors
    rng = np.random.default_rng([config.train.seed, 7])
    is_valid = np.zeros(train.num_rows, bool)
    is_valid[rng.permutation(train.num_rows)[: max(1, round(config.valid_fraction * train.num_rows))]] = True
    return train.filter(pa.array(~is_valid)), train.filter(pa.array(is_valid)), manifest.errors


def _rows(table, config: ClassifierConfig) -> Rows:
    from prism_ray.data.storage import resolve_uri

    uris = [
        resolve_uri(str(u), config.data.image_root)
        for u in table.column(config.data.image_column).to_pylist()
    ]
    return Rows(uris, head_targets(table, config.heads, config.train.uncertain))


def plan_run(config: ClassifierConfig) -> ClassifierPlan:
    """Every check the driver can make (manifest, columns, splits) before any worker starts."""
    from prism_ray.data.storage import join_uri
    from prism_ray.models.loading import resolve_model_root
    from prism_ray.pipelines.finetune import absolute_storage
    from prism_ray.training.classifier import pos_weight
    from prism_ray.training.examples import write_error_rows

    if config.model.weights:  # a wrong folder is a config error, found before the run folder exists
        with config_field("model.weights"):
            resolve_model_root(config.model.weights)
    train_table, valid_table, row_errors = split_rows(config)
    storage_path = absolute_storage(config.run.storage_path)
    run_path = join_uri(storage_path, config.run.name)
    if row_errors:  # bad label cells, conflicting duplicates: left out, said in the run's errors table
        bad = [{"uri": e.source_uri or "", "error": f"{e.stage}: {e.reason}"} for e in row_errors]
        write_error_rows(bad, join_uri(run_path, "errors"), config.config_hash())
    if train_table.num_rows == 0:
        raise ValueError(f"config field 'train_split': no rows with split == {config.train_split!r}")
    train, valid = _rows(train_table, config), _rows(valid_table, config)
    for h, head in enumerate(config.heads):
        y = train.targets[:, h]
        if not (np.isfinite(y) & (y > 0.5)).any() or not (np.isfinite(y) & (y < 0.5)).any():
            raise ValueError(f"config field 'heads.{head}': the training rows hold only one class")
    if (
        config.train.select == "valid_worst_group"
        and not np.isfinite(valid.targets[:, config.select_column()]).any()
    ):
        raise ValueError("config field 'train.select_head': no validation row has a label for it")
    return ClassifierPlan(
        run_path=run_path,
        storage_path=storage_path,
        heads=tuple(config.heads),
        train=train,
        valid=valid,
        pos_weight=pos_weight(train.targets),
    )


def load_pixels(rows: Rows, resolution: int, decode) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Decode rows to uint8 (N, R, R) gray (squared as `data.decode` says, resized); (pixels, targets, errors).

    An unreadable image is an error row and is left out; storage outages propagate (the runtime retries).
    """
    from PIL import Image

    from prism_ray.data.images import ImageReadError, make_square
    from prism_ray.data.storage import read_image

    r = resolution
    pixels, keep, errors = [], [], []
    for i, uri in enumerate(rows.uris):
        try:
            image = make_square(read_image(uri, decode, min_side=1), decode.square, decode.alpha_background)
        except ImageReadError as err:
            errors.append({"uri": uri, "error": f"image: {err.reason}"})
            continue
        gray = Image.fromarray(image.mean(axis=2).round().astype(np.uint8))
        pixels.append(np.asarray(gray.resize((r, r), Image.BILINEAR) if gray.size != (r, r) else gray))
        keep.append(i)
    stack = np.stack(pixels) if pixels else np.zeros((0, r, r), np.uint8)
    return stack, rows.targets[keep], errors


# --- the worker loop (one process, or one Ray Train worker) ----------------------------------


class WorkerContext(Protocol):
    """What differs between a local run and a Ray Train worker; `distributed.classifier_loop` has the Ray one."""

    rank: int
    world: int

    def wrap(self, model, optimizer, config: ClassifierConfig): ...  # -> (module to train, stepper)

    def mean(self, values) -> list[float]: ...  # means over workers of a 1-D device tensor; a host sync

    def restore(self, run_path: str) -> str | None: ...  # a checkpoint folder to resume from

    def save(self, metrics: dict, folder: str | None, step: int) -> None: ...  # every worker calls it


class LocalContext:
    """One process, no Ray: checkpoints go straight to `<run>/checkpoint_<step>`."""

    rank, world = 0, 1

    def __init__(self, run_path: str, keep: int = 2):
        self.run_path, self.keep = run_path, keep

    def wrap(self, model, optimizer, config):
        from prism_ray.training.classifier import TorchStepper

        return model, TorchStepper(model, optimizer, config.train.max_grad_norm)

    def mean(self, values) -> list[float]:
        return values.tolist()  # sync point

    def restore(self, run_path: str) -> str | None:
        from prism_ray.training.callbacks import latest_checkpoint

        return latest_checkpoint(run_path)

    def save(self, metrics: dict, folder: str | None, step: int) -> None:
        import fsspec

        from prism_ray.data.storage import join_uri
        from prism_ray.training.callbacks import STATE_FILE

        if folder is None:
            return
        fs, path = fsspec.core.url_to_fs(join_uri(self.run_path, f"checkpoint_{step:08d}"))
        fs.makedirs(path, exist_ok=True)
        names = sorted(p.name for p in Path(folder).iterdir())
        for name in sorted(names, key=lambda n: n == STATE_FILE):  # the state file last: marks it complete
            fs.put_file(f"{folder}/{name}", f"{path}/{name}")
        parent = path.rsplit("/", 1)[0]
        for old in sorted(fs.glob(f"{parent}/checkpoint_0*"))[: -self.keep]:  # as Ray's num_to_keep
            fs.rm(old, recursive=True)


def train_worker(config: ClassifierConfig, plan: ClassifierPlan, ctx: WorkerContext) -> None:
    """Train on this worker's shard of the training rows; validate on all validation rows; checkpoint on rank 0."""
    import torch

    from prism_ray.models.classifier import to_pixels
    from prism_ray.training.callbacks import STATE_FILE, MetricsLog
    from prism_ray.training.classifier import (
        BEST_FILE,
        MODEL_FILE,
        OPTIMIZER_FILE,
        EarlyStopping,
        balanced_row_weights,
        batch_indices,
        cpu_copy,
        group_balanced_row_weights,
        group_dro_step,
        group_ids,
        init_classifier,
        multi_head_loss,
        predict_logits,
        read_classifier_checkpoint,
        train_step,
        worst_group_accuracy,
        write_classifier_checkpoint,
    )
    from prism_ray.training.examples import write_error_rows

    t, m = config.train, config.model
    if config.compute.torch_threads:
        torch.set_num_threads(config.compute.torch_threads)
    torch.manual_seed(t.seed)  # the same initial weights on every worker
    model = init_classifier(plan.heads, m.resolution, m.weights, **m.arch_kwargs())
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    stopper = EarlyStopping(t.patience, t.min_delta, mode="max" if t.select == "valid_worst_group" else "min")
    best_state = cpu_copy(model.state_dict())
    columns, n_groups = config.group_columns(), 3 ** len(t.group_heads)
    # Group DRO's q starts uniform over the groups of all training rows (every worker the same q).
    present = np.bincount(group_ids(plan.train.targets, columns), minlength=n_groups) > 0
    q_start = present / present.sum()
    best_metrics: dict = {}  # the validation metrics at the best step
    start_step, resumed = 0, ctx.restore(plan.run_path)
    if resumed is not None:
        model.load_state_dict(read_classifier_checkpoint(resumed, MODEL_FILE))
        optimizer.load_state_dict(read_classifier_checkpoint(resumed, OPTIMIZER_FILE))
        best_state = read_classifier_checkpoint(resumed, BEST_FILE)
        state = read_classifier_checkpoint(resumed, STATE_FILE)
        start_step = int(state["step"])
        with config_field("train.select"):
            stopper.load(state["early_stopping"])
        best_metrics = state.get("best_metrics", {"valid_loss": stopper.best})
        if state.get("group_dro_q") is not None and len(state["group_dro_q"]) == n_groups:
            q_start = np.asarray(state["group_dro_q"])  # the adversary continues where it stopped
        if ctx.rank == 0:
            print(f"classifier: resumed from step {start_step} ({resumed})", flush=True)
    module, stepper = ctx.wrap(model, optimizer, config)
    device = next(model.parameters()).device
    q = torch.as_tensor(q_start, dtype=torch.float32, device=device)  # (G,) Group DRO's group weights

    shard = Rows(plan.train.uris[ctx.rank :: ctx.world], plan.train.targets[ctx.rank :: ctx.world])
    train_px, train_y, errors = load_pixels(shard, m.resolution, config.data.decode)
    valid_px, valid_y, valid_errors = load_pixels(plan.valid, m.resolution, config.data.decode)
    bad = errors + (valid_errors if ctx.rank == 0 else [])
    if bad:
        write_error_rows(bad, plan.errors_uri, config.config_hash())
    if len(train_px) == 0 or len(valid_px) == 0:
        raise ValueError(f"classifier: worker {ctx.rank} has no readable training or validation image")
    train_groups = group_ids(train_y, columns)  # (N,) all 0 without group_heads
    valid_groups = torch.as_tensor(group_ids(valid_y, columns), device=device)
    valid_t = torch.as_tensor(valid_y, dtype=torch.float32, device=device)
    weights = {"sampling": balanced_row_weights, "groups": group_balanced_row_weights}.get(t.balance)
    weights = weights(train_groups if t.balance == "groups" else train_y) if weights else None
    pw = torch.as_tensor(plan.pos_weight.copy(), device=device) if t.balance == "loss" else None

    def reduce(stats):
        return torch.as_tensor(ctx.mean(stats), device=device)  # sync point: over the workers

    log = MetricsLog(config.config_hash(), t.max_steps) if ctx.rank == 0 else None
    loss_sum, window_start, step = torch.zeros((), device=device), start_step + 1, start_step
    stopped = stopper.should_stop  # a run that stopped early stays stopped when re-run
    lr = t.learning_rate

    for step in range(start_step + 1, (start_step if stopped else t.max_steps) + 1):
        idx = batch_indices(
            len(train_px), t.batch_size, step=step, seed=t.seed, rank=ctx.rank, weights=weights
        )
        x = to_pixels(train_px[idx], m.resolution, device)  # (B, 1, R, R)
        y = torch.as_tensor(train_y[idx], dtype=torch.float32, device=device)  # (B, H)
        if t.objective == "group_dro":
            g = torch.as_tensor(train_groups[idx], device=device)  # (B,)
            loss, norm, q = group_dro_step(
                module, stepper, x, y, g, q, t.dro_step_size, pw, reduce if ctx.world > 1 else None
            )
        else:
            loss, norm = train_step(module, stepper, x, y, pw)
        loss_sum += loss
        metrics: dict = {"step": step}
        if step % t.eval_every == 0 or step == t.max_steps:
            logits = predict_logits(model, valid_px)  # (N, H)
            loss_now = multi_head_loss(logits, valid_t)
            worst_now = worst_group_accuracy(logits, valid_t, valid_groups, n_groups, config.select_column())
            scores = torch.stack([loss_now, worst_now])
            # sync point: every worker gets the same means, hence the same stopping decision (and q, equal)
            valid_loss, valid_worst, *q_now = ctx.mean(torch.cat([scores, q]))
            valid_worst = valid_worst if t.group_heads else math.nan  # no groups: not a worst-group number
            value = valid_worst if t.select == "valid_worst_group" else valid_loss
            if stopper.update(step, value):
                best_state = cpu_copy(model.state_dict())
                best_metrics = {"valid_loss": valid_loss, "valid_worst_group": valid_worst}
            stopped = stopper.should_stop
            metrics.update(valid_loss=valid_loss, valid_worst_group=valid_worst, best_step=stopper.best_step)
            metrics[f"best_{t.select}"] = stopper.best
            if ctx.rank == 0:
                worst = f" valid_worst_group {valid_worst:.3f}" if t.group_heads else ""
                dro = f" q {[round(v, 3) for v in q_now]}" if t.objective == "group_dro" else ""
                print(
                    f"classifier: step {step} valid_loss {valid_loss:.4f}{worst}{dro} (best {t.select} "
                    f"{stopper.best:.4f} at {stopper.best_step}){' - stopping early' if stopped else ''}",
                    flush=True,
                )
        if step % t.log_every == 0 or step == t.max_steps or stopped:
            window = torch.stack([loss_sum / (step - window_start + 1), norm.to(loss_sum)])
            mean_loss, grad_norm = ctx.mean(window)  # sync point: loss since the last log, last step's norm
            if log is not None:
                images = (step - window_start + 1) * t.batch_size * ctx.world
                metrics.update(
                    log.record(step=step, loss=mean_loss, lr=lr, grad_norm=grad_norm, images=images)
                )
            loss_sum.zero_()
            window_start = step + 1
        if step % t.checkpoint_every == 0 or step == t.max_steps or stopped:
            with tempfile.TemporaryDirectory(prefix="prism-clf-ckpt-") as tmp:
                if ctx.rank == 0:
                    state = {
                        "step": step,
                        "start_step": start_step,
                        "config_hash": config.config_hash(),
                        "early_stopping": stopper.state(),
                        "select": t.select,
                        "best_metrics": best_metrics,
                        "stopped_early": stopped,
                        "heads": list(plan.heads),
                        "group_heads": list(t.group_heads),
                        "group_dro_q": q.tolist() if t.objective == "group_dro" else None,
                    }
                    write_classifier_checkpoint(
                        tmp,
                        model_state=model.state_dict(),
                        best_state=best_state,
                        optimizer_state=optimizer.state_dict(),
                        state=state,
                    )
                    log.flush(plan.run_path)
                ctx.save(metrics, tmp if ctx.rank == 0 else None, step)
        elif "valid_loss" in metrics or step % t.log_every == 0:
            ctx.save(metrics, None, step)
        if stopped:
            break
    if step == start_step:  # resumed at the end: keep the report count equal across workers
        ctx.save({"step": step}, None, step)


# --- the job ---------------------------------------------------------------------------------


@dataclass
class ClassifierResult:
    run_path: str
    model_path: str | None
    final_step: int
    best_step: int
    best_valid_loss: float  # at best_step
    stopped_early: bool
    checkpoint_path: str
    skipped: dict[str, int] = field(default_factory=dict)
    select: str = "valid_loss"  # the rule that chose best_step (train.select)
    best_valid_worst_group: float = math.nan  # at best_step: train.select_head over label x group_heads


Runner = Callable[[ClassifierConfig, ClassifierPlan], str]


def in_process(config: ClassifierConfig, plan: ClassifierPlan) -> str:
    """Train in this process (no Ray): the runner of the tests and of small experiments."""
    from prism_ray.training.callbacks import latest_checkpoint

    train_worker(config, plan, LocalContext(plan.run_path))
    return latest_checkpoint(plan.run_path)


def run(config: ClassifierConfig, runner: Runner) -> ClassifierResult:
    """Train (`runner`: `in_process`, or the CLI's Ray Train `distributed.classifier_loop.fit`), resume by
    `run.name`, and export the best validation weights as a transformers folder (`<run>/model` unless
    `run.export_path`)."""
    from prism_ray.data.storage import join_uri
    from prism_ray.pipelines.finetune import absolute_storage
    from prism_ray.training.callbacks import STATE_FILE
    from prism_ray.training.classifier import (
        BEST_FILE,
        export_classifier,
        group_ids,
        group_names,
        init_classifier,
        read_classifier_checkpoint,
    )
    from prism_ray.training.examples import skipped_rows

    started = time.perf_counter()
    plan = plan_run(config)
    print(
        f"classifier: {len(plan.train)} train / {len(plan.valid)} valid rows, heads {list(plan.heads)}, "
        f"run folder {plan.run_path}",
        flush=True,
    )
    if config.train.group_heads:
        names = group_names(config.train.group_heads)
        counts = np.bincount(group_ids(plan.train.targets, config.group_columns()), minlength=len(names))
        per_group = {names[g]: int(n) for g, n in enumerate(counts) if n}
        print(f"classifier: training rows per group {per_group}", flush=True)
    checkpoint = runner(config, plan)
    state = read_classifier_checkpoint(checkpoint, STATE_FILE)
    stopping = state["early_stopping"]
    best = state.get("best_metrics") or {"valid_loss": stopping["best"]}
    best_loss, best_worst = best.get("valid_loss", math.nan), best.get("valid_worst_group", math.nan)
    model_path = None
    if config.run.export:
        model_path = (
            absolute_storage(config.run.export_path, "run.export_path")
            if config.run.export_path
            else join_uri(plan.run_path, "model")
        )
        m = config.model
        skeleton = init_classifier(plan.heads, m.resolution, m.weights, **m.arch_kwargs())
        metadata = {
            "step": state["step"],
            "best_step": stopping["best_step"],
            "select": config.train.select,
            "best_valid_loss": best_loss,
            "best_valid_worst_group": best_worst,
            "heads": dict(config.heads),
            "group_heads": list(config.train.group_heads),
            "objective": config.train.objective,
            "config_hash": config.config_hash(),
        }
        export_classifier(skeleton, read_classifier_checkpoint(checkpoint, BEST_FILE), model_path, metadata)
    skipped = skipped_rows(plan.errors_uri)
    worst = f", valid worst-group accuracy {best_worst:.3f}" if config.train.group_heads else ""
    print(
        f"classifier: step {state['step']}, best ({config.train.select}) at step {stopping['best_step']}: "
        f"valid loss {best_loss:.4f}{worst}, model {model_path} ({time.perf_counter() - started:.0f}s)",
        flush=True,
    )
    return ClassifierResult(
        run_path=plan.run_path,
        model_path=model_path,
        final_step=int(state["step"]),
        best_step=int(stopping["best_step"]),
        best_valid_loss=float(best_loss),
        stopped_early=bool(state.get("stopped_early")),
        checkpoint_path=checkpoint,
        skipped=skipped,
        select=config.train.select,
        best_valid_worst_group=float(best_worst),
    )
