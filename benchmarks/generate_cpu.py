"""Wall time of one `generate` run on CPU with the embedded prior and critic, by precision and threads.

    python benchmarks/generate_cpu.py [--steps 200] [--repeats 1]

Runs configs/generate/cpu_tiny.yaml (SDS from the embedded prior + the critic term, 32 px, 4 views,
2048 Gaussians, grey start) for each setting in turn and prints a markdown table of seconds per
run (loading and outputs included) and the ratio against float32 with one thread, measured in the
same call. Each setting runs in a fresh process so that torch's thread count is its own.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

SETTINGS = [("float32", 1), ("bf16", 1), ("float32", 2), ("bf16", 2)]

_CHILD = """
import sys, torch
from coherendream.config import load_config
from coherendream.generation.runner import GenerateConfig, generate
torch.set_num_threads(int(sys.argv[1]))
generate(load_config(GenerateConfig, "configs/generate/cpu_tiny.yaml", sys.argv[2:]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    times: dict[tuple[str, int], list[float]] = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for dtype, threads in SETTINGS:  # interleaved, so that load from other work hits all alike
                overrides = [f"output_dir={tmp}/{dtype}-{threads}-{r}", f"steps={args.steps}", f"prior.anneal_end_step={args.steps}",
                             "init.colors=gray", "progress=false", "outputs.turntable_frames=0", "checkpoint_every=100000",
                             f"prior.half_dtype={'bf16' if dtype == 'bf16' else 'fp16'}"]  # fmt: skip
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", _CHILD, str(threads), *overrides], cwd=root, check=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                times[(dtype, threads)].append(time.perf_counter() - t0)
    base = min(times[("float32", 1)])
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.steps} steps, best of {args.repeats}")
    print("| prior weights | torch threads | seconds per run | speed-up vs float32, 1 thread |")
    print("|---|---|---|---|")
    for (dtype, threads), ts in times.items():
        print(f"| {dtype} | {threads} | {min(ts):.1f} | {base / min(ts):.2f}x |")


if __name__ == "__main__":
    main()
