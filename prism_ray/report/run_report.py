"""The HTML run report of a counterfactual job (augment, demo): what was run, counts and acceptance per
subgroup, and example grids source | counterfactual | signed difference map."""

from __future__ import annotations

from typing import Any

from prism_ray.report.grids import Example, add_counterfactual_grid
from prism_ray.report.html import HtmlReport


def render_run_report(
    path: str,
    *,
    title: str,
    run_info: dict[str, Any],
    subgroups=None,
    subgroup_explanations: dict[str, str] | None = None,
    tables: dict[str, Any] | None = None,
    examples: dict[str, list[Example]] | None = None,
    max_examples_per_grid: int = 12,
    max_images: int = 400,
) -> str:
    """Write a run report to `path` (local path or fsspec URI) and return it.

    - `run_info`: what was run (model, manifest, config hash, counts, errors), shown as given.
    - `subgroups`: a table (pyarrow Table or list of dicts) with one row per subgroup, e.g.
      `subgroup, attempted, accepted, acceptance, mean_s_clip`; `subgroup_explanations` explain
      its columns in a sentence each.
    - `tables`: further tables by caption (e.g. errors by stage).
    - `examples`: grid title -> examples (e.g. 'age=80+ · accepted'), at most
      `max_examples_per_grid` shown each.
    """
    report = HtmlReport(title, max_images=max_images)
    report.add_heading("What was run", id="run-info")
    report.add_key_values(run_info)
    if subgroups is not None:
        report.add_heading("Subgroups", id="subgroups")
        report.add_table(subgroups, explanations=subgroup_explanations, id="subgroup-table")
    for k, (caption, table) in enumerate((tables or {}).items()):
        report.add_table(table, caption=caption, id=f"table-{k}")
    if examples:
        report.add_heading("Examples", id="examples")
        for k, (grid_title, items) in enumerate(examples.items()):
            shown = items[:max_examples_per_grid]
            add_counterfactual_grid(
                report,
                shown,
                caption=f"{grid_title} ({len(shown)} of {len(items)})",
                source_name="source",
                id=f"grid-{k}",
            )
    return report.write(path)
