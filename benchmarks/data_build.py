"""Throughput of `coherendream data build`: assets per second, procedural scenes and real meshes.

    python benchmarks/data_build.py [--scenes 200] [--resolution 256] [--workers 1 2]

Each configuration builds from scratch into a temporary folder (render 4 views, encode PNGs,
negatives, Parquet, finalise) and is timed end to end, process start-up of the workers included.
The baseline is the same build with one worker, measured in the same run; the target for
procedural scenes is at least 20 scenes/s on 2 CPU cores at 256 px, 4 views.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from coherendream.config import from_dict
from coherendream.data.assets import mesh_extensions
from coherendream.data.build import BuildConfig, build_dataset

ASSIMP = Path("/usr/share/assimp/models")


def assimp_manifest(folder: Path) -> Path:
    extensions = set(mesh_extensions())
    files = sorted(p for p in ASSIMP.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    path = folder / "assimp.jsonl"
    with path.open("w") as fh:
        for i, p in enumerate(files):
            fh.write(json.dumps({"uid": f"a{i}", "path": str(p.relative_to(ASSIMP)), "caption": f"model {i}"}) + "\n")
    return path


def run(source: dict, resolution: int, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(BuildConfig, {"output_dir": tmp, "source": source, "render": {"resolution": resolution}, "num_workers": workers, "chunk_size": 16, "progress": False})
        start = time.perf_counter()
        result = build_dataset(cfg)
        seconds = time.perf_counter() - start
        info = json.loads((Path(tmp) / "build_info.json").read_text())
        assert result.finalized
        return seconds, info["assets_planned"] - info["assets_rejected"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"procedural": {"kind": "procedural", "num_scenes": args.scenes}}
        if ASSIMP.is_dir():
            sources["assimp models"] = {"kind": "manifest", "path": str(assimp_manifest(Path(tmp))), "root": str(ASSIMP)}
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.resolution} px, 4 views")
        print("| source | workers | assets built | seconds | assets/s | vs 1 worker |")
        print("|---|---|---|---|---|---|")
        for name, source in sources.items():
            base = None
            for w in args.workers:
                seconds, built = run(source, args.resolution, w)
                rate = built / seconds
                base = base or rate
                print(f"| {name} | {w} | {built} | {seconds:.1f} | {rate:.1f} | {rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
