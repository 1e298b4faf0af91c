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
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

__all__ = ["shard_from_env", "resolve_shard", "shard_items", "JobMarkers"]

T = TypeVar("T")


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
    """The explicit shard if given, else the environment's, else ``(1, 0)``; checked."""
    if num_shards is None and shard_index is None:
        num_shards, shard_index = shard_from_env() or (1, 0)
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
