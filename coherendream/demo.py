"""``coherendream demo``: the whole toolkit on a CPU in a few minutes, with no downloads.

1. Build a fresh procedural evaluation set (a seed the embedded critic never saw in training) and
   evaluate the critic on it: accuracy per negative type, calibration.
2. Run a slice of the procedural text-to-3D benchmark (``coherendream eval procedural``): the
   first prompt of each category, score distillation from the embedded prior alone (``sds``)
   against the same plus the critic's term (``tcsd``), same seeds, from grey Gaussians, judged
   against real renders of the procedural scenes (no model the generator was optimised against).
3. Write one self-contained HTML report (plus JSON): the critic's figures, the verdicts per
   method, and every prompt's views side by side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from coherendream.io import write_json
from coherendream.output_folder import OutputFolder


@dataclass
class DemoConfig:
    output_dir: str = "outputs/demo"
    critic: str | None = None  # default: the embedded procedural critic
    eval_scenes: int = 96
    eval_seed: int = 777  # not a seed of the embedded critic's training data
    view_resolution: int | None = None  # default: the critic's crop size / 2 (its 2x2 grid)
    prompts_per_category: int = 1
    methods: dict[str, list[str]] = field(default_factory=lambda: {"sds": ["mode=sds"], "tcsd": ["mode=tcsd"]})
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 200
    num_workers: int = 2
    overrides: list[str] = field(default_factory=list)  # extra `generate` overrides, key=value
    overwrite: bool = False  # replace an earlier demo with other settings in output_dir

    def __post_init__(self) -> None:
        # the command-line names: this is what the demo command builds from its options
        for flag, value in (("--eval-scenes", self.eval_scenes), ("--prompts-per-category", self.prompts_per_category), ("--steps", self.steps)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")


def run_demo(config: DemoConfig) -> dict:
    """Run the demo; returns the summary also written to ``summary.json``."""
    from coherendream.config import from_dict, to_dict
    from coherendream.critic.model import Critic, default_critic_path
    from coherendream.data.build import BuildConfig, build_dataset
    from coherendream.eval.critic_eval import CriticEvalConfig, evaluate_critic, per_type_table
    from coherendream.eval.procedural import ProceduralEvalConfig, run_procedural_eval

    critic_path = config.critic or str(default_critic_path())
    settings = {k: v for k, v in to_dict(config).items() if k not in ("output_dir", "num_workers", "overwrite")}
    folder = OutputFolder(config.output_dir, "demo", {**settings, "critic": critic_path}, overwrite=config.overwrite)
    if folder.resuming:
        print(f"resuming in {config.output_dir} (its earlier demo had the same settings)")
    out = folder.take()
    critic = Critic.from_pretrained(critic_path, device="cpu")
    crop = min(critic.image_size)
    view_res = config.view_resolution or max(16, crop // 2)
    orbit = critic.config.orbit()  # evaluation views from the orbit the critic was trained on

    print(f"[1/3] building {config.eval_scenes} procedural evaluation scenes and evaluating the critic on them")
    eval_set = out / "eval-set"
    build_dataset(from_dict(BuildConfig, {
        "output_dir": str(eval_set),
        "source": {"kind": "procedural", "num_scenes": config.eval_scenes},
        "render": {"resolution": view_res, "orbit": to_dict(orbit)},
        "splits": {"test": 1.0},
        "seed": config.eval_seed,
        "num_workers": config.num_workers,
    }))
    metrics = evaluate_critic(critic, CriticEvalConfig(eval_set, out / "critic-eval", split="test"))

    print(f"[2/3] generating the first {config.prompts_per_category} prompt(s) of each benchmark category with {', '.join(config.methods)}")
    bench = ProceduralEvalConfig(
        output_dir=str(out / "benchmark"), methods=config.methods, seeds=list(config.seeds), limit=config.prompts_per_category,
        overrides=[f"steps={config.steps}", f"critic.path={critic_path}", "device=cpu", *config.overrides], bootstrap=0,
        num_shards=1, shard_index=0,
    )  # fmt: skip
    workers = max(1, min(config.num_workers, len(bench.methods) * len(bench.seeds)))
    if workers > 1:
        # One process of one thread per core: the demo ran 1.4x faster so than in one process of two
        # threads (docs/benchmarks.md). The shards write one folder; the last to finish merges.
        import multiprocessing as mp

        shards = [dataclasses.replace(bench, num_shards=workers, shard_index=i) for i in range(workers)]
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(run_procedural_eval, shards)
    status = run_procedural_eval(bench)  # every job done: this only reads and merges them
    rows = status["rows"]

    print("[3/3] writing the report")
    summary = {
        "critic": critic_path,
        "eval_set": str(eval_set),
        "critic_accuracy": metrics["overall"]["accuracy"],
        "critic_per_type": {row["negative type"]: row["accuracy"] for row in per_type_table(metrics)},
        "methods": list(config.methods),
        "generation": [{k: r.get(k) for k in ("method", "prompt_id", "category", "seed", "prompt", "object_color", "color_present",
                                               "placement", "swapped", "critic_prob_yes", "output_dir")} for r in rows],
        "benchmark": str(out / "benchmark"),
    }  # fmt: skip
    write_json(out / "summary.json", summary)
    _report(summary, metrics, rows, bench, out / "report.html")
    summary["report"] = str(out / "report.html")
    return summary


def _report(summary: dict, metrics: dict, rows: list[dict], bench: object, path: Path) -> None:
    from coherendream.eval.critic_eval import METRICS_EXPLAINED, per_type_table
    from coherendream.eval.procedural import add_side_by_side
    from coherendream.eval.procedural_prompts import read_prompt_set
    from coherendream.eval.report import Report, reliability_diagram

    report = Report("CoherenDream demo")
    report.add_text(f"Critic: {summary['critic']}. Everything below ran on this machine's CPU with no downloads.")
    report.add_heading("1. The critic on fresh procedural scenes")
    o = metrics["overall"]
    report.add_table([{"rows": metrics["scored"], "accuracy": o["accuracy"], "ROC-AUC": o["roc_auc"], "ECE": o["ece"], "pairwise accuracy": o["pairwise_accuracy"]}])
    report.add_table(per_type_table(metrics))
    report.add_text(METRICS_EXPLAINED)
    report.add_image(reliability_diagram(o["calibration"]), caption="Reliability of P(yes)", width=360)
    report.add_heading("2. Text to 3D from grey Gaussians: score distillation with and without the critic")
    steps = next((o.split("=", 1)[1] for o in reversed(getattr(bench, "overrides", [])) if o.startswith("steps=")), "?")
    report.add_text(f"{steps} optimisation steps per generation, seeds {', '.join(map(str, sorted({r['seed'] for r in rows})))}. "
                    "Verdicts from the renders, judged against real renders of the procedural scenes: each object's colour "
                    "(the share of objects in their own colour), whether the colours stand in the relation's order, "
                    "and the critic's own P(yes). The full benchmark: coherendream eval procedural.")  # fmt: skip
    report.add_table([{"prompt": r["prompt"], "method": r["method"], "seed": r["seed"], "object colour": r["object_color"],
                       "colours in order": r.get("placement"), "critic P(yes)": r["critic_prob_yes"]} for r in rows])  # fmt: skip
    ids = {r["prompt_id"] for r in rows}
    specs = [s for s in read_prompt_set(getattr(bench, "prompts", None)) if s.id in ids]
    add_side_by_side(report, rows, specs, summary["methods"], rows[0]["seed"] if rows else 0)
    report.write(path)
