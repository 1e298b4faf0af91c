"""The demo at its smallest settings: every stage runs and the report holds each part."""

import json

from coherendream.critic.tiny import build_tiny_critic
from coherendream.demo import DemoConfig, run_demo


def test_demo_smallest_settings(tmp_path):
    critic = build_tiny_critic(tmp_path / "critic", image_size=64, patch_size=8)
    summary = run_demo(DemoConfig(output_dir=str(tmp_path / "demo"), critic=str(critic), eval_scenes=8, steps=3,
                                  num_gaussians=256, render_resolution=32, num_workers=1,
                                  overrides=["outputs.turntable_frames=4", "outputs.mp4=false"]))
    assert 0.0 <= summary["critic_accuracy"] <= 1.0
    assert set(summary["generation"]) == {"tcsd", "no-critic"}
    for run in summary["generation"].values():
        assert [o["expected_color"] for o in run["objects"]] == ["red", "blue"]
        assert run["relation_accuracy"] is not None and 0.0 <= run["final_prob_yes"] <= 1.0
    # with the critic term off, nothing but a constant image gradient acts: the Gaussians stay grey
    assert all(o["rendered_color"] == "gray" for o in summary["generation"]["no-critic"]["objects"])
    html = (tmp_path / "demo" / "report.html").read_text()
    for part in ("The critic on fresh procedural scenes", "Generating", "Reliability", "data:image/png;base64"):
        assert part in html
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["prompt"] == "a red cube to the left of a blue sphere"
