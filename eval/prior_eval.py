"""What a text-to-image prior knows of procedural prompts, measured on its samples.

``evaluate_prior(config)`` samples the prior and judges each sample with
:class:`~coherendream.eval.image_judge.ImageJudge` (calibrated on real renders; its own accuracy on
fresh renders is measured in the same run and reported beside the prior's figures):

- **single objects**: every colour x shape prompt ("a red cube"), ``samples_per_prompt`` samples
  each; colour and shape accuracy, split into prompts seen in training and held out (the prior
  folder's ``training.json`` lists the held-out captions);
- **two groups** ("a red cube to the left of two blue spheres, front view"): prompts with two
  different colours in a relation visible from the front (left of, right of, on top of), drawn from
  ``prompt_seed`` and never seen in training (the folder's ``training_captions.txt``); per object,
  whether its colour is present, and per prompt whether the two colours sit in the relation's
  order or are **swapped**, i.e. the prior gave each object the other's colour.

Outputs in ``output_dir``: ``metrics.json``, ``samples.csv`` (one row per sample),
``single.png`` (one sample per colour x shape) and ``relation.png``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coherendream.eval.protocol import output_field, output_folder, overwrite_field
from coherendream.io import atomic_open, atomic_path, write_json
from coherendream.vocabulary import PALETTE, RELATIONS, SHAPES, Group, SceneCaption

__all__ = ["PriorEvalConfig", "evaluate_prior", "single_prompts", "relation_prompts"]

_FRONT_RELATIONS = ("left_of", "right_of", "on_top_of")


@dataclass
class PriorEvalConfig:
    """Settings of ``coherendream eval prior``; each field is also a command-line option."""

    output_dir: str = output_field("metrics.json, samples.csv, sample grids")
    prior: str | None = field(default=None, metadata={"help": "prior: diffusers pipeline folder or hub id (default: the embedded prior)", "deprecated_flags": ("--model",)})
    samples_per_prompt: int = field(default=8, metadata={"help": "samples of each single-object prompt"})
    relation_prompts: int = field(default=40, metadata={"help": "two-group prompts (never seen in training)"})
    samples_per_relation_prompt: int = field(default=4, metadata={"help": "samples of each two-group prompt"})
    num_inference_steps: int = field(default=50, metadata={"help": "DDIM steps", "flags": ("--steps",)})
    guidance_scale: float = field(default=5.0, metadata={"help": "classifier-free guidance scale"})
    seed: int = field(default=4242, metadata={"help": "seed of the sampling noise"})
    prompt_seed: int = field(default=310_000, metadata={"help": "seed of the procedural draw of the two-group prompts"})
    batch_size: int = field(default=100, metadata={"help": "images per sampling batch"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.relation_prompts < 0 or self.samples_per_relation_prompt < 1:
            raise ValueError("relation_prompts must be >= 0 and samples_per_relation_prompt >= 1")


def single_prompts() -> list[SceneCaption]:
    """Every colour x shape single object, colours outer."""
    return [SceneCaption((Group(shape, color, 1),)) for color in PALETTE for shape in SHAPES]


def relation_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[SceneCaption]:
    """``n`` distinct two-group captions with two colours in a front-visible relation, none in ``exclude``."""
    from coherendream.data.procedural import sample_scene  # the mesh stack loads only when prompts are drawn

    out: dict[str, SceneCaption] = {}
    s = seed
    while len(out) < n:
        cap = sample_scene(s).caption
        s += 1
        if cap.relation in _FRONT_RELATIONS and cap.groups[0].color != cap.groups[1].color and cap.text() not in exclude:
            out.setdefault(cap.text(), cap)
        if s - seed > 200 * max(n, 1):
            raise RuntimeError("could not draw enough unseen two-group prompts")
    return list(out.values())


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _read_training_info(path: str | None) -> tuple[set[str], set[str]]:
    """Held-out single captions and all training captions recorded in a local prior folder."""
    if path is None:
        from coherendream.generation.pixel_prior import default_prior_path

        path = str(default_prior_path())
    folder = Path(path)
    holdout, seen = set(), set()
    if (folder / "training.json").is_file():
        holdout = set(json.loads((folder / "training.json").read_text(encoding="utf-8")).get("holdout_captions", []))
    if (folder / "training_captions.txt").is_file():
        seen = set((folder / "training_captions.txt").read_text(encoding="utf-8").splitlines())
    return holdout, seen


def evaluate_prior(config: PriorEvalConfig) -> dict[str, Any]:
    """Sample, judge and write the outputs; returns the metrics (see the module docstring)."""
    import torch

    from coherendream.eval.image_judge import ImageJudge
    from coherendream.generation.pixel_prior import image_grid, load_prior_pipeline, sample_images

    t0 = time.perf_counter()
    folder = output_folder(config, "prior")  # before loading: a folder this run may not write is refused now
    pipe = load_prior_pipeline(config.prior, device=config.device)  # fails before anything is written
    out = folder.take()
    holdout, seen = _read_training_info(config.prior)
    judge = ImageJudge(resolution=32)

    singles = single_prompts()
    k = config.samples_per_prompt
    prompts = [c.text() for c in singles for _ in range(k)]
    relations = relation_prompts(config.relation_prompts, config.prompt_seed, seen) if config.relation_prompts else []
    kr = config.samples_per_relation_prompt
    rel_prompts = [f"{c.text()}, front view" for c in relations for _ in range(kr)]
    images = sample_images(pipe, prompts + rel_prompts, config.num_inference_steps, config.guidance_scale, config.seed, config.batch_size)

    rows: list[dict[str, Any]] = []
    for i, cap in enumerate(c for c in singles for _ in range(k)):
        v = judge.judge_single(images[i])
        g = cap.groups[0]
        rows.append({"kind": "single", "prompt": prompts[i], "held_out": cap.text() in holdout, "sample": i % k,
                     "expected_color": g.color, "color": v.color, "color_ok": v.color == g.color,
                     "expected_shape": g.shape, "shape": v.shape, "shape_ok": v.shape == g.shape, "foreground": round(v.foreground, 3)})  # fmt: skip
    for j, cap in enumerate(c for c in relations for _ in range(kr)):
        v = judge.judge_relation(images[len(prompts) + j], cap)
        rows.append({"kind": "relation", "prompt": rel_prompts[j], "relation": cap.relation, "sample": j % kr,
                     "colors": [g.color for g in cap.groups], "color_present": list(v.colors_present),
                     "placement_ok": v.placement_ok, "swapped": v.swapped})  # fmt: skip

    single_rows = [r for r in rows if r["kind"] == "single"]
    rel_rows = [r for r in rows if r["kind"] == "relation"]

    def single_block(rs: list[dict]) -> dict[str, Any]:
        return {"samples": len(rs), "prompts": len({r["prompt"] for r in rs}), "color": _mean([r["color_ok"] for r in rs]), "shape": _mean([r["shape_ok"] for r in rs])}

    per_color = {c: _mean([r["color_ok"] for r in single_rows if r["expected_color"] == c]) for c in PALETTE}
    per_shape = {s: _mean([r["shape_ok"] for r in single_rows if r["expected_shape"] == s]) for s in SHAPES}
    both = [r for r in rel_rows if all(r["color_present"])]
    judge_acc = judge.accuracy_on_renders(singles, relations or relation_prompts(20, config.prompt_seed))
    metrics = {
        "model": config.prior or "embedded",
        "sampling": {"scheduler": "DDIM", "num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale,
                     "seed": config.seed, "prompt_seed": config.prompt_seed},  # fmt: skip
        "single": {
            "all": single_block(single_rows),
            "seen": single_block([r for r in single_rows if not r["held_out"]]),
            "held_out": single_block([r for r in single_rows if r["held_out"]]),
            "color_by_color": per_color,
            "shape_by_shape": per_shape,
        },
        "relation": {
            "samples": len(rel_rows),
            "prompts": len(relations),
            "prompts_seen_in_training": sum(c.text() in seen for c in relations),
            "object_color_present": _mean([p for r in rel_rows for p in r["color_present"]]),
            "both_colors_present": _mean([all(r["color_present"]) for r in rel_rows]),
            "placement_ok": _mean([r["placement_ok"] for r in rel_rows]),
            "swapped_given_both_present": _mean([r["swapped"] for r in both]),
            "by_relation": {rel: _mean([r["placement_ok"] for r in rel_rows if r["relation"] == rel]) for rel in _FRONT_RELATIONS},
        },
        "judge_on_real_renders": judge_acc,
        "relation_words": {k: RELATIONS[k] for k in _FRONT_RELATIONS},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "metrics.json", metrics)
    with atomic_open(out / "samples.csv") as f:
        keys = sorted({key for r in rows for key in r})
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    first = torch.stack([images[i * k] for i in range(len(singles))])
    with atomic_path(out / "single.png") as tmp:
        image_grid(first, rows=len(PALETTE), labels=list(PALETTE)).save(tmp, format="PNG")
    if relations:
        shown = min(len(relations), 12)
        rel_imgs = images[len(prompts) : len(prompts) + shown * kr]
        with atomic_path(out / "relation.png") as tmp:
            image_grid(rel_imgs, rows=shown, labels=[c.text() for c in relations[:shown]]).save(tmp, format="PNG")
    return metrics
