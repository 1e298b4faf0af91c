"""Where the toolkit computes (coherendream.devices): bf16 only on CPUs with bf16 units, threads per shard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from coherendream.devices import BF16_ENV, compute_record, cpu_cores, cpu_dtype, cpu_has_fast_bf16, log_compute, resolve_device, threads_for_shards
from coherendream.shards import resolve_shard


@pytest.fixture
def bf16_forced(monkeypatch):
    """Set COHERENDREAM_CPU_BF16 for one test; the detection's cache is cleared before and after."""

    def force(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(BF16_ENV, raising=False)
        else:
            monkeypatch.setenv(BF16_ENV, value)
        cpu_has_fast_bf16.cache_clear()

    yield force
    monkeypatch.delenv(BF16_ENV, raising=False)
    cpu_has_fast_bf16.cache_clear()


def test_reduced_precision_on_a_cpu_is_bf16_only_where_native(bf16_forced):
    bf16_forced("0")
    assert cpu_dtype(torch.bfloat16) == torch.float32
    bf16_forced("1")
    assert cpu_dtype(torch.bfloat16) == torch.bfloat16
    assert cpu_dtype(torch.float16) == torch.float32  # fp16 on a CPU: never
    assert cpu_dtype(torch.float32) == torch.float32
    bf16_forced("2")
    with pytest.raises(ValueError, match=f"{BF16_ENV}='2'"):
        cpu_has_fast_bf16()


def test_the_detection_follows_pytorchs_isa_cap():
    """A CPU capped to AVX2 (oneDNN's and ATen's own switches) is a CPU without bf16 units, whatever
    this machine has: that is how docs/benchmarks.md reproduces an AVX2 machine."""
    env = {k: v for k, v in os.environ.items() if k != BF16_ENV}
    env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    code = "from coherendream.devices import cpu_has_fast_bf16; print(cpu_has_fast_bf16())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sharded_processes_share_the_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    try:
        torch.set_num_threads(7)
        assert resolve_shard(2, 0) == (2, 0)  # two processes started by hand on this machine
        assert torch.get_num_threads() == max(1, cpu_cores() // 2)
        torch.set_num_threads(7)
        resolve_shard()  # one process: its thread count is left alone
        assert torch.get_num_threads() == 7
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # told otherwise
        assert threads_for_shards(64) == 7
    finally:
        torch.set_num_threads(before)


def test_the_choice_is_logged_and_recorded(caplog, bf16_forced):
    bf16_forced("0")
    with caplog.at_level("INFO", logger="coherendream"):
        log_compute("prior", "cpu", torch.float32, torch.bfloat16)
        log_compute("prior", "cpu", torch.float32, torch.bfloat16)  # once, not every call
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "float32 on cpu" in lines[0] and "no bf16 units" in lines[0] and "thread" in lines[0]
    record = compute_record("cpu", torch.float32)
    assert record["dtype"] == "float32" and record["cpu_bf16_units"] is False and record["torch_threads"] == torch.get_num_threads()
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
