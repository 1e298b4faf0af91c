"""`generate` on CPU with the embedded prior and critic: step time by CPU kind and prior precision.

    python benchmarks/generate_cpu.py [--steps 30] [--threads 2] [--repeats 1] [--demo]

Runs configs/generate/cpu_tiny.yaml (SDS from the embedded prior + the critic term, 32 px, 4 views,
2048 Gaussians, grey start) once per setting, each in a fresh process, and prints a markdown table
of the median step time and the run's wall time (loading and outputs included), as ratios against
the toolkit's own choice on this CPU, measured in the same call.

CPU kinds: this machine as it is, and the same machine capped to AVX2 with PyTorch's own switches
(``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``), which has no bf16 kernels: a CPU without
bf16 units. Precision: ``auto`` (what the toolkit picks: bf16 only with bf16 units), and bf16 or
float32 forced with ``COHERENDREAM_CPU_BF16``. ``--demo`` also times ``coherendream demo`` (the
README's ``make demo`` without the install) with the toolkit's choice on both kinds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
KINDS = {"this CPU": {}, "capped to AVX2 (no bf16 units)": AVX2}
PRECISIONS = {"auto": None, "bf16 forced": "1", "float32 forced": "0"}

_CHILD = """
import json, sys, torch
from coherendream.config import load_config
from coherendream.generation.runner import GenerateConfig, generate
from coherendream.devices import cpu_has_fast_bf16
torch.set_num_threads(int(sys.argv[1]))
r = generate(load_config(GenerateConfig, "configs/generate/cpu_tiny.yaml", sys.argv[2:]))
steps = [json.loads(line)["seconds"] for line in open(r.paths["metrics"])]
print("RESULT", json.dumps({"steps": steps, "dtype": json.load(open(r.paths["summary"]))["dtype"], "bf16_units": cpu_has_fast_bf16()}))
"""


def _env(kind: dict, forced: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COHERENDREAM_CPU_BF16", *AVX2)}
    env.update(kind, HF_HUB_OFFLINE="1")
    if forced is not None:
        env["COHERENDREAM_CPU_BF16"] = forced
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all settings (interleaved); the table takes each setting's best round")
    parser.add_argument("--demo", action="store_true", help="also time `coherendream demo` on both CPU kinds")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs: dict[tuple[str, str], list[dict]] = {(k, p): [] for k in KINDS for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so that load from other work hits every setting alike
            for (kind_name, prec_name), done in runs.items():
                overrides = [f"output_dir={tmp}/{len(done)}-{r}-{kind_name[:4]}-{prec_name[:4]}", f"steps={args.steps}", f"prior.anneal_end_step={args.steps}",
                             "init.colors=gray", "progress=false", "outputs.turntable_frames=0", "outputs.mp4=false", "checkpoint_every=100000"]  # fmt: skip
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", _CHILD, str(args.threads), *overrides], cwd=root,
                                     env=_env(KINDS[kind_name], PRECISIONS[prec_name]), check=True, capture_output=True, text=True)  # fmt: skip
                wall = time.perf_counter() - t0
                result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
                done.append({"dtype": result["dtype"], "step": statistics.median(result["steps"][1:]), "wall": wall})
                print(kind_name, prec_name, done[-1], file=sys.stderr)
        rows = [{"kind": k, "precision": p, **min(done, key=lambda d: d["step"])} for (k, p), done in runs.items()]
        demos = {}
        if args.demo:
            for kind_name, kind in KINDS.items():
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "coherendream.cli", "demo", "-o", f"{tmp}/demo-{len(demos)}"], cwd=root,
                               env=_env(kind, None), check=True, capture_output=True)  # fmt: skip
                demos[kind_name] = time.perf_counter() - t0
                print(kind_name, demos[kind_name], file=sys.stderr)
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads; "
          f"{args.steps} steps per run, best of {args.repeats}")  # fmt: skip
    print("| CPU | prior precision | runs in | median step, s | vs the toolkit's choice | run wall, s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["kind"] == r["kind"] and b["precision"] == "auto")
        print(f"| {r['kind']} | {r['precision']} | {r['dtype']} | {r['step']:.3f} | {r['step'] / base['step']:.2f}x | {r['wall']:.1f} |")
    for kind_name, seconds in demos.items():
        print(f"demo ({kind_name}): {seconds:.0f} s")


if __name__ == "__main__":
    main()
