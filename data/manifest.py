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
from typing import Any, Iterator, Literal

from coherendream.data.assets import AssetError, mesh_extensions

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


# Column names accepted for an asset's id and its text, in order of preference: `data build`
# manifests say uid/caption, scoring manifests id/prompt; both are read everywhere.
ID_COLUMNS = ("id", "uid")
PROMPT_COLUMNS = ("prompt", "caption", "text")


def column_value(row: dict, keys: tuple[str, ...]) -> str:
    """The first non-empty value of ``keys`` in ``row`` as a stripped string ('' if none)."""
    for key in keys:
        value = row.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return ""


def manifest_rows(path: str | Path, root: str | Path | None = None, path_pattern: str | None = None) -> Iterator[dict]:
    """The rows of an asset manifest, checked; the one reader behind ``data build``, ``critic
    score`` and ``eval assets``.

    Args:
        path: CSV/TSV with a header, or JSONL. Columns: ``id`` (or ``uid``), ``prompt`` (or
            ``caption``/``text``), ``path``; other columns are kept in ``extra``. With
            ``path_pattern``, a headerless ``uid,caption`` CSV (Cap3D's) is read too, and a row
            without ``path`` gets ``path_pattern.format(uid=...)``.
        root: the folder paths are relative to (default: the manifest's); a path that leads out of
            it (``../``, a symbolic link) is refused, never followed.

    Yields:
        In file order, ``{"id", "prompt", "path", "full", "where", "extra"}`` for a usable row
        (``full``: the resolved path under the root; ``where``: ``"<file>:<line>"``), else ``{"id",
        "prompt", "path", "where", "extra", "reason", "error"}``. Reasons: ``invalid_row`` (bad
        JSON line, no id; ``id`` is then ``"<where>"``), ``duplicate_id`` (a later row with an id
        seen before; also ``"<where>"``), ``empty_prompt``, ``prompt_too_long``, ``missing_path``,
        ``outside_root``.

    Raises:
        FileNotFoundError / ValueError: the manifest or the root is missing, or the manifest
            cannot be read or has no id column (then no row can be trusted).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path}: {'not a file' if path.exists() else 'not found'}")
    root_dir = Path(root) if root is not None else path.parent
    if not root_dir.is_dir():
        raise FileNotFoundError(f"manifest root {root_dir}: not found or not a folder")
    hint = "; a headerless uid,caption file (Cap3D) needs path_pattern, e.g. '{uid}.glb'"
    seen: set[str] = set()
    for line_no, row in read_table(path, ID_COLUMNS, headerless=("uid", "caption") if path_pattern else None, hint=hint):
        where = f"{path.name}:{line_no}"
        uid, prompt = column_value(row, ID_COLUMNS), " ".join(column_value(row, PROMPT_COLUMNS).split())
        rel = column_value(row, ("path",)) or (path_pattern.format(uid=uid) if path_pattern and uid else "")
        extra = {k: v for k, v in row.items() if k not in (*ID_COLUMNS, *PROMPT_COLUMNS, "path", "_error")}
        entry = {"id": uid, "prompt": prompt, "path": rel, "where": where, "extra": extra}
        if "_error" in row or not uid:
            why = row.get("_error") or "row has no id (an id or uid column)"
            yield {**entry, "id": f"<{where}>", "reason": "invalid_row", "error": f"{where}: {why}"}
            continue
        if uid in seen:
            yield {**entry, "id": f"<{where}>", "reason": "duplicate_id", "error": f"{where}: id {uid!r} appears earlier in the manifest; this row is ignored"}
            continue
        seen.add(uid)
        if not prompt:
            yield {**entry, "reason": "empty_prompt", "error": f"{where}: prompt is empty (a prompt or caption column)"}
        elif len(prompt) > MAX_CAPTION_CHARS:
            yield {**entry, "reason": "prompt_too_long", "error": f"{where}: prompt longer than {MAX_CAPTION_CHARS} characters"}
        elif not rel:
            yield {**entry, "reason": "missing_path", "error": f"{where}: no path" + (" (give a path column or --path-pattern)" if path_pattern is None else "")}
        else:
            try:
                yield {**entry, "full": resolve_under_root(root_dir, rel)}
            except AssetError as err:
                yield {**entry, "reason": err.reason, "error": f"{where}: {err}"}
            except (OSError, ValueError) as err:
                yield {**entry, "reason": "unreadable", "error": f"{where}: {rel}: {err}"}


def check_manifest(path: str | Path) -> None:
    """Refuse, before any work, a manifest with no rows or without the columns every row needs
    (id, path, prompt, under any of their accepted names)."""
    rows = [row for _, row in read_table(path, ID_COLUMNS) if "_error" not in row]
    if not rows:
        raise ValueError(f"manifest {path}: no rows (expected columns id, path, prompt)")
    keys = set().union(*rows)
    missing = [name for name, accepted in (("path", ("path",)), ("prompt", PROMPT_COLUMNS)) if not keys & set(accepted)]
    if missing:
        raise ValueError(f"manifest {path}: no {' or '.join(repr(m) for m in missing)} column; its columns are "
                         f"{', '.join(sorted(keys))} (expected id, path, prompt)")  # fmt: skip


def read_manifest(path: str | Path, root: str | Path | None = None, path_pattern: str | None = None) -> tuple[list[AssetRef], list[Rejection]]:
    """Assets of a CSV/JSONL manifest (or a headerless Cap3D ``uid,caption`` CSV with
    ``path_pattern``) for ``data build``; rows that cannot be used become rejections."""
    refs, rejected = [], []
    for row in manifest_rows(path, root, path_pattern):
        if "error" in row:
            rejected.append(Rejection(row["id"], row["path"] or None, "manifest", row["reason"], row["error"]))
        else:
            full = row["full"]
            refs.append(AssetRef(uid=row["id"], kind="views" if full.is_dir() else "mesh", caption=row["prompt"], path=str(full)))
    return refs, rejected


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object as a dict, refusing a key given twice (json would keep the last silently)."""
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise _DuplicateKey(twice)
    return dict(pairs)


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
        raise FileNotFoundError(f"{path}: {'not a file' if path.exists() else 'not found'}")
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
                row = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            except json.JSONDecodeError as err:
                yield i, {"_error": f"not valid JSON ({err.msg})"}
                continue
            except _DuplicateKey as err:
                yield i, {"_error": f"the key {err.args[0]!r} appears more than once"}
                continue
            yield i, row if isinstance(row, dict) else {"_error": "line is not a JSON object"}
        return
    lines = list(csv.reader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
    if not lines:
        return
    header = [h.strip().lower() for h in lines[0]]
    twice = sorted({h for h in header if h and header.count(h) > 1})
    if twice:  # csv would keep the last one silently
        raise ValueError(f"{path}: the header names the column(s) {', '.join(map(repr, twice))} more than once; keep one of each")
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
    refs, rejected, extensions = [], [], set(mesh_extensions())
    for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file()):
        uid = file.relative_to(folder).with_suffix("").as_posix()
        caption_file = file.with_suffix(".txt")
        caption = " ".join(caption_file.read_text(encoding="utf-8", errors="replace").split()) if caption_file.is_file() else ""
        if not caption:
            rejected.append(Rejection(uid, str(file), "manifest", "missing_prompt", f"{file}: no caption (expected text in {caption_file.name})"))
            continue
        try:
            full = resolve_under_root(folder, str(file.relative_to(folder)))
        except AssetError as err:
            rejected.append(Rejection(uid, str(file), "manifest", err.reason, str(err)))
            continue
        refs.append(AssetRef(uid=uid, kind="mesh", caption=caption, path=str(full)))
    return refs, rejected


def render_dir_rows(folder: str | Path, prompts_file: str | Path | None = None) -> Iterator[dict]:
    """The assets of a folder of renders, one per sub-folder ``<uid>/`` of view images; the one
    reader behind ``data build`` and ``critic score`` for such folders.

    Args:
        folder: the folder whose sub-folders are the assets (``id`` = sub-folder name).
        prompts_file: CSV (header with ``uid``/``id`` and ``prompt``/``caption``) or JSONL of the
            same keys. Its prompt wins over ``<uid>/caption.txt``; a uid listed there without a
            sub-folder becomes a ``missing_folder`` row, and a uid with neither a prompt nor a
            ``caption.txt`` a ``missing_prompt`` row.

    Yields:
        ``{"id", "prompt", "path", "full"}`` (``path``: the sub-folder; ``full``: it resolved) in
        sub-folder name order, then the prompts file's uids without a sub-folder; a row that cannot
        be used has ``reason`` and ``error`` instead of ``full``. A symlinked sub-folder that leads
        out of ``folder`` is ``outside_root``, never read.

    Raises:
        FileNotFoundError: ``folder`` or ``prompts_file`` does not exist (the input itself, not
            one row, is wrong).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"render folder {folder}: not found or not a folder")
    prompts: dict[str, str] = {}
    if prompts_file is not None:
        for line_no, row in read_table(prompts_file, ID_COLUMNS):
            where = f"{Path(prompts_file).name}:{line_no}"
            if "_error" in row:
                yield {"id": f"<{where}>", "reason": "invalid_row", "error": f"{where}: {row['_error']}"}
                continue
            uid, prompt = column_value(row, ID_COLUMNS), column_value(row, PROMPT_COLUMNS)
            if not uid:
                yield {"id": f"<{where}>", "reason": "invalid_row", "error": f"{where}: row has no uid/id"}
            elif uid in prompts:
                yield {"id": f"<{where}>", "reason": "duplicate_id", "error": f"{where}: uid {uid!r} appears earlier in {Path(prompts_file).name}; this row is ignored"}
            else:
                prompts[uid] = prompt

    seen: set[str] = set()
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        uid = sub.name
        seen.add(uid)
        row: dict = {"id": uid, "path": str(sub)}
        try:
            real = resolve_under_root(folder, uid)
        except AssetError as err:
            yield {**row, "reason": err.reason, "error": f"{sub}: {err}"}
            continue
        prompt = prompts.get(uid)
        if prompt is None:
            caption_file = real / "caption.txt"
            if not caption_file.is_file():
                where = f" or in {prompts_file}" if prompts_file is not None else ""
                yield {**row, "reason": "missing_prompt", "error": f"{sub}: no prompt (no caption.txt{where})"}
                continue
            try:
                prompt = caption_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                yield {**row, "reason": "unreadable_prompt", "error": f"{caption_file}: cannot be read as UTF-8 text ({err})"}
                continue
        yield {**row, "prompt": " ".join(prompt.split()), "full": real}
    for uid in prompts:
        if uid in seen:
            continue
        row = {"id": uid, "prompt": " ".join(prompts[uid].split()), "path": str(folder / uid)}
        try:
            resolve_under_root(folder, uid)  # a uid like "../x" names no sub-folder of this input
        except AssetError as err:
            yield {**row, "reason": err.reason, "error": f"{prompts_file}: uid {uid!r}: {err}"}
            continue
        yield {**row, "reason": "missing_folder", "error": f"{folder / uid}: listed in {prompts_file} but no such sub-folder"}


def scan_render_dir(folder: str | Path) -> tuple[list[AssetRef], list[Rejection]]:
    """Every sub-folder ``<uid>/`` holding images, captioned by ``<uid>/caption.txt``
    (:func:`render_dir_rows`), for ``data build``."""
    refs, rejected = [], []
    for row in render_dir_rows(folder):
        if "error" in row:
            rejected.append(Rejection(row["id"], row.get("path"), "manifest", row["reason"], row["error"]))
        elif not row["prompt"]:
            rejected.append(Rejection(row["id"], row["path"], "manifest", "empty_prompt", f"{row['path']}: caption.txt is empty"))
        else:
            refs.append(AssetRef(uid=row["id"], kind="views", caption=row["prompt"], path=str(row["full"])))
    return refs, rejected


def evenly_spaced(files: list, num_views: int) -> list:
    """``num_views`` of ``files`` spread evenly from the first (renders are stored in orbit order,
    so this keeps the chosen views spread around the object). Needs ``len(files) >= num_views``."""
    return [files[int(i * len(files) / num_views)] for i in range(num_views)]


def list_view_images(folder: str | Path) -> list[Path]:
    """Image files of a pre-rendered asset, in name order (which is taken as view order)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
