"""``coherendream demo``: the whole toolkit on a CPU in a few minutes, with no downloads.

1. Build a fresh procedural evaluation set (a seed the embedded critic never saw in training).
2. Evaluate the critic on it: accuracy per negative type, calibration.
3. Generate one multi-object procedural prompt with the layout planner and TCSD (no diffusion
   prior on CPU), starting from grey Gaussians, once with the critic term and once without it
   (same seed), so the critic's feedback is the only thing that can give the objects their colours.
4. Check both results against the prompt without humans: the rendered colour of each layout
   box's Gaussians and the relations between their centroids.
5. Write one self-contained HTML report (plus JSON) of all of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from coherendream.io import write_json


@dataclass
class DemoConfig:
    output_dir: str = "outputs/demo"
    critic: str | None = None  # default: the embedded procedural critic
    eval_scenes: int = 96
    eval_seed: int = 777  # not a seed of the embedded critic's training data
    view_resolution: int | None = None  # default: the critic's crop size / 2 (its 2x2 grid)
    prompt: str = "a red cube to the left of a blue sphere"
    steps: int = 200
    num_gaussians: int = 2048
    render_resolution: int = 64
    critic_weight: float = 1.0
    num_workers: int = 2
    overrides: list[str] = field(default_factory=list)  # extra `generate` overrides, key=value


def run_demo(config: DemoConfig) -> dict:
    """Run the demo; returns the summary also written to ``summary.json``."""
    from coherendream.config import from_dict, load_config, to_dict
    from coherendream.critic.model import Critic, default_critic_path
    from coherendream.data.build import BuildConfig, build_dataset
    from coherendream.eval.critic_eval import evaluate_critic, per_type_table
    from coherendream.eval.ground_truth import check_generation
    from coherendream.generation.layout import Layout
    from coherendream.generation.runner import GenerateConfig, generate

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    critic_path = config.critic or str(default_critic_path())
    critic = Critic.from_pretrained(critic_path, device="cpu")
    crop = min(critic.image_size)
    view_res = config.view_resolution or max(16, crop // 2)

    # Every view the critic sees is taken from the orbit it was trained on (its critic_config.json):
    # the evaluation scenes, the generator's training cameras (distance and FoV within +-0.3 and
    # +-5 of the critic's, as the generator's defaults are around 2.5 and 40) and the final scoring.
    orbit = critic.config.orbit()

    print(f"[1/4] building {config.eval_scenes} procedural evaluation scenes ({view_res} px views, distance {orbit.distance:g})")
    eval_set = out / "eval-set"
    build_dataset(from_dict(BuildConfig, {
        "output_dir": str(eval_set),
        "source": {"kind": "procedural", "num_scenes": config.eval_scenes},
        "render": {"resolution": view_res, "orbit": to_dict(orbit)},
        "splits": {"test": 1.0},
        "seed": config.eval_seed,
        "num_workers": config.num_workers,
    }))

    print("[2/4] evaluating the critic on it")
    metrics = evaluate_critic(critic, eval_set, out / "critic-eval", split="test")

    runs = {}
    for name, weight in (("tcsd", config.critic_weight), ("no-critic", 0.0)):
        print(f"[3/4] generating {config.prompt!r} ({name}, {config.steps} steps)")
        gen = load_config(GenerateConfig, None, [
            f"prompt={json.dumps(config.prompt)}", f"steps={config.steps}", f"num_gaussians={config.num_gaussians}",
            f"resolution={config.render_resolution}", "mode=tcsd", "prior=none", "init.colors=gray",
            f"critic.path={critic_path}", f"tcsd.critic.weight={weight}", f"output_dir={out / name}",
            "device=cpu", "backend=torch", "checkpoint_every=1000000",
            f"cameras.distance_range=[{orbit.distance - 0.3:g},{orbit.distance + 0.3:g}]", f"cameras.fov_range=[{orbit.fov_y - 5:g},{orbit.fov_y + 5:g}]",
            f"outputs.elevation={orbit.elevation:g}", f"outputs.distance={orbit.distance:g}", f"outputs.fov={orbit.fov_y:g}",
            *config.overrides,
        ])
        result = generate(gen, critic=critic)
        layout = Layout.model_validate(json.loads((out / name / "layout.json").read_text())["layout"])
        runs[name] = {"result": result, "check": check_generation(result.model, layout)}

    print("[4/4] writing the report")
    summary = {
        "critic": critic_path,
        "eval_set": str(eval_set),
        "critic_accuracy": metrics["overall"]["accuracy"],
        "critic_per_type": {row["negative type"]: row["accuracy"] for row in per_type_table(metrics)},
        "prompt": config.prompt,
        "generation": {
            name: {
                "final_prob_yes": (run["result"].final_critic or {}).get("prob_yes"),
                "color_accuracy": run["check"]["color_accuracy"],
                "relation_accuracy": run["check"]["relation_accuracy"],
                "passed": run["check"]["passed"],
                "objects": run["check"]["objects"],
                "output_dir": str(run["result"].output_dir),
            }
            for name, run in runs.items()
        },
    }
    write_json(out / "summary.json", summary)
    _report(summary, metrics, runs, out / "report.html")
    summary["report"] = str(out / "report.html")
    return summary


def _report(summary: dict, metrics: dict, runs: dict, path: Path) -> None:
    from coherendream.eval.critic_eval import per_type_table
    from coherendream.eval.report import Report, reliability_diagram, training_curves

    report = Report("CoherenDream demo")
    report.add_text(f"Critic: {summary['critic']}. Everything below ran on this machine's CPU with no downloads.")
    report.add_heading("1. The critic on fresh procedural scenes")
    o = metrics["overall"]
    report.add_table([{"rows": metrics["scored"], "accuracy": o["accuracy"], "ROC-AUC": o["roc_auc"], "ECE": o["ece"], "pairwise accuracy": o["pairwise_accuracy"]}])
    report.add_table(per_type_table(metrics))
    report.add_image(reliability_diagram(o["calibration"]), caption="Reliability of P(yes)", width=360)
    report.add_heading(f"2. Generating {summary['prompt']!r} from grey Gaussians")
    rows = []
    for name, run in runs.items():
        check = run["check"]
        rows.append({
            "run": name,
            "critic P(yes) of the result": (run["result"].final_critic or {}).get("prob_yes"),
            "colours right": check["color_accuracy"],
            "relations right": check["relation_accuracy"],
            "rendered colours": ", ".join(f"{ob['prompt']} -> {ob['rendered_color']}" for ob in check["objects"]),
        })
    report.add_table(rows)
    for name, run in runs.items():
        grid = run["result"].paths.get("grid")
        if grid is not None and Path(grid).is_file():
            report.add_image(Path(grid).read_bytes(), caption=f"{name}: views at azimuth 0/90/180/270", width=320)
        metrics_file = Path(run["result"].output_dir) / "metrics.jsonl"
        if metrics_file.is_file():
            keys = [k for k in ("loss", "prob_yes", "margin") if k in metrics_file.read_text().split("\n", 1)[0]]
            if keys:
                report.add_image(training_curves(str(metrics_file), keys), caption=f"{name}: per-step log", width=420)
    report.write(path)
