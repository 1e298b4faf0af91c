"""Batch scoring of many (views, prompt) items with a :class:`~coherendream.critic.Critic`.

``coherendream critic score`` is built from three parts, each usable alone:

1. **Readers** turn an input into a stream of *items*, plain dicts::

       {"id": str, "views": <views>, "prompt": str, ...extra fields}

   ``views`` is a list of V images (paths, PIL images, ``{"bytes", "path"}`` dicts as stored by
   ``datasets``, or raw bytes) or a folder of view images (then V evenly spaced images are taken
   in name order, V being the critic's ``num_views``). Extra fields (``label``,
   ``negative_type``, ``path``, ...) are copied to the result untouched. A reader that already
   knows an item is bad (a path leaving the manifest root, a row without a prompt) yields it with
   ``"error"`` (and a short ``"reason"`` code) instead of failing the whole input:

   * :func:`items_from_render_dir` -- ``<folder>/<uid>/`` sub-folders of renders, prompt from
     ``<uid>/caption.txt`` or a prompts CSV/JSONL (``uid, prompt``);
   * :func:`items_from_dataset` -- a split written by ``coherendream data build`` (its ``views``
     and ``caption``; ``label``, ``negative_type``, ``pair_id``, ``asset_id`` are kept);
   * :func:`items_from_manifest` -- a CSV/JSONL manifest ``id, path, prompt`` whose paths are
     folders of views under the manifest's root;
   * :func:`items_from_input` -- any of these, the kind detected from the path.

2. :func:`score_items` validates and loads each item **before** it joins a batch (so one corrupt
   PNG or empty prompt never spoils the batch it would have been in), then scores each batch with
   one forward pass of :meth:`Critic.score` under ``torch.no_grad()``. The result list is in input
   order; a bad item becomes ``{"id", "reason", "error", ...extra}``, where ``error`` names the
   file or field and says why.

3. Writers: :func:`write_score_files` / :func:`score_to_files` write, atomically,

   * ``scores.csv`` and ``scores.jsonl`` -- one row per *scored* item: ``id, prompt, prob_yes,
     margin`` then the extra fields (in the CSV, list/dict values are JSON-encoded);
   * ``errors.jsonl`` -- one object per item that could not be scored (``id, reason, error`` and
     its extra fields); always written, empty when nothing failed, so "no errors" and "not run"
     look different;
   * ``summary.json`` -- counts, errors by reason, timing.

   Errors go to their own file rather than an ``error`` column so the score files hold only
   valid numbers and load straight into pandas / evaluation without filtering.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import torch

from coherendream.data.manifest import (
    MAX_CAPTION_CHARS,
    evenly_spaced,
    list_view_images,
    manifest_rows,
    render_dir_rows,
)
from coherendream.io import errors_by_reason, write_json, write_results

logger = logging.getLogger(__name__)

SCORES_CSV = "scores.csv"
SCORES_JSONL = "scores.jsonl"
ERRORS_JSONL = "errors.jsonl"
SUMMARY_JSON = "summary.json"

# Keys with a fixed meaning in items and results; anything else in an item is an extra field.
_ITEM_KEYS = ("id", "views", "prompt", "error", "reason")
_RESULT_KEYS = ("id", "prompt", "prob_yes", "margin", "error", "reason")
# Columns of a built dataset that results keep, so evaluation can group by them.
DATASET_EXTRA_COLUMNS = ("label", "negative_type", "pair_id", "asset_id", "split")


class ItemError(Exception):
    """An item that cannot be scored. ``reason`` is a short code, ``str(err)`` says why in words."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# =========================================================================== readers


def select_views(folder: str | Path, num_views: int) -> list[Path]:
    """``num_views`` image files of a render folder, in name order.

    When the folder holds more images, evenly spaced ones are taken (renders are usually stored
    in orbit order, so this keeps the views spread around the object; the same rule as
    ``data build``). Fewer images than ``num_views`` is an error.

    Raises:
        ItemError: ``missing_folder``, ``not_a_folder`` or ``too_few_views``.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ItemError("missing_folder", f"{folder}: folder of views not found")
    if not folder.is_dir():
        from coherendream.data.assets import mesh_extensions

        if folder.suffix.lower() in mesh_extensions():  # a 3D asset: it needs rendering first
            raise ItemError("not_a_folder", f"{folder}: a 3D file, not a folder of view images; `coherendream eval assets` renders and scores 3D files")
        raise ItemError("not_a_folder", f"{folder}: not a folder of view images")
    files = list_view_images(folder)
    if len(files) < num_views:
        raise ItemError(
            "too_few_views", f"{folder}: {len(files)} image(s), {num_views} views needed (image files: .png/.jpg/.jpeg/.webp)"
        )
    return evenly_spaced(files, num_views)


def items_from_render_dir(
    folder: str | Path, num_views: int | None = None, prompts_file: str | Path | None = None
) -> Iterator[dict]:
    """Items of a folder of renders: one per sub-folder ``<uid>/`` holding view images.

    Args:
        folder: the folder whose sub-folders are the assets (``id`` = sub-folder name).
        num_views: views per item; ``None`` leaves the folder in ``views`` and lets
            :func:`score_items` pick the critic's ``num_views`` (the usual choice).
        prompts_file: CSV (header with ``uid``/``id`` and ``prompt``/``caption``) or JSONL of the
            same keys. Its prompt wins over ``<uid>/caption.txt``; a uid listed there without a
            sub-folder becomes a ``missing_folder`` error, and a uid with neither a prompt nor a
            ``caption.txt`` a ``missing_prompt`` error.

    Yields:
        ``{"id", "views", "prompt", "path"}`` (``path``: the sub-folder), sub-folders in name
        order, then prompts-file uids without a sub-folder.

    Raises:
        FileNotFoundError: ``folder`` or ``prompts_file`` does not exist (the input itself, not
            one item, is wrong).
    """
    return _items_of_rows(render_dir_rows(folder, prompts_file), num_views)


def items_from_manifest(path: str | Path, root: str | Path | None = None, num_views: int | None = None) -> Iterator[dict]:
    """Items of a CSV/JSONL manifest with ``id``, ``path`` and ``prompt`` per row.

    ``uid`` and ``caption`` are accepted for ``id`` and ``prompt`` (the names of ``data build``
    manifests). ``path`` is a folder of view images relative to ``root`` (default: the manifest's
    folder) and must stay under it: ``../`` or a symlink leading out is reported as an
    ``outside_root`` error, never read. Other columns are kept as extra fields.

    Yields:
        ``{"id", "views", "prompt", "path", ...other columns}`` in file order; rows that cannot
        become items (no id, no path, duplicate id, bad JSON line) as error items.

    Raises:
        FileNotFoundError / ValueError: the manifest itself is missing, unreadable or has no
            header naming an id column.
    """
    return _items_of_rows(manifest_rows(path, root), num_views)


def _items_of_rows(rows: Iterable[dict], num_views: int | None) -> Iterator[dict]:
    """Critic items of checked asset rows (``coherendream.data.manifest``'s readers): the row's
    folder as ``views`` (or ``num_views`` of its images), extra columns kept, or the row's error."""
    for row in rows:
        extra = {k: v for k, v in row.get("extra", {}).items() if k not in (*_RESULT_KEYS, "views")}
        item = {**{k: row[k] for k in ("id", "prompt", "path") if k in row}, **extra}
        if "error" in row:
            yield {**item, "reason": row["reason"], "error": row["error"]}
            continue
        item["views"] = row["full"]
        if num_views is not None:
            try:
                item["views"] = select_views(row["full"], num_views)
            except ItemError as err:
                where = f"{row['where']}: " if "where" in row else ""
                yield {**item, "reason": err.reason, "error": f"{where}{err}"}
                continue
        yield item


def items_from_dataset(dataset_dir: str | Path, split: str = "test") -> Iterator[dict]:
    """Items of one split of a dataset written by ``coherendream data build``.

    Uses each row's ``views`` (the V separate views, not the model-ready ``images``) and
    ``caption``; ``id`` is the row id (``<pair_id>/pos`` or ``/neg``). ``label`` (1 = the caption
    matches), ``negative_type``, ``pair_id``, ``asset_id`` and ``split`` are kept as extra fields so
    that evaluation can compute accuracy per negative type from the results alone.

    Images are not decoded here: ``views`` holds the stored PNG bytes, decoded per item by
    :func:`score_items`, so a corrupt image is one item's error instead of an exception out of the
    dataset iterator.

    Raises:
        FileNotFoundError: no built dataset in ``dataset_dir``.
        ValueError: no such split, or the split lacks a ``views``/``caption`` column.
    """
    from datasets import Image as ImageFeature
    from datasets import List as ListFeature

    from coherendream.data.build import load_built_dataset

    dataset_dir = Path(dataset_dir)
    splits = load_built_dataset(dataset_dir)
    if split not in splits:
        raise ValueError(f"dataset {dataset_dir}: no split {split!r} (splits: {sorted(splits)})")
    ds = splits[split]
    missing = [c for c in ("id", "views", "caption") if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset {dataset_dir} split {split!r}: missing column(s) {missing}; is it a `data build` output?")
    keep = ["id", "views", "caption", *[c for c in DATASET_EXTRA_COLUMNS if c in ds.column_names]]
    # Dropping the other image columns (the grid, depth, normals) avoids decoding them at all.
    ds = ds.select_columns(keep).cast_column("views", ListFeature(ImageFeature(decode=False)))
    return _dataset_items(ds, split)  # the checks above run now, the rows are read as they are scored


def _dataset_items(ds: Any, split: str) -> Iterator[dict]:
    for row in ds:
        item = {"id": str(row["id"]), "views": row["views"], "prompt": row["caption"] or ""}
        item.update({c: row[c] for c in DATASET_EXTRA_COLUMNS if c in row})
        item.setdefault("split", split)
        yield item


def detect_input_kind(path: str | Path) -> str:
    """``"dataset"``, ``"manifest"`` or ``"render_dir"`` for an input path (for ``--input``).

    A folder holding ``data/*.parquet`` is a built dataset, another folder a render folder, a
    ``.csv``/``.tsv``/``.jsonl`` file a manifest.

    Raises:
        FileNotFoundError / ValueError: the path does not exist or is none of these.
    """
    path = Path(path)
    if path.is_dir():
        return "dataset" if any((path / "data").glob("*.parquet")) else "render_dir"
    if path.is_file():
        if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".ndjson"):
            return "manifest"
        raise ValueError(f"input {path}: expected a folder of renders, a built dataset folder or a .csv/.jsonl manifest")
    raise FileNotFoundError(f"input {path}: not found")


def items_from_input(
    path: str | Path,
    kind: str | None = None,
    *,
    split: str = "test",
    prompts_file: str | Path | None = None,
    root: str | Path | None = None,
    num_views: int | None = None,
) -> Iterator[dict]:
    """Items of any supported input; ``kind`` (default: :func:`detect_input_kind`) picks the reader.

    ``split`` applies to datasets, ``prompts_file`` to render folders, ``root`` to manifests;
    an option given for another kind of input is an error rather than silently ignored.
    """
    kind = kind or detect_input_kind(path)
    given = {"prompts_file": prompts_file is not None and kind != "render_dir", "root": root is not None and kind != "manifest"}
    wrong = [name for name, bad in given.items() if bad]
    if wrong:
        raise ValueError(f"input {path} ({kind}): option(s) {wrong} do not apply to this kind of input")
    if kind == "dataset":
        return items_from_dataset(path, split)
    if kind == "manifest":
        from coherendream.data.manifest import check_manifest

        check_manifest(path)  # a manifest no row of which can be used is refused before the critic loads
        return items_from_manifest(path, root=root, num_views=num_views)
    if kind == "render_dir":
        return items_from_render_dir(path, num_views=num_views, prompts_file=prompts_file)
    raise ValueError(f"unknown input kind {kind!r}; known: dataset, manifest, render_dir")


# =========================================================================== loading


def load_item(item: Mapping, num_views: int) -> tuple[str, list, str]:
    """Validate one item and decode its views: ``(id, [V RGB PIL images], prompt)``.

    Everything that could make :meth:`Critic.score` fail on this item is checked here, so that a
    batch holds only items that score.

    Raises:
        ItemError: with a reason code and a message naming the file or field.
    """
    item_id = item.get("id")
    if item_id is None or not str(item_id).strip():
        raise ItemError("invalid_item", "item has no id")
    item_id = str(item_id)
    if item.get("error"):
        raise ItemError(str(item.get("reason") or "invalid_item"), str(item["error"]))

    prompt = item.get("prompt")
    if not isinstance(prompt, str):
        raise ItemError("missing_prompt" if prompt is None else "invalid_prompt",
                        f"{item_id}: prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ItemError("empty_prompt", f"{item_id}: prompt is empty" + _where(item))
    if len(prompt) > MAX_CAPTION_CHARS:
        raise ItemError("prompt_too_long", f"{item_id}: prompt is {len(prompt)} characters, more than {MAX_CAPTION_CHARS}")

    views = item.get("views")
    if views is None:
        raise ItemError("missing_views", f"{item_id}: no views" + _where(item))
    if isinstance(views, (str, Path)):
        views = select_views(views, num_views)
    elif not isinstance(views, Sequence) or isinstance(views, (bytes, bytearray)):
        raise ItemError("invalid_item", f"{item_id}: views must be a folder or a list of images, got {type(views).__name__}")
    if len(views) != num_views:
        raise ItemError("wrong_view_count", f"{item_id}: {len(views)} view(s), the critic takes {num_views}" + _where(item))

    images = [_open_image(view, f"{item_id}: view {v}") for v, view in enumerate(views)]
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ItemError("view_size_mismatch", f"{item_id}: the views differ in size {sorted(sizes)}; all V views of an item must match" + _where(item))
    return item_id, images, prompt


def _where(item: Mapping) -> str:
    return f" ({item['path']})" if item.get("path") else ""


def _open_image(view: Any, label: str):
    """One view as a decoded RGB PIL image (alpha dropped, as :meth:`Critic.score` does with files)."""
    from PIL import Image

    if isinstance(view, Image.Image):
        try:  # a lazily opened image decodes here; a truncated one fails here
            return view.convert("RGB")
        except Exception as err:
            raise ItemError("unreadable_image", f"{label}: PIL image cannot be decoded ({type(err).__name__}: {err})") from err
    if isinstance(view, Mapping):  # datasets' undecoded Image: {"bytes": ..., "path": ...}
        data, path = view.get("bytes"), view.get("path")
        source, name = (io.BytesIO(data), "stored image bytes") if data else (path, str(path))
    elif isinstance(view, (bytes, bytearray)):
        source, name = io.BytesIO(view), "image bytes"
    elif isinstance(view, (str, Path)):
        source, name = view, str(view)
    else:
        raise ItemError("invalid_item", f"{label}: expected an image path, PIL image or bytes, got {type(view).__name__}")
    if source is None:
        raise ItemError("unreadable_image", f"{label}: neither bytes nor a path")
    try:
        with Image.open(source) as im:
            im.load()  # decode now: a truncated file fails here, not in the middle of a batch
            return im.convert("RGB")
    except FileNotFoundError as err:
        raise ItemError("missing_image", f"{label}: {name}: file not found") from err
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise ItemError("unreadable_image", f"{label}: {name}: cannot be read as an image ({type(err).__name__}: {err})") from err


# =========================================================================== scoring


def score_items(
    critic: Any,
    items: Iterable[Mapping],
    batch_size: int = 8,
    progress: bool = True,
    on_batch: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Score every item; bad items are reported, not raised.

    Items are read lazily, validated and decoded one by one (:func:`load_item`); valid ones fill
    batches of ``batch_size`` that are each scored by ONE ``critic.score`` call under
    ``torch.no_grad()``. Should a batch still fail (an error no check foresaw, or running out of
    memory), its items are retried one at a time so that only the culprit is reported.

    Args:
        critic: a :class:`~coherendream.critic.Critic` (anything with ``score(views, prompts)``
            and ``config.num_views``).
        items: dicts ``{"id", "views", "prompt", ...extra}`` (see the module docstring).
        batch_size: items per forward pass.
        progress: show a tqdm bar.
        on_batch: called with the new results after each batch (e.g. to log), optional.

    Returns:
        One dict per item, in input order: ``{"id", "prompt", "prob_yes", "margin", ...extra}``
        for a scored item, ``{"id", "prompt", "reason", "error", ...extra}`` for a bad one (a
        second item with an id already seen is an error, ``duplicate_id``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    num_views = int(critic.config.num_views)
    total = len(items) if isinstance(items, Sized) else None  # generators: a bar without a total
    results: list[dict] = []
    pending: list[tuple[int, list, str]] = []  # (result slot, images, prompt)
    seen: set[str] = set()

    def flush() -> None:
        if not pending:
            return
        new = _score_batch(critic, pending, results)
        pending.clear()
        if on_batch is not None:
            on_batch(new)

    with tqdm(total=total, disable=not progress, unit="item", desc="critic score") as bar:
        for item in items:
            extra = {k: v for k, v in item.items() if k not in _ITEM_KEYS and k not in _RESULT_KEYS}
            raw_id = item.get("id")
            prompt = item.get("prompt") if isinstance(item.get("prompt"), str) else None
            try:
                item_id, images, prompt = load_item(item, num_views)
                if item_id in seen:
                    raise ItemError("duplicate_id", f"{item_id}: id appears earlier in the input; ids must be unique")
                seen.add(item_id)
            except ItemError as err:
                results.append({"id": str(raw_id) if raw_id is not None else "", "prompt": prompt, "reason": err.reason, "error": str(err), **extra})
            else:
                note = _unreadable(critic, prompt)
                if note:  # scored all the same, but marked: the score does not judge those words
                    extra["text_warning"] = note
                results.append({"id": item_id, "prompt": prompt, **extra})  # filled in by _score_batch
                pending.append((len(results) - 1, images, prompt))
                if len(pending) >= batch_size:
                    flush()
            bar.update(1)
        flush()
    return results



_warned: set[str] = set()


def _unreadable(critic: Any, prompt: str) -> str | None:
    """The critic's :meth:`~coherendream.critic.Critic.unreadable_text` of ``prompt`` (None for a
    scorer without it), logged the first time each is seen in this process."""
    check = getattr(critic, "unreadable_text", None)
    note = check(prompt) if callable(check) else None
    if note and note not in _warned and len(_warned) < 20:
        _warned.add(note)
        logger.warning("%s (prompt %r); its rows are marked in text_warning", note, prompt[:80])
    return note


def _score_batch(critic: Any, pending: list[tuple[int, list, str]], results: list) -> list[dict]:
    """Score ``pending`` in one forward pass, writing into ``results``; returns the updated dicts."""
    views = [images for _, images, _ in pending]
    prompts = [prompt for _, _, prompt in pending]
    try:
        with torch.no_grad():
            out = critic.score(views, prompts)
    except Exception as err:  # noqa: BLE001 -- recorded per item below, never lost
        if len(pending) == 1:
            slot = pending[0][0]
            results[slot].update(reason="score_failed", error=f"{results[slot]['id']}: scoring failed ({type(err).__name__}: {err})")
            return [results[slot]]
        logger.warning("a batch of %d items failed (%s: %s); scoring them one at a time", len(pending), type(err).__name__, err)
        new: list[dict] = []
        for one in pending:
            new += _score_batch(critic, [one], results)
        return new
    prob = out.prob_yes.detach().float().cpu().tolist()
    margin = out.margin.detach().float().cpu().tolist()
    new = []
    for (slot, _, _), p, m in zip(pending, prob, margin):
        row = results[slot]
        if not (math.isfinite(p) and math.isfinite(m)):
            row.update(reason="score_failed", error=f"{row['id']}: the critic returned a non-finite score (prob_yes={p}, margin={m})")
        else:
            # Rebuild so the score columns come right after id/prompt in the output files.
            results[slot] = row = {"id": row["id"], "prompt": row["prompt"], "prob_yes": p, "margin": m,
                                   **{k: v for k, v in row.items() if k not in ("id", "prompt")}}
        new.append(row)
    return new


# =========================================================================== writing


def split_results(results: Iterable[Mapping]) -> tuple[list[dict], list[dict]]:
    """``(scored, errors)``: results with a score, and results with an ``error``."""
    scored, errors = [], []
    for r in results:
        (errors if r.get("error") else scored).append(dict(r))
    return scored, errors


def write_score_files(results: Sequence[Mapping], output_dir: str | Path, formats: Sequence[str] = ("csv", "jsonl")) -> dict[str, str]:
    """Write ``scores.csv`` / ``scores.jsonl`` (scored items) and ``errors.jsonl`` atomically
    (``coherendream.io.write_results``).

    Returns:
        ``{"csv": path, "jsonl": path, "errors": path}`` (the formats written).
    """
    unknown = sorted(set(formats) - {"csv", "jsonl"})
    if unknown:
        raise ValueError(f"unknown output format(s) {unknown}; known: csv, jsonl")
    output_dir = Path(output_dir)
    scored, errors = split_results(results)
    columns = ["id", "prompt", "prob_yes", "margin"]
    for row in scored:  # extra fields in first-seen order, after the fixed ones
        columns += [k for k in row if k not in columns and k not in ("error", "reason")]
    paths = write_results(scored, output_dir / Path(SCORES_CSV).stem, columns, formats)
    files = {fmt: str(path) for fmt, path in zip(formats, paths)}
    errors = [{"id": e["id"], "reason": e.get("reason"), "error": e["error"],
               **{k: v for k, v in e.items() if k not in ("id", "reason", "error")}} for e in errors]  # fmt: skip
    (files["errors"],) = map(str, write_results(errors, output_dir / Path(ERRORS_JSONL).stem, formats=("jsonl",)))
    return files


def read_scores_csv(path: str | Path) -> list[dict]:
    """Read ``scores.csv`` back, with ``prob_yes``/``margin`` (and ``label``) as numbers."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in ("prob_yes", "margin"):
            row[key] = float(row[key])
        if row.get("label", "") not in ("", None):
            row["label"] = int(row["label"])
    return rows


def score_to_files(
    critic: Any,
    items: Iterable[Mapping],
    output_dir: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    formats: Sequence[str] = ("csv", "jsonl"),
    metadata: Mapping[str, Any] | None = None,
    num_shards: int | None = None,
    shard_index: int | None = None,
    chunk_size: int = 256,
) -> dict[str, Any]:
    """Score ``items`` and write the result files; what ``coherendream critic score`` runs.

    The items are scored in chunks of ``chunk_size``, each kept in ``output_dir/chunks/`` once
    done, so a re-run resumes and the work splits over processes (``coherendream.shards``:
    ``num_shards``/``shard_index``, else torchrun's ``RANK``/``WORLD_SIZE`` or a SLURM array).
    The process that finds every chunk done writes the files.

    Args:
        critic, items, batch_size, progress: as for :func:`score_items`.
        output_dir: created if needed; gets ``scores.csv``, ``scores.jsonl``, ``errors.jsonl``,
            ``summary.json``.
        formats: score files to write (``"csv"``, ``"jsonl"``); ``errors.jsonl`` is always written.
        metadata: copied into the summary (e.g. the model path, the adapter, the input).
        num_shards, shard_index, chunk_size: how the work is split (see above).

    Returns:
        The summary, also written to ``summary.json``: ``items``, ``scored``, ``errors``,
        ``errors_by_reason``, ``mean_prob_yes``, ``batch_size``, ``num_views``, ``seconds``
        (scoring time summed over the chunks), ``items_per_second``, ``files`` and ``metadata``;
        ``merged`` is False (and nothing but chunks is written) while other shards still work.
    """
    from coherendream.shards import map_in_chunks

    unknown = sorted(set(formats) - {"csv", "jsonl"})
    if unknown:  # fail before hours of scoring, not after
        raise ValueError(f"unknown output format(s) {unknown}; known: csv, jsonl")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if value < 1:  # before the output folder is made
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    def score_chunk(chunk: list[Mapping], start: int) -> list[dict]:
        rows = score_items(critic, chunk, batch_size=batch_size, progress=progress)
        return json.loads(json.dumps(rows, default=str))  # JSON-ready, as the chunk file stores it

    signature = {"metadata": dict(metadata or {})}
    run = map_in_chunks(items, score_chunk, Path(output_dir) / "chunks", chunk_size, num_shards, shard_index, signature)
    if not run.merged:
        return {"merged": False, "chunks": run.chunks, "chunks_done": run.done, "chunks_skipped": run.skipped}
    results = _mark_duplicates(run.rows)
    files = write_score_files(results, output_dir, formats)
    scored, errors = split_results(results)
    summary = {
        "merged": True,
        "items": len(results),
        "scored": len(scored),
        "errors": len(errors),
        "errors_by_reason": errors_by_reason(errors),
        "mean_prob_yes": (sum(r["prob_yes"] for r in scored) / len(scored)) if scored else None,
        "batch_size": batch_size,
        "num_views": int(critic.config.num_views),
        "seconds": round(run.seconds, 3),
        "items_per_second": round(len(results) / run.seconds, 3) if run.seconds > 0 else None,
        "files": {**files, "summary": str(Path(output_dir) / SUMMARY_JSON)},
        "metadata": dict(metadata or {}),
    }
    write_json(Path(output_dir) / SUMMARY_JSON, summary)
    if errors:
        logger.warning("%d of %d items could not be scored; see %s", len(errors), len(results), files["errors"])
    return summary


def _mark_duplicates(results: list[dict]) -> list[dict]:
    """A scored item whose id a previous item already had becomes a ``duplicate_id`` error (each
    chunk checks its own items; this checks across chunks)."""
    seen: set[str] = set()
    out = []
    for r in results:
        if not r.get("error") and r["id"] in seen:
            r = {"id": r["id"], "prompt": r.get("prompt"), "reason": "duplicate_id", "error": f"{r['id']}: id appears earlier in the input; ids must be unique"}
        seen.add(r["id"])
        out.append(r)
    return out


__all__ = [
    "DATASET_EXTRA_COLUMNS",
    "ERRORS_JSONL",
    "SCORES_CSV",
    "SCORES_JSONL",
    "SUMMARY_JSON",
    "ItemError",
    "detect_input_kind",
    "items_from_dataset",
    "items_from_input",
    "items_from_manifest",
    "items_from_render_dir",
    "load_item",
    "read_scores_csv",
    "score_items",
    "score_to_files",
    "select_views",
    "split_results",
    "write_score_files",
]
