"""Timings of the generation stack, printed as a markdown table.

    python benchmarks/generation.py [--repeats 5] [--gaussians 10000] [--dense-gaussians 2000]

One function per measurement, each returning a ``Row`` (median wall-clock seconds over
``repeats`` runs after one warm-up). Sections so far:

* rasteriser: forward+backward of the tiled pure-PyTorch rasteriser against the naive dense
  reference (every Gaussian x every pixel) on the same scene. The dense one holds
  ``N x H x W`` floats per intermediate per camera, so it runs on fewer Gaussians by default; the
  tiled one is timed at both sizes so that one ratio compares like with like.

* tcsd: one full optimisation step of ``generate`` (sample cameras, render V views, the step's
  image gradient, one backward into the Gaussians, Adam) on the seeded layout of a two-object
  prompt, with and without the critic term (tiny random critic), with ``prior: none`` and with
  the tiny SD prior (32 px native, x4 VAE), plus the x0 straight-through and reward-weighted SDS
  variants. Configurations are timed *interleaved* (one step of each per round) so that load from
  other processes on a shared machine hits them alike; medians over rounds after warm-up steps.
  Without a prior and without the critic there is no loss term: that baseline applies a constant
  image gradient, i.e. it is the render + backward + Adam machinery the critic term is added to.

    python benchmarks/generation.py --section tcsd --threads 1 [--tcsd-steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from coherendream.cameras import Camera, camera_tensors
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
    cams = Camera.ring(views, 15.0, 2.5, 40.0, resolution)
    vm, ks = camera_tensors(cams)
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


# ------------------------------------------------------------------------------------------------
# TCSD steps
# ------------------------------------------------------------------------------------------------


def _tcsd_parts(tmp: str, num_gaussians: int, resolution: int, views: int):
    """Tiny critic, tiny prior and the seeded Gaussians of a two-object layout (as ``generate`` builds them)."""
    from coherendream.critic.model import Critic
    from coherendream.critic.tiny import build_tiny_critic
    from coherendream.generation.gaussians import GaussianModel
    from coherendream.generation.guidance import SDSConfig, SDSGuidance
    from coherendream.generation.layout import colors_from_prompts, sample_points_in_layout
    from coherendream.generation.layout_rules import RuleBasedPlanner
    from coherendream.generation.tiny_prior import build_tiny_prior

    critic = Critic.from_pretrained(build_tiny_critic(f"{tmp}/critic"), device="cpu")
    guidance = SDSGuidance.from_pretrained(build_tiny_prior(f"{tmp}/prior"), SDSConfig(local_files_only=True), device="cpu")
    layout = RuleBasedPlanner().plan(PROMPT).layout
    points, ids = sample_points_in_layout(layout, num_gaussians, torch.Generator().manual_seed(0))
    model = GaussianModel.from_points(points, colors_from_prompts(layout)[ids], scale=0.02, opacity=0.1, object_ids=ids)
    return critic, guidance, model


PROMPT = "a red cube to the left of a blue sphere"


def _make_step(model, guidance, critic, mode: str, resolution: int, views: int, x0: bool = False) -> Callable[[], None]:
    """One ``generate`` loop iteration on a private copy of ``model`` (its own Adam and generator)."""
    from coherendream.generation.camera_sampler import OrbitCameraSampler
    from coherendream.generation.gaussians import GaussianModel
    from coherendream.generation.runner import LearningRates, build_optimizer
    from coherendream.generation.tcsd import CriticTerm, CriticTermConfig, RewardWeightedConfig, reward_weighted_sds, tcsd_step

    model = GaussianModel.from_state_dict(model.state_dict())
    optimizer = build_optimizer(model, LearningRates())
    sampler = OrbitCameraSampler(views, resolution)
    generator = torch.Generator().manual_seed(0)
    term = CriticTerm(critic, CriticTermConfig(x0_straight_through=x0)) if mode == "tcsd" else None
    background = torch.ones(3)
    counter = [0]

    def step() -> None:
        cams = sampler.sample(generator)
        rgb = model.render(cams.viewmats, cams.Ks, resolution, resolution, backgrounds=background, backend="torch").rgb.permute(0, 3, 1, 2)
        prompts = guidance.prompts_for_views(PROMPT, cams.azimuths.tolist(), cams.elevations.tolist()) if guidance is not None else None
        if mode == "reward_weighted":
            grad = reward_weighted_sds(rgb, PROMPT, counter[0], guidance, critic, RewardWeightedConfig(num_draws=4), sds_prompts=prompts, generator=generator).grad
        else:
            grad = tcsd_step(rgb, PROMPT, counter[0], guidance=guidance, critic_term=term, sds_prompts=prompts, generator=generator).grad
        if grad is None:  # no loss term at all: the machinery alone (constant image gradient)
            grad = torch.full_like(rgb, 1e-3)
        optimizer.zero_grad(set_to_none=True)
        rgb.backward(grad)
        optimizer.step()
        counter[0] += 1

    return step


def tcsd_rows(args: argparse.Namespace) -> list[Row]:
    import tempfile

    n, r, v = args.gaussians, args.resolution, args.views
    with tempfile.TemporaryDirectory() as tmp:
        critic, guidance, model = _tcsd_parts(tmp, n, r, v)
        setting = f"N={n}, {v}x{r}px, CPU"
        configs = [
            ("prior none, no critic", _make_step(model, None, None, "sds", r, v)),
            ("prior none + critic", _make_step(model, None, critic, "tcsd", r, v)),
            ("tiny prior SDS, no critic", _make_step(model, guidance, None, "sds", r, v)),
            ("tiny prior SDS + critic", _make_step(model, guidance, critic, "tcsd", r, v)),
            ("tiny prior SDS + critic (x0 straight-through)", _make_step(model, guidance, critic, "tcsd", r, v, x0=True)),
            ("tiny prior reward-weighted SDS (K=4)", _make_step(model, guidance, critic, "reward_weighted", r, v)),
        ]
        for _ in range(args.tcsd_warmup):
            for _, fn in configs:
                fn()
        wall: dict[str, list[float]] = {name: [] for name, _ in configs}
        cpu: dict[str, list[float]] = {name: [] for name, _ in configs}
        for _ in range(args.tcsd_steps):
            for name, fn in configs:  # interleaved: one step of each per round
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    rows = {
        name: Row(f"TCSD step: {name}", setting, statistics.median(wall[name]), (min(wall[name]), max(wall[name])), statistics.median(cpu[name]))
        for name, _ in configs
    }
    rows["prior none + critic"].baseline = rows["prior none, no critic"]
    for name in ("tiny prior SDS + critic", "tiny prior SDS + critic (x0 straight-through)", "tiny prior reward-weighted SDS (K=4)"):
        rows[name].baseline = rows["tiny prior SDS, no critic"]
    return list(rows.values())


def tcsd_markdown(rows: list[Row]) -> str:
    """Steps in ms, with the added cost over the matching no-critic step (target: <= +50%)."""
    lines = [
        "| step | setting | median ms (wall) | min-max ms | median CPU ms | added vs no critic (wall, CPU) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        extra = ""
        if row.baseline is not None:
            b = row.baseline
            extra = f"+{100 * (row.seconds / b.seconds - 1):.0f}%, +{100 * (row.cpu_seconds / b.cpu_seconds - 1):.0f}%"
        lines.append(
            f"| {row.name.removeprefix('TCSD step: ')} | {row.setting} | {1e3 * row.seconds:.0f} "
            f"| {1e3 * row.spread[0]:.0f}-{1e3 * row.spread[1]:.0f} | {1e3 * row.cpu_seconds:.0f} | {extra} |"
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
    parser.add_argument("--section", choices=("all", "raster", "tcsd"), default="all")
    parser.add_argument("--tcsd-steps", type=int, default=10, help="timed steps per TCSD configuration")
    parser.add_argument("--tcsd-warmup", type=int, default=2, help="untimed steps per TCSD configuration first")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32\n")
    if args.section in ("all", "raster"):
        print(to_markdown(rasterizer_rows(args)))
    if args.section in ("all", "tcsd"):
        print()
        print(tcsd_markdown(tcsd_rows(args)))


if __name__ == "__main__":
    main()
