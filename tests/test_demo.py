"""The demo at its smallest settings: every stage runs and the report holds each part."""

import json

import pytest

from coherendream.critic.tiny import build_tiny_critic
from coherendream.demo import DemoConfig, run_demo


def test_demo_smallest_settings(tmp_path):
    critic = build_tiny_critic(tmp_path / "critic", image_size=64, patch_size=8)
    summary = run_demo(DemoConfig(output_dir=str(tmp_path / "demo"), critic=str(critic), eval_scenes=8, steps=3, num_workers=1,
                                  overrides=["num_gaussians=256"]))  # fmt: skip
    assert 0.0 <= summary["critic_accuracy"] <= 1.0
    runs = summary["generation"]
    # the first prompt of each of the four categories, with and without the critic term, same seed
    assert sorted((r["method"], r["category"]) for r in runs) == sorted((m, c) for m in ("sds", "tcsd") for c in ("single", "count", "relation", "two_groups"))
    assert {r["seed"] for r in runs} == {0}
    for r in runs:
        assert 0.0 <= r["critic_prob_yes"] <= 1.0
        assert r["object_color"] is None or 0.0 <= r["object_color"] <= 1.0
    html = (tmp_path / "demo" / "report.html").read_text()
    for part in ("The critic on fresh procedural scenes", "with and without the critic", "Reliability", "data:image/png;base64", "sds: colour", "tcsd: colour"):
        assert part in html
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["methods"] == ["sds", "tcsd"]
    assert "3 optimisation steps per generation" in html and "What produced this report" in html
    # A demo with other steps into the same folder is refused, not answered with these generations.
    with pytest.raises(ValueError, match="other settings.*steps 3 -> 4"):
        run_demo(DemoConfig(output_dir=str(tmp_path / "demo"), critic=str(critic), eval_scenes=8, steps=4, num_workers=1, overrides=["num_gaussians=256"]))


def test_demo_refuses_empty_settings_by_their_flags(tmp_path):
    from typer.testing import CliRunner

    from coherendream.cli import app

    for flag in ("--eval-scenes", "--prompts-per-category", "--steps"):
        res = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "d"), flag, "0"])
        assert res.exit_code == 2 and f"{flag} must be >= 1, got 0" in res.output and not (tmp_path / "d").exists()
