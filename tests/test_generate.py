"""End-to-end generation on CPU with the tiny critic (and once the tiny prior): TCSD raises the
critic's score, NaN steps are skipped and logged, interrupted runs resume to the same Gaussians,
outputs are complete and readable, the CLI runs the CPU preset."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from coherendream.config import ConfigError, load_config
from coherendream.critic.model import Critic
from coherendream.critic.tiny import build_tiny_critic
from coherendream.generation.gaussians import GaussianModel, read_ply_vertices
from coherendream.generation.runner import GenerateConfig, generate
from coherendream.generation.tiny_prior import build_tiny_prior
from coherendream.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
CPU_PRESET = REPO / "configs" / "generate" / "cpu_tiny.yaml"

# Small and fast: 32 px renders (the critic resizes to its 64 px), ~1000 Gaussians, few steps.
FAST = ["resolution=32", "outputs.resolution=null", "num_gaussians=800", "progress=false", "outputs.turntable_frames=3", "device=cpu", "backend=torch"]


@pytest.fixture(scope="module")
def critic_dir(tmp_path_factory):
    return build_tiny_critic(tmp_path_factory.mktemp("critic") / "tiny", seed=0)


@pytest.fixture(scope="module")
def critic(critic_dir):
    return Critic.from_pretrained(critic_dir, device="cpu")


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    return build_tiny_prior(tmp_path_factory.mktemp("prior"), seed=0)


def _config(out: Path, critic_dir: Path, *overrides: str) -> GenerateConfig:
    return load_config(GenerateConfig, CPU_PRESET, [*FAST, f"critic.path={critic_dir}", f"output_dir={out}", *overrides])


def test_tcsd_raises_the_critic_score(tmp_path, critic_dir, critic):
    # Same seed, layout, cameras and init; only the critic term's weight differs.
    # The tiny critic is random, so its margin moves little in absolute terms: larger colour and
    # opacity steps than the preset's make the effect clear in 24 steps.
    # prior=none: the critic term alone, at its fixed weight.
    common = ("steps=24", "checkpoint_every=100", "outputs.turntable_frames=0", "lr.colors=0.1", "lr.opacity_logits=0.1", "prior=none")
    with_term = generate(_config(tmp_path / "tcsd", critic_dir, *common), critic=critic)
    without = generate(_config(tmp_path / "off", critic_dir, *common, "tcsd.critic.weight=0"), critic=critic)
    # Measured: margin 0.038 with the term vs 0.028 without (prob_yes 0.5095 vs 0.5069).
    assert with_term.final_critic["margin"] > without.final_critic["margin"] + 0.005
    assert with_term.final_critic["prob_yes"] > without.final_critic["prob_yes"]
    rows = read_jsonl(with_term.paths["metrics"])
    assert [r["step"] for r in rows] == list(range(24))
    first, last = sum(r["margin"] for r in rows[:4]) / 4, sum(r["margin"] for r in rows[-4:]) / 4
    assert last > first  # the score rises over the run, not only at the end
    assert all(r["lam"] == 1.0 and r["critic_active"] and r["status"] == "ok" for r in rows)


def test_cpu_preset_distils_the_embedded_prior_with_the_critic_term(tmp_path, critic_dir, critic):
    from coherendream.generation.pixel_prior import EMBEDDED_PRIOR

    result = generate(_config(tmp_path / "emb", critic_dir, "steps=3", "checkpoint_every=100", "outputs.turntable_frames=0"), critic=critic)
    rows = read_jsonl(result.paths["metrics"])
    assert all(r["status"] == "ok" and r["loss_sds"] is not None and r["t"] is not None and r["critic_active"] for r in rows)
    ratio = load_config(GenerateConfig, CPU_PRESET).tcsd.critic.grad_ratio
    for r in rows:  # the critic's weight is matched to the SDS gradient, as with any prior
        assert r["lam"] * r["grad_norm_critic"] == pytest.approx(ratio * r["grad_norm_sds"], rel=1e-4)
    assert json.loads((tmp_path / "emb" / "summary.json").read_text())["prior"] == str(EMBEDDED_PRIOR)


def test_sds_plus_tcsd_with_the_tiny_prior(tmp_path, critic_dir, critic, prior_dir):
    prior = [f"prior.pretrained_model_name_or_path={prior_dir}", "prior.local_files_only=true", "prior.anneal_end_step=8"]
    common = ("steps=8", "checkpoint_every=100", "outputs.turntable_frames=0", "tcsd.critic.start_step=2", "tcsd.critic.grad_ratio=0.5")
    tcsd = generate(_config(tmp_path / "tcsd", critic_dir, *common, *prior), critic=critic)
    sds = generate(_config(tmp_path / "sds", critic_dir, *common, *prior, "mode=sds"), critic=critic)
    rows = read_jsonl(tcsd.paths["metrics"])
    assert [r["critic_active"] for r in rows] == [False, False] + [True] * 6
    for r in rows:
        assert r["status"] == "ok" and r["loss_sds"] is not None and r["t"] is not None
        if r["critic_active"]:  # gradient-norm matching as logged
            assert r["lam"] * r["grad_norm_critic"] == pytest.approx(0.5 * r["grad_norm_sds"], rel=1e-4)
    sds_rows = read_jsonl(sds.paths["metrics"])
    assert not any(r["critic_active"] for r in sds_rows)
    # Before the critic switches on, both runs take identical steps (same seed, same t and noise).
    assert [r["t"] for r in rows[:2]] == [r["t"] for r in sds_rows[:2]]
    # The critic's steps look from its own orbit (front view first, within the jitter); the
    # others from anywhere in the first quarter turn.
    jitter = load_config(GenerateConfig, CPU_PRESET).tcsd.critic.azimuth_jitter
    assert all(min(r["azimuth"], 360 - r["azimuth"]) <= jitter for r in rows if r["critic_active"])
    assert all(0 <= r["azimuth"] < 90 for r in sds_rows)
    assert rows[1]["loss_sds"] == pytest.approx(sds_rows[1]["loss_sds"], rel=1e-5)
    assert tcsd.final_critic is not None and sds.final_critic is not None
    assert not torch.equal(tcsd.model.colors, sds.model.colors)


@dataclass
class _Out:
    margin: torch.Tensor
    prob_yes: torch.Tensor


class NaNOnce:
    """Wraps a critic; its ``nan_call``-th score (0-based) is NaN."""

    def __init__(self, critic, nan_call: int) -> None:
        self.critic, self.nan_call, self.calls = critic, nan_call, 0
        self.config = critic.config

    def score(self, views, prompts):
        out = self.critic.score(views, prompts)
        self.calls += 1
        if self.calls - 1 == self.nan_call:
            return _Out(out.margin * float("nan"), out.prob_yes * float("nan"))
        return out


def test_nan_step_is_skipped_and_logged_and_outputs_are_finite(tmp_path, critic_dir, critic):
    cfg = _config(tmp_path / "nan", critic_dir, "steps=5", "checkpoint_every=100")
    result = generate(cfg, critic=NaNOnce(critic, nan_call=2))
    assert result.skipped_steps == [2]
    rows = read_jsonl(result.paths["metrics"])
    assert rows[2]["status"].startswith("skipped") and rows[2]["loss"] is None and rows[2]["margin"] is None
    assert all(r["status"] == "ok" for i, r in enumerate(rows) if i != 2)
    text = result.paths["metrics"].read_text()
    assert "NaN" not in text and "Infinity" not in text  # valid JSON, no NaN literals
    for p in result.model.parameters():
        assert torch.isfinite(p).all()
    back = GaussianModel.from_ply(result.paths["ply"])
    assert torch.isfinite(back.means).all() and torch.isfinite(back.opacity_logits).all()
    assert json.loads((tmp_path / "nan" / "summary.json").read_text())["skipped_steps"] == [2]


def test_interrupted_run_resumes_to_the_same_gaussians(tmp_path, critic_dir, critic):
    common = ("steps=6", "checkpoint_every=2", "outputs.turntable_frames=0", "seed=3")
    full = generate(_config(tmp_path / "full", critic_dir, *common), critic=critic)

    part = _config(tmp_path / "parts", critic_dir, *common, "max_steps_this_run=3")
    first = generate(part, critic=critic)
    assert not first.finished and first.step == 3 and not (tmp_path / "parts" / "gaussians.ply").exists()
    # A crash after the checkpoint leaves metrics of steps that will be redone: they must not double.
    with open(tmp_path / "parts" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 3, "status": "ok", "loss": 123.0}) + "\n")
    second = generate(_config(tmp_path / "parts", critic_dir, *common), critic=critic)
    assert second.finished and second.resumed_from == 3 and second.step == 6
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    assert [r["step"] for r in read_jsonl(second.paths["metrics"])] == list(range(6))
    a, b = read_jsonl(full.paths["metrics"]), read_jsonl(second.paths["metrics"])
    assert [r["margin"] for r in a] == [r["margin"] for r in b]
    # A different run in the same folder is refused, not silently mixed.
    with pytest.raises(ValueError, match=r"other settings \(seed 3 -> 4\)"):
        generate(_config(tmp_path / "parts", critic_dir, *common, "seed=4"), critic=critic)


def test_outputs_exist_and_ply_reads_back(tmp_path, critic_dir, critic):
    result = generate(_config(tmp_path / "out", critic_dir, "steps=2", "checkpoint_every=1"), critic=critic)
    out = tmp_path / "out"
    for name in ("gaussians.ply", "config.yaml", "layout.json", "metrics.jsonl", "summary.json", "turntable.gif",
                 "views/az000.png", "views/az090.png", "views/az180.png", "views/az270.png", "checkpoints/last.pt", "turntable.mp4"):  # fmt: skip
        assert (out / name).is_file(), name
    cols = read_ply_vertices(out / "gaussians.ply")
    assert {"x", "y", "z", "f_dc_0", "opacity", "scale_0", "rot_0"} <= set(cols)
    back = GaussianModel.from_ply(out / "gaussians.ply")
    assert back.num_gaussians == 800
    assert torch.allclose(back.means, result.model.means.detach())
    assert torch.allclose(back.rgb, result.model.rgb.detach(), atol=1e-5)
    # The resolved config reloads to the same config.
    again = load_config(GenerateConfig, out / "config.yaml")
    assert again == load_config(GenerateConfig, CPU_PRESET, [*FAST, f"critic.path={critic_dir}", f"output_dir={out}", "steps=2", "checkpoint_every=1"])
    layout = json.loads((out / "layout.json").read_text())
    assert layout["source"] == "rules" and len(layout["layout"]["objects"]) == 2
    from PIL import Image

    with Image.open(out / "turntable.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (32, 32)
    import imageio.v3 as iio

    assert iio.imread(out / "turntable.mp4", plugin="FFMPEG").shape == (3, 32, 32, 3)
    assert result.final_critic is not None and 0 < result.final_critic["prob_yes"] < 1


def test_tcsd_without_critic_path_uses_the_embedded_critic(tmp_path, critic_dir, monkeypatch):
    import coherendream.critic.model as critic_model

    monkeypatch.setattr(critic_model, "EMBEDDED_CRITIC", critic_dir)  # a tiny stand-in for the shipped weights
    result = generate(load_config(GenerateConfig, CPU_PRESET, [*FAST, "steps=1", f"output_dir={tmp_path / 'a'}"]))
    assert result.final_critic is not None and 0 < result.final_critic["prob_yes"] < 1
    monkeypatch.setattr(critic_model, "EMBEDDED_CRITIC", tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="embedded critic is missing"):
        generate(load_config(GenerateConfig, CPU_PRESET, [*FAST, f"output_dir={tmp_path / 'b'}"]))
    with pytest.raises(ValueError, match="needs a prior"):
        generate(load_config(GenerateConfig, CPU_PRESET, [*FAST, "mode=sds", "prior=none", "critic.path=x", f"output_dir={tmp_path}"]))


def test_cli_generate_runs_the_cpu_preset(tmp_path, critic_dir):
    from typer.testing import CliRunner

    from coherendream.cli import app

    out = tmp_path / "cli"
    args = ["generate", "-c", str(CPU_PRESET), "--critic", str(critic_dir), "-o", str(out), "--steps", "2",
            "--prompt", "a red cube: on a blue sphere 🎲", *FAST]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "P(yes)" in res.output and (out / "gaussians.ply").is_file()
    assert json.loads((out / "layout.json").read_text())["prompt"] == "a red cube: on a blue sphere 🎲"  # ':' and emoji intact
    # a critic or prior that is not there: one line naming it, and no output folder left behind
    for flag, name in (("--critic", str(tmp_path / "no-critic")), ("--prior", "nobody/no-prior")):
        res = CliRunner().invoke(app, ["generate", "-c", str(CPU_PRESET), "-o", str(tmp_path / "x"), flag, name, "--prompt", "a cube", *FAST])
        assert res.exit_code == 2 and name in res.output and "Traceback" not in res.output, res.output
        assert res.output.strip().splitlines()[-1].startswith("error:") and not (tmp_path / "x").exists()


def test_a_critic_trained_from_another_distance_is_warned_about(tmp_path, critic_dir, critic):
    import warnings

    from coherendream.critic.model import CriticConfig

    closer = Critic(critic.model, critic.processor, CriticConfig(view_distance=1.5))
    with pytest.warns(UserWarning, match=r"distance 1\.5, outside cameras\.distance_range"):
        generate(_config(tmp_path / "far", critic_dir, "steps=1"), critic=closer)
    with warnings.catch_warnings(record=True) as caught:  # cameras around the critic's distance: no warning
        warnings.simplefilter("always")
        generate(_config(tmp_path / "near", critic_dir, "steps=1", "cameras.distance_range=[1.3,1.7]"), critic=closer)
    assert not [w for w in caught if "distance_range" in str(w.message)]


@pytest.mark.parametrize("preset", sorted((REPO / "configs" / "generate").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_generate_preset_loads(preset):
    cfg = load_config(GenerateConfig, preset)
    assert cfg.prior is not None and cfg.mode == "tcsd"  # every preset distils a prior with the critic term
    if preset.stem.startswith("gpu"):
        assert cfg.device == "cuda" and cfg.prior.pretrained_model_name_or_path


def test_a_run_reports_to_tensorboard_like_a_training_run(tmp_path, critic_dir, critic, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = generate(_config(tmp_path / "tb", critic_dir, "steps=4", "outputs.turntable_frames=0", "report_to=tensorboard", "log_images_every=2"), critic=critic)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    prob = [e.value for e in events.Scalars("critic/prob_yes")]
    logged = [r["prob_yes"] for r in read_jsonl(result.paths["metrics"])]
    assert prob == pytest.approx(logged, rel=1e-6)
    assert {"loss/total", "loss/sds", "critic/lambda", "grad_norm/sds", "sds/t"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("views")] == [0, 2]
    with pytest.raises(ConfigError, match="report_to"):
        _config(tmp_path / "x", critic_dir, "report_to=mlflow")
    # wandb named where it is not installed: refused before the run writes anything
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="report_to=wandb needs the wandb package"):
        generate(_config(tmp_path / "wb", critic_dir, "steps=1", "report_to=wandb"), critic=critic)
    assert not (tmp_path / "wb").exists()


def test_load_parts_loads_each_prior_and_critic_once_per_cache(tmp_path, critic_dir, prior_dir, monkeypatch):
    from coherendream.generation.guidance import SDSGuidance
    from coherendream.generation.runner import load_parts

    loads = []
    real_critic, real_prior = Critic.from_pretrained, SDSGuidance.from_pretrained
    monkeypatch.setattr(Critic, "from_pretrained", lambda *a, **k: loads.append("critic") or real_critic(*a, **k))
    monkeypatch.setattr(SDSGuidance, "from_pretrained", lambda *a, **k: loads.append("prior") or real_prior(*a, **k))
    cfg = _config(tmp_path / "a", critic_dir, f"prior.pretrained_model_name_or_path={prior_dir}")
    cache: dict = {}
    first = load_parts(cfg, cache=cache)
    again = load_parts(dataclasses.replace(cfg, prompt="a blue sphere", output_dir=str(tmp_path / "b")), cache=cache)
    assert first["critic"] is again["critic"] and first["guidance"] is again["guidance"] and sorted(loads) == ["critic", "prior"]
    load_parts(cfg)  # no cache: loaded anew
    assert sorted(loads) == ["critic", "critic", "prior", "prior"]
    assert "critic" not in load_parts(cfg, critic=False, cache=cache) and "guidance" not in load_parts(cfg, prior=False, cache=cache)


def test_per_object_term_in_a_run(tmp_path, critic_dir, critic):
    """The per-object term beside the scene term, and instead of it: each step logs its lambda and
    P(yes), and without the scene term the Gaussians still move (the per-object gradient alone)."""
    for name, extra in (("beside", []), ("instead", ["tcsd.critic.scene_term=false"])):
        result = generate(_config(tmp_path / name, critic_dir, "steps=3", "prior=none", "tcsd.critic.per_object_weight=1.0", *extra), critic=critic)
        records = read_jsonl(result.paths["metrics"])
        assert all(r["status"] == "ok" and r["lam_object"] > 0 and 0 < r["prob_yes_object"] < 1 for r in records), records
        assert all((r["margin"] is None) == (name == "instead") for r in records)
