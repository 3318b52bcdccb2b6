"""Run summaries: one JSON per run, and the non-zero ending of a run that did not deliver."""

from __future__ import annotations

from prism_ray.results.layout import Layout
from prism_ray.results.ledger import write_json_atomic


class RunIncomplete(RuntimeError):
    """The job finished its work but not its goal (a shortfall, or no output at all).

    Its message is the one-line summary the CLI prints before exiting non-zero; the outputs and
    `summary.json` are written and valid, and a re-run continues from them.
    """

    def __init__(self, line: str, summary: dict):
        super().__init__(line)
        self.summary = summary


def write_summary(layout: Layout, summary: dict, *, legacy_name: bool = False) -> None:
    """`summary.json` (and the same bytes as `run_summary.json` where `legacy_name`: augment's old name)."""
    write_json_atomic(summary, layout.summary)
    if legacy_name:
        write_json_atomic(summary, layout.legacy_summary)
