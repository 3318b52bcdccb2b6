"""One self-contained HTML report file: sections of text, tables and inline PNG images, no network."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .3em 0; }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: .15em 1.2em; }
dl.kv dt { font-weight: 600; } dl.kv dd { margin: 0; white-space: pre-wrap; }
figure { margin: 1em 0; } figcaption { font-size: .9em; color: #444; max-width: 900px; }
img.pixel { image-rendering: pixelated; }
table.grid td { text-align: center; } table.grid td.label { text-align: left; max-width: 18em; font-size: .85em; }
table.grid th p { font-weight: normal; font-size: .82em; margin: .2em 0 0 0; max-width: 16em; }
ul.legend li, p.note { color: #444; font-size: .9em; }
details summary { cursor: pointer; font-weight: 600; }
div.flow { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; }
td.text { min-width: 15em; }
"""

ImageLike = bytes | np.ndarray


def png_bytes(image: ImageLike, max_side: int | None = None) -> tuple[bytes, int, int]:
    """PNG bytes and (width, height) of a uint8 image array ((H, W), (H, W, 1), (H, W, 3), (H, W, 4)) or of
    encoded image bytes; images larger than `max_side` are downscaled (aspect kept)."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        pil = Image.open(io.BytesIO(bytes(image)))
        if pil.format == "PNG" and (max_side is None or max(pil.size) <= max_side):
            return bytes(image), pil.size[0], pil.size[1]
        pil.load()
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"image: expected uint8 pixels, got {array.dtype}")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise ValueError(f"image: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
        pil = Image.fromarray(array)
    if max_side is not None and max(pil.size) > max_side:
        pil.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue(), pil.size[0], pil.size[1]


def figure_png(figure, dpi: int = 100) -> bytes:
    """Render a matplotlib Figure to PNG bytes with the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    buf = io.BytesIO()
    figure.savefig(
        buf, format="png", dpi=dpi
    )  # no bbox "tight" (a second draw): plots.py uses constrained layout
    return buf.getvalue()


def _format_cell(value: Any, digits: int) -> tuple[str, bool]:
    """(text, is_number) for one table cell."""
    if value is None:
        return "", False
    if isinstance(value, (bool, np.bool_)):
        return ("yes" if value else "no"), False
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}", True
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "–", True
        if v != 0 and (abs(v) < 10**-digits or abs(v) >= 1e6):
            return f"{v:.{max(digits - 1, 1)}e}", True
        return f"{v:.{digits}f}", True
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str), False
    return str(value), False


class HtmlReport:
    """A report built section by section and written as one HTML file that opens from disk.

    Every text is HTML-escaped; images are embedded as `data:image/png;base64` URIs. Images larger
    than `max_image_side` pixels are downscaled, and at most `max_images` images or `max_bytes` of
    PNG are embedded (later ones are replaced by a note, counted in the footer): the caller picks
    which examples to show, the limits cap the file (25 MB by default) even when it asks for too many. Elements given an `id` can be found by tests and links (`#id`).
    """

    def __init__(
        self, title: str, *, max_images: int = 400, max_image_side: int = 256, max_bytes: int = 25_000_000
    ):
        if max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if max_image_side < 8:
            raise ValueError(f"max_image_side must be >= 8, got {max_image_side}")
        self.title = title
        self.max_images = max_images
        self.max_image_side = max_image_side
        self.max_bytes = max_bytes
        self.bytes_embedded = 0
        self.images_embedded = 0
        self.images_omitted = 0
        self._parts: list[str] = []

    # --- text ------------------------------------------------------------------------------

    def add_heading(self, text: str, level: int = 2, id: str | None = None) -> None:
        if level not in (1, 2, 3, 4):
            raise ValueError(f"level must be 1..4, got {level}")
        self._parts.append(f"<h{level}{_id(id)}>{html.escape(text)}</h{level}>")

    def add_paragraph(self, text: str, id: str | None = None, css_class: str | None = None) -> None:
        cls = f' class="{html.escape(css_class)}"' if css_class else ""
        self._parts.append(f"<p{_id(id)}{cls}>{html.escape(text)}</p>")

    def add_list(self, items: Sequence[str], id: str | None = None, css_class: str | None = None) -> None:
        cls = f' class="{html.escape(css_class)}"' if css_class else ""
        lis = "".join(f"<li>{html.escape(str(item))}</li>" for item in items)
        self._parts.append(f"<ul{_id(id)}{cls}>{lis}</ul>")

    def add_key_values(self, items: dict[str, Any], id: str | None = None) -> None:
        """A definition list: what was run (model, data, counts, errors). Dicts and lists become JSON."""
        rows = "".join(
            f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(_format_cell(v, 4)[0])}</dd>"
            for k, v in items.items()
        )
        self._parts.append(f'<dl class="kv"{_id(id)}>{rows}</dl>')

    # --- tables ----------------------------------------------------------------------------

    def add_table(
        self,
        table=None,
        *,
        columns: Sequence[str] | None = None,
        rows: Sequence[Sequence[Any]] | None = None,
        caption: str | None = None,
        explanations: dict[str, str] | None = None,
        id: str | None = None,
        digits: int = 3,
        max_rows: int | None = 1000,
    ) -> None:
        """A table from a pyarrow Table (or a list of dicts), or from `columns` + `rows`.

        `explanations` (column -> one sentence) are shown as header tooltips and as a legend
        under the table; floats are shown with `digits` decimals; rows beyond `max_rows` are
        dropped with a note.
        """
        if table is not None:
            if columns is not None or rows is not None:
                raise ValueError("add_table: give either a table or columns + rows, not both")
            if isinstance(table, list):  # of dicts
                columns = list(table[0]) if table else []
                rows = [[r.get(c) for c in columns] for r in table]
            else:  # pyarrow.Table: only the shown rows are converted
                columns = list(table.column_names)
                shown = table if max_rows is None else table.slice(0, max_rows)
                rows = [[r[c] for c in columns] for r in shown.to_pylist()]
                n_total = table.num_rows
        if columns is None or rows is None:
            raise ValueError("add_table: give a table, or both columns and rows")
        if any(len(r) != len(columns) for r in rows):
            raise ValueError(f"add_table: every row must have {len(columns)} cells")
        if table is None or isinstance(table, list):
            n_total = len(rows)
        if max_rows is not None:
            rows = rows[:max_rows]
        explanations = explanations or {}
        unknown = sorted(set(explanations) - set(columns))
        if unknown:
            raise ValueError(f"add_table: explanations for unknown column(s) {unknown}")
        head = "".join(
            f'<th title="{html.escape(explanations[c])}">{html.escape(c)}</th>'
            if c in explanations
            else f"<th>{html.escape(c)}</th>"
            for c in columns
        )
        body = []
        for row in rows:
            cells = []
            for value in row:
                text, numeric = _format_cell(value, digits)
                cls = ' class="num"' if numeric else ' class="text"' if len(text) > 60 else ""
                cells.append(f"<td{cls}>{html.escape(text)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        parts = [f"<table{_id(id)}>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"]
        if n_total > len(rows):
            parts.append(f'<p class="note">Showing the first {len(rows):,} of {n_total:,} rows.</p>')
        if explanations:
            items = "".join(
                f"<li><b>{html.escape(c)}</b>: {html.escape(explanations[c])}</li>"
                for c in columns
                if c in explanations
            )
            parts.append(f'<ul class="legend">{items}</ul>')
        self._parts.append("".join(parts))

    # --- images ----------------------------------------------------------------------------

    def _img(self, image: ImageLike, alt: str, display_width: int | None, downscale: bool = True) -> str:
        """One `<img>` with the image inline, or a note once `max_images` or `max_bytes` are reached."""
        data = None
        if self.images_embedded < self.max_images:
            data, width, height = png_bytes(image, self.max_image_side if downscale else None)
        if data is None or self.bytes_embedded + len(data) > self.max_bytes:
            self.images_omitted += 1
            return '<span class="note">(not embedded: image limit reached)</span>'
        self.images_embedded += 1
        self.bytes_embedded += len(data)
        shown = display_width or width
        pixel = ' class="pixel"' if shown > width else ""  # small images enlarged: keep pixels sharp
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (
            f'<img src="{uri}" alt="{html.escape(alt)}" width="{shown}" '
            f'height="{round(height * shown / width)}"{pixel}>'
        )

    def add_image(
        self, image: ImageLike, caption: str = "", id: str | None = None, display_width: int | None = None
    ) -> None:
        """An image (uint8 array or encoded bytes) with a caption; `display_width` enlarges small images."""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._parts.append(f"<figure{_id(id)}>{self._img(image, caption, display_width)}{cap}</figure>")

    def add_figure(self, figure, caption: str = "", id: str | None = None, dpi: int = 100) -> None:
        """A matplotlib Figure rendered to PNG (not downscaled: its size is chosen by the plot)."""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        img = self._img(figure_png(figure, dpi=dpi), caption, None, downscale=False)
        self._parts.append(f"<figure{_id(id)}>{img}{cap}</figure>")

    def add_image_grid(
        self,
        rows: Sequence[tuple[str, Sequence[ImageLike]]],
        column_titles: Sequence[str],
        *,
        column_explanations: Sequence[str] | None = None,
        caption: str | None = None,
        id: str | None = None,
        display_width: int | None = None,
    ) -> None:
        """A grid: one row per `(label, images)`, one column per title, each column explained in a
        sentence under its title (e.g. original | counterfactual | signed difference map)."""
        if column_explanations is not None and len(column_explanations) != len(column_titles):
            raise ValueError(
                f"column_explanations has {len(column_explanations)} entries for {len(column_titles)} columns"
            )
        head = ["<th></th>"]
        for j, title in enumerate(column_titles):
            note = f"<p>{html.escape(column_explanations[j])}</p>" if column_explanations else ""
            head.append(f"<th>{html.escape(title)}{note}</th>")
        body = []
        for label, images in rows:
            if len(images) != len(column_titles):
                raise ValueError(
                    f"image grid row '{label}' has {len(images)} images for {len(column_titles)} columns"
                )
            cells = "".join(
                f"<td>{self._img(im, f'{label}: {title}', display_width)}</td>"
                for im, title in zip(images, column_titles, strict=True)
            )
            body.append(f'<tr><td class="label">{html.escape(label)}</td>{cells}</tr>')
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self._parts.append(
            f'<table class="grid"{_id(id)}>{cap}<thead><tr>{"".join(head)}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>"
        )

    @contextlib.contextmanager
    def flow(self):
        """Side by side: what is added inside the `with` block wraps like words (e.g. small charts)."""
        self._parts.append('<div class="flow">')
        try:
            yield self
        finally:
            self._parts.append("</div>")

    @contextlib.contextmanager
    def details(self, summary: str):
        """A collapsed section: what is added inside the `with` block is folded under `summary`."""
        self._parts.append(f"<details><summary>{html.escape(summary)}</summary>")
        try:
            yield self
        finally:
            self._parts.append("</details>")

    # --- output ----------------------------------------------------------------------------

    def to_html(self) -> str:
        footer = f"{self.images_embedded} image(s) embedded ({self.bytes_embedded / 1e6:.1f} MB)"
        if self.images_omitted:
            footer += (
                f"; {self.images_omitted} more not embedded (limits: max_images={self.max_images}, "
                f"max_bytes={self.max_bytes:,})"
            )
        title = html.escape(self.title)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="data:,">'  # no favicon request: the file opens offline without errors
            f"<title>{title}</title><style>{_CSS}</style></head>\n<body>\n<h1>{title}</h1>\n"
            + "\n".join(self._parts)
            + f'\n<footer><p class="note">{html.escape(footer)}.</p></footer>\n</body></html>\n'
        )

    def write(self, uri: str) -> str:
        """Write the report to a local path or fsspec URI under a temporary name, then switch it into
        place (a reader never sees half a report). Returns `uri`."""
        from prism_ray.results.ledger import write_atomic

        page = self.to_html().encode("utf-8")
        write_atomic(uri, lambda f: f.write(page), "report.write")
        return uri


def _id(id: str | None) -> str:
    return f' id="{html.escape(id)}"' if id else ""
