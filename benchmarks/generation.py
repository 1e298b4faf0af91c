"""Timings of the generation stack, printed as a markdown table.

    python benchmarks/generation.py [--repeats 5] [--gaussians 10000] [--dense-gaussians 2000]

One function per measurement, each returning a ``Row`` (median wall-clock seconds over
``repeats`` runs after one warm-up). Sections so far:

* rasteriser: forward+backward of the tiled pure-PyTorch rasteriser against the naive dense
  reference (every Gaussian x every pixel) on the same scene. The dense one holds
  ``N x H x W`` floats per intermediate per camera, so it runs on fewer Gaussians by default; the
  tiled one is timed at both sizes so that one ratio compares like with like.

TCSD step timings will be added as further ``bench_*`` functions and rows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from coherendream.cameras import Camera
from coherendream.generation.rasterize import rasterize_gaussians, rasterize_gaussians_dense


@dataclass
class Row:
    name: str
    setting: str
    seconds: float  # median wall-clock
    spread: tuple[float, float]  # min, max wall-clock
    cpu_seconds: float  # median process CPU time (all threads): steadier on a shared machine
    baseline: Row | None = None  # the row this one's speed-up is reported against


def _median_time(fn: Callable[[], None], repeats: int) -> tuple[float, tuple[float, float], float]:
    fn()  # warm-up (allocator, lazy init)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), (min(times), max(times)), statistics.median(cpu)


def make_scene(num_gaussians: int, seed: int = 0) -> list[torch.Tensor]:
    """Random Gaussians in a ball of radius 0.5 (the unit cube's asset scale), leaf tensors with grads.

    Scales log-uniform in [0.01, 0.04], opacities U[0.1, 0.9], random rotations and colours.
    """
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(num_gaussians, 3, generator=g)
    radius = 0.5 * torch.rand(num_gaussians, 1, generator=g) ** (1 / 3)
    means = dirs / dirs.norm(dim=-1, keepdim=True) * radius
    scales = torch.exp(torch.empty(num_gaussians, 3).uniform_(np.log(0.01), np.log(0.04), generator=g))
    quats = torch.randn(num_gaussians, 4, generator=g)
    opac = 0.1 + 0.8 * torch.rand(num_gaussians, generator=g)
    colors = torch.rand(num_gaussians, 3, generator=g)
    return [t.requires_grad_(True) for t in (means, quats, scales, opac, colors)]


def make_cameras(views: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    cams = [Camera.orbit(360.0 * i / views, 15.0, 2.5, 40.0, resolution) for i in range(views)]
    vm = torch.tensor(np.stack([c.viewmat for c in cams]), dtype=torch.float32)
    ks = torch.tensor(np.stack([c.K for c in cams]), dtype=torch.float32)
    return vm, ks


def _forward_backward(render: Callable, scene, vm, ks, resolution: int) -> Callable[[], None]:
    def run() -> None:
        for t in scene:
            t.grad = None
        out = render(*scene, vm, ks, resolution, resolution)
        (out.rgb.sum() + out.alpha.sum() + out.depth.sum()).backward()

    return run


def bench_rasterizer_tiled(num_gaussians: int, views: int, resolution: int, repeats: int, tile_size: int | None = None) -> Row:
    scene, (vm, ks) = make_scene(num_gaussians), make_cameras(views, resolution)
    render = lambda *a: rasterize_gaussians(*a, backend="torch", tile_size=tile_size)  # noqa: E731
    med, spread, cpu = _median_time(_forward_backward(render, scene, vm, ks, resolution), repeats)
    tiles = f", tile {tile_size}" if tile_size else ""
    return Row(f"raster torch tiled{tiles}", f"N={num_gaussians}, {views}x{resolution}px, fwd+bwd", med, spread, cpu)


def bench_rasterizer_dense(num_gaussians: int, views: int, resolution: int, repeats: int) -> Row:
    scene, (vm, ks) = make_scene(num_gaussians), make_cameras(views, resolution)
    med, spread, cpu = _median_time(_forward_backward(rasterize_gaussians_dense, scene, vm, ks, resolution), repeats)
    return Row("raster naive dense", f"N={num_gaussians}, {views}x{resolution}px, fwd+bwd", med, spread, cpu)


def rasterizer_rows(args: argparse.Namespace) -> list[Row]:
    v, r, k = args.views, args.resolution, args.repeats
    dense = bench_rasterizer_dense(args.dense_gaussians, v, r, k)
    tiled_small = bench_rasterizer_tiled(args.dense_gaussians, v, r, k)
    tiled_small.baseline = dense
    tiled = bench_rasterizer_tiled(args.gaussians, v, r, k)
    tiled16 = bench_rasterizer_tiled(args.gaussians, v, r, k, tile_size=16)
    tiled16.baseline = tiled
    return [dense, tiled_small, tiled, tiled16]


def to_markdown(rows: list[Row]) -> str:
    lines = [
        "| measurement | setting | median wall s | min-max wall s | median CPU s | speed-up (wall, CPU) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        ratio = ""
        if row.baseline is not None:
            b = row.baseline
            ratio = f"{b.seconds / row.seconds:.1f}x, {b.cpu_seconds / row.cpu_seconds:.1f}x vs {b.name} ({b.setting})"
        lines.append(
            f"| {row.name} | {row.setting} | {row.seconds:.3f} | {row.spread[0]:.3f}-{row.spread[1]:.3f} "
            f"| {row.cpu_seconds:.3f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gaussians", type=int, default=10_000)
    parser.add_argument("--dense-gaussians", type=int, default=2_000, help="fewer for the naive reference (memory)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = rasterizer_rows(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32\n")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
