"""Attribute classifier training in plain torch: balanced loss and sampling, groups and Group DRO, steps, early
stopping, checkpoints, export."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from prism_ray.models.classifier import build_classifier, to_pixels
from prism_ray.scoring.classification import logit_decision
from prism_ray.training.callbacks import STATE_FILE

MODEL_FILE = "classifier.safetensors"  # the weights (and BatchNorm buffers) at the checkpoint's step
BEST_FILE = "best.safetensors"  # the weights with the best validation score so far (what is exported)
OPTIMIZER_FILE = "optimizer.pt"  # AdamW state, loaded with weights_only=True


# --- model -----------------------------------------------------------------------------------


def init_classifier(heads: tuple[str, ...], resolution: int, weights: str | None = None, **arch):
    """A trainable classifier with one sigmoid head per name: from a transformers folder (`weights`, its body
    kept, the heads re-made when they differ) or randomly initialised by `build_classifier(**arch)`."""
    if weights is None:
        return build_classifier(tuple(heads), resolution, **arch).train()
    from transformers import AutoModelForImageClassification

    from prism_ray.models.loading import resolve_model_root

    model = AutoModelForImageClassification.from_pretrained(
        resolve_model_root(weights),
        num_labels=len(heads),
        id2label=dict(enumerate(heads)),
        label2id={name: i for i, name in enumerate(heads)},
        problem_type="multi_label_classification",
        ignore_mismatched_sizes=True,  # a folder trained for other heads: keep its body
        use_safetensors=True,
    )
    if model.config.num_channels != 1:
        raise ValueError(
            f"model.weights: {weights!r} takes {model.config.num_channels}-channel images, expected 1"
        )
    model.config.image_size = resolution
    return model.train()


# --- class balance ---------------------------------------------------------------------------


def pos_weight(targets: np.ndarray) -> np.ndarray:
    """(H,) negatives / positives per head over its known (non-NaN) labels: BCE's class-balancing weight."""
    known = np.isfinite(targets)
    pos = np.where(known, targets > 0.5, False).sum(axis=0)
    neg = known.sum(axis=0) - pos
    return np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0).astype(np.float32)


def balanced_row_weights(targets: np.ndarray) -> np.ndarray:
    """(N,) sampling weights that give each head's two classes equal mass, averaged over the heads a row
    has a label for (rows without any label get the mean weight)."""
    known = np.isfinite(targets)
    positive = np.where(known, targets > 0.5, False)
    weight = np.zeros(targets.shape, np.float64)
    for h in range(targets.shape[1]):
        n_pos, n_known = positive[:, h].sum(), known[:, h].sum()
        if 0 < n_pos < n_known:
            weight[:, h] = np.where(
                known[:, h], np.where(positive[:, h], 0.5 / n_pos, 0.5 / (n_known - n_pos)), 0.0
            )
        else:
            weight[:, h] = np.where(known[:, h], 1.0 / max(n_known, 1), 0.0)
    per_row = np.divide(weight.sum(1), known.sum(1), out=np.zeros(len(targets)), where=known.sum(1) > 0)
    per_row[per_row == 0] = per_row[per_row > 0].mean() if (per_row > 0).any() else 1.0
    return per_row / per_row.sum()


# --- groups: the joint label of some heads ----------------------------------------------------

UNKNOWN = 2  # a group head's value where its label is NaN: a group of its own, the row stays in training


def group_ids(targets: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """(N,) int64 group of each row of (N, H) `targets`: the joint label of the heads `columns`, each 0, 1 or
    unknown (NaN), as the base-3 number sum_k value_k * 3**k; `3 ** len(columns)` possible groups.

    A row with an unknown label on a group head is not dropped: it is in the group with that head unknown
    (CheXpert's blank cells are common), trained and scored like any other group.
    """
    out = np.zeros(len(targets), np.int64)
    for k, h in enumerate(columns):
        y = targets[:, h]
        out += np.where(np.isfinite(y), (y > 0.5).astype(np.int64), UNKNOWN) * 3**k
    return out


def group_names(heads: Sequence[str]) -> list[str]:
    """The name of each of the `3 ** len(heads)` group ids, e.g. 'pleural_effusion=1,support_devices=?'."""
    names = []
    for g in range(3 ** len(heads)):
        values = [(g // 3**k) % 3 for k in range(len(heads))]
        names.append(",".join(f"{h}={'?' if v == UNKNOWN else v}" for h, v in zip(heads, values, strict=True)))
    return names


def group_balanced_row_weights(groups: np.ndarray) -> np.ndarray:
    """(N,) sampling weights that give every group present in `groups` the same total mass."""
    counts = np.bincount(groups)
    weight = 1.0 / (np.count_nonzero(counts) * counts[groups])
    return weight / weight.sum()


def batch_indices(
    n: int, batch_size: int, *, step: int, seed: int, rank: int, weights: np.ndarray | None = None
):
    """Row indices of one step's batch, a function of (seed, rank, step) only, so a resumed run draws
    what a straight run would: epoch-wise permutations, or weighted draws with replacement."""
    if weights is not None:
        rng = np.random.default_rng([seed, rank, step])
        return rng.choice(n, size=batch_size, replace=True, p=weights)
    flat = (step - 1) * batch_size + np.arange(batch_size)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(flat // n):
        here = flat // n == epoch
        out[here] = np.random.default_rng([seed, rank, int(epoch), 1]).permutation(n)[flat[here] % n]
    return out


# --- loss and steps --------------------------------------------------------------------------


def label_losses(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None):
    """(B, H) binary cross-entropy per label, 0 where the label is unknown (NaN), and the (B, H) known mask."""
    known = torch.isfinite(targets)
    per_label = F.binary_cross_entropy_with_logits(
        logits.float(), torch.where(known, targets, 0.0), pos_weight=pos_weight, reduction="none"
    )  # (B, H)
    return per_label * known, known


def multi_head_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None):
    """Mean binary cross-entropy over the known labels; (B, H) logits and targets, NaN = no label."""
    per_label, known = label_losses(logits, targets, pos_weight)
    return per_label.sum() / known.sum().clamp(min=1)


def group_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor,
    n_groups: int,
    pos_weight: torch.Tensor | None = None,
):
    """(G,) summed BCE over the known labels of each group's rows and (G,) how many labels that is; a group's
    mean loss is their ratio (`multi_head_loss` restricted to the group), a group absent from the batch has 0 / 0."""
    per_label, known = label_losses(logits, targets, pos_weight)  # (B, H)
    zeros = torch.zeros(n_groups, device=logits.device)
    sums = zeros.index_add(0, groups, per_label.sum(1))  # (G,)
    counts = zeros.index_add(0, groups, known.sum(1).float())  # (G,)
    return sums, counts


def group_dro_update(q: torch.Tensor, group_loss: torch.Tensor, step_size: float) -> torch.Tensor:
    """One exponentiated-gradient step of the adversary's group weights, q_g <- q_g exp(eta loss_g) normalised:
    Group DRO, Sagawa, Koh, Hashimoto & Liang 2020, "Distributionally Robust Neural Networks for Group Shifts"
    (ICLR), Algorithm 1, on a batch's (G,) mean group losses as their code does (kohpangwei/group_DRO). Taken
    in log space (a softmax), the same numbers without overflow; a group with q_g = 0 stays at 0."""
    return torch.softmax(torch.log(q) + step_size * group_loss.detach(), dim=0)


def train_step(model, stepper, pixels: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None):
    """One optimiser step on a batch; (loss, gradient norm), device tensors: no host sync here."""
    loss = multi_head_loss(model(pixels).logits, targets, pos_weight)
    norm = stepper.step(loss)
    return loss.detach(), norm


def group_dro_step(
    model,
    stepper,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    groups: torch.Tensor,
    q: torch.Tensor,
    step_size: float,
    pos_weight: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """One Group DRO step (Sagawa et al. 2020, Algorithm 1): update q with the batch's mean group losses, then
    an optimiser step on the robust loss sum_g q_g loss_g over the groups in the batch (an absent group's loss
    is 0). (loss, gradient norm, new q), device tensors.

    `reduce` (several workers) turns this worker's (2G,) group loss sums and label counts into the mean over
    every worker, so each updates q from the losses of the whole global batch and the q stay equal; it is a
    host sync. None (one worker): no host sync here.
    """
    n_groups = q.numel()
    sums, counts = group_losses(model(pixels).logits, targets, groups, n_groups, pos_weight)  # (G,), (G,)
    stats = torch.cat([sums.detach(), counts])
    if reduce is not None:
        stats = reduce(stats)  # sync point: the global batch's group losses
    global_sums, global_counts = stats[:n_groups], stats[n_groups:]
    q = group_dro_update(q, global_sums / global_counts.clamp(min=1), step_size)
    loss = (q * (sums / counts.clamp(min=1))).sum()  # this worker's share; DDP averages the gradients
    norm = stepper.step(loss)
    return loss.detach(), norm, q


class TorchStepper:
    """backward + clip + AdamW step for a plain or DDP-wrapped module."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None):
        self.model, self.optimizer, self.max_grad_norm = model, optimizer, max_grad_norm

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """The step; returns the global gradient norm before clipping."""
        loss.backward()
        limit = self.max_grad_norm if self.max_grad_norm is not None else math.inf  # inf: measure, never clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()


@torch.no_grad()
def predict_logits(model, pixels: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, R, R) -> (N, H) logits, in eval mode (the model's mode is restored after)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    resolution = int(model.config.image_size)
    out = [
        model(to_pixels(pixels[i : i + batch_size], resolution, device)).logits.float()
        for i in range(0, len(pixels), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, model.config.num_labels))


def validation_loss(model, pixels: np.ndarray, targets: np.ndarray) -> torch.Tensor:
    """Unweighted mean BCE on the validation rows (a device tensor)."""
    logits = predict_logits(model, pixels)
    return multi_head_loss(logits, torch.as_tensor(targets, dtype=torch.float32, device=logits.device))


def worst_group_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, n_groups: int, head: int
) -> torch.Tensor:
    """The lowest accuracy of head `head` (positive at logit >= 0, i.e. p >= 0.5) over its label x group cells
    with at least one row of known label, as `scoring.classification.worst_group_accuracy`; a 0-d device
    tensor, NaN when no row has a label. (N, H) logits and targets, (N,) group ids below `n_groups`."""
    y = targets[:, head]
    known = torch.isfinite(y)
    positive = y > 0.5
    correct = (logit_decision(logits[:, head]) == positive) & known
    cell = groups * 2 + positive.long()  # (N,) label x group
    zeros = torch.zeros(2 * n_groups, device=logits.device)
    hits = zeros.index_add(0, cell, correct.float())
    rows = zeros.index_add(0, cell, known.float())
    accuracy = torch.where(rows > 0, hits / rows.clamp(min=1), torch.full_like(rows, math.inf))
    worst = accuracy.min()
    return torch.where(torch.isinf(worst), torch.full_like(worst, math.nan), worst)


@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations without the selection value improving by more than `min_delta`: lower
    is better (`mode="min"`, a validation loss) or higher (`mode="max"`, a worst-group accuracy). A NaN value
    never improves."""

    patience: int | None
    min_delta: float = 0.0
    mode: Literal["min", "max"] = "min"
    best: float | None = None  # None: the worst value of `mode` (inf for min, -inf for max)
    best_step: int = 0
    bad: int = 0

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping.mode: {self.mode!r} is not 'min' or 'max'")
        if self.best is None:
            self.best = math.inf if self.mode == "min" else -math.inf

    def update(self, step: int, value: float) -> bool:
        """Record one evaluation; True when it is the new best."""
        better = (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad, "mode": self.mode}

    def load(self, state: Mapping) -> None:
        """Continue from `state()`; a state of the other mode (a best on another scale) is a ValueError."""
        mode = state.get("mode", "min")  # checkpoints before modes were all validation losses
        if mode != self.mode:
            raise ValueError(
                f"early stopping: the checkpoint selected with mode {mode!r}, this run {self.mode!r}"
            )
        self.best, self.best_step, self.bad = float(state["best"]), int(state["best_step"]), int(state["bad"])


# --- checkpoints and export ------------------------------------------------------------------


def cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def write_classifier_checkpoint(
    folder: str | Path, *, model_state, best_state, optimizer_state: dict, state: dict
) -> None:
    """A checkpoint folder: weights, best weights, optimizer, then the state file (it marks it complete)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file(cpu_copy(model_state), str(folder / MODEL_FILE))
    save_file(cpu_copy(best_state), str(folder / BEST_FILE))
    torch.save(optimizer_state, folder / OPTIMIZER_FILE)
    (folder / STATE_FILE).write_text(json.dumps(state))


def read_classifier_checkpoint(uri: str, what: str = MODEL_FILE):
    """One file of a checkpoint folder (local or any fsspec URI): weights as tensors, the optimizer state
    unpickled with weights_only=True, or the state dict."""
    import fsspec
    from safetensors.torch import load

    from prism_ray.data.storage import join_uri

    with fsspec.open(join_uri(uri, what), "rb") as f:
        data = f.read()
    if what == STATE_FILE:
        return json.loads(data)
    if what == OPTIMIZER_FILE:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return load(data)


def export_classifier(model, weights: Mapping[str, torch.Tensor], uri: str, metadata: dict) -> str:
    """`weights` in `model`'s architecture as a transformers folder (config.json with `id2label` = the heads,
    model.safetensors) plus training.json; any fsspec URI. `models.classifier.load_classifier` reads it."""
    import tempfile

    import fsspec

    model.load_state_dict(weights)
    with tempfile.TemporaryDirectory(prefix="prism-classifier-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "training.json").write_text(json.dumps(metadata, indent=2))
        fs, path = fsspec.core.url_to_fs(uri)
        fs.makedirs(path, exist_ok=True)
        for file in sorted(Path(tmp).iterdir()):
            fs.put_file(str(file), f"{path.rstrip('/')}/{file.name}")
    return uri
