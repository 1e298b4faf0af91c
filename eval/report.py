"""Self-contained HTML reports, plots and JSON/CSV result files.

The HTML page is one file that opens offline: no scripts, no external style sheets, fonts or
images -- every image (renders, grids, matplotlib plots) is embedded as a base64 ``data:`` URI.
All text that reaches the page (headings, paragraphs, table cells, captions, alt text) is
HTML-escaped, because captions and prompts are untrusted (LLM or user written).

Plots are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
``pyplot``, so nothing here touches matplotlib's global state or needs a display.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from coherendream.grid import GridLayout, tile
from coherendream.io import read_jsonl, table_columns, write_results, write_text

__all__ = [
    "Report",
    "html_table",
    "image_grid_png",
    "reliability_diagram",
    "score_histogram",
    "to_png_bytes",
    "training_curves",
    "write_results",
]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


# ----------------------------------------------------------------------------- images


def _as_uint8_array(image: Any) -> np.ndarray:
    """``[H, W, C]`` uint8 (C in 1, 3, 4) from a PIL image or a numpy array.

    Float arrays are read as values in ``[0, 1]`` (clipped); ``[H, W]`` becomes ``[H, W, 1]``.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a core dependency
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        arr = np.asarray(image)
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image must be [H, W], [H, W, 1|3|4] or a PIL image; got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        return (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind in "iu":
        return np.clip(arr, 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {arr.dtype}")


def to_png_bytes(image: Any) -> bytes:
    """Encode a PIL image or ``[H, W(, C)]`` array as PNG; PNG bytes pass through unchanged."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data.startswith(_PNG_MAGIC):
            raise ValueError("image bytes are not a PNG (expected the PNG signature)")
        return data
    from PIL import Image

    arr = _as_uint8_array(image)
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(image: Any) -> str:
    if isinstance(image, (bytes, bytearray, memoryview)) and bytes(image[:3]) == _JPEG_MAGIC:
        return "data:image/jpeg;base64," + base64.b64encode(bytes(image)).decode("ascii")
    return "data:image/png;base64," + base64.b64encode(to_png_bytes(image)).decode("ascii")


def image_grid_png(images: Sequence[Any], cols: int, pad: int = 2, background: int = 255) -> bytes:
    """Tile images row-major into one PNG.

    Args:
        images: ``V >= 1`` images (PIL, ``[H, W(, C)]`` arrays or PNG bytes); sizes may differ --
            each is centred in a cell of the largest height and width; mixed channel counts are
            promoted to RGB(A).
        cols: tiles per row, ``>= 1``; the last row is filled with background cells.
        pad: background pixels around every tile.
        background: grey level 0..255 of padding and empty cells (alpha 255 where present).

    Returns:
        PNG bytes of a ``[rows*(H+2*pad), cols*(W+2*pad), C]`` image.
    """
    if len(images) == 0:
        raise ValueError("images is empty")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    from PIL import Image

    arrays = []
    for im in images:
        if isinstance(im, (bytes, bytearray, memoryview)):
            im = Image.open(io.BytesIO(bytes(im)))
        arrays.append(_as_uint8_array(im))
    channels = max(a.shape[2] for a in arrays)
    channels = 3 if channels == 1 and any(a.shape[2] != 1 for a in arrays) else channels
    h = max(a.shape[0] for a in arrays) + 2 * pad
    w = max(a.shape[1] for a in arrays) + 2 * pad
    cols = min(cols, len(arrays))
    rows = math.ceil(len(arrays) / cols)
    cells = np.full((rows * cols, h, w, channels), background, dtype=np.uint8)
    if channels == 4:
        cells[..., 3] = 255
    for i, a in enumerate(arrays):
        if a.shape[2] == 1 and channels > 1:
            a = np.repeat(a, 3, axis=2)
        if a.shape[2] == 3 and channels == 4:
            a = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], axis=2)
        top = (h - a.shape[0]) // 2
        left = (w - a.shape[1]) // 2
        cells[i, top : top + a.shape[0], left : left + a.shape[1]] = a
    grid = tile(cells, GridLayout(rows, cols))  # the project's row-major tiling
    return to_png_bytes(grid)


# ----------------------------------------------------------------------------- plots


def _figure_png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)  # attaches an Agg canvas to this figure only; no global backend switch
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def reliability_diagram(bin_table: Sequence[Mapping[str, Any]], title: str = "Reliability diagram") -> bytes:
    """Reliability diagram of a calibration table, as PNG bytes.

    Args:
        bin_table: the per-bin rows of
            :func:`coherendream.eval.metrics.expected_calibration_error` (``bin_lower``,
            ``bin_upper``, ``count``, ``mean_confidence``, ``accuracy``; empty bins have ``None``).
        title: plot title (plain text).

    Returns:
        PNG bytes: top panel observed frequency per bin (bars) against the diagonal of perfect
        calibration, with each bin's mean confidence marked; bottom panel the bin counts.
    """
    if not bin_table:
        raise ValueError("bin_table is empty")
    fig = Figure(figsize=(5, 5.5))
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lo = np.array([float(r["bin_lower"]) for r in bin_table])
    hi = np.array([float(r["bin_upper"]) for r in bin_table])
    counts = np.array([int(r["count"]) for r in bin_table])
    full = counts > 0

    def column(key: str) -> np.ndarray:  # None (empty bin) -> NaN
        return np.array([np.nan if r.get(key) is None else float(r[key]) for r in bin_table])

    acc, conf = column("accuracy"), column("mean_confidence")
    widths = np.maximum(hi - lo, 1e-3)
    ax.bar(lo[full], acc[full], width=widths[full], align="edge", color="#4c72b0", edgecolor="black", label="observed")
    ax.plot(conf[full], acc[full], "o", color="#dd8452", label="mean confidence")
    x0, x1 = float(lo.min()), float(hi.max())
    ax.plot([x0, x1], [x0, x1], "--", color="gray", label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(lo, counts, width=widths, align="edge", color="#55a868", edgecolor="black")
    ax_n.set_xlabel("confidence")
    ax_n.set_ylabel("count")
    ax_n.set_xlim(x0, x1)
    return _figure_png(fig)


def score_histogram(
    scores_by_group: Mapping[str, Sequence[float]],
    bins: int = 20,
    value_range: tuple[float, float] | None = None,
    density: bool = True,
    title: str = "Score distribution",
    xlabel: str = "P(yes)",
) -> bytes:
    """Overlaid step histograms of scores per group (e.g. positives vs each negative type).

    Args:
        scores_by_group: ``{group name: [N_g] scores}``; NaNs are dropped; empty groups skipped.
        bins: number of bins shared by every group.
        value_range: ``(low, high)``; default the min/max over all groups.
        density: normalise each group to unit area, so groups of different sizes compare.

    Returns:
        PNG bytes.
    """
    groups = {str(k): np.asarray(v, dtype=float).ravel() for k, v in scores_by_group.items()}
    groups = {k: v[~np.isnan(v)] for k, v in groups.items()}
    groups = {k: v for k, v in groups.items() if v.size}
    if not groups:
        raise ValueError("scores_by_group holds no scores")
    if value_range is None:
        allv = np.concatenate(list(groups.values()))
        lo, hi = float(allv.min()), float(allv.max())
        value_range = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, v in groups.items():
        ax.hist(v, bins=edges, histtype="step", linewidth=1.5, density=density, label=f"{name} (n={v.size})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density else "count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _figure_png(fig)


def _load_log_records(log_records: Any) -> list[Mapping[str, Any]]:
    if isinstance(log_records, (str, Path)):
        path = Path(log_records)
        if path.suffix == ".json":  # e.g. a Trainer's trainer_state.json
            log_records = json.loads(path.read_text(encoding="utf-8"))
        else:
            return read_jsonl(path)
    if isinstance(log_records, Mapping):
        if "log_history" not in log_records:
            raise ValueError("log_records mapping has no 'log_history' (expected a trainer_state.json)")
        log_records = log_records["log_history"]
    return list(log_records)


def training_curves(
    log_records: Any,
    keys: Sequence[str],
    x_key: str | None = None,
    title: str = "Training curves",
    log_y: bool = False,
) -> bytes:
    """Curves of logged metrics against step, as PNG bytes.

    Args:
        log_records: a list of dicts (a metrics JSONL read into memory, or a Trainer's
            ``state.log_history``), a ``{"log_history": [...]}`` dict, or a path to a ``.jsonl``
            file or to a ``trainer_state.json``. Records need not all hold every key (Trainer logs
            ``loss`` and ``eval_loss`` in different records): each curve uses the records that
            hold a finite numeric value for its key.
        keys: metric names to plot, one line each (``>= 1``).
        x_key: the x axis; default ``"step"`` if any record has it, else ``"epoch"``, else the
            record index.
        log_y: logarithmic y axis (losses).

    Returns:
        PNG bytes.

    Raises:
        ValueError: no keys, or none of ``keys`` appears in any record.
    """
    records = _load_log_records(log_records)
    if not keys:
        raise ValueError("keys is empty")
    if x_key is None:
        x_key = next((k for k in ("step", "global_step", "epoch") if any(k in r for r in records)), None)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    plotted = 0
    for key in keys:
        xs, ys = [], []
        for i, r in enumerate(records):
            v = r.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            x = i if x_key is None else r.get(x_key)
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                xs.append(x)
                ys.append(v)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
            plotted += 1
    if not plotted:
        raise ValueError(f"none of keys {list(keys)} has a numeric value in the log records")
    ax.set_xlabel(x_key or "record")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _figure_png(fig)


# ----------------------------------------------------------------------------- tables


def _format_cell(v: Any, float_fmt: str) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return "NaN" if math.isnan(v) else float_fmt.format(float(v))
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def html_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, float_fmt: str = "{:.4g}"
) -> str:
    """An escaped HTML ``<table>`` from a list of dicts.

    Args:
        rows: records; a missing key is an empty cell.
        columns: column order; default every key in order of first appearance.
        float_fmt: ``str.format`` pattern for floats; ``None`` prints empty, NaN prints ``NaN``,
            lists/dicts print as JSON.
    """
    cols = table_columns(rows, columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cls = ' class="num"' if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(_format_cell(v, float_fmt))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


# ----------------------------------------------------------------------------- report


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1, h2, h3 { font-weight: 600; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
td { max-width: 32em; overflow-wrap: anywhere; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; height: auto; image-rendering: auto; }
figcaption { font-size: 0.85em; color: #444; max-width: 40em; white-space: pre-wrap; word-break: break-word; }
.grid { display: grid; gap: 0.5em; }
.grid figure { margin: 0; }
p.text { white-space: pre-wrap; }
"""


class Report:
    """Builder of a single-file HTML report.

    Every ``add_*`` call appends one block in order and returns ``self`` (so calls chain). All
    text arguments are plain text and are escaped; there is deliberately no raw-HTML method.

    Example::

        rep = Report("Critic evaluation")
        rep.add_heading("Overall").add_table(rows, ["metric", "value"])
        rep.add_image(reliability_diagram(bins), caption="calibration")
        rep.write("out/report.html")
    """

    def __init__(self, title: str = "CoherenDream report") -> None:
        self.title = str(title)
        self._blocks: list[str] = []

    def add_heading(self, text: str, level: int = 2) -> Report:
        """A heading ``<h1>``..``<h6>``."""
        if not 1 <= int(level) <= 6:
            raise ValueError(f"level must be 1..6, got {level}")
        self._blocks.append(f"<h{int(level)}>{html.escape(str(text))}</h{int(level)}>")
        return self

    def add_text(self, text: str) -> Report:
        """A paragraph; blank lines separate paragraphs, line breaks are kept."""
        for para in str(text).split("\n\n"):
            if para.strip():
                self._blocks.append(f'<p class="text">{html.escape(para)}</p>')
        return self

    def add_table(
        self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, float_fmt: str = "{:.4g}"
    ) -> Report:
        """A table from a list of dicts, see :func:`html_table`."""
        self._blocks.append(html_table(rows, columns, float_fmt))
        return self

    @staticmethod
    def _figure(image: Any, caption: str | None, width: int | None) -> str:
        alt = html.escape(str(caption) if caption else "image", quote=True)
        style = f' style="width:{int(width)}px"' if width else ""
        img = f'<img src="{_data_uri(image)}" alt="{alt}"{style}>'
        cap = f"<figcaption>{html.escape(str(caption))}</figcaption>" if caption else ""
        return f"<figure>{img}{cap}</figure>"

    def add_image(self, image: Any, caption: str | None = None, width: int | None = None) -> Report:
        """One embedded image.

        Args:
            image: PNG (or JPEG) bytes, a PIL image or a ``[H, W(, C)]`` array (uint8, or float in
                ``[0, 1]``).
            caption: plain-text caption (escaped; also the alt text).
            width: display width in CSS pixels (default: natural size, capped to the page).
        """
        self._blocks.append(self._figure(image, caption, width))
        return self

    def add_images(
        self,
        images: Sequence[Any],
        captions: Sequence[str | None] | None = None,
        cols: int = 4,
        width: int | None = None,
    ) -> Report:
        """Several images in a grid of ``cols`` columns, each with its own caption."""
        if captions is not None and len(captions) != len(images):
            raise ValueError(f"length mismatch: images has {len(images)}, captions has {len(captions)}")
        if cols < 1:
            raise ValueError(f"cols must be >= 1, got {cols}")
        caps = list(captions) if captions is not None else [None] * len(images)
        figs = "".join(self._figure(im, c, width) for im, c in zip(images, caps))
        self._blocks.append(f'<div class="grid" style="grid-template-columns: repeat({int(cols)}, 1fr)">{figs}</div>')
        return self

    def render(self) -> str:
        """The complete HTML document as a string."""
        title = html.escape(self.title)
        body = "\n".join(self._blocks)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{title}</h1>\n{body}\n</body>\n</html>\n"
        )

    def write(self, path: str | Path) -> Path:
        """Write the page atomically (temp file + rename); returns the path.

        A page written into a command's output folder ends with what produced it: the command,
        its settings, the toolkit's version and the date (``coherendream_run.json``)."""
        from coherendream.output_folder import read_record

        path = Path(path)
        record = read_record(path.parent)
        if record is None:
            write_text(path, self.render())
            return path
        page = Report(self.title)
        page._blocks = [*self._blocks]
        page.add_heading("What produced this report")
        page.add_text(f"coherendream {record['command']}, toolkit {record.get('toolkit_version', '?')}, "
                      f"started {record.get('created', '?')}, last run {record.get('updated', '?')} (UTC). Its settings:")  # fmt: skip
        page.add_table([{"setting": k, "value": v} for k, v in _flatten(record.get("settings", {}))], ["setting", "value"])
        write_text(path, page.render())
        return path


def _flatten(settings: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, value)`` pairs of a nested settings dict, values as compact JSON."""
    if isinstance(settings, dict) and settings:
        return [pair for k, v in settings.items() for pair in _flatten(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), settings if isinstance(settings, str) else json.dumps(settings))]


# ----------------------------------------------------------------------------- result files

