"""Splitting a batch job over processes: every n-th job, finished jobs skipped, the last one merges.

One mechanism for every job that users spread over machines (``data build``, ``eval procedural``,
``eval t3bench`` when it generates, ``critic score``, ``eval assets``):

- the job list is fixed by the inputs alone, so every process computes the same list;
- process ``i`` of ``n`` takes jobs ``i, i + n, i + 2n, ...`` (``n``/``i`` given explicitly, or from
  torchrun's ``WORLD_SIZE``/``RANK``, or a SLURM array);
- each finished job leaves a marker file, written atomically and last, so a killed or re-run
  process skips what is done and redoes what is not;
- the process that finds every marker present after its own jobs writes the merged results (if two
  finish at once, both write the same files atomically).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["shard_from_env", "resolve_shard", "shard_items", "JobMarkers", "JobsRun", "run_jobs", "ChunkedRun", "map_in_chunks"]

T = TypeVar("T")

# The help of every command's --num-shards / --shard-index.
NUM_SHARDS_HELP = "split the work over this many processes (default: torchrun's WORLD_SIZE or the SLURM array size, else 1)"
SHARD_INDEX_HELP = "this process's share (default: RANK or the SLURM array index)"


def shard_from_env() -> tuple[int, int] | None:
    """``(num_shards, shard_index)`` from a SLURM array or torchrun (``WORLD_SIZE``/``RANK``), if set."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"]) - first
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["WORLD_SIZE"]), int(env["RANK"])
    return None


def resolve_shard(num_shards: int | None = None, shard_index: int | None = None) -> tuple[int, int]:
    """The explicit shard if given, else the environment's, else ``(1, 0)``; checked.

    Processes given ``num_shards`` explicitly are taken to share one machine: each gets
    ``cores // num_shards`` torch threads unless ``OMP_NUM_THREADS`` is set
    (:func:`coherendream.devices.threads_for_shards`). torchrun sets that variable itself, and a
    SLURM array's tasks have cores of their own.
    """
    if num_shards is None and shard_index is None:
        num_shards, shard_index = shard_from_env() or (1, 0)
    elif num_shards is not None and int(num_shards) > 1:
        from coherendream.devices import threads_for_shards

        threads_for_shards(int(num_shards))
    num_shards = 1 if num_shards is None else int(num_shards)
    shard_index = 0 if shard_index is None else int(shard_index)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is not in [0, num_shards={num_shards})")
    return num_shards, shard_index


def shard_items(items: Sequence[T], num_shards: int, shard_index: int) -> list[T]:
    """Every ``num_shards``-th item from ``shard_index`` on."""
    return [x for k, x in enumerate(items) if k % num_shards == shard_index]


class JobMarkers:
    """Marker files of finished jobs under ``folder`` (``<job id>.json``), written atomically.

    Job ids must be safe file names (letters, digits, ``-``, ``_``, ``.``).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, job_id: str) -> Path:
        if not job_id or not all(c.isalnum() or c in "-_." for c in job_id) or job_id.startswith("."):
            raise ValueError(f"job id {job_id!r} is not a safe file name")
        return self.folder / f"{job_id}.json"

    def done(self, job_id: str) -> bool:
        return self.path(job_id).is_file()

    def write(self, job_id: str, record: dict) -> None:
        from coherendream.io import write_json

        write_json(self.path(job_id), record)

    def read(self, job_id: str) -> dict:
        import json

        return json.loads(self.path(job_id).read_text(encoding="utf-8"))

    def all_done(self, job_ids: Sequence[str]) -> bool:
        return all(self.done(j) for j in job_ids)


@dataclass
class JobsRun:
    """What :func:`run_jobs` did: ``records`` (every job's record by id, in job order, or None while
    other shards still have jobs to do), ``mine`` (jobs of this process), ``done`` / ``skipped``
    (of those, run now / found finished)."""

    records: dict[str, dict] | None
    mine: int
    done: int
    skipped: int

    @property
    def merged(self) -> bool:
        return self.records is not None


def run_jobs(
    jobs: Sequence[T],
    job_id: Callable[[T], str],
    fn: Callable[[T], dict],
    folder: str | Path,
    num_shards: int | None = None,
    shard_index: int | None = None,
) -> JobsRun:
    """Run this process's share of ``jobs`` (:func:`shard_items`), each once: ``fn(job)`` returns
    its JSON-ready record, written as the job's marker under ``folder``; a job whose marker is
    there is skipped. Once every job's marker is there, all records come back."""
    num_shards, shard_index = resolve_shard(num_shards, shard_index)
    markers = JobMarkers(folder)
    mine = shard_items(jobs, num_shards, shard_index)
    done = skipped = 0
    for job in mine:
        if markers.done(job_id(job)):
            skipped += 1
            continue
        markers.write(job_id(job), fn(job))
        done += 1
    ids = [job_id(job) for job in jobs]
    records = {i: markers.read(i) for i in ids} if markers.all_done(ids) else None
    return JobsRun(records, len(mine), done, skipped)


@dataclass
class ChunkedRun:
    """What :func:`map_in_chunks` did: ``rows`` (every chunk's rows in input order, or None while
    other shards still have chunks to do), ``chunks``, ``done`` / ``skipped`` (chunks of this
    process), ``seconds`` (the time every chunk took, summed over all processes)."""

    rows: list[dict] | None
    chunks: int
    done: int
    skipped: int
    seconds: float

    @property
    def merged(self) -> bool:
        return self.rows is not None


def map_in_chunks(
    items: Iterable[T],
    fn: Callable[[list[T], int], list[dict]],
    folder: str | Path,
    chunk_size: int = 256,
    num_shards: int | None = None,
    shard_index: int | None = None,
    signature: dict[str, Any] | None = None,
) -> ChunkedRun:
    """Apply ``fn`` to this process's chunks of ``items``; all rows once every chunk is done.

    ``items`` is cut, in order, into chunks of ``chunk_size``; chunk ``k`` belongs to shard
    ``k % num_shards`` (:func:`resolve_shard`). ``fn(chunk, start)`` (``start``: the index of the
    chunk's first item) returns JSON-ready rows, kept in ``folder/chunk-<k>.json``; a chunk
    already there is skipped, so a re-run resumes. Every process reads the whole item stream
    (cheap: readers yield paths, the expensive work is ``fn``'s) and so knows the number of
    chunks, and the one that finds them all done gets the rows.

    ``signature`` (JSON-ready: the input, the model, ...) is kept in ``folder/signature.json``
    with the chunk size; chunks left by a run with another signature are never mixed in: that is
    an error naming the folder, raised before any work.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_shards, shard_index = resolve_shard(num_shards, shard_index)
    markers = JobMarkers(folder)
    _check_signature(Path(folder), {**(signature or {}), "chunk_size": chunk_size})
    it = iter(items)
    chunks = done = skipped = 0
    while chunk := list(islice(it, chunk_size)):
        k = chunks
        chunks += 1
        if k % num_shards != shard_index:
            continue
        name = f"chunk-{k:06d}"
        if markers.done(name):
            skipped += 1
            continue
        t0 = time.perf_counter()
        rows = fn(chunk, k * chunk_size)
        markers.write(name, {"rows": rows, "seconds": round(time.perf_counter() - t0, 3)})
        done += 1
    names = [f"chunk-{k:06d}" for k in range(chunks)]
    if not markers.all_done(names):
        return ChunkedRun(None, chunks, done, skipped, 0.0)
    rows_all: list[dict] = []
    seconds = 0.0
    for name in names:
        record: dict[str, Any] = markers.read(name)
        rows_all += record["rows"]
        seconds += float(record.get("seconds", 0.0))
    return ChunkedRun(rows_all, chunks, done, skipped, seconds)


def _check_signature(folder: Path, signature: dict[str, Any]) -> None:
    import json

    from coherendream.io import write_json

    path = folder / "signature.json"
    wanted = json.loads(json.dumps(signature, default=str))
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != wanted:
            diff = sorted(k for k in {*found, *wanted} if found.get(k) != wanted.get(k))
            raise ValueError(f"{folder}: holds chunks of another run (different {', '.join(diff)}); give another output folder or delete this one")
    else:
        write_json(path, wanted)
