"""Crash-safe file writes shared by every batch job, and the one writer of result tables.

A file is written next to its destination under a temporary name, flushed to disk and then
renamed over the destination (``os.replace`` is atomic on POSIX within one file system), so a
kill at any moment leaves either the old file or the complete new one, never half of one.
:func:`write_results` writes every command's per-item results (``critic score``, ``eval ...``)
as JSON, JSONL and/or CSV with the same conversions and the same spreadsheet safety.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; the result should be an ordinary file
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def check_safetensors(folder: str | Path, what: str) -> None:
    """Refuse a local model folder with a ``*.safetensors`` file that is truncated or corrupt, naming
    the file, before a loader fails on it with the library's own message (which names neither)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # safetensors raises its own SafetensorError (no public class) or OSError
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{what} {folder}: weights file {path.relative_to(folder)} is truncated or corrupt ({reason}); copy or download it again") from err


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# Text cells that a spreadsheet would evaluate as a formula.
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple)):
        v = json.dumps(v, default=str)
    if isinstance(v, str) and v.startswith(_FORMULA_PREFIXES):
        # Untrusted text such as "=HYPERLINK(...)" would run as a formula in a spreadsheet;
        # a leading apostrophe makes it inert (OWASP CSV-injection advice). Numbers are untouched.
        return "'" + v
    if isinstance(v, np.generic):
        return v.item()
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN/Infinity
    if isinstance(v, Path):
        return str(v)
    return v


def table_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> list[str]:
    """``columns`` if given, else every key of ``rows`` in order of first appearance."""
    if columns is not None:
        return list(columns)
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(map(str, r.keys())))
    return list(cols)


RESULT_FORMATS = ("json", "jsonl", "csv")


def write_results(
    rows: Iterable[Mapping[str, Any]], path_stem: str | Path, columns: Sequence[str] | None = None,
    formats: Sequence[str] = ("json", "csv"),
) -> tuple[Path, ...]:  # fmt: skip
    """Write result records as ``<stem>.json`` (a list of objects), ``<stem>.jsonl`` (one object a
    line) and/or ``<stem>.csv``, each atomically.

    Args:
        rows: records (dicts); numpy scalars/arrays and paths are converted, NaN/inf become
            ``null`` in JSON and empty cells in CSV.
        path_stem: output path without extension (a trailing ``.json``, ``.jsonl`` or ``.csv`` is
            dropped; any other dot stays part of the name).
        columns: CSV column order (JSON keeps every key); default every key in order of first
            appearance. Nested values are JSON-encoded in their CSV cell; text cells starting with
            ``= + - @`` get a leading ``'`` so spreadsheets do not evaluate them.
        formats: any of ``"json"``, ``"jsonl"``, ``"csv"``.

    Returns:
        The paths written, in the order of ``formats``.
    """
    unknown = sorted(set(formats) - set(RESULT_FORMATS))
    if unknown:
        raise ValueError(f"unknown output format(s) {unknown}; known: {', '.join(RESULT_FORMATS)}")
    rows = [_jsonable(dict(r)) for r in rows]
    stem = Path(path_stem)
    if stem.suffix in (".json", ".jsonl", ".csv"):
        stem = stem.with_suffix("")
    paths = []
    for fmt in formats:
        # Appended rather than with_suffix, so a stem such as "run.v2" keeps its dot.
        path = stem.parent / f"{stem.name}.{fmt}"
        if fmt == "json":
            write_json(path, rows)
        elif fmt == "jsonl":
            write_jsonl(path, rows)
        else:
            cols = table_columns(rows, columns)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            for r in rows:
                writer.writerow({c: _csv_cell(r.get(c)) for c in cols})
            write_text(path, buf.getvalue())
        paths.append(path)
    return tuple(paths)


def errors_by_reason(errors: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many error records carry each ``reason`` code, most frequent first (the summary every
    batch command writes next to its ``errors.jsonl``)."""
    return dict(Counter(e.get("reason") or "error" for e in errors).most_common())
