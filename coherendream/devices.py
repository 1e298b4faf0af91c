"""Where and how the toolkit computes: device, reduced precision on CPUs, torch threads.

bf16 on a CPU is fast only where the CPU has bf16 units (AVX512-BF16 or AMX on x86, the BF16
extension on Arm). Elsewhere oneDNN has no bf16 kernels and PyTorch emulates them: the embedded
prior's UNet ran 23x slower in bf16 than in float32 on AVX2 (docs/benchmarks.md). So a config's
"half precision" is a wish that :func:`cpu_dtype` grants only on such CPUs, and the choice is
logged with the thread count (:func:`log_compute`).

Two processes of two torch threads each on a 2-core machine make every step several times slower
(threads spin waiting for a core another process holds), so sharded jobs started by hand take
``cores // shards`` threads each unless ``OMP_NUM_THREADS`` says otherwise
(:func:`threads_for_shards`).

Environment:
    COHERENDREAM_CPU_BF16: ``1`` or ``0`` overrides the detection (a wrong guess, or a benchmark).
    ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` makes a CPU with bf16 units behave like
    one without (PyTorch's own switches); the detection follows them.
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import torch

__all__ = ["BF16_ENV", "cpu_has_fast_bf16", "cpu_dtype", "resolve_device", "cpu_cores", "threads_for_shards", "log_compute", "compute_record"]

logger = logging.getLogger(__name__)

BF16_ENV = "COHERENDREAM_CPU_BF16"


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls and convolutions natively (not emulated).

    Both must hold: oneDNN, as PyTorch configured it, takes bf16 (``ONEDNN_MAX_CPU_ISA`` and
    ``ATEN_CPU_CAPABILITY`` can cap it), and the CPU has bf16 instructions (``avx512_bf16`` or
    ``amx_bf16`` on x86, ``bf16`` on Arm): oneDNN also accepts plain AVX-512, where bf16 is
    converted, not computed. ``COHERENDREAM_CPU_BF16=1``/``0`` overrides both.
    """
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{BF16_ENV}={forced!r}: use 1 (bf16 on this CPU) or 0 (float32)")
        return forced == "1"
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
    return onednn and bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_dtype(wanted: torch.dtype) -> torch.dtype:
    """The dtype to run a CPU model in when ``wanted`` is asked for: bf16 only where it is native,
    float32 in place of any other reduced precision (fp16 matmuls on CPUs are slow or missing)."""
    if wanted == torch.bfloat16 and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"``/``None``: CUDA when available, else CPU; a CUDA device asked for without CUDA is an error."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} asked for but CUDA is not available")
    return torch.device(name)


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_for_shards(num_shards: int | None) -> int:
    """Give this process ``cores // num_shards`` torch threads (at least one) when it is one of
    ``num_shards`` processes started by hand on one machine, unless ``OMP_NUM_THREADS`` is set
    (torchrun sets it, a user may). Returns the thread count in force."""
    if num_shards is not None and num_shards > 1 and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, cpu_cores() // num_shards))
    return torch.get_num_threads()


def compute_record(device: torch.device | str, dtype: torch.dtype) -> dict:
    """What a run computed on, for its summary and report: device, dtype, threads, CPU kind."""
    device = torch.device(device)
    record = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads()}
    if device.type == "cpu":
        record["cpu_bf16_units"] = cpu_has_fast_bf16()
        record["cpu"] = platform.processor() or platform.machine()
    return record


_last_logged: tuple | None = None


def log_compute(what: str, device: torch.device | str, dtype: torch.dtype, wanted: torch.dtype | None = None) -> None:
    """Log once per process (and again when it changes) what ``what`` runs on and why."""
    global _last_logged
    device = torch.device(device)
    key = (what, str(device), dtype, wanted)
    if key == _last_logged:
        return
    _last_logged = key
    why = ""
    if device.type == "cpu" and wanted == torch.bfloat16 and dtype != wanted:
        why = f" (bf16 asked for, but this CPU has no bf16 units: emulated bf16 is 10-20x slower; {BF16_ENV}=1 forces it)"
    elif device.type == "cpu" and dtype == torch.bfloat16:
        why = " (this CPU has bf16 units)"
    logger.info("%s: %s on %s, %d torch thread%s%s", what, str(dtype).removeprefix("torch."), device,
                torch.get_num_threads(), "" if torch.get_num_threads() == 1 else "s", why)
