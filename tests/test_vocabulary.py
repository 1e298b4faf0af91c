"""The shared vocabulary: one reading of each relation for boxes and points, free of heavy imports."""

import subprocess
import sys

import numpy as np
import pytest

from coherendream.vocabulary import RELATION_KEYS, Group, SceneCaption, first_color_word, normalise_relation, parse_caption, relation_holds


def box(center, size):
    c, s = np.asarray(center, float), np.asarray(size, float)
    return c - s / 2, c + s / 2


def test_importing_the_vocabulary_loads_neither_the_mesh_stack_nor_torch():
    code = "import sys, coherendream.vocabulary; print(sorted(m for m in ('trimesh', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_side_by_side_relations_bend_by_the_tolerance():
    a, b = box([-0.25, 0, 0], [0.5, 0.3, 0.3]), box([0.25, 0, 0], [0.5, 0.3, 0.3])  # they touch at x = 0
    assert not relation_holds("left_of", *a, *b)  # exact reading: touching boxes are not apart
    assert relation_holds("left_of", *a, *b, tol=0.02)
    assert not relation_holds("right_of", *a, *b, tol=0.02)
    overlapping = box([0.1, 0, 0], [0.4, 0.3, 0.3])  # overlaps a by 0.1 along x
    assert not relation_holds("left_of", *a, *overlapping, tol=0.02)
    assert relation_holds("left_of", *a, *overlapping, tol=0.2)
    front, back = box([0, 0, 0.3], [0.2, 0.2, 0.2]), box([0, 0, -0.1], [0.2, 0.2, 0.2])
    assert relation_holds("in_front_of", *front, *back) and relation_holds("behind", *back, *front)
    assert not relation_holds("next_to", *front, *back)  # apart along z, not side by side along x
    assert relation_holds("next_to", *box([-0.3, 0, 0], [0.2] * 3), *box([0.3, 0, 0.05], [0.2] * 3))


def test_vertical_relations():
    table, cup = box([0, 0, 0], [0.6, 0.2, 0.6]), box([0.1, 0.2, 0], [0.1, 0.2, 0.1])  # cup's bottom on the top
    assert relation_holds("on_top_of", *cup, *table) and relation_holds("above", *cup, *table)
    assert relation_holds("below", *table, *cup) and not relation_holds("on_top_of", *table, *cup)
    hovering = box([0.1, 0.5, 0], [0.1, 0.2, 0.1])
    assert relation_holds("above", *hovering, *table) and not relation_holds("on_top_of", *hovering, *table)
    beside = box([0.6, 0.2, 0], [0.1, 0.2, 0.1])  # at table height but off its footprint
    assert not relation_holds("on_top_of", *beside, *table, tol=0.02)
    bowl, apple = box([0, 0, 0], [0.4, 0.2, 0.4]), box([0.05, 0.05, 0], [0.1, 0.1, 0.1])
    assert relation_holds("inside", *apple, *bowl) and not relation_holds("inside", *bowl, *apple)
    assert relation_holds("with", *apple, *bowl) and not relation_holds("with", *hovering, *apple, tol=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_points_read_as_centroid_offsets(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        a, b = rng.normal(size=3), rng.normal(size=3)
        dx, dy, dz = a - b
        assert relation_holds("left_of", a, a, b, b) == (dx < 0)
        assert relation_holds("in_front_of", a, a, b, b) == (dz > 0)
        assert relation_holds("on_top_of", a, a, b, b) == (dy > 0) == relation_holds("above", a, a, b, b)
        assert relation_holds("next_to", a, a, b, b) == (abs(dx) >= abs(dz) and abs(dy) < abs(dx))


def test_every_relation_key_has_a_reading_and_unknown_words_are_refused():
    a, b = box([-0.3, 0, 0], [0.2] * 3), box([0.3, 0, 0], [0.2] * 3)
    for key in RELATION_KEYS:
        relation_holds(key, *a, *b)
    with pytest.raises(ValueError, match="unknown relation 'near'"):
        relation_holds("near", *a, *b)  # a phrase, not a key: normalise it first
    assert normalise_relation("near") == "next_to" and normalise_relation("To the left of") == "left_of"


def test_caption_grammar_round_trip_and_colour_words():
    caption = SceneCaption((Group("cube", "red", 2), Group("torus", "orange")), "on_top_of")
    assert caption.text() == "two red cubes on top of an orange torus"
    assert parse_caption(caption.text()) == caption
    assert parse_caption("two red cube on top of an orange torus") is None
    assert first_color_word("A golden, RED-orange cube") == "red"  # palette words only by default
    assert first_color_word("a golden cube", {"golden"}) == "golden"
