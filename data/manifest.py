"""Where the assets of a build come from: manifests, folders of meshes, folders of renders.

A manifest is CSV (with a header naming ``uid``, ``caption`` and ``path``) or JSONL (one object a
line with those keys). Cap3D's caption file -- a CSV *without* header, ``uid,caption`` -- works
with a ``path_pattern`` such as ``"glbs/{uid}.glb"``. Paths are relative to the manifest's root
(its folder unless given) and must stay under it: ``../`` or a symbolic link that leads out is
rejected, not followed. A path that names a folder is read as pre-rendered views
(``<folder>/*.png``), anything else as a mesh file.

Problems with a single row are returned as :class:`Rejection` records, never raised, so one bad
row does not stop a build; problems with the manifest itself (missing, unreadable) are raised.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from coherendream.data.assets import MESH_EXTENSIONS, AssetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_CAPTION_CHARS = 2000


@dataclass(frozen=True)
class AssetRef:
    """One asset to build rows from. ``kind`` says how to get its views."""

    uid: str
    kind: Literal["mesh", "views", "procedural"]
    caption: str
    path: str | None = None  # mesh file or folder of views (absolute), None for procedural
    seed: int | None = None  # procedural scenes only

    def stable_hash(self, salt: int = 0) -> int:
        """A 64-bit integer fixed by the uid (and salt): seeds per-asset randomness and the split."""
        digest = hashlib.sha256(f"{salt}:{self.uid}".encode()).digest()
        return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class Rejection:
    uid: str
    path: str | None
    stage: str  # manifest | load | render | negatives
    reason: str  # short code, e.g. missing_file, corrupt, outside_root
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_under_root(root: Path, relative: str) -> Path:
    """``root / relative`` with symlinks resolved; raises ``AssetError('outside_root')`` if it escapes."""
    root_real = root.resolve()
    candidate = Path(relative)
    full = (candidate if candidate.is_absolute() else root_real / candidate).resolve()
    if not full.is_relative_to(root_real):
        raise AssetError("outside_root", f"path {relative!r} leads outside the manifest root {root_real}")
    return full


def read_manifest(path: str | Path, root: str | Path | None = None, path_pattern: str | None = None) -> tuple[list[AssetRef], list[Rejection]]:
    """Read a CSV/JSONL manifest (or a headerless Cap3D ``uid,caption`` CSV with ``path_pattern``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path}: not found")
    root_dir = Path(root) if root is not None else path.parent
    if not root_dir.is_dir():
        raise FileNotFoundError(f"manifest root {root_dir}: not a folder")
    hint = "; a headerless uid,caption file (Cap3D) needs path_pattern, e.g. '{uid}.glb'"
    rows = list(read_table(path, key_columns=("uid",), headerless=("uid", "caption") if path_pattern else None, hint=hint))
    refs, rejected, seen = [], [], set()
    for line_no, row in rows:
        uid = str(row.get("uid") or "").strip()
        caption = " ".join(str(row.get("caption") or "").split())
        rel = row.get("path")
        if rel is None and path_pattern is not None and uid:
            rel = path_pattern.format(uid=uid)
        where = f"{path.name}:{line_no}"
        if "_error" in row:
            rejected.append(Rejection(f"<{where}>", None, "manifest", "invalid_row", f"{where}: {row['_error']}"))
            continue
        if not uid:
            rejected.append(Rejection(f"<{where}>", rel, "manifest", "missing_uid", f"{where}: row has no uid"))
            continue
        if uid in seen:
            rejected.append(Rejection(uid, rel, "manifest", "duplicate_uid", f"{where}: uid {uid!r} appears earlier in the manifest"))
            continue
        seen.add(uid)
        if not caption:
            rejected.append(Rejection(uid, rel, "manifest", "empty_caption", f"{where}: caption is empty"))
            continue
        if len(caption) > MAX_CAPTION_CHARS:
            rejected.append(Rejection(uid, rel, "manifest", "caption_too_long", f"{where}: caption longer than {MAX_CAPTION_CHARS} characters"))
            continue
        if not rel:
            rejected.append(Rejection(uid, None, "manifest", "missing_path", f"{where}: no path (give a path column or --path-pattern)"))
            continue
        try:
            full = resolve_under_root(root_dir, str(rel))
        except AssetError as err:
            rejected.append(Rejection(uid, str(rel), "manifest", err.reason, f"{where}: {err}"))
            continue
        kind = "views" if full.is_dir() else "mesh"
        refs.append(AssetRef(uid=uid, kind=kind, caption=caption, path=str(full)))
    return refs, rejected


def read_table(path: str | Path, key_columns: tuple[str, ...] = ("uid", "id"), headerless: tuple[str, str] | None = None, hint: str = ""):
    """Rows of a CSV/TSV file with a header, or of a JSONL file, as ``(line number, dict)``.

    A JSONL line that is not a JSON object yields ``{"_error": why}``: one bad row is that row's
    problem. A CSV whose header names none of ``key_columns`` is read as headerless rows of the two
    ``headerless`` columns (the second takes the rest of the line, commas included: Cap3D's
    ``uid,caption``) or, without ``headerless``, raises ``ValueError`` (ending with ``hint``),
    since then no row can be trusted. Header names are lower-cased.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise ValueError(f"{path}: expected .csv, .tsv or .jsonl, got {suffix or 'no extension'}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot be read as UTF-8 text ({err})") from err
    if suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield i, {"_error": f"not valid JSON ({err.msg})"}
                continue
            yield i, row if isinstance(row, dict) else {"_error": "line is not a JSON object"}
        return
    lines = list(csv.reader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
    if not lines:
        return
    header = [h.strip().lower() for h in lines[0]]
    if any(k in header for k in key_columns):
        for i, values in enumerate(lines[1:], start=2):
            if values:
                yield i, dict(zip(header, values))
        return
    if headerless is None:
        raise ValueError(f"{path}: the header must name an id column ({' or '.join(map(repr, key_columns))}), got {lines[0]}{hint}")
    first, rest = headerless
    for i, values in enumerate(lines, start=1):
        if values:
            yield i, {first: values[0], rest: ",".join(values[1:])}


def scan_mesh_dir(folder: str | Path) -> tuple[list[AssetRef], list[Rejection]]:
    """Every mesh file under ``folder``; its caption is the text of ``<same name>.txt`` beside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"mesh folder {folder}: not found")
    refs, rejected = [], []
    for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in MESH_EXTENSIONS and p.is_file()):
        uid = file.relative_to(folder).with_suffix("").as_posix()
        caption_file = file.with_suffix(".txt")
        caption = " ".join(caption_file.read_text(encoding="utf-8", errors="replace").split()) if caption_file.is_file() else ""
        if not caption:
            rejected.append(Rejection(uid, str(file), "manifest", "missing_caption", f"{file}: no caption (expected text in {caption_file.name})"))
            continue
        try:
            full = resolve_under_root(folder, str(file.relative_to(folder)))
        except AssetError as err:
            rejected.append(Rejection(uid, str(file), "manifest", err.reason, str(err)))
            continue
        refs.append(AssetRef(uid=uid, kind="mesh", caption=caption, path=str(full)))
    return refs, rejected


def scan_render_dir(folder: str | Path) -> tuple[list[AssetRef], list[Rejection]]:
    """Every sub-folder ``<uid>/`` holding images; its caption is ``<uid>/caption.txt``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"render folder {folder}: not found")
    refs, rejected = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        caption_file = sub / "caption.txt"
        caption = " ".join(caption_file.read_text(encoding="utf-8", errors="replace").split()) if caption_file.is_file() else ""
        if not caption:
            rejected.append(Rejection(sub.name, str(sub), "manifest", "missing_caption", f"{sub}: no caption.txt"))
            continue
        refs.append(AssetRef(uid=sub.name, kind="views", caption=caption, path=str(sub.resolve())))
    return refs, rejected


def evenly_spaced(files: list, num_views: int) -> list:
    """``num_views`` of ``files`` spread evenly from the first (renders are stored in orbit order,
    so this keeps the chosen views spread around the object). Needs ``len(files) >= num_views``."""
    return [files[int(i * len(files) / num_views)] for i in range(num_views)]


def list_view_images(folder: str | Path) -> list[Path]:
    """Image files of a pre-rendered asset, in name order (which is taken as view order)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
