"""HTML report (self-contained, escaped), plots, image grids and JSON/CSV result files."""

from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coherendream.eval.metrics import expected_calibration_error
from coherendream.eval.report import (
    Report,
    html_table,
    image_grid_png,
    reliability_diagram,
    score_histogram,
    to_png_bytes,
    training_curves,
)
from coherendream.io import write_json, write_jsonl, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script>"


class _Collector(HTMLParser):
    """Records start tags with attributes and the text inside each open tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.text: list[tuple[str, str]] = []  # (innermost tag, text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        if data.strip():
            self.text.append((self.stack[-1] if self.stack else "", data))


def _parse(text: str) -> _Collector:
    p = _Collector()
    p.feed(text)
    p.close()
    return p


def _open_png(data: bytes) -> Image.Image:
    assert data.startswith(PNG_MAGIC)
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _bins():
    rng = np.random.default_rng(0)
    p = rng.random(400)
    y = (rng.random(400) < p).astype(int)
    return expected_calibration_error(y, p, n_bins=10)[1]


# ----------------------------------------------------------------------------- plots and grids


def test_plots_are_pngs():
    png = reliability_diagram(_bins())
    im = _open_png(png)
    assert im.width > 100 and im.height > 100
    # Empty bins (None values) must not break the plot.
    _open_png(reliability_diagram(expected_calibration_error([1, 0], [1.0, 0.0], n_bins=5)[1]))
    hist = score_histogram({"positive": [0.9, 0.8, 0.7], "color": np.array([0.1, 0.4, np.nan]), "empty": []})
    _open_png(hist)
    with pytest.raises(ValueError, match="bin_table is empty"):
        reliability_diagram([])
    with pytest.raises(ValueError, match="no scores"):
        score_histogram({"a": []})


def test_training_curves_sources(tmp_path):
    # Trainer log_history: train loss and eval loss arrive in different records.
    history = [
        {"loss": 2.0, "step": 10, "epoch": 0.1},
        {"loss": 1.5, "step": 20, "epoch": 0.2},
        {"eval_loss": 1.7, "step": 20, "epoch": 0.2},
        {"loss": 1.0, "step": 30, "epoch": 0.3},
        {"train_runtime": 12.0, "step": 30},
    ]
    a = training_curves(history, ["loss", "eval_loss"])
    _open_png(a)
    write_jsonl(tmp_path / "metrics.jsonl", history)
    _open_png(training_curves(tmp_path / "metrics.jsonl", ["loss"], log_y=True))
    write_json(tmp_path / "trainer_state.json", {"log_history": history, "global_step": 30})
    _open_png(training_curves(tmp_path / "trainer_state.json", ["eval_loss"]))
    with pytest.raises(ValueError, match="none of keys"):
        training_curves(history, ["accuracy"])
    with pytest.raises(ValueError, match="keys is empty"):
        training_curves(history, [])


def test_image_grid_layout():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [np.full((8, 8, 3), c, np.uint8) for c in colours]
    png = image_grid_png(images, cols=3, pad=1, background=0)
    arr = np.asarray(_open_png(png))
    assert arr.shape == (2 * 10, 3 * 10, 3)
    # Row-major: tile i at row i // 3, column i % 3; centre pixel of each tile has its colour.
    for i, c in enumerate(colours):
        r, col = divmod(i, 3)
        assert tuple(arr[r * 10 + 5, col * 10 + 5]) == c
    assert tuple(arr[15, 25]) == (0, 0, 0)  # the empty sixth cell is background
    assert tuple(arr[0, 0]) == (0, 0, 0)  # padding

    # Mixed sizes, grey, float and PIL inputs: everything is centred in the largest cell.
    mixed = [
        np.zeros((4, 6), np.uint8),
        np.ones((10, 10, 3), np.float32),
        Image.new("RGBA", (5, 5), (10, 20, 30, 255)),
        to_png_bytes(np.full((3, 3, 3), 7, np.uint8)),
    ]
    arr = np.asarray(_open_png(image_grid_png(mixed, cols=2, pad=0, background=255)))
    assert arr.shape == (20, 20, 4)
    assert tuple(arr[5, 15]) == (255, 255, 255, 255)  # float ones -> white
    assert tuple(arr[15, 5]) == (10, 20, 30, 255)
    assert tuple(arr[5, 5]) == (0, 0, 0, 255)  # grey zeros promoted to RGBA
    with pytest.raises(ValueError, match="images is empty"):
        image_grid_png([], cols=2)


def test_to_png_bytes_rejects_non_png():
    with pytest.raises(ValueError, match="not a PNG"):
        to_png_bytes(b"GIF89a....")
    with pytest.raises(ValueError, match="image must be"):
        to_png_bytes(np.zeros((4, 4, 2)))


# ----------------------------------------------------------------------------- HTML report


def test_html_table_escapes_and_formats():
    rows = [{"name": "<b>x</b>", "value": 0.123456, "n": 3}, {"name": "y", "extra": {"k": [1]}, "value": None}]
    out = html_table(rows)
    parsed = _parse(out)
    assert [a for t, a in parsed.tags if t == "b"] == []  # no tag injected
    assert ("td", "<b>x</b>") in parsed.text
    assert ("td", "0.1235") in parsed.text
    assert ("td", '{"k": [1]}') in parsed.text
    assert [d for t, d in parsed.text if t == "th"] == ["name", "value", "n", "extra"]
    out = html_table(rows, columns=["value"])
    assert "name" not in out and out.count("<tr>") == 3


def test_report_is_self_contained_and_escaped(tmp_path):
    rng = np.random.default_rng(0)
    render = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    rep = Report(title="Critic <eval> & friends")
    rep.add_heading("Overall <i>metrics</i>").add_text("Prompt was:\n" + EVIL + "\n\nsecond paragraph")
    rep.add_table([{"metric": "accuracy", "value": 0.75}, {"metric": EVIL, "value": 1}], ["metric", "value"])
    rep.add_image(reliability_diagram(_bins()), caption=EVIL)
    rep.add_images(
        [render, Image.fromarray(render), image_grid_png([render] * 4, cols=2)],
        captions=["a <b>red</b> cube", None, 'quote " and \' and &'],
        cols=3,
    )
    rep.add_image(training_curves([{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}], ["loss"]))
    out = rep.write(tmp_path / "sub" / "report.html")

    assert out == tmp_path / "sub" / "report.html" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary file left
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parsed = _parse(text)
    tags = [t for t, _ in parsed.tags]

    # Untrusted text never becomes markup, and reads back verbatim once parsed.
    assert "script" not in tags and "i" not in tags and "b" not in tags
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert ("figcaption", EVIL) in parsed.text
    assert ("td", EVIL) in parsed.text
    assert ("h2", "Overall <i>metrics</i>") in parsed.text
    assert ("title", "Critic <eval> & friends") in parsed.text
    assert any(t == "p" and EVIL in d for t, d in parsed.text)
    assert sum(t == "p" for t, _ in parsed.text) == 2
    alts = [a["alt"] for t, a in parsed.tags if t == "img"]
    assert EVIL in alts and 'quote " and \' and &' in alts

    # Every image is embedded as a PNG data URI that decodes.
    srcs = [a["src"] for t, a in parsed.tags if t == "img"]
    assert len(srcs) == 5
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        _open_png(base64.b64decode(src.split(",", 1)[1], validate=True))
    assert np.array_equal(np.asarray(_open_png(base64.b64decode(srcs[1].split(",", 1)[1]))), render)

    # Nothing is fetched from outside: no external src/href, no URL anywhere in the page.
    for _, attrs in parsed.tags:
        for key in ("src", "href"):
            if attrs.get(key) is not None:
                assert attrs[key].startswith("data:"), attrs[key]
    assert "http://" not in text and "https://" not in text and "<link" not in text


def test_report_argument_errors():
    with pytest.raises(ValueError, match="level"):
        Report().add_heading("x", level=7)
    with pytest.raises(ValueError, match="length mismatch"):
        Report().add_images([np.zeros((2, 2), np.uint8)], captions=["a", "b"])


# ----------------------------------------------------------------------------- result files


def test_write_results_json_and_csv(tmp_path):
    rows = [
        {"method": "ours", "elo": np.float64(1123.5), "n": np.int64(40), "ci": [1100.0, 1150.0]},
        {"method": "=HYPERLINK(\"x\")", "elo": float("nan"), "note": "-3 is fine as a number", "delta": -3},
    ]
    jp, cp = write_results(rows, tmp_path / "out" / "elo.v2")
    assert (jp.name, cp.name) == ("elo.v2.json", "elo.v2.csv")
    assert sorted(p.name for p in jp.parent.iterdir()) == ["elo.v2.csv", "elo.v2.json"]

    data = json.loads(jp.read_text())  # strict JSON: NaN became null
    assert data[0] == {"method": "ours", "elo": 1123.5, "n": 40, "ci": [1100.0, 1150.0]}
    assert data[1]["elo"] is None and data[1]["method"] == "=HYPERLINK(\"x\")"

    with open(cp, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["method", "elo", "n", "ci", "note", "delta"]
        back = list(reader)
    assert back[0]["elo"] == "1123.5" and back[0]["ci"] == "[1100.0, 1150.0]" and back[0]["note"] == ""
    assert back[1]["method"] == "'=HYPERLINK(\"x\")"  # formula made inert
    assert back[1]["note"] == "'-3 is fine as a number" and back[1]["delta"] == "-3"  # numbers untouched
    assert back[1]["elo"] == ""

    jp2, cp2 = write_results(rows[:1], tmp_path / "plain.json", columns=["method"])
    assert jp2.name == "plain.json" and cp2.read_text().splitlines() == ["method", "ours"]
    assert isinstance(jp2, Path)

    (lines,) = write_results(rows, tmp_path / "lines", formats=("jsonl",))  # one object a line, same conversions
    assert [json.loads(x) for x in lines.read_text().splitlines()] == data
    with pytest.raises(ValueError, match="unknown output format"):
        write_results(rows, tmp_path / "x", formats=("parquet",))
