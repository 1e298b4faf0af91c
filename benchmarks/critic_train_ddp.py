"""Training throughput of `coherendream critic train` on CPU: one process against torchrun data parallel.

    python benchmarks/critic_train_ddp.py [--steps 300] [--global-batch 24] [--scenes 600]

Trains the embedded critic's shapes (a fresh random tiny LLaVA with the `tiny` settings of
`recipes/embedded_critic/train.yaml`) with that recipe's stage 2 config on a small procedural build
of its stage 2 mix, presence rows included, for the same number of steps and the
same global batch in three ways: the baseline, one process with 2 torch threads; one process with 1
thread; and `torchrun --standalone --nproc_per_node 2` with 1 thread each and half the batch per
process. Throughput is steps/s from the trainer's own `train_runtime` (the training loop only, not
process start-up or loading), each way run in the same session on the same data.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from coherendream.config import dump_yaml, read_yaml
from coherendream.critic.tiny import build_tiny_critic

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "coherendream.cli"]


def run(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def _embedded_critic_recipe():
    """recipes/embedded_critic/train.py as a module (its data and stage configs)."""
    spec = importlib.util.spec_from_file_location("embedded_critic_recipe", ROOT / "recipes" / "embedded_critic" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_runtime(output: Path) -> float:
    history = json.loads((output / "log_history.json").read_text())
    return next(h["train_runtime"] for h in history if "train_runtime" in h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--global-batch", type=int, default=24)
    parser.add_argument("--scenes", type=int, default=600)
    args = parser.parse_args()
    if args.global_batch % 2:
        raise SystemExit(f"--global-batch must be even (split over 2 processes), got {args.global_batch}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = _embedded_critic_recipe()
        (tmp / "data.yaml").write_text(dump_yaml(recipe.data_configs(tmp)["stage2"]))
        (tmp / "stage2.yaml").write_text(dump_yaml(recipe.stage_configs(tmp)["s2"]))
        run([*CLI, "data", "build", "-c", str(tmp / "data.yaml"), "-o", str(tmp / "data"), f"source.num_scenes={args.scenes}", "--num-workers", "2"], threads=1)
        build_tiny_critic(tmp / "tiny", **read_yaml(ROOT / "recipes" / "embedded_critic" / "train.yaml")["tiny"])
        common = ["-c", str(tmp / "stage2.yaml"), f"model_name_or_path={tmp / 'tiny'}", f"dataset={tmp / 'data'}",
                  f"training.max_steps={args.steps}", "training.logging_steps=50"]
        ways = [  # name, launcher, processes, threads per process
            ("1 process x 2 threads (baseline)", CLI, 1, 2),
            ("1 process x 1 thread", CLI, 1, 1),
            ("torchrun 2 processes x 1 thread", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", "2", "-m", "coherendream.cli"], 2, 1),
        ]
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"{args.steps} steps at global batch {args.global_batch}")
        print("| launch | steps/s | rows/s | vs baseline |")
        print("|---|---|---|---|")
        base = None
        for i, (name, launcher, procs, threads) in enumerate(ways):
            out = tmp / f"run{i}"
            run([*launcher, "critic", "train", *common, f"output_dir={out}",
                 f"training.per_device_train_batch_size={args.global_batch // procs}"], threads=threads)
            rate = args.steps / train_runtime(out)
            base = base or rate
            print(f"| {name} | {rate:.2f} | {rate * args.global_batch:.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
