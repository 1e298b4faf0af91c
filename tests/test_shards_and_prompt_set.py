"""Splitting jobs over processes (coherendream.shards) and the versioned procedural prompt set."""

from __future__ import annotations

import json

import pytest

from coherendream.eval.procedural_prompts import CATEGORIES, VERSION, build_prompt_set, default_prompt_set_path, read_prompt_set
from coherendream.shards import JobMarkers, resolve_shard, shard_items


def test_shards_partition_the_jobs_and_come_from_the_environment(monkeypatch):
    jobs = list(range(11))
    parts = [shard_items(jobs, 3, i) for i in range(3)]
    assert sorted(sum(parts, [])) == jobs and parts[1] == [1, 4, 7, 10]
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_shard() == (1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert resolve_shard() == (4, 2)
    assert resolve_shard(2, 1) == (2, 1)  # explicit wins
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    assert resolve_shard() == (5, 3)
    with pytest.raises(ValueError, match="not in"):
        resolve_shard(2, 2)


def test_job_markers_are_atomic_files_with_safe_names(tmp_path):
    markers = JobMarkers(tmp_path / "jobs")
    assert not markers.done("a-1")
    markers.write("a-1", {"score": 1})
    assert markers.done("a-1") and markers.read("a-1") == {"score": 1} and markers.all_done(["a-1"])
    assert not markers.all_done(["a-1", "b"])
    for bad in ("../x", "a/b", "", ".hidden", "a b"):
        with pytest.raises(ValueError, match="safe file name"):
            markers.path(bad)


def test_committed_prompt_set_is_the_seeded_draw_and_reads_back():
    specs = read_prompt_set()
    assert [s.to_dict() for s in specs] == [s.to_dict() for s in build_prompt_set()]
    assert {s.category for s in specs} == set(CATEGORIES) and len(specs) >= 24
    for s in specs:
        groups = s.caption.groups
        assert (len(groups) == 2) == (s.category in ("relation", "two_groups"))
        if len(groups) == 2:
            assert groups[0].color != groups[1].color
        if s.category == "count":
            assert groups[0].count >= 2
        if s.category == "two_groups":
            assert max(g.count for g in groups) >= 2


def test_prompt_set_rows_are_checked(tmp_path):
    rows = [json.loads(line) for line in default_prompt_set_path().read_text().splitlines()]
    bad = dict(rows[0], groups=[{"color": "green", "shape": "cube", "count": 1}])  # ground truth off its prompt
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="ground truth"):
        read_prompt_set(path)
    path.write_text(json.dumps(dict(rows[0], version=VERSION + 1)) + "\n")
    with pytest.raises(ValueError, match="version"):
        read_prompt_set(path)
    path.write_text(json.dumps(dict(rows[0], prompt="a dragon")) + "\n")
    with pytest.raises(ValueError, match="procedural grammar"):
        read_prompt_set(path)
