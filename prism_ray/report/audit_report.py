"""The audit's HTML report: what was run, the co-change heatmap, flagged co-changes in words, what the
audit could not have flagged (cells too small to reach alpha) and the strongest unflagged co-changes,
subgroup bars with CIs, and example grids (original | counterfactual | signed difference map)."""

from __future__ import annotations

import math
from typing import Any

from prism_ray.report.grids import Example, add_counterfactual_grid
from prism_ray.report.html import HtmlReport
from prism_ray.report.plots import ALL, cochange_heatmap, cochange_rows, subgroup_bars
from prism_ray.scoring.audit_stats import AuditStatsConfig, images_needed, min_q_values

COLUMN_EXPLANATIONS = {
    "n": "Images in the subgroup the intervention applies to.",
    "change_rate": "Share of those images whose attribute decision changed under the intervention.",
    "control_rate": "Share whose decision changed in the control (the unedited reconstruction).",
    "difference": "change_rate − control_rate: the change the edit causes beyond reconstruction drift.",
    "ci_low": "Lower end of the 95 % bootstrap confidence interval of the difference (over images).",
    "ci_high": "Upper end of the 95 % bootstrap confidence interval of the difference.",
    "p_value": "Paired test of intervention vs control flips.",
    "q_value": "Benjamini–Hochberg q-value over the whole table.",
    "expected": "The intervention's target, or an attribute declared implied by it.",
    "flagged": "Not expected, q below alpha and |difference| at least min_effect.",
    "min_q_value": (
        "The smallest q-value the cell's n allows: all n images changed under the edit and none under the control "
        "(McNemar p = 2^(1 − n)), BH-corrected with the rest of the table. At or above alpha the cell cannot be "
        "flagged at any effect size."
    ),
}


def format_q(q: float | None) -> str:
    """q-values as people write them: 0.004, 0.03, 1e-9, 2.5e-12."""
    if q is None or math.isnan(q):
        return "n/a"
    if q >= 1e-3:
        return f"{q:.2g}"
    mantissa, exponent = f"{q:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def _percent(rate: float) -> str:
    return f"{100 * rate:.1f} %" if 0 < rate < 0.01 else f"{100 * rate:.0f} %"


def ranked_flagged(cochange) -> list[dict]:
    """Flagged rows, strongest evidence first (smallest q, then largest |difference|)."""
    rows = [r for r in cochange_rows(cochange) if r["flagged"]]
    return sorted(rows, key=lambda r: (r["q_value"], -abs(r["difference"])))


def cochange_sentence(row: dict) -> str:
    """One co-change row in plain language, e.g. 'do(Cardiomegaly=0) also flipped the pacemaker decision
    in 41 % of 240 images vs 2 % in the control (+39 points, 95 % CI +30 to +48), q = 1e-9.'

    The change rate counts flips in either direction; when the row has `mean_signed_delta_p`, the
    sentence says which way the attribute's probability moved on average.
    """
    who = "" if row["subgroup"] == ALL else f"Among {row['subgroup']} images, "
    sentence = (
        f"{who}{row['intervention']} also flipped the {row['attribute']} decision in "
        f"{_percent(row['change_rate'])} of {row['n']:,} images vs {_percent(row['control_rate'])} in the control"
    )
    delta = row.get("mean_signed_delta_p")
    if delta is not None and not math.isnan(delta) and delta != 0:
        sentence += (
            f" and {'raised' if delta > 0 else 'lowered'} its probability by {abs(delta):.2f} on average"
        )
    ci = ""
    if row["ci_low"] is not None and row["ci_high"] is not None:
        ci = f", 95 % CI {100 * row['ci_low']:+.0f} to {100 * row['ci_high']:+.0f}"
    return f"{sentence} ({100 * row['difference']:+.0f} points{ci}), q = {format_q(row['q_value'])}."


def with_min_q(rows: list[dict]) -> list[dict]:
    """The rows with `min_q_value` (audit_stats.min_q_values), computed from n and p when a table lacks it."""
    if rows and all("min_q_value" in r for r in rows):
        return rows
    floor = min_q_values([r["n"] for r in rows], [_nan(r["p_value"]) for r in rows])
    return [{**r, "min_q_value": float(q)} for r, q in zip(rows, floor, strict=True)]


def strongest_unflagged(rows: list[dict], limit: int = 10) -> list[dict]:
    """Co-changes the audit could flag (not expected) but did not, strongest evidence first (as `ranked_flagged`),
    the edit changing the attribute more often than the control (difference > 0)."""
    mine = [r for r in rows if not r["expected"] and not r["flagged"] and _nan(r["difference"]) > 0]
    return sorted(mine, key=lambda r: (_nan(r["q_value"], 1.0), -abs(r["difference"])))[:limit]


def power_sentences(rows: list[dict], alpha: float) -> list[str]:
    """What 'not flagged' can mean here: how many cells could not reach q < alpha with any effect, and how
    many images a cell needs in this table."""
    open_cells = [r for r in rows if not r["expected"] and not math.isnan(_nan(r["min_q_value"]))]
    if not open_cells:
        return []
    blind = [r for r in open_cells if r["min_q_value"] >= alpha]
    out = []
    if blind:
        sizes = sorted({r["n"] for r in blind})
        out.append(
            f"{len(blind)} of {len(open_cells)} cells that could be flagged (not expected) cannot reach q < {alpha:g} "
            f"at any effect size: even all their images changed under the edit and none under the control would "
            f"leave q ≥ {alpha:g} after the BH correction over {len(rows)} tests (n = "
            f"{', '.join(map(str, sizes[:8]))}{', …' if len(sizes) > 8 else ''}; column min q). For them 'not "
            "flagged' means 'not measurable with these images', not 'no co-change'."
        )
    needed = images_needed([_nan(r["p_value"]) for r in rows], alpha)
    if needed is not None:
        out.append(
            f"In this table a cell needs at least {needed} images, every one changed by the edit and none by the "
            f"control, for q < {alpha:g}; a co-change seen in a share f of the images needs about {needed} / f "
            "(e.g. 30 %: "
            f"{math.ceil(needed / 0.3)} images)."
        )
    return out


def _nan(value, default: float = math.nan) -> float:
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else value


def flagged_sentences(cochange) -> list[str]:
    """Plain-language sentences for the flagged co-changes, in `ranked_flagged` order."""
    return [cochange_sentence(r) for r in ranked_flagged(cochange)]


def render_audit_report(
    path: str,
    *,
    run_info: dict[str, Any],
    cochange,
    per_intervention=None,
    examples: dict[str, list[Example]],
    alpha: float | None = None,
    min_effect: float | None = None,
    max_bar_charts: int = 24,
    max_examples_per_grid: int = 12,
    max_images: int = 400,
) -> str:
    """Write the audit report to `path` (local path or fsspec URI) and return it.

    `run_info`: what was run (model, data, interventions, classifier, edit settings, counts, errors),
    shown as given. `cochange`: the co-change table (pyarrow Table, columns `plots.COCHANGE_COLUMNS`,
    optional `mean_signed_delta_p`). `per_intervention`: an optional table per intervention (target
    CPG, acceptance, L1, ...), shown as given. `examples`: grid title -> examples, e.g.
    'do(Cardiomegaly=0) → pacemaker: strongest' or 'do(sex=flip): random', rendered in that order
    (at most `max_examples_per_grid` each). `alpha` / `min_effect` only word the legend.
    """
    rows = with_min_q(cochange_rows(cochange))
    level = alpha if alpha is not None else AuditStatsConfig().alpha
    report = HtmlReport("prism_ray audit report", max_images=max_images)

    report.add_heading("What was run", id="run-info")
    report.add_key_values(run_info)

    report.add_heading("Co-changes at a glance")
    rule = "not expected, q < " + (f"{alpha:g}" if alpha is not None else "alpha") + " and |difference| ≥ "
    rule += f"{min_effect:g}" if min_effect is not None else "min_effect"
    report.add_figure(
        cochange_heatmap(cochange),
        caption="Each cell: the share of images whose classifier decision for the attribute (column) "
        "changed under the intervention (row), minus the same share under the control reconstruction. "
        f"* and a black outline: flagged ({rule}); dotted outline: expected (the target or an implied "
        "attribute). Red: the edit changes the attribute more than reconstruction alone does.",
        id="cochange-heatmap",
    )

    flagged = ranked_flagged(cochange)
    report.add_heading("Flagged co-changes", id="flagged")
    if not flagged:
        report.add_paragraph(f"No co-change was flagged ({rule}).", id="no-flagged")
    power = power_sentences(rows, level)
    if power:
        report.add_paragraph(" ".join(power), id="power", css_class="note")
    explanations = {
        k: COLUMN_EXPLANATIONS[k] for k in ("n", "change_rate", "control_rate", "difference", "q_value")
    }
    explanations["95 % CI"] = "95 % bootstrap confidence interval of the difference (over images)."
    report.add_table(
        columns=["rank", "intervention", "attribute", "subgroup", "n", "change_rate", "control_rate",
                 "difference", "95 % CI", "q_value", "in words"],
        rows=[
            [k + 1, r["intervention"], r["attribute"], r["subgroup"], r["n"], r["change_rate"],
             r["control_rate"], r["difference"], _interval(r), format_q(r["q_value"]), cochange_sentence(r)]
            for k, r in enumerate(flagged)
        ],
        caption=f"{len(flagged)} flagged co-change(s), strongest evidence first",
        explanations=explanations,
        id="flagged-table",
    )  # fmt: skip

    unflagged = strongest_unflagged(rows)
    report.add_heading("Strongest unflagged co-changes", id="unflagged")
    report.add_table(
        columns=["rank", "intervention", "attribute", "subgroup", "n", "change_rate", "control_rate",
                 "difference", "95 % CI", "q_value", "min q", "could be flagged"],
        rows=[
            [k + 1, r["intervention"], r["attribute"], r["subgroup"], r["n"], r["change_rate"], r["control_rate"],
             r["difference"], _interval(r), format_q(r["q_value"]), format_q(r["min_q_value"]),
             "yes" if r["min_q_value"] < level else "no: too few images"]
            for k, r in enumerate(unflagged)
        ],
        caption=f"Not flagged, not expected, the edit changing the attribute more often than the control: the "
        f"{len(unflagged)} with the strongest evidence. A CI that excludes 0 with q ≥ {level:g} is a co-change "
        "this audit saw but could not confirm; 'could be flagged: no' is a cell too small for q < "
        f"{level:g} at any effect.",
        explanations={
            **explanations,
            "min q": COLUMN_EXPLANATIONS["min_q_value"],
            "could be flagged": f"Whether the cell's min q is below alpha ({level:g}).",
        },
        id="unflagged-table",
    )  # fmt: skip

    if per_intervention is not None:
        report.add_heading("Per intervention", id="per-intervention")
        report.add_table(per_intervention, caption="Target effect, acceptance and distance per intervention")

    cells = _ordered_cells(rows, flagged)
    report.add_heading("Subgroups", id="subgroups")
    report.add_paragraph(
        "The difference per subgroup with its 95 % confidence interval, for every flagged co-change and "
        "every intervention's target: red bars are flagged, grey expected, blue neither."
    )
    with report.flow():
        for k, (intervention, attribute) in enumerate(cells[:max_bar_charts]):
            report.add_figure(subgroup_bars(cochange, intervention, attribute), id=f"bars-{k}")
    if len(cells) > max_bar_charts:
        report.add_paragraph(f"{len(cells) - max_bar_charts} more chart(s) not shown.", css_class="note")

    report.add_heading("Examples", id="examples")
    for k, (title, items) in enumerate(examples.items()):
        shown = items[:max_examples_per_grid]
        add_counterfactual_grid(
            report, shown, caption=f"{title} ({len(shown)} of {len(items)})", id=f"grid-{k}"
        )

    with report.details("The whole co-change table"):
        shown = {k: v for k, v in COLUMN_EXPLANATIONS.items() if k in rows[0]} if rows else {}
        report.add_table(rows, explanations=shown, id="cochange-table")
    return report.write(path)


def _interval(row: dict) -> str:
    if row["ci_low"] is None or row["ci_high"] is None:
        return "n/a"
    return f"{row['ci_low']:+.3f} to {row['ci_high']:+.3f}"


def _ordered_cells(rows: list[dict], flagged: list[dict]) -> list[tuple[str, str]]:
    """(intervention, attribute) cells to chart: flagged ones by rank, then the expected ones."""
    cells = [(r["intervention"], r["attribute"]) for r in flagged]
    cells += [(r["intervention"], r["attribute"]) for r in rows if r["expected"] and r["subgroup"] == ALL]
    return list(dict.fromkeys(cells))
