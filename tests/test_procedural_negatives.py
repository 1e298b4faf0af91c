import numpy as np
import pytest

from coherendream.data.negatives import NegativeConfig, procedural_negative, text_negative
from coherendream.data.procedural import ProceduralConfig, caption_holds, sample_scene
from coherendream.vocabulary import PALETTE, RELATIONS, SHAPES, SceneCaption, parse_caption
from coherendream.vocabulary import relation_holds as boxes_relate


def relation_holds(scene, relation, a, b):
    return boxes_relate(relation, *scene.group_box(a), *scene.group_box(b))

SCENES = [sample_scene(s) for s in range(300)]


def test_scenes_are_deterministic_and_cover_the_grammar():
    again = sample_scene(7)
    assert again.text == SCENES[7].text
    assert all(np.allclose(a.center, b.center) for a, b in zip(again.objects, SCENES[7].objects))
    relations = {s.caption.relation for s in SCENES}
    assert relations == {None, *RELATIONS}
    assert {o.shape for s in SCENES for o in s.objects} == set(SHAPES)
    assert {len(s.objects) for s in SCENES} == {1, 2, 3, 4}


def test_scenes_are_collision_free_and_true_to_their_caption():
    for scene in SCENES:
        assert caption_holds(scene, scene.caption)
        assert parse_caption(scene.text) == scene.caption
        objs = scene.objects
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert not (np.all(a.lo < b.hi - 1e-6) and np.all(b.lo < a.hi - 1e-6))


def test_relation_predicates_are_mutually_consistent():
    for scene in SCENES:
        if scene.caption.relation is None:
            continue
        assert not (relation_holds(scene, "left_of", 0, 1) and relation_holds(scene, "right_of", 0, 1))
        assert not (relation_holds(scene, "in_front_of", 0, 1) and relation_holds(scene, "behind", 0, 1))
        if scene.caption.relation not in ("next_to",):
            # an asymmetric relation never holds the other way round
            assert not relation_holds(scene, scene.caption.relation, 1, 0)


@pytest.mark.parametrize("kind", ["color", "object", "count", "relation", "relation_swap"])
def test_procedural_negatives_are_false_and_change_one_fact(kind):
    rng = np.random.default_rng(0)
    made = 0
    for scene in SCENES:
        neg = procedural_negative(scene, kind, rng, list(PALETTE), list(SHAPES))
        if neg is None:
            assert kind.startswith("relation") and (scene.caption.relation is None or (kind == "relation_swap" and scene.caption.relation == "next_to"))
            continue
        made += 1
        parsed = parse_caption(neg.text)
        assert parsed is not None and parsed != scene.caption
        assert not caption_holds(scene, parsed), (scene.text, neg.text)
        if kind in ("color", "object", "count"):
            changed = [i for i, (a, b) in enumerate(zip(parsed.groups, scene.caption.groups)) if a != b]
            assert changed == [neg.detail["group"]]
            assert parsed.relation == scene.caption.relation
    assert made > 50


def test_synonym_caption_is_not_used_as_a_negative():
    # "A left of B" and "B right of A" say the same thing: caption_holds must accept both
    scene = next(s for s in SCENES if s.caption.relation == "left_of")
    mirrored = SceneCaption(scene.caption.groups[::-1], "right_of")
    assert caption_holds(scene, mirrored)


@pytest.mark.parametrize(
    "caption, kind, must_differ_in",
    [
        ("A red cube on top of a blue sphere.", "color", {"red", "blue"}),
        ("A cat sitting next to a dog", "object", {"cat", "dog"}),
        ("three wooden chairs", "count", {"three"}),
        ("A vase in front of a mirror", "relation", {"in front of"}),
    ],
)
def test_text_negatives_edit_one_known_word(caption, kind, must_differ_in):
    rng = np.random.default_rng(3)
    neg = text_negative(caption, kind, rng)
    assert neg is not None and neg.text != caption
    assert neg.detail["from"].lower() in must_differ_in
    s, e = neg.detail["span"]
    assert caption[s:e] == neg.detail["from"]
    assert neg.text.replace(neg.detail["to"], neg.detail["from"], 1).lower().replace("an ", "a ") == caption.lower().replace("an ", "a ")


def test_text_relation_swap_and_articles():
    rng = np.random.default_rng(0)
    neg = text_negative("A red cube on top of a blue sphere.", "relation_swap", rng)
    assert neg.text == "A blue sphere on top of a red cube."
    assert text_negative("An antique wooden rocking horse", "relation_swap", rng) is None
    assert text_negative("A horse", "color", rng) is None
    # replacing a noun keeps "a"/"an" right
    for seed in range(20):
        neg = text_negative("an apple", "object", np.random.default_rng(seed))
        word = neg.text.split()[1]
        assert neg.text.split()[0] == ("an" if word[0] in "aeiou" else "a")


def test_config_validation():
    with pytest.raises(ValueError, match="unknown"):
        NegativeConfig(ratios={"colour": 1.0})
    with pytest.raises(ValueError, match="colors"):
        ProceduralConfig(colors=["red", "mauve"])


def test_presence_questions_are_true_of_the_scene_and_balanced():
    from coherendream.data.presence import presence_questions

    rng = np.random.default_rng(0)
    seen_words, answers = set(), []
    for scene in SCENES[:100]:
        objects = [(o.color, o.shape) for o in scene.objects]
        for word, present in presence_questions(objects, 6, rng):
            assert parse_caption(word) is None  # never a caption of the grammar
            assert present == (word in {c for c, _ in objects} | {s for _, s in objects})
            assert word in PALETTE or word in SHAPES
            seen_words.add(word)
            answers.append(present)
    assert seen_words == set(PALETTE) | set(SHAPES)
    assert 0.4 < np.mean(answers) < 0.6
    with pytest.raises(ValueError, match="at least one object"):
        presence_questions([], 2, rng)
    with pytest.raises(ValueError, match="teal"):
        presence_questions([("teal", "cube")], 2, rng)


@pytest.mark.parametrize("kind, attr", [("color_swap", "color"), ("shape_swap", "shape")])
def test_binding_negatives_exchange_one_attribute_of_the_two_groups(kind, attr):
    rng = np.random.default_rng(0)
    made = 0
    for scene in SCENES:
        neg = procedural_negative(scene, kind, rng, list(PALETTE), list(SHAPES))
        groups = scene.caption.groups
        if neg is None:  # one group, or both groups alike in that attribute
            assert len(groups) == 1 or getattr(groups[0], attr) == getattr(groups[1], attr) or scene.caption.relation == "next_to"
            continue
        made += 1
        parsed = parse_caption(neg.text)
        assert not caption_holds(scene, parsed), (scene.text, neg.text)
        # the same relation, counts and other attribute: only which group has which `attr` changed
        other = "shape" if attr == "color" else "color"
        assert parsed.relation == scene.caption.relation and [g.count for g in parsed.groups] == [g.count for g in groups]
        assert [getattr(g, other) for g in parsed.groups] == [getattr(g, other) for g in groups]
        assert [getattr(g, attr) for g in parsed.groups] == [getattr(g, attr) for g in groups][::-1]
    assert made > 20


def test_text_binding_negatives():
    rng = np.random.default_rng(0)
    assert text_negative("a red cube and a blue ball", "color_swap", rng).text == "a blue cube and a red ball"
    assert text_negative("an orange cat next to a red car", "color_swap", rng).text == "a red cat next to an orange car"
    assert text_negative("a red cube and a blue ball", "shape_swap", rng).text == "a red ball and a blue cube"
    assert text_negative("a red car", "color_swap", rng) is None  # one colour: nothing to swap
