"""The image judge: calibrated on real renders, and right about hand-made images whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from coherendream.data.procedural import sample_scene
from coherendream.vocabulary import PALETTE, SHAPES, Group, SceneCaption
from coherendream.eval.image_judge import ImageJudge


@pytest.fixture(scope="module")
def judge():
    return ImageJudge(resolution=32, views_per_shape=4)


def _blocks(*parts: tuple[str, slice, slice], size: int = 32) -> np.ndarray:
    """A white image with blocks of palette colours (each part: colour, rows, columns)."""
    img = np.ones((size, size, 3), dtype=np.float32)
    for color, rows, cols in parts:
        img[rows, cols] = PALETTE[color]
    return img


def test_the_judge_reads_fresh_real_renders(judge):
    singles = [SceneCaption((Group(s, c, 1),)) for c in PALETTE for s in SHAPES]
    relations, seed = [], 9000
    while len(relations) < 40:
        cap = sample_scene(seed).caption
        seed += 1
        if cap.relation and cap.groups[0].color != cap.groups[1].color:
            relations.append(cap)
    groups = [SceneCaption((Group(s, c, n),)) for n in (1, 2, 3) for c, s in zip(list(PALETTE)[n::2], SHAPES)]
    acc = judge.accuracy_on_renders(singles, relations, seed=5, counts=groups)
    assert acc["single_color"] >= 0.95 and acc["single_shape"] >= 0.85
    assert acc["relation_placement"] >= 0.85 and acc["relation_object_color"] >= 0.9
    assert acc["count"] >= 0.9


def test_two_objects_their_colours_order_and_swaps(judge):
    cap = SceneCaption((Group("cube", "red", 1), Group("sphere", "blue", 1)), "left_of")
    right = judge.judge_relation(_blocks(("red", slice(12, 20), slice(4, 12)), ("blue", slice(12, 20), slice(20, 28))), cap)
    assert right.colors_present == (True, True) and right.placement_ok and not right.swapped and right.object_colors == (True, True)
    wrong = judge.judge_relation(_blocks(("blue", slice(12, 20), slice(4, 12)), ("red", slice(12, 20), slice(20, 28))), cap)
    assert wrong.colors_present == (True, True) and wrong.placement_ok is False and wrong.swapped and wrong.object_colors == (False, False)
    # Both objects purple with pink bases: both colours are present, but the pink one is not pink.
    cap2 = SceneCaption((Group("cylinder", "purple", 1), Group("cube", "pink", 1)), "left_of")
    mixed = _blocks(("purple", slice(8, 18), slice(4, 12)), ("pink", slice(18, 22), slice(4, 12)),
                    ("purple", slice(8, 18), slice(20, 28)), ("pink", slice(18, 22), slice(20, 28)))  # fmt: skip
    v = judge.judge_relation(mixed, cap2)
    assert v.colors_present == (True, True) and v.object_colors == (True, False)
    # next to: either order counts; in front of: not decidable from the front.
    beside = SceneCaption((Group("cube", "red", 1), Group("sphere", "blue", 1)), "next_to")
    assert judge.judge_relation(_blocks(("blue", slice(12, 20), slice(4, 12)), ("red", slice(12, 20), slice(20, 28))), beside).object_colors == (True, True)
    front = SceneCaption((Group("cube", "red", 1), Group("sphere", "blue", 1)), "in_front_of")
    assert judge.judge_relation(_blocks(("red", slice(12, 20), slice(4, 28))), front).object_colors is None


def test_single_object_colour_shape_and_an_empty_image(judge):
    v = judge.judge_single(_blocks(("green", slice(6, 26), slice(6, 26))))
    assert v.color == "green" and v.shape == "cube" and 0.3 < v.foreground < 0.5
    speckled = _blocks(("green", slice(6, 26), slice(6, 26)), ("pink", slice(1, 2), slice(30, 31)))
    assert judge.judge_single(speckled).shape == "cube"  # one stray pixel does not change the silhouette
    assert judge.judge_single(speckled).count == 1  # nor does it count as an object
    three = _blocks(*[("green", slice(12, 20), slice(2 + 10 * k, 9 + 10 * k)) for k in range(3)], ("green", slice(1, 2), slice(30, 31)))
    assert judge.judge_single(three).count == 3
    merged = _blocks(("green", slice(12, 20), slice(2, 20)), ("green", slice(12, 20), slice(22, 29)))
    assert judge.judge_single(merged).count == 2
    empty = judge.judge_single(np.ones((32, 32, 3), dtype=np.float32))
    assert empty.color is None and empty.shape is None and empty.foreground == 0.0 and empty.count == 0
