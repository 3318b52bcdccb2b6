"""Audit figures: the co-change heatmap, per-subgroup bars with CIs, and signed difference maps.

matplotlib is imported inside the functions (importing prism_ray stays light) and figures are built
as `matplotlib.figure.Figure` objects on the Agg canvas: no pyplot, no global figure registry, no
display. `prism_ray.report.html.figure_png` renders them to PNG bytes.
"""

from __future__ import annotations

import math

import numpy as np

COCHANGE_COLUMNS = (
    "intervention",
    "attribute",
    "subgroup",
    "n",
    "change_rate",
    "control_rate",
    "difference",
    "ci_low",
    "ci_high",
    "p_value",
    "q_value",
    "expected",
    "flagged",
)
ALL = "all"  # the subgroup holding every image

FLAGGED_COLOR, EXPECTED_COLOR, OTHER_COLOR = "#c0392b", "#7f8c8d", "#2e86c1"


def cochange_rows(cochange) -> list[dict]:
    """The co-change table (pyarrow Table or list of dicts) as a list of dicts, its columns checked."""
    rows = cochange.to_pylist() if hasattr(cochange, "to_pylist") else list(cochange)
    names = cochange.column_names if hasattr(cochange, "column_names") else (list(rows[0]) if rows else [])
    missing = [c for c in COCHANGE_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"cochange: missing column(s) {missing}")
    return rows


def _ordered(values) -> list:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


# Heatmap cell outlines: flagged solid, expected dotted (the gid lets tests find the patches).
_OUTLINE = {"flagged": ("black", 2.5, "-"), "expected": ("#555555", 1.5, ":")}


def cochange_heatmap(cochange):
    """Intervention × attribute heatmap of `difference` (change rate − control rate) over all images.

    Flagged cells get a thick black outline and a '*' after their value; expected cells (the
    target or an attribute declared implied) a dotted grey outline. The outlines carry the gids
    'flagged' and 'expected'. Returns a matplotlib Figure.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = [r for r in cochange_rows(cochange) if r["subgroup"] == ALL]
    if not rows:
        raise ValueError(f"cochange: no rows with subgroup '{ALL}' to draw the heatmap from")
    interventions = _ordered(r["intervention"] for r in rows)
    attributes = _ordered(r["attribute"] for r in rows)
    diff = np.full((len(interventions), len(attributes)), np.nan)  # (I, A)
    cells = {}
    for r in rows:
        i, a = interventions.index(r["intervention"]), attributes.index(r["attribute"])
        if (i, a) in cells:
            raise ValueError(f"cochange: two '{ALL}' rows for {r['intervention']} × {r['attribute']}")
        cells[i, a] = r
        diff[i, a] = np.nan if r["difference"] is None else r["difference"]
    finite = np.abs(diff[np.isfinite(diff)])
    vmax = max(float(finite.max()) if finite.size else 0.0, 0.05)

    fig = Figure(
        figsize=(max(4.5, 1.0 * len(attributes) + 2.5), max(2.6, 0.55 * len(interventions) + 1.6)),
        layout="constrained",
    )
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(diff), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(attributes)), labels=attributes, rotation=35, ha="right")
    ax.set_yticks(range(len(interventions)), labels=interventions)
    ax.set_xlabel("classifier attribute")
    for (i, a), r in cells.items():
        d = diff[i, a]
        text = "n/a" if not np.isfinite(d) else f"{d:+.2f}" + ("*" if r["flagged"] else "")
        dark = np.isfinite(d) and abs(d) > 0.6 * vmax
        ax.text(
            a,
            i,
            text,
            ha="center",
            va="center",
            fontsize=8.5,
            color="white" if dark else "black",
            fontweight="bold" if r["flagged"] else "normal",
        )
        kind = "flagged" if r["flagged"] else "expected" if r["expected"] else None
        if kind is not None:
            color, width, line = _OUTLINE[kind]
            ax.add_patch(Rectangle((a - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor=color,
                                   linewidth=width, linestyle=line, gid=kind))
    fig.colorbar(image, ax=ax, label="change rate − control rate")
    ax.set_title("Co-changes (all images): * = flagged, dotted = expected")
    return fig


def subgroup_bars(cochange, intervention: str, attribute: str):
    """Bar chart of `difference` per subgroup for one intervention × attribute, with 95 % CI error bars
    (flagged bars red, expected grey, others blue; n under each bar). Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    rows = [
        r
        for r in cochange_rows(cochange)
        if r["intervention"] == intervention and r["attribute"] == attribute
    ]
    if not rows:
        raise ValueError(f"cochange: no rows for {intervention} × {attribute}")
    rows.sort(key=lambda r: r["subgroup"] != ALL)  # 'all' first, the rest in table order
    diffs = np.array([_num(r["difference"]) for r in rows])
    low = np.array([_num(r["ci_low"]) for r in rows])
    high = np.array([_num(r["ci_high"]) for r in rows])
    yerr = np.nan_to_num(np.stack([diffs - low, high - diffs]).clip(min=0))  # (2, S); no CI -> no bar
    colors = [
        FLAGGED_COLOR if r["flagged"] else EXPECTED_COLOR if r["expected"] else OTHER_COLOR for r in rows
    ]

    fig = Figure(figsize=(max(3.8, 0.85 * len(rows) + 1.8), 3.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    ax.bar(x, np.nan_to_num(diffs), yerr=yerr, color=colors, capsize=4, error_kw={"elinewidth": 1.2})
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels=[f"{r['subgroup']}\nn={r['n']}" for r in rows], fontsize=8)
    ax.set_ylabel("change − control\n(95 % CI)")
    ax.set_title(f"{intervention} → {attribute}", fontsize=10)
    return fig


def _num(value) -> float:
    return math.nan if value is None else float(value)


def signed_difference_map(
    original: np.ndarray, counterfactual: np.ndarray, scale: float | None = None
) -> np.ndarray:
    """Counterfactual minus original as a uint8 (H, W, 3) RdBu image: red = brighter in the
    counterfactual, blue = darker, white = unchanged. Colours saturate at ±`scale` grey levels
    (default: the largest |difference| in this pair). Colour inputs are compared in grey (channel mean).
    """
    import matplotlib

    a, b = gray_levels(original), gray_levels(counterfactual)
    if a.shape != b.shape:
        raise ValueError(f"signed_difference_map: shapes differ: {a.shape} vs {b.shape}")
    diff = b - a  # (H, W), grey levels in [-255, 255]
    if scale is None:
        scale = float(np.abs(diff).max())
    scale = max(float(scale), 1.0)
    rgba = matplotlib.colormaps["RdBu_r"](0.5 + 0.5 * np.clip(diff / scale, -1.0, 1.0))  # (H, W, 4) in [0, 1]
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def gray_levels(image: np.ndarray) -> np.ndarray:
    """A uint8 (H, W) or (H, W, 3|4) image as float grey levels (H, W) (colour: the channel mean)."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"signed_difference_map: expected uint8 pixels, got {array.dtype}")
    if array.ndim == 3:
        array = array[..., :3].mean(axis=2)
    return array.astype(np.float64)
