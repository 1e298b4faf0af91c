"""``coherendream eval steering``: does a critic's gradient steer an asset toward its caption?

TCSD adds a critic's gradient to score distillation; that only helps if the gradient moves the
asset toward what the caption says, not merely toward a higher P(yes). This benchmark measures it
directly, without a prior, in minutes:

1. Two-group procedural scenes from a fresh seed ("two red cubes to the left of a blue sphere";
   left of, right of, on top of: decidable from the front), each object's Gaussians on the surface
   of its true shape at its true place, in the frame the critic's training renders use.
2. The colours start wrong: ``gray`` (every object grey) or ``swapped`` (each group in the other
   group's colour: the binding failure the prior makes).
3. Only the Gaussians' colours are optimised (Adam on their logits), by the critic's gradient of
   ``-log P(yes)`` for the true caption alone, from the critic's own orbit jittered as TCSD does;
   ``term`` chooses what the critic scores: the whole scene, each group framed alone against its
   own caption (TCSD's per-object term), or both.
4. The ground truth then reads each object's colour (its Gaussians rendered alone, the mean
   visible colour's nearest palette colour, ``coherendream.eval.ground_truth``).

Per start: the share of objects in their own colour before and after, the share of scenes with
every object right, the share of swapped scenes still swapped, the critic's final P(yes) (from its
orbit, no jitter), and the **hacked** share: P(yes) above ``hacked_threshold`` while the ground
truth says some object is wrong. A critic whose gradient steers fixes colours; one whose gradient
is adversarial reaches P(yes) near 1 with the colours barely moved.

Outputs in ``output_dir``: ``results.{json,csv}`` (one row per scene and start), ``summary.json``,
``report.html`` (before/after views of the first scenes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coherendream.eval.protocol import check_common, output_field, output_folder, overwrite_field, progress_field

__all__ = ["SteeringEvalConfig", "STARTS", "steering_scenes", "steer_scene", "run_steering_eval"]

STARTS = ("gray", "swapped")
# Relations a front view decides (in front of / behind are not); on top of stacks one on one.
FRONT_RELATIONS = ("left_of", "right_of", "on_top_of")


@dataclass
class SteeringEvalConfig:
    """Settings of ``eval steering``; each field is also a command-line option."""

    output_dir: Path = output_field("results.{json,csv}, summary.json, report.html")
    scenes: int = field(default=16, metadata={"help": "two-group scenes (each run from every start)"})
    seed: int = field(default=20_261_207, metadata={"help": "seed of the scenes' draw (not one of the critic's training seeds)"})
    starts: list[str] = field(default_factory=lambda: list(STARTS), metadata={"help": "wrong colours to start from: gray, swapped"})
    steps: int = field(default=50, metadata={"help": "Adam steps on the colours"})
    lr: float = field(default=0.1, metadata={"help": "Adam learning rate on the colour logits"})
    gaussians_per_object: int = field(default=192, metadata={"help": "Gaussians on each object's surface"})
    resolution: int | None = field(default=None, metadata={"help": "view size in pixels (default: half the critic's crop, its 2x2 grid cell)"})
    azimuth_jitter: float = field(default=10.0, metadata={"help": "degrees the critic's orbit turns by at random each step (TCSD's default)"})
    elevation_jitter: float = field(default=5.0, metadata={"help": "degrees the orbit rises or falls by at random each step"})
    term: str = field(default="scene", metadata={"help": "what the critic scores: scene (the whole scene's views), objects (each group framed "
                                                         "alone against its own caption, TCSD's per-object term) or both"})
    hacked_threshold: float = field(default=0.9, metadata={"help": "P(yes) above which a wrong scene counts as hacked"})
    judge_resolution: int = field(default=64, metadata={"help": "render size of the ground truth's per-object views"})
    report_scenes: int = field(default=4, metadata={"help": "scenes whose before/after views the report shows"})
    progress: bool = progress_field()
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        check_common(self)
        self.starts = [self.starts] if isinstance(self.starts, str) else list(self.starts)
        bad = [s for s in self.starts if s not in STARTS]
        if bad or not self.starts:
            raise ValueError(f"starts: unknown {bad or self.starts} (known: {', '.join(STARTS)})")
        for name in ("scenes", "steps", "gaussians_per_object", "judge_resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.term not in ("scene", "objects", "both"):
            raise ValueError(f"term must be scene, objects or both, got {self.term!r}")


def steering_scenes(count: int, seed: int) -> list[Any]:
    """``count`` two-group procedural scenes whose groups differ in colour (so a swap is visible),
    drawn from ``seed`` in order: the same list for the same arguments."""
    from coherendream.data.procedural import ProceduralConfig, sample_scene

    config = ProceduralConfig(kind_weights={"relation": 1.0}, relations=list(FRONT_RELATIONS))
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < count:
        scene = sample_scene(int(rng.integers(2**31)), config)
        groups = scene.caption.groups
        if groups[0].color != groups[1].color:
            scenes.append(scene)
    return scenes


def _surface_gaussians(scene: Any, per_object: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points on each object's true surface (the normalised frame of the critic's renders), their
    object index, and a scale of about half the spacing between neighbours."""
    import trimesh

    meshes = [trimesh.Trimesh(p.vertices, p.faces, process=False) for p in scene.to_asset(f"steering-{seed}").parts]
    points, ids = [], []
    for k, mesh in enumerate(meshes):
        pts, _ = trimesh.sample.sample_surface(mesh, per_object, seed=seed + k)
        points.append(torch.as_tensor(np.asarray(pts), dtype=torch.float32))
        ids.append(torch.full((per_object,), k, dtype=torch.long))
    # about half the spacing of points spread evenly over the surfaces: a closed skin, still crisp
    scale = 0.6 * (sum(m.area for m in meshes) / (per_object * len(meshes))) ** 0.5
    return torch.cat(points), torch.cat(ids), torch.tensor(scale)


def scene_groups(scene: Any) -> list[Any]:
    """The scene's two groups as the per-object term frames them (normalised frame, own caption)."""
    from coherendream.generation.tcsd import ObjectGroup
    from coherendream.vocabulary import SceneCaption

    boxes = scene.to_layout()["objects"]
    groups = []
    for gi, group in enumerate(scene.caption.groups):
        members = [k for k, o in enumerate(boxes) if o["group"] == gi]
        groups.append(ObjectGroup.framing(members, SceneCaption((group,)).text(), [(boxes[k]["center"], boxes[k]["size"]) for k in members]))
    return groups


def start_colors(scene: Any, start: str) -> list[str | None]:
    """The colour name each object starts in (None: grey)."""
    if start == "gray":
        return [None] * len(scene.objects)
    colors = [g.color for g in scene.caption.groups]
    return [colors[1 - o.group] for o in scene.objects]


def steer_scene(critic: Any, scene: Any, start: str, config: SteeringEvalConfig, seed: int) -> dict[str, Any]:
    """Optimise one scene's colours from ``start`` by the critic's gradient alone; the row of results."""
    from coherendream.cameras import scorer_orbit
    from coherendream.eval.ground_truth import object_colors
    from coherendream.generation.camera_sampler import sample_jittered_orbit
    from coherendream.generation.gaussians import GaussianModel
    from coherendream.generation.runner import render_views
    from coherendream.generation.tcsd import CriticTermConfig, ObjectCriticTerm, critic_loss
    from coherendream.vocabulary import PALETTE

    t0 = time.perf_counter()
    device = critic.device
    resolution = config.resolution or max(16, min(critic.image_size) // 2)
    orbit = scorer_orbit(critic)
    background = torch.ones(3, device=device)
    points, ids, scale = _surface_gaussians(scene, config.gaussians_per_object, seed)
    rgb = torch.tensor([[0.5, 0.5, 0.5] if c is None else PALETTE[c] for c in start_colors(scene, start)], dtype=torch.float32)[ids]
    model = GaussianModel.from_points(points, rgb.clamp(0.02, 0.98), scale=scale, opacity=0.9, object_ids=ids).to(device)
    model.requires_grad_(False)
    model.colors.requires_grad_(True)
    optimizer = torch.optim.Adam([model.colors], lr=config.lr)
    caption = scene.text
    expected = [o.color for o in scene.objects]

    def verdict() -> dict[str, Any]:
        seen = [o["color"] for o in object_colors(model, len(scene.objects), config.judge_resolution, orbit)]
        with torch.no_grad():
            views = render_views(model, orbit, resolution, background, "torch")
            prob = float(critic.score(views[None], [caption]).prob_yes.float()[0])
        own = [s == e for s, e in zip(seen, expected)]
        swapped = [s == c for s, c in zip(seen, start_colors(scene, "swapped"))]
        return {"colors": seen, "own": float(np.mean(own)), "all_own": all(own), "swapped": all(swapped), "prob_yes": prob, "views": views}

    before = verdict()
    generator = torch.Generator().manual_seed(seed)
    objects = ObjectCriticTerm(critic, CriticTermConfig(), scene_groups(scene)) if config.term != "scene" else None
    for _ in range(config.steps):
        cams = sample_jittered_orbit(orbit, resolution, None, config.azimuth_jitter, config.elevation_jitter, generator, device)
        loss = torch.zeros((), device=device)
        if config.term != "objects":
            views = model.render(cams.viewmats, cams.Ks, resolution, resolution, backgrounds=background, backend="torch").rgb.permute(0, 3, 1, 2)
            loss = loss + critic_loss(critic, views[None], [caption])[0]  # -log P(yes), finite where P(yes) underflows
        if objects is not None:
            framed = objects.render(model, cams.viewmats, cams.Ks, resolution, background, "torch")
            loss = loss + critic_loss(critic, framed, [g.caption for g in objects.groups])[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = verdict()
    hacked = after["prob_yes"] > config.hacked_threshold and not after["all_own"]
    return {
        "scene_seed": scene.seed, "caption": caption, "relation": scene.caption.relation, "start": start, "objects": len(expected),
        "expected_colors": expected, "colors_before": before["colors"], "colors_after": after["colors"],
        "own_before": before["own"], "own_after": after["own"], "all_own_after": after["all_own"],
        "swapped_before": before["swapped"], "swapped_after": after["swapped"],
        "prob_yes_before": before["prob_yes"], "prob_yes_after": after["prob_yes"], "hacked": hacked,
        "mean_color_change": float((model.rgb.detach() - rgb.to(device)).abs().mean()), "seconds": round(time.perf_counter() - t0, 2),
        "_views": (before["views"], after["views"]),
    }  # fmt: skip


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per start: objects in their own colour before and after, scenes all right,
    swapped scenes, P(yes) before and after, the hacked share."""
    table = []
    for start in dict.fromkeys(r["start"] for r in rows):
        sel = [r for r in rows if r["start"] == start]
        mean = lambda key: float(np.mean([float(r[key]) for r in sel]))  # noqa: E731
        table.append({
            "start": start, "scenes": len(sel), "own colour before": mean("own_before"), "own colour after": mean("own_after"),
            "scenes all right after": mean("all_own_after"), "swapped before": mean("swapped_before"), "swapped after": mean("swapped_after"),
            "P(yes) before": mean("prob_yes_before"), "P(yes) after": mean("prob_yes_after"), "hacked": mean("hacked"),
            "mean colour change": mean("mean_color_change"),
        })  # fmt: skip
    return table


def run_steering_eval(critic: Any, config: SteeringEvalConfig) -> dict[str, Any]:
    """Every scene from every start; writes the results, the summary and the report; returns the summary."""
    from tqdm.auto import tqdm

    from coherendream.io import write_json, write_results

    out = output_folder(config, "steering", getattr(critic, "source", None)).take()
    t0 = time.perf_counter()
    scenes = steering_scenes(config.scenes, config.seed)
    jobs = [(i, scene, start) for i, scene in enumerate(scenes) for start in config.starts]
    rows = [steer_scene(critic, scene, start, config, seed=config.seed + i) for i, scene, start in tqdm(jobs, desc="steering", disable=not config.progress)]
    table = summarise(rows)
    summary = {"table": table, "scenes": len(scenes), "steps": config.steps, "lr": config.lr, "seed": config.seed, "term": config.term,
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    plain = [{k: v for k, v in r.items() if k != "_views"} for r in rows]
    write_results(plain, out / "results", formats=("json", "csv"))
    write_json(out / "summary.json", summary)
    _write_report(out / "report.html", summary, rows, config)
    return {**summary, "rows": plain}


def _write_report(path: Path, summary: dict, rows: list[dict], config: SteeringEvalConfig) -> None:
    from coherendream.eval.report import Report

    report = Report("Does the critic's gradient steer?")
    report.add_text(
        f"{summary['scenes']} two-group scenes (seed {config.seed}), their Gaussians on the objects' true surfaces, colours "
        f"starting wrong; {config.steps} Adam steps (lr {config.lr}) on the colours alone by the critic's gradient of "
        f"-log P(yes) for the true caption. own colour: share of objects whose rendered colour is their own (ground truth: "
        f"each object rendered alone, nearest palette colour). swapped: scenes with every object in the other group's colour. "
        f"hacked: P(yes) above {config.hacked_threshold} while some object is wrong. {summary['seconds']} s in all."
    )  # fmt: skip
    report.add_table(summary["table"])
    report.add_heading("Before and after (critic's orbit)")
    for r in rows[: config.report_scenes * len(config.starts)]:
        before, after = r["_views"]
        caption = (f"{r['caption']!r}, start {r['start']}: {', '.join(map(str, r['colors_before']))} -> "
                   f"{', '.join(map(str, r['colors_after']))}; P(yes) {r['prob_yes_before']:.2f} -> {r['prob_yes_after']:.2f}")  # fmt: skip
        grid = torch.cat([torch.cat(list(before), dim=2), torch.cat(list(after), dim=2)], dim=1)  # [3, 2H, V*W]
        report.add_image((grid.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8), caption=caption, width=512)
    report.write(path)
