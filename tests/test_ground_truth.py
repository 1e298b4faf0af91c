import torch

from coherendream.eval.ground_truth import check_generation, nearest_palette_color
from coherendream.generation.gaussians import GaussianModel
from coherendream.generation.layout import colors_from_prompts, sample_points_in_layout
from coherendream.generation.layout_rules import RuleBasedPlanner


def seeded_scene(prompt: str, swap_colors: bool = False, mirror_x: bool = False):
    layout = RuleBasedPlanner().plan(prompt).layout
    points, ids = sample_points_in_layout(layout, 2000, torch.Generator().manual_seed(0))
    colors = colors_from_prompts(layout)
    if swap_colors:
        colors = colors.flip(0)
    if mirror_x:
        points = points * torch.tensor([-1.0, 1.0, 1.0])
    model = GaussianModel.from_points(points, colors[ids], scale=0.03, opacity=0.9, object_ids=ids)
    return model, layout


def test_a_faithful_scene_passes():
    model, layout = seeded_scene("a red cube to the left of a blue sphere")
    report = check_generation(model, layout, resolution=48)
    assert [o["rendered_color"] for o in report["objects"]] == ["red", "blue"]
    assert report["color_accuracy"] == 1.0 and report["relation_accuracy"] == 1.0 and report["passed"]


def test_wrong_colours_and_positions_fail():
    wrong_colour = check_generation(*seeded_scene("a red cube to the left of a blue sphere", swap_colors=True), resolution=48)
    assert wrong_colour["color_accuracy"] == 0.0 and not wrong_colour["passed"]
    assert wrong_colour["relation_accuracy"] == 1.0
    mirrored = check_generation(*seeded_scene("a red cube to the left of a blue sphere", mirror_x=True), resolution=48)
    assert mirrored["relation_accuracy"] == 0.0 and not mirrored["passed"]


def test_stacking_and_depth_relations():
    report = check_generation(*seeded_scene("a black cylinder on top of an orange cube"), resolution=48)
    assert report["passed"], report
    report = check_generation(*seeded_scene("two green cones in front of a yellow torus"), resolution=48)
    assert report["passed"] and len(report["relations"]) == 2


def test_nearest_palette_colour():
    assert nearest_palette_color(torch.tensor([0.9, 0.1, 0.05]).numpy()) == "red"
    assert nearest_palette_color(torch.tensor([0.05, 0.05, 0.06]).numpy()) == "black"
    # an untouched grey object is grey, not the nearest chromatic colour
    assert nearest_palette_color(torch.tensor([0.5, 0.5, 0.5]).numpy()) == "gray"
    assert nearest_palette_color(torch.tensor([0.51, 0.49, 0.56]).numpy()) == "gray"
