"""Binary classifier metrics per head and subgroup (accuracy, balanced accuracy, AUROC, ECE, worst group), with CIs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "auroc", "ece")
THRESHOLD = 0.5  # a sigmoid head's decision threshold on its probability


# --- a head's decision, and whether an edit flipped it -------------------------------------------


def decision(p, threshold: float = THRESHOLD):
    """A sigmoid head's decision from its probability: positive at `p >= threshold`, so a tie (p exactly 0.5)
    is positive and NaN is negative. Elementwise on numpy arrays and torch tensors, a bool on a float."""
    return p >= threshold


def logit_decision(logits):
    """The same decision from a logit: sigmoid(z) >= 0.5 exactly when z >= 0, so a tie (z = 0) is positive."""
    return logits >= 0


def flipped(before, after, threshold: float = THRESHOLD):
    """Whether the decision changed between the source's probability (`before`) and the edit's (`after`)."""
    return decision(after, threshold) != decision(before, threshold)


# --- one metric on one set of predictions ------------------------------------------------------


def accuracy(y: np.ndarray, p: np.ndarray, threshold: float = THRESHOLD) -> float:
    """Share of rows whose decision equals the 0/1 label; NaN for no rows."""
    y, p = np.asarray(y, bool), np.asarray(p, float)
    return float(np.mean(decision(p, threshold) == y)) if y.size else math.nan


def balanced_accuracy(y: np.ndarray, p: np.ndarray, threshold: float = THRESHOLD) -> float:
    """Mean of the true-positive and true-negative rates; NaN unless both classes are present."""
    y, pred = np.asarray(y, bool), decision(np.asarray(p, float), threshold)
    if y.all() or not y.any():
        return math.nan
    return float(0.5 * (pred[y].mean() + (~pred[~y]).mean()))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` along its last axis, tied values sharing their mean rank."""
    x = np.asarray(x, float)
    order = np.argsort(x, axis=-1, kind="stable")
    s = np.take_along_axis(x, order, axis=-1)  # sorted values
    n = x.shape[-1]
    # A tie block [a, b] gets rank (a + b) / 2 + 1: find each element's block start and end.
    new_block = np.ones(s.shape, bool)
    new_block[..., 1:] = s[..., 1:] != s[..., :-1]
    idx = np.broadcast_to(np.arange(n), s.shape)
    start = np.maximum.accumulate(np.where(new_block, idx, 0), axis=-1)
    last = np.ones(s.shape, bool)
    last[..., :-1] = new_block[..., 1:]
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, idx, n), -1), axis=-1), -1)
    ranks = np.empty(s.shape, float)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=-1)
    return ranks


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic (ties count half); NaN for one class."""
    y, score = np.asarray(y, bool), np.asarray(score, float)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = average_ranks(score)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of P(y = 1): sum over equal-width bins of |mean(y) - mean(p)| x share.

    Bins are [0, 1/B), ..., [(B-1)/B, 1]: a probability of exactly 1 falls in the last bin.
    """
    y, p = np.asarray(y, float), np.asarray(p, float)
    if not y.size:
        return math.nan
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    gap = np.abs(np.bincount(which, y, bins) - np.bincount(which, p, bins))  # |sum y - sum p| per bin
    return float(gap.sum() / y.size)


def metric(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    return {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy, "auroc": auroc, "ece": ece}[name]


# --- groups --------------------------------------------------------------------------------------


def group_accuracies(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, min_size: int = 1, threshold: float = 0.5
) -> dict[tuple, float]:
    """Accuracy in every (label, group value) cell with at least `min_size` rows."""
    y, p, groups = np.asarray(y, bool), np.asarray(p, float), np.asarray(groups)
    out = {}
    for label in (False, True):
        for value in np.unique(groups):
            cell = (y == label) & (groups == value)
            if cell.sum() >= min_size:
                out[(int(label), value.item() if hasattr(value, "item") else value)] = accuracy(
                    y[cell], p[cell], threshold
                )
    return out


def worst_group_accuracy(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, min_size: int = 1, threshold: float = 0.5
) -> float:
    """The lowest accuracy over the (label, group value) cells (Sagawa et al., 2020, "Group DRO")."""
    cells = group_accuracies(y, p, groups, min_size, threshold)
    return min(cells.values()) if cells else math.nan


# --- bootstrap ---------------------------------------------------------------------------------


def bootstrap_ci(
    fn: Callable[..., float],
    arrays: tuple[np.ndarray, ...],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `fn(*arrays)`, resampling rows with replacement (one seeded generator).

    Resamples where the metric is undefined (e.g. AUROC of one class) are left out; (NaN, NaN)
    if fewer than half of them are defined.
    """
    n = len(arrays[0])
    if n == 0 or n_boot == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        take = rng.integers(0, n, n)
        values[b] = fn(*(a[take] for a in arrays))
    ok = values[np.isfinite(values)]
    if ok.size < n_boot / 2:
        return math.nan, math.nan
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(ok, [tail, 100.0 - tail])
    return float(low), float(high)


def head_metrics(
    y: np.ndarray,
    p: np.ndarray,
    attributes: Mapping[str, np.ndarray],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    min_group: int = 1,
    threshold: float = 0.5,
) -> list[dict]:
    """Every metric of one head: on all rows, per value of each attribute, per (label, value) cell, and the
    worst-group accuracy per attribute; one dict per number with its bootstrap CI.

    Rows: {attribute, group, label, metric, value, ci_low, ci_high, n}; `attribute` = "all" for the whole set,
    `group` = the attribute's value ("all", "worst"), `label` = the true label of a cell (None otherwise).
    Rows whose label is unknown (NaN) are left out.
    """
    y, p = np.asarray(y, float), np.asarray(p, float)
    known = np.isfinite(y)
    y, p = y[known] > 0.5, p[known]
    attributes = {name: np.asarray(values)[known] for name, values in attributes.items()}
    rows: list[dict] = []

    def add(attribute, group, label, name, fn, arrays):
        value = fn(*arrays)
        low, high = (
            bootstrap_ci(fn, arrays, n_boot=n_boot, level=level, seed=seed)
            if math.isfinite(value)
            else (math.nan, math.nan)
        )
        rows.append(
            {
                "attribute": attribute,
                "group": str(group),
                "label": label,
                "metric": name,
                "value": value,
                "ci_low": low,
                "ci_high": high,
                "n": len(arrays[0]),
            }
        )

    fns = {
        "accuracy": lambda a, b: accuracy(a, b, threshold),
        "balanced_accuracy": lambda a, b: balanced_accuracy(a, b, threshold),
        "auroc": auroc,
        "ece": ece,
    }
    for name, fn in fns.items():
        add("all", "all", None, name, fn, (y, p))
    for attribute, values in attributes.items():
        for value in np.unique(values):
            mask = values == value
            if mask.sum() < min_group:
                continue
            for name, fn in fns.items():
                add(attribute, value, None, name, fn, (y[mask], p[mask]))
            for label in (0, 1):
                cell = mask & (y == bool(label))
                if cell.sum() >= min_group:
                    add(attribute, value, label, "accuracy", fns["accuracy"], (y[cell], p[cell]))

        def worst(a, b, g):
            return worst_group_accuracy(a, b, g, min_group, threshold)

        add(attribute, "worst", None, "worst_group_accuracy", worst, (y, p, values))
    return rows


# --- across seeds ------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0 if math.isinf(t) else math.nan
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The `q` quantile (q > 0.5) of Student's t, by bisection on the two-sided p."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_two_sided_p(mid, df) > 2.0 * (1.0 - q):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def paired_t_test(diffs: np.ndarray) -> tuple[float, float]:
    """(t, two-sided p) of H0: mean paired difference = 0; NaN below 2 pairs, p = 1 or 0 for zero spread."""
    d = np.asarray(diffs, float)
    if d.size < 2:
        return math.nan, math.nan
    sd = d.std(ddof=1)
    if sd == 0.0:
        return (0.0, 1.0) if d.mean() == 0.0 else (math.copysign(math.inf, d.mean()), 0.0)
    t = float(d.mean() / (sd / math.sqrt(d.size)))
    return t, t_two_sided_p(t, d.size - 1)


def sign_flip_p(diffs: np.ndarray) -> float:
    """Exact two-sided sign-flip permutation p of the mean paired difference (all 2^n sign patterns).

    Its smallest possible value is 2 / 2^n: 0.25 with 3 seeds, 0.0625 with 5.
    """
    d = np.asarray(diffs, float)
    if d.size == 0 or d.size > 20:
        return math.nan
    signs = 1 - 2 * ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1)  # (2^n, n) of +-1
    means = np.abs(signs @ d) / d.size
    return float(np.mean(means >= abs(d.mean()) - 1e-12))


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sample sd, t-interval low, high) of per-seed values; NaN interval below 2 values."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(v.std(ddof=1))
    half = t_quantile(0.5 + level / 2.0, v.size - 1) * sd / math.sqrt(v.size)
    return mean, sd, mean - half, mean + half
