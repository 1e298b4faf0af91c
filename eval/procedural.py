"""``coherendream eval procedural``: score distillation against TCSD on prompts with exact answers.

For each prompt of the versioned procedural set (``procedural_prompts_v1.jsonl``) x method x
seed, ``generate`` runs (or its finished output is reused), and the result is judged without a
model: its renders at the critic's orbit go to :class:`~coherendream.eval.image_judge.ImageJudge`,
calibrated on real renders of the same scenes (so no method is scored by a model it was optimised
against); the critic's P(yes) is recorded beside it.

- **single / count**: the object's colour (majority over the four views), the number of objects
  (separate parts of the front view; groups of up to three, as many as the judge tells apart on
  real renders) and, for single objects, its shape;
- **relation / two_groups** (front view): each object's colour, strictly: the foreground is cut
  along the relation's axis where the groups' counts put the boundary and each group's colour
  must be the majority of its own part (left of, right of, on top of, next to; not decidable
  from the front for in front of / behind, which count in ``color_present`` only); whether each
  group's colour is present at all; whether the two colours stand in the relation's order
  (left/right, top); and whether they are swapped.

Methods are named lists of ``generate`` overrides on one base config (default: the four of
:data:`DEFAULT_METHODS`); every method starts from grey Gaussians (``init.colors=gray``), so the
colours are the guidance's work.

Jobs are split over processes like every batch job of the toolkit (``coherendream.shards``:
``--num-shards/--shard-index``, torchrun's ``RANK``/``WORLD_SIZE`` or a SLURM array); each finished
job leaves ``jobs/<id>.json``, a re-run skips finished jobs (and a half-finished generation resumes
from its checkpoint), and the process that finds every job done writes the merged results:
``results.csv`` / ``results.json`` (one row per job), ``summary.json`` and ``categories.csv``
(method x category with bootstrap intervals over prompts and seeds, and the paired difference of
every method against ``sds``), and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coherendream.cameras import OrbitSpec
from coherendream.eval.procedural_prompts import CATEGORIES, PromptSpec, read_prompt_set
from coherendream.eval.protocol import num_shards_field, output_field, output_folder, overwrite_field, shard_index_field
from coherendream.io import write_json, write_results
from coherendream.shards import resolve_shard, run_jobs

__all__ = ["DEFAULT_METHODS", "ProceduralEvalConfig", "run_procedural_eval", "judge_generation", "summarise", "add_side_by_side"]

DEFAULT_METHODS: dict[str, list[str]] = {
    "sds": ["mode=sds"],
    "tcsd": ["mode=tcsd"],
    "reward_weighted": ["mode=reward_weighted"],
    "tcsd_no_layout": ["mode=tcsd", "layout.planner=none"],
}
# Every method: colours from the guidance alone, no turntable, no progress bars in logs.
BENCH_OVERRIDES = ["init.colors=gray", "outputs.turntable_frames=0", "progress=false"]
_REPO_PRESET = Path(__file__).resolve().parents[1] / "configs" / "generate" / "cpu_tiny.yaml"
METRICS = ("object_color", "color_present", "shape", "count", "placement", "swapped", "critic_prob_yes")


@dataclass
class ProceduralEvalConfig:
    """Settings of the procedural benchmark; each field but ``methods`` is also a command-line
    option (``methods`` comes from ``--method NAME[:key=value,...]``)."""

    output_dir: str = output_field("generations, jobs/, results, report.html; re-running resumes")
    prompts: str | None = field(default=None, metadata={"help": "prompt set JSONL (default: the versioned procedural set)"})
    generate_config: str | None = field(default=None, metadata={"help": "base `generate` YAML (default: configs/generate/cpu_tiny.yaml)"})
    methods: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_METHODS.items()}, metadata={"cli": False})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "generation seed (repeat)", "flags": ("--seed",)})
    overrides: list[str] = field(default_factory=list, metadata={"help": "`generate` overrides for every method, after its own, key=value", "argument": True})
    limit: int | None = field(default=None, metadata={"help": "only the first N prompts of each category (smoke runs)"})
    judge_resolution: int = field(default=32, metadata={"help": "render size of the views the ground-truth judge reads"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the confidence intervals"})
    num_shards: int | None = num_shards_field()
    shard_index: int | None = shard_index_field()
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods: give at least one method")
        bad = [m for m in self.methods if not m or not all(c.isalnum() or c == "_" for c in m)]
        if bad:
            raise ValueError(f"methods: names must be letters, digits and '_': {bad}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


def _job_id(method: str, spec: PromptSpec, seed: int) -> str:
    return f"{method}__{spec.id}__s{seed}"


def _select(specs: list[PromptSpec], limit: int | None) -> list[PromptSpec]:
    if limit is None:
        return specs
    out, seen = [], {c: 0 for c in CATEGORIES}
    for s in specs:
        if seen[s.category] < limit:
            out.append(s)
            seen[s.category] += 1
    return out


# --------------------------------------------------------------------------------------------
# Judging one generation
# --------------------------------------------------------------------------------------------


def judge_generation(model: Any, spec: PromptSpec, judge: Any, orbit: OrbitSpec | None = None) -> dict[str, Any]:
    """Ground-truth verdicts of a ``GaussianModel`` for ``spec`` from its renders (see the module
    docstring) at ``orbit``'s elevation, distance and FoV (default: the design's orbit); the judge
    always looks from azimuths 0/90/180/270 (front, right, back, left)."""
    import torch

    from coherendream.eval.image_judge import COUNT_MAX
    from coherendream.generation.runner import render_views

    orbit = dataclasses.replace(orbit or OrbitSpec(), azimuths=[0.0, 90.0, 180.0, 270.0], random_views=0)
    white = torch.ones(3, device=model.means.device)
    views = render_views(model, orbit, judge.resolution, white, "auto").cpu()
    groups = spec.caption.groups
    out: dict[str, Any] = {"object_color": None, "color_present": None, "shape": None, "count": None, "placement": None, "swapped": None}
    if len(groups) == 1:
        verdicts = [judge.judge_single(v) for v in views]
        color = _majority([v.color for v in verdicts])
        out["color"] = color
        out["object_color"] = out["color_present"] = float(color == groups[0].color)
        out["count_seen"] = verdicts[0].count  # the front view, where the layout puts a group side by side
        if groups[0].count <= COUNT_MAX:  # more objects than the judge can tell apart: not judged
            out["count"] = float(verdicts[0].count == groups[0].count)
        if groups[0].count == 1:
            shape = _majority([v.shape for v in verdicts])
            out["shape_seen"] = shape
            out["shape"] = float(shape == groups[0].shape)
    else:
        v = judge.judge_relation(views[0], spec.caption)
        out["colors_present"] = list(v.colors_present)
        out["color_present"] = float(np.mean(v.colors_present))
        out["object_colors"] = None if v.object_colors is None else list(v.object_colors)
        out["object_color"] = None if v.object_colors is None else float(np.mean(v.object_colors))
        out["placement"] = None if v.placement_ok is None else float(v.placement_ok)
        out["swapped"] = None if v.swapped is None else float(v.swapped)
    return out


def _majority(values: list[str | None]) -> str | None:
    """The most common value (ties: the first seen, i.e. the earliest view), None if there is none."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _interval(values: np.ndarray, n_boot: int, seed: int) -> tuple[float | None, float | None]:
    """95% percentile bootstrap interval of the mean (None for fewer than two values)."""
    if len(values) < 2 or n_boot < 1:
        return None, None
    from scipy.stats import bootstrap

    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    res = bootstrap((values,), np.mean, n_resamples=n_boot, method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarise(rows: list[dict[str, Any]], n_boot: int = 2000, baseline: str = "sds") -> dict[str, Any]:
    """Method x category means with bootstrap intervals over (prompt, seed), and each method's
    paired difference from ``baseline`` on the same (prompt, seed)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cats = [*CATEGORIES, "multi_object", "all"]
    in_cat = {
        **{c: (lambda r, c=c: r["category"] == c) for c in CATEGORIES},
        "multi_object": lambda r: r["category"] in ("relation", "two_groups"),
        "all": lambda r: True,
    }
    table: list[dict[str, Any]] = []
    for method in methods:
        for cat in cats:
            sel = [r for r in rows if r["method"] == method and in_cat[cat](r)]
            if not sel:
                continue
            entry: dict[str, Any] = {"method": method, "category": cat, "jobs": len(sel)}
            for k, metric in enumerate(METRICS):
                vals = np.array([r[metric] for r in sel if r.get(metric) is not None], dtype=float)
                entry[metric] = float(vals.mean()) if len(vals) else None
                entry[f"{metric}_ci"] = list(_interval(vals, n_boot, seed=k)) if len(vals) else None
            if baseline in methods and method != baseline:
                base = {(r["prompt_id"], r["seed"]): r for r in rows if r["method"] == baseline}
                diffs = [r["object_color"] - base[(r["prompt_id"], r["seed"])]["object_color"] for r in sel
                         if (r["prompt_id"], r["seed"]) in base and r["object_color"] is not None
                         and base[(r["prompt_id"], r["seed"])]["object_color"] is not None]  # fmt: skip
                d = np.array(diffs, dtype=float)
                entry[f"object_color_minus_{baseline}"] = float(d.mean()) if len(d) else None
                entry[f"object_color_minus_{baseline}_ci"] = list(_interval(d, n_boot, seed=99)) if len(d) else None
            table.append(entry)
    return {"methods": methods, "table": table}


def _fmt(x: Any) -> str:
    return "" if x is None else f"{x:.3f}"


def _write_results(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], specs: list[PromptSpec], config: ProceduralEvalConfig) -> None:
    from coherendream.eval.report import Report

    keys = ["method", "prompt_id", "category", "seed", "prompt", *METRICS, "color", "shape_seen", "count_seen", "colors_present", "object_colors", "steps", "seconds", "output_dir"]
    write_results(rows, out / "results", columns=keys)
    write_json(out / "summary.json", {**summary, "config": dataclasses.asdict(config), "jobs": len(rows)})
    flat = []
    for e in summary["table"]:
        row = {"method": e["method"], "category": e["category"], "jobs": e["jobs"]}
        for m in METRICS:
            row[m] = _fmt(e[m])
            ci = e.get(f"{m}_ci")
            row[f"{m} 95% CI"] = "" if not ci or ci[0] is None else f"{ci[0]:.3f}-{ci[1]:.3f}"
        if "object_color_minus_sds" in e:
            ci = e.get("object_color_minus_sds_ci")
            row["object colour minus sds"] = _fmt(e["object_color_minus_sds"])
            row["minus sds 95% CI"] = "" if not ci or ci[0] is None else f"{ci[0]:.3f}-{ci[1]:.3f}"
        flat.append(row)
    write_results(flat, out / "categories", formats=("csv",))

    report = Report("Procedural text-to-3D benchmark")
    steps = sorted({r.get("steps") for r in rows if r.get("steps") is not None})
    report.add_text(f"{len(specs)} prompts x {len(summary['methods'])} methods x {len(config.seeds)} seeds "
                    f"({', '.join(map(str, config.seeds))}), {'/'.join(map(str, steps)) or '?'} optimisation steps per generation. "
                    "Verdicts from renders judged against real renders of the procedural scenes; the critic's P(yes) beside them. "
                    + " ".join(f"{m}: prior {v['prior']}, critic {v['critic']}." for m, v in summary.get("models", {}).items()))  # fmt: skip
    report.add_text("object_color: share of the prompt's objects drawn in their own colour (each in its part of the "
                    "frame along the relation's axis). color_present: share of the prompt's colours seen anywhere. shape, "
                    "count: single objects' shape and counted groups' count read right. placement: two-group scenes whose "
                    "colours stand in the relation's order. swapped: two-group scenes with the two colours exchanged. "
                    "critic_prob_yes: the critic's own P(yes) of the final views (not a ground truth). Intervals: 95% "
                    "bootstrap over prompts; minus sds: the paired difference against SDS alone on the same prompts and seeds.")  # fmt: skip
    report.add_heading("Method x category")
    report.add_table([{k: v for k, v in r.items() if "CI" not in k or "minus" in k} for r in flat])
    report.add_heading("Per prompt (front, side, back, side views of each method, first seed)")
    add_side_by_side(report, rows, specs, summary["methods"], config.seeds[0])
    report.write(out / "report.html")


def add_side_by_side(report: Any, rows: list[dict[str, Any]], specs: list[PromptSpec], methods: list[str], seed: int) -> None:
    """Per prompt: every method's four views side by side, each captioned with its ground-truth
    verdicts (object colour, colours in order) and the critic's P(yes)."""
    by_key = {(r["method"], r["prompt_id"], r["seed"]): r for r in rows}
    for spec in specs:
        images, captions = [], []
        for method in methods:
            r = by_key.get((method, spec.id, seed))
            grid = Path(r["output_dir"]) / "views" / "grid.png" if r else None
            if grid is not None and grid.is_file():
                images.append(grid.read_bytes())
                verdict = f"colour {_fmt(r['object_color'] if r['object_color'] is not None else r['color_present'])}" + (
                    f", order {_fmt(r['placement'])}" if r.get("placement") is not None else "")
                captions.append(f"{method}: {verdict}, P(yes) {_fmt(r['critic_prob_yes'])}")
        if images:
            report.add_heading(f"{spec.id}: {spec.prompt}", level=3)
            report.add_images(images, captions, cols=len(images), width=160)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_procedural_eval(config: ProceduralEvalConfig, *, generate_fn: Any = None) -> dict[str, Any]:
    """Run this process's share of the jobs; merge when every job is done. Returns a summary of
    what this call did (``done``, ``skipped``, ``merged``), with the merged summary when merged."""
    from coherendream.config import load_config, override
    from coherendream.eval.image_judge import ImageJudge
    from coherendream.generation.runner import GenerateConfig, generate, load_parts

    generate_fn = generate_fn or generate
    specs = _select(read_prompt_set(config.prompts), config.limit)
    base = config.generate_config or (str(_REPO_PRESET) if _REPO_PRESET.is_file() else None)
    if base is None:
        raise ValueError("generate_config: give a base `generate` YAML (configs/generate/cpu_tiny.yaml is not beside this install)")
    num_shards, shard_index = resolve_shard(config.num_shards, config.shard_index)
    jobs = [(m, s, seed) for s in specs for m in config.methods for seed in config.seeds]
    # Every job's config is built (and so checked) before any work is written.
    configs = {
        _job_id(m, s, seed): load_config(GenerateConfig, base, [
            *BENCH_OVERRIDES, *config.methods[m], *config.overrides, override("prompt", s.prompt), f"seed={seed}",
            f"output_dir={Path(config.output_dir) / 'generations' / m / s.id / f's{seed}'}",
        ])
        for m, s, seed in jobs
    }  # fmt: skip
    out = output_folder(config, "procedural").take()
    judge = None  # calibrated on real renders (seconds), only in a process that has a job to run
    parts: dict[str, Any] = {}  # loaded critics and priors, shared by this process's jobs

    def run_one(job: tuple[str, PromptSpec, int]) -> dict[str, Any]:
        nonlocal judge
        method, spec, seed = job
        judge = judge or ImageJudge(resolution=config.judge_resolution)
        cfg = configs[_job_id(method, spec, seed)]
        t0 = time.perf_counter()
        # the critic scores SDS runs too (critic_prob_yes); each part loads once per process
        result = generate_fn(cfg, **load_parts(cfg, cache=parts))
        verdict = judge_generation(result.model, spec, judge, cfg.outputs.orbit)
        return {
            "method": method, "prompt_id": spec.id, "category": spec.category, "seed": seed, "prompt": spec.prompt,
            **verdict, "critic_prob_yes": (result.final_critic or {}).get("prob_yes"), "steps": cfg.steps,
            "seconds": round(time.perf_counter() - t0, 2), "output_dir": str(cfg.output_dir),
        }  # fmt: skip

    run = run_jobs(jobs, lambda job: _job_id(*job), run_one, out / "jobs", num_shards, shard_index)
    status: dict[str, Any] = {"jobs": len(jobs), "this_shard": run.mine, "done": run.done, "skipped": run.skipped, "merged": False}
    if run.merged:
        rows = list(run.records.values())
        summary = summarise(rows, config.bootstrap)
        per_method: dict[str, Any] = {}  # each method's first generate config (configs is in job order)
        for (method, _, _), cfg in zip(jobs, configs.values()):
            per_method.setdefault(method, cfg)
        summary["models"] = {m: {"prior": (cfg.prior.pretrained_model_name_or_path or "the embedded prior") if cfg.prior else "none",
                                 "critic": cfg.critic.path or "the embedded critic"} for m, cfg in per_method.items()}  # fmt: skip
        _write_results(out, rows, summary, specs, config)
        status.update(merged=True, summary=summary, rows=rows)
    return status
