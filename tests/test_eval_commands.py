"""`eval critic` and `eval assets` end to end on a tiny critic, bad inputs included."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from typer.testing import CliRunner

from coherendream.cli import app
from coherendream.config import from_dict
from coherendream.critic.model import Critic
from coherendream.critic.tiny import build_tiny_critic
from coherendream.data.build import BuildConfig, build_dataset, load_built_dataset
from coherendream.eval.assets import AssetsEvalConfig, evaluate_assets
from coherendream.eval.critic_eval import CriticEvalConfig, evaluate_critic
from coherendream.generation.gaussians import GaussianModel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_critic(tmp_path_factory.mktemp("tiny") / "critic", image_size=64, patch_size=8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "d"
    build_dataset(from_dict(BuildConfig, {"output_dir": str(out), "source": {"kind": "procedural", "num_scenes": 12},
                                          "render": {"resolution": 32}, "splits": {"test": 1.0}, "progress": False}))
    return out


def test_eval_critic_metrics_match_direct_scoring(tmp_path, tiny, dataset):
    critic = Critic.from_pretrained(tiny)
    metrics = evaluate_critic(critic, CriticEvalConfig(dataset, tmp_path / "ev", split="test", progress=False))
    rows = load_built_dataset(dataset)["test"]
    with torch.no_grad():
        probs = critic.score(list(rows["views"]), rows["caption"]).prob_yes.numpy()
    labels = np.array(rows["label"])
    assert metrics["scored"] == len(rows) and metrics["errors"] == 0
    assert metrics["overall"]["accuracy"] == pytest.approx(float(np.mean((probs >= 0.5) == labels)))
    for name, m in metrics["per_negative_type"].items():
        mask = np.array([t == name for t in rows["negative_type"]])
        assert m["accuracy"] == pytest.approx(float(np.mean(probs[mask] < 0.5)))
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "Per negative type" in html and "data:image/png;base64" in html
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["overall"]["n_pairs"] > 0


def _gaussian_ply(path: Path, nan: bool = False) -> None:
    g = torch.Generator().manual_seed(0)
    pts = (torch.rand(300, 3, generator=g) - 0.5) * 0.6
    GaussianModel.from_points(pts, torch.tensor([[0.9, 0.1, 0.1]]).expand(300, 3), scale=0.05, opacity=0.8).export_ply(path)
    if nan:  # corrupt the first x coordinate after the header
        data = bytearray(path.read_bytes())
        start = data.index(b"end_header\n") + len(b"end_header\n")
        data[start : start + 4] = struct.pack("<f", float("nan"))
        path.write_bytes(bytes(data))


def test_eval_assets_scores_every_kind_and_reports_bad_items(tmp_path, tiny):
    root = tmp_path / "assets"
    root.mkdir()
    trimesh.creation.box().export(root / "box.glb")
    _gaussian_ply(root / "splats.ply")
    _gaussian_ply(root / "nan.ply", nan=True)
    views = root / "views"
    views.mkdir()
    for k in range(4):
        Image.fromarray(np.full((40, 40, 3), 60 * k, np.uint8)).save(views / f"{k}.png")
    odd = root / "odd"
    odd.mkdir()
    for k in range(4):
        Image.fromarray(np.zeros((40 + k, 40, 3), np.uint8)).save(odd / f"{k}.png")
    (root / "empty").mkdir()
    rows = [
        ("box", "box.glb", "a white cube"),
        ("splats", "splats.ply", "a red blob"),
        ("views", "views", "a gray thing"),
        ("nan", "nan.ply", "broken splats"),
        ("odd", "odd", "views of different sizes"),
        ("empty", "empty", "a folder without views"),
        ("missing", "nothere.glb", "a missing mesh"),
        ("noprompt", "box.glb", ""),
        ("escape", "../outside.glb", "outside the root"),
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "path": p, "prompt": t}) + "\n" for i, p, t in rows))
    critic = Critic.from_pretrained(tiny)
    summary = evaluate_assets(critic, AssetsEvalConfig(manifest, tmp_path / "out", resolution=32, progress=False))
    assert summary["scored"] == 3 and summary["errors"] == 6
    errors = {e["id"]: e["reason"] for e in map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())}
    assert errors == {"nan": "non_finite", "odd": "view_size_mismatch", "empty": "too_few_views", "missing": "missing_file",
                      "noprompt": "empty_prompt", "escape": "outside_root"}  # fmt: skip
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert {s["id"] for s in scores} == {"box", "splats", "views"}
    assert all(0.0 < s["prob_yes"] < 1.0 for s in scores)
    assert "data:image/png;base64" in (tmp_path / "out" / "report.html").read_text()

    # Split over two shards in chunks of 3 assets: the second to finish merges the same results.
    halves = [evaluate_assets(critic, AssetsEvalConfig(manifest, tmp_path / "split", resolution=32, progress=False, num_shards=2, shard_index=i, chunk_size=3)) for i in (0, 1)]
    assert not halves[0]["merged"] and halves[1] == {**summary, "merged": True}
    split = json.loads((tmp_path / "split" / "scores.json").read_text())
    assert [(s["id"], round(s["prob_yes"], 5)) for s in split] == [(s["id"], round(s["prob_yes"], 5)) for s in scores]
    assert (tmp_path / "split" / "errors.jsonl").read_text() == (tmp_path / "out" / "errors.jsonl").read_text()


def test_eval_assets_renders_from_the_critics_training_orbit(tmp_path):
    from coherendream.critic.model import CriticConfig, CriticOutput

    class Recorder:  # P(yes) 0.5 for all; keeps the views it was given
        def __init__(self, config):
            self.config, self.views = config, []

        def score(self, views, prompts):
            self.views += list(views)
            return CriticOutput(prob_yes=torch.full((len(views),), 0.5), margin=torch.zeros(len(views)))

    trimesh.creation.box(extents=(0.5, 0.5, 0.5)).export(tmp_path / "box.glb")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "box", "path": "box.glb", "prompt": "a cube"}) + "\n")

    def foreground(config):
        critic = Recorder(config)
        evaluate_assets(critic, AssetsEvalConfig(tmp_path / "m.jsonl", tmp_path / f"out{config.view_distance}", resolution=32, progress=False))
        views = np.stack([np.asarray(v, dtype=float)[..., :3] for v in critic.views[0]])
        return (views.min(-1) < 250).mean()

    near, far = foreground(CriticConfig()), foreground(CriticConfig(view_distance=5.0))
    # the box (scaled into the unit cube) covers an area falling as the square of the distance:
    # about 4x less from 5.0 than from the default 2.5
    assert 3.0 < near / far < 5.0


def test_gaussian_views_show_the_red_splats(tiny):
    from coherendream.cameras import OrbitSpec
    from coherendream.eval.assets import render_gaussian_views

    g = torch.Generator().manual_seed(0)
    model = GaussianModel.from_points((torch.rand(300, 3, generator=g) - 0.5) * 0.6, torch.tensor([[0.9, 0.1, 0.1]]).expand(300, 3), scale=0.05, opacity=0.8)
    views = [np.asarray(v) for v in render_gaussian_views(model, OrbitSpec(), 48)]
    for v in views:
        centre = v[18:30, 18:30].reshape(-1, 3).astype(int)
        assert (centre[:, 0] > centre[:, 1] + 80).mean() > 0.8  # red in the middle
        assert tuple(v[0, 0]) == (255, 255, 255)  # white background


def test_cli_eval_commands(tmp_path, tiny, dataset):
    res = CliRunner().invoke(app, ["eval", "critic", "--dataset", str(dataset), "-o", str(tmp_path / "c"), "--critic", str(tiny), "--split", "test"])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and (tmp_path / "c" / "report.html").is_file()
    res = CliRunner().invoke(app, ["eval", "critic", "--dataset", str(dataset), "-o", str(tmp_path / "c2"), "--model", str(tiny), "--split", "nope"])
    assert res.exit_code == 2 and "nope" in res.output and "--model is deprecated" in res.output  # the old spelling still works
    assert not (tmp_path / "c2").exists()  # the missing split is refused before anything is written
    res = CliRunner().invoke(app, ["eval", "assets", "--manifest", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "a"), "--critic", str(tiny)])
    assert res.exit_code == 2 and "missing.csv" in res.output


def test_cli_protocol_commands(tmp_path, tiny):
    from coherendream.eval.t3bench import prompt_slugs

    prompts = ["a red cube", "a blue sphere"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    for method in ("ours", "baseline"):
        for slug in prompt_slugs(prompts):
            (tmp_path / method / slug).mkdir(parents=True)
            _gaussian_ply(tmp_path / method / slug / "gaussians.ply")
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "t3bench", str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "t3"), "--generations", str(tmp_path / "ours"),
                              "--critic", str(tiny), "--resolution", "32"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t3" / "prompts" / "results.json").is_file()
    assert "alignment_critic" in res.output and "2 of 2" in res.output  # the per-set table ends the run
    res = runner.invoke(app, ["eval", "tifa", str(tmp_path / "prompts.txt"), "--generations", str(tmp_path / "ours"), "-o", str(tmp_path / "tifa"),
                              "--critic", str(tiny), "--resolution", "32"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tifa" / "answers.jsonl").is_file()
    res = runner.invoke(app, ["eval", "judge", str(tmp_path / "prompts.txt"), "--method", f"ours={tmp_path / 'ours'}", "--method", f"baseline={tmp_path / 'baseline'}",
                              "-o", str(tmp_path / "judge"), "--critic", str(tiny), "--resolution", "32"])
    assert res.exit_code == 0, res.output
    assert "too few games" in res.output  # two prompts: no Elo interval, and the user is told why
    ratings = json.loads((tmp_path / "judge" / "ratings.json").read_text())
    # both methods rendered the same assets: every comparison is a tie, so both sit at the anchor's 1000
    assert ratings["anchor"] == "ours" and ratings["ratings"] == {"ours": 1000.0, "baseline": 1000.0}
    res = runner.invoke(app, ["eval", "judge", str(tmp_path / "prompts.txt"), "--method", f"ours={tmp_path / 'ours'}", "-o", str(tmp_path / "j2"), "--critic", str(tiny)])
    assert res.exit_code == 2 and "two --method" in res.output
    (tmp_path / "empty.txt").write_text("\n")
    res = runner.invoke(app, ["eval", "t3bench", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "t3e"), "--generations", str(tmp_path / "ours"), "--critic", str(tiny)])
    assert res.exit_code == 2 and "empty.txt" in res.output
    # Generations where none of the prompts has a folder: each protocol says why and exits non-zero.
    (tmp_path / "elsewhere").mkdir()
    for command in ("t3bench", "tifa"):
        res = runner.invoke(app, ["eval", command, str(tmp_path / "prompts.txt"), "-o", str(tmp_path / f"{command}-none"),
                                  "--generations", str(tmp_path / "elsewhere"), "--critic", str(tiny), "--resolution", "32"])  # fmt: skip
        assert res.exit_code == 2 and "2 of 2 rejected: missing_output (no folder for these prompts under --generations" in res.output, res.output
        assert "could be scored" in res.output
    # What `eval t3bench --generate-config` writes (<out>/<set>/generations/<slug>) is itself a --generations folder.
    (tmp_path / "run" / "prompts").mkdir(parents=True)
    (tmp_path / "ours").rename(tmp_path / "run" / "prompts" / "generations")
    res = runner.invoke(app, ["eval", "tifa", str(tmp_path / "prompts.txt"), "--generations", str(tmp_path / "run"), "-o", str(tmp_path / "tifa2"),
                              "--critic", str(tiny), "--resolution", "32"])  # fmt: skip
    assert res.exit_code == 0 and "scored: 2" in res.output, res.output


@pytest.mark.parametrize("name, text, why", [
    ("header.csv", "id,path,prompt\n", "no rows"),
    ("other.csv", "id,file,description\na,box.glb,a cube\n", "no 'path' or 'prompt' column; its columns are description, file, id"),
    ("other.jsonl", '{"id": "a", "path": "box.glb", "description": "a cube"}\n', "no 'prompt' column"),
])  # fmt: skip
def test_eval_assets_refuses_a_manifest_it_cannot_use_before_writing(tmp_path, name, text, why):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=why):
        evaluate_assets(None, AssetsEvalConfig(tmp_path / name, tmp_path / "out", progress=False))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, config_cls", [
    ("critic", "coherendream.eval.critic_eval:CriticEvalConfig"), ("assets", "coherendream.eval.assets:AssetsEvalConfig"),
    ("t3bench", "coherendream.eval.t3bench:T3BenchConfig"), ("tifa", "coherendream.eval.tifa:TifaConfig"),
    ("judge", "coherendream.eval.judge:JudgeConfig"), ("prior", "coherendream.eval.prior_eval:PriorEvalConfig"),
    ("procedural", "coherendream.eval.procedural:ProceduralEvalConfig"), ("steering", "coherendream.eval.steering:SteeringEvalConfig"),
])  # fmt: skip
def test_eval_commands_take_their_options_from_the_protocol_config(command, config_cls):
    import dataclasses
    import importlib

    module, name = config_cls.split(":")
    cls = getattr(importlib.import_module(module), name)
    res = CliRunner().invoke(app, ["eval", command, "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False or f.metadata.get("argument"):
            continue
        flag = f.metadata.get("flags", (f"--{f.name.replace('_', '-')}",))[0]
        assert flag in res.output, (command, f.name)
        assert " ".join(f.metadata["help"].split()[:3]) in " ".join(res.output.split()), (command, f.name)


def test_commands_speak_in_flags_and_keep_old_spellings(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red cube\n")
    res = CliRunner().invoke(app, ["eval", "t3bench", str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "give exactly one of --generations (existing outputs) and --generate-config" in res.output
    res = CliRunner().invoke(app, ["eval", "tifa", str(tmp_path / "prompts.txt"), "--outputs-dir", str(tmp_path), "-o", str(tmp_path / "t"),
                                   "--questions", "openai"])  # fmt: skip
    # the old --outputs-dir still fills --generations (with a warning); the refusal names the flags
    assert res.exit_code == 2 and "--outputs-dir is deprecated" in res.output and "--questions=openai needs --llm-model" in res.output
    assert "--outputs-dir" not in CliRunner().invoke(app, ["eval", "tifa", "--help"], env={"COLUMNS": "300"}).output  # hidden


def test_help_wraps_docstring_paragraphs_to_the_terminal():
    # typer keeps a docstring's line breaks after its first paragraph; the help joins them
    res = CliRunner().invoke(app, ["eval", "t3bench", "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
    assert res.exit_code == 0 and "(or started by torchrun or a SLURM array) share the generations" in " ".join(res.output.split())
    # one paragraph is one block of lines, rewrapped to the terminal: no line break where the source has one
    assert "--num-shards/--shard-index (or" in " ".join(res.output.split()) and "\n\n  SLURM array" not in res.output
