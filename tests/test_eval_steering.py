"""`eval steering`: wrong colours on two-group scenes, optimised by a critic's gradient alone, judged
by the ground truth."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from coherendream.cli import app
from coherendream.critic.model import Critic, default_critic_path
from coherendream.eval.steering import SteeringEvalConfig, start_colors, steer_scene, steering_scenes
from coherendream.vocabulary import SceneCaption


@pytest.fixture(scope="module")
def critic():
    return Critic.from_pretrained(default_critic_path(), device="cpu")


def test_scenes_are_two_groups_of_two_colours_and_start_wrong():
    scenes = steering_scenes(6, seed=5)
    assert [s.seed for s in scenes] == [s.seed for s in steering_scenes(6, seed=5)]  # the same draw
    for s in scenes:
        a, b = s.caption.groups
        assert a.color != b.color and s.caption.relation in ("left_of", "right_of", "on_top_of")
        swapped = start_colors(s, "swapped")
        assert all(c != o.color for c, o in zip(swapped, s.objects))  # every object starts in the other group's colour
        assert start_colors(s, "gray") == [None] * len(s.objects)


def test_the_ground_truth_reads_the_starting_colours_and_the_critic_drives_p_yes_up(critic):
    scene = steering_scenes(1, seed=11)[0]
    config = SteeringEvalConfig(output_dir="unused", steps=15, lr=0.1, gaussians_per_object=128, judge_resolution=48)
    swapped = steer_scene(critic, scene, "swapped", config, seed=1)
    # before any step, the judge sees exactly the colours the scene was given
    assert swapped["colors_before"] == start_colors(scene, "swapped") and swapped["swapped_before"] and swapped["own_before"] == 0.0
    gray = steer_scene(critic, scene, "gray", config, seed=1)
    assert gray["colors_before"] == ["gray"] * len(scene.objects)
    # the colours move under the critic's gradient, and its own objective improves
    for row in (swapped, gray):
        assert row["mean_color_change"] > 0.01
        assert row["prob_yes_after"] > row["prob_yes_before"], row
        assert row["hacked"] == (row["prob_yes_after"] > 0.9 and not row["all_own_after"])


def test_the_command_writes_its_table_and_report(tmp_path):
    out = tmp_path / "steer"
    result = CliRunner().invoke(app, ["eval", "steering", "-o", str(out), "--scenes", "2", "--steps", "2", "--gaussians-per-object", "64"])
    assert result.exit_code == 0, result.output
    assert "gray start, 2 scenes" in result.output and "swapped start, 2 scenes" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [r["start"] for r in summary["table"]] == ["gray", "swapped"]
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 4 and all(0.0 <= r["prob_yes_after"] <= 1.0 for r in rows)
    assert "Does the critic" in (out / "report.html").read_text()
    bad = CliRunner().invoke(app, ["eval", "steering", "-o", str(tmp_path / "x"), "--starts", "red"])
    assert bad.exit_code == 2 and "starts: unknown" in bad.output
    assert torch.get_num_threads() >= 1


def test_the_per_object_variant_frames_each_group(critic):
    from coherendream.eval.steering import scene_groups

    scene = steering_scenes(1, seed=11)[0]
    groups = scene_groups(scene)
    assert [g.caption for g in groups] == [SceneCaption((g,)).text() for g in scene.caption.groups]
    assert sorted(k for g in groups for k in g.objects) == list(range(len(scene.objects)))
    config = SteeringEvalConfig(output_dir="unused", steps=10, gaussians_per_object=96, judge_resolution=48, term="objects")
    row = steer_scene(critic, scene, "gray", config, seed=2)
    assert row["mean_color_change"] > 0.01  # the framed views' gradient reaches the colours
