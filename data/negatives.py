"""Negative captions: what the critic must learn to answer "No" to.

Types (the ``negative_type`` column):

* ``caption_swap``: the caption of another asset (same split).
* ``color``, ``object``, ``count``, ``relation``: one fact of the caption changed (a colour word,
  the object noun -- the shape for procedural scenes --, a number, a relation phrase).
* ``relation_swap``: the two objects of a relation exchanged ("A left of B" -> "B left of A").
* ``color_swap``, ``shape_swap``: binding negatives, the two groups' colours (or shapes) exchanged
  while everything else stays ("a red cube left of a blue sphere" -> "a blue cube left of a red
  sphere"): every word of the caption is still in the scene, only which attribute belongs to which
  object is wrong, the failure text-to-image priors make (SugarCrepe's swap-attribute negatives).
* ``multiview_mix``: the true caption, but half the views come from another asset (built in
  ``coherendream.data.build`` where the views are at hand).

For procedural scenes the change is made on the structured caption and the result is checked to
be false of the scene with :func:`coherendream.data.procedural.caption_holds`, so these negatives
are exact. For free-text captions the changes are rule-based over small word lists; they are hard
negatives with a known edit, not guaranteed falsehoods (a caption may mention a colour twice).
Every negative records its exact change in ``detail``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

from coherendream.data.procedural import Scene, caption_holds
from coherendream.vocabulary import RELATIONS, SceneCaption

NEGATIVE_TYPES = ("caption_swap", "color", "object", "count", "relation", "relation_swap", "color_swap", "shape_swap", "multiview_mix")


@dataclass
class NegativeConfig:
    """Relative frequency of each negative type and how many (positive, negative) pairs per asset.

    A type that does not apply to an asset (no colour word, one object, ...) is skipped and the
    draw renormalised over the types that do. Each pair repeats the asset's positive row, so the
    dataset is balanced between "Yes" and "No" whatever ``pairs_per_asset`` is.
    """

    ratios: dict[str, float] = field(
        default_factory=lambda: {
            "caption_swap": 1.0,
            "color": 1.0,
            "object": 1.0,
            "count": 1.0,
            "relation": 1.0,
            "relation_swap": 1.0,
            "color_swap": 1.0,
            "shape_swap": 0.5,
            "multiview_mix": 0.5,
        }
    )
    pairs_per_asset: int = 1

    def __post_init__(self) -> None:
        unknown = set(self.ratios) - set(NEGATIVE_TYPES)
        if unknown:
            raise ValueError(f"negatives.ratios: unknown type(s) {sorted(unknown)}; known: {list(NEGATIVE_TYPES)}")
        if any(v < 0 for v in self.ratios.values()) or sum(self.ratios.values()) <= 0:
            raise ValueError(f"negatives.ratios: weights must be >= 0 with a positive sum, got {self.ratios}")
        if self.pairs_per_asset < 1:
            raise ValueError("negatives.pairs_per_asset must be >= 1")


@dataclass
class Negative:
    type: str
    text: str
    detail: dict


# --------------------------------------------------------------------------- procedural (exact)


def procedural_negative(scene: Scene, kind: str, rng: np.random.Generator, colors: list[str], shapes: list[str]) -> Negative | None:
    """A false caption of ``kind`` for ``scene``, or None when the type does not apply."""
    cap = scene.caption
    candidates: list[tuple[SceneCaption, dict]] = []
    groups = list(range(len(cap.groups)))
    if kind == "color":
        for gi in groups:
            for c in colors:
                if c != cap.groups[gi].color:
                    candidates.append((_with_group(cap, gi, color=c), {"group": gi, "from": cap.groups[gi].color, "to": c}))
    elif kind == "object":
        for gi in groups:
            for s in shapes:
                if s != cap.groups[gi].shape:
                    candidates.append((_with_group(cap, gi, shape=s), {"group": gi, "from": cap.groups[gi].shape, "to": s}))
    elif kind == "count":
        for gi in groups:
            for n in range(1, 5):
                if n != cap.groups[gi].count:
                    candidates.append((_with_group(cap, gi, count=n), {"group": gi, "from": cap.groups[gi].count, "to": n}))
    elif kind == "relation" and cap.relation is not None:
        # "next to" is never used as a replacement: side by side and in front are both "next to"
        # for many people, so such a negative would not be exact.
        for r in RELATIONS:
            if r not in (cap.relation, "next_to"):
                candidates.append((replace(cap, relation=r), {"from": cap.relation, "to": r}))
    elif kind == "relation_swap" and cap.relation is not None and cap.relation != "next_to":
        candidates.append((SceneCaption(cap.groups[::-1], cap.relation), {"swapped": [cap.groups[0].phrase(), cap.groups[1].phrase()]}))
    elif kind in ("color_swap", "shape_swap") and len(cap.groups) == 2:
        attr = "color" if kind == "color_swap" else "shape"
        a, b = (getattr(g, attr) for g in cap.groups)
        if a != b:
            swapped = SceneCaption((replace(cap.groups[0], **{attr: b}), replace(cap.groups[1], **{attr: a})), cap.relation)
            candidates.append((swapped, {"swapped": [a, b]}))
    if not candidates:
        return None
    for i in rng.permutation(len(candidates)):
        new, detail = candidates[int(i)]
        if not caption_holds(scene, new):
            return Negative(kind, new.text(), detail)
    return None


def _with_group(cap: SceneCaption, gi: int, **changes) -> SceneCaption:
    groups = list(cap.groups)
    groups[gi] = replace(groups[gi], **changes)
    return SceneCaption(tuple(groups), cap.relation)


# --------------------------------------------------------------------------- free text (rule-based)

# Colour words by family; a replacement comes from another family (never grey -> gray).
_COLOR_FAMILIES = [
    ["red", "crimson", "scarlet", "maroon"],
    ["orange"],
    ["yellow", "golden", "gold"],
    ["green", "lime", "olive"],
    ["blue", "navy", "azure"],
    ["cyan", "turquoise", "teal"],
    ["purple", "violet", "lilac", "magenta"],
    ["pink"],
    ["brown", "tan", "beige", "bronze"],
    ["black"],
    ["white", "ivory", "cream"],
    ["gray", "grey", "silver"],
]
_COLOR_REPLACEMENTS = ["red", "orange", "yellow", "green", "blue", "cyan", "purple", "pink", "brown", "black", "white", "gray"]
COLOR_FAMILY = {w: i for i, fam in enumerate(_COLOR_FAMILIES) for w in fam}

# Object nouns by category, singular: a replacement is drawn from the same category first, which
# keeps the negative hard ("a dog" -> "a cat", not "a dog" -> "a castle").
_OBJECT_CATEGORIES = {
    "animal": "dog cat horse bird rabbit bear lion tiger elephant fox owl frog fish duck cow pig sheep monkey penguin turtle mouse squirrel deer wolf dragon dinosaur snake giraffe zebra parrot eagle chicken goat kangaroo koala panda shark whale dolphin octopus crab bee butterfly unicorn",
    "furniture": "chair table sofa couch bed lamp desk shelf bookshelf cabinet stool bench armchair dresser wardrobe",
    "vehicle": "car truck bus bicycle bike motorcycle airplane plane boat ship train tractor helicopter rocket scooter van tank submarine",
    "food": "apple banana cake pizza burger hamburger bread cupcake donut pear strawberry cookie sandwich carrot pumpkin watermelon cherry lemon pineapple taco croissant egg",
    "object": "cup mug bottle vase bowl teapot pot basket box bucket hammer sword shield guitar violin piano drum clock book umbrella hat shoe boot helmet camera phone laptop computer lantern candle key crown ring backpack bag chest barrel teddy ball balloon kite lamp candlestick",
    "structure": "house castle tower bridge church lighthouse windmill tent igloo cabin fountain statue",
    "shape": "cube sphere cylinder cone torus pyramid prism disc ring",
    "nature": "tree flower rock mushroom cactus plant bush stone log leaf shell",
    "figure": "robot astronaut knight wizard soldier pirate man woman boy girl child person chef doctor",
}
_IRREGULAR_PLURALS = {"mouse": "mice", "sheep": "sheep", "fish": "fish", "deer": "deer", "man": "men", "woman": "women", "child": "children", "person": "people", "knife": "knives", "leaf": "leaves", "shelf": "shelves", "wolf": "wolves", "goose": "geese", "cactus": "cacti"}
NOUN_CATEGORY = {w: cat for cat, words in _OBJECT_CATEGORIES.items() for w in words.split()}


def plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


PLURAL_TO_SINGULAR = {plural(w): w for w in NOUN_CATEGORY}

_NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

# Relation phrases and their replacements; longest first so "on top of" wins over "on".
_RELATION_REPLACEMENTS = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "on the left of": "on the right of",
    "on the right of": "on the left of",
    "left of": "right of",
    "right of": "left of",
    "on top of": "under",
    "in front of": "behind",
    "behind": "in front of",
    "above": "below",
    "below": "above",
    "under": "on top of",
    "underneath": "on top of",
    "beneath": "on top of",
    "inside": "outside",
    "outside": "inside",
    "next to": "far from",
    "beside": "far from",
    "on": "under",
    "in": "next to",
}
RELATION_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _RELATION_REPLACEMENTS), key=len, reverse=True)) + r")\b", re.IGNORECASE)
_WORD_RE = re.compile(r"[A-Za-z]+")


def text_negative(caption: str, kind: str, rng: np.random.Generator) -> Negative | None:
    """A rule-based hard negative of ``kind`` for a free-text caption, or None if none applies."""
    edits: list[tuple[int, int, str, str]] = []  # (start, end, original, replacement)
    if kind == "color":
        for m in _WORD_RE.finditer(caption):
            fam = COLOR_FAMILY.get(m.group().lower())
            if fam is not None:
                choices = [c for c in _COLOR_REPLACEMENTS if COLOR_FAMILY[c] != fam]
                edits.append((m.start(), m.end(), m.group(), _match_case(m.group(), str(rng.choice(choices)))))
    elif kind == "object":
        for m in _WORD_RE.finditer(caption):
            word = m.group().lower()
            singular = PLURAL_TO_SINGULAR.get(word, word)
            cat = NOUN_CATEGORY.get(singular)
            if cat is None or word in COLOR_FAMILY:
                continue
            pool = [w for w in _OBJECT_CATEGORIES[cat].split() if w != singular]
            new = str(rng.choice(pool))
            if word != singular:
                new = plural(new)
            edits.append((m.start(), m.end(), m.group(), _match_case(m.group(), new)))
    elif kind == "count":
        for m in re.finditer(r"\b(" + "|".join(_NUMBERS) + r"|[2-9]|1[0-9])\b", caption, re.IGNORECASE):
            word = m.group().lower()
            if word.isdigit():
                choices = [str(n) for n in range(2, 10) if str(n) != word]
            else:
                choices = [n for n in _NUMBERS if n != word]
            edits.append((m.start(), m.end(), m.group(), _match_case(m.group(), str(rng.choice(choices)))))
    elif kind == "relation":
        for m in RELATION_RE.finditer(caption):
            edits.append((m.start(), m.end(), m.group(), _match_case(m.group(), _RELATION_REPLACEMENTS[m.group().lower()])))
    elif kind == "relation_swap":
        return _relation_swap(caption)
    elif kind in ("color_swap", "shape_swap"):
        return _attribute_swap(caption, kind)
    else:
        raise ValueError(f"no rule-based negative of type {kind!r}")
    if not edits:
        return None
    start, end, old, new = edits[int(rng.integers(len(edits)))]
    text = _article_before(caption[:start], new) + new + caption[end:]
    return Negative(kind, text, {"span": [start, end], "from": old, "to": new})


def _attribute_swap(caption: str, kind: str) -> Negative | None:
    """The first two colour words of different families (``color_swap``) or the first two object
    nouns of the word lists (``shape_swap``) exchanged: "a red cube and a blue ball" -> "a blue cube
    and a red ball" / "a red ball and a blue cube". None with fewer than two."""
    def singular(word: str) -> str:
        return PLURAL_TO_SINGULAR.get(word.lower(), word.lower())

    found: list[re.Match] = []
    for m in _WORD_RE.finditer(caption):
        word = m.group().lower()
        if kind == "color_swap":
            family = COLOR_FAMILY.get(word)
            if family is not None and all(COLOR_FAMILY[f.group().lower()] != family for f in found):
                found.append(m)
        elif word not in COLOR_FAMILY and NOUN_CATEGORY.get(singular(word)) is not None:
            if all(singular(f.group()) != singular(word) for f in found):
                found.append(m)
        if len(found) == 2:
            break
    if len(found) < 2:
        return None
    first, second = found

    def as_at(word: str, slot: re.Match) -> str:  # the other word, in this slot's number and case
        if kind == "shape_swap":
            slot_is_plural = slot.group().lower() != singular(slot.group())
            word = plural(singular(word)) if slot_is_plural else singular(word)
        return _match_case(slot.group(), word.lower())

    a, b = as_at(second.group(), first), as_at(first.group(), second)
    head = caption[: first.start()]
    text = _article_before(head, a) + a + caption[first.end() : second.start()]
    text = _article_before(text, b) + b + caption[second.end() :]
    return Negative(kind, text, {"swapped": [first.group(), second.group()]})


def _relation_swap(caption: str) -> Negative | None:
    """"A red cube on top of a blue sphere" -> "A blue sphere on top of a red cube"."""
    body = caption.strip()
    end_punct = body[-1] if body and body[-1] in ".!" else ""
    body = body.rstrip(".!").strip()
    for m in RELATION_RE.finditer(body):
        if m.group().lower() in ("on", "in"):
            continue  # too often part of a verb phrase ("turned on", "dressed in")
        left, right = body[: m.start()].strip(), body[m.end() :].strip()
        # only short noun phrases on both sides: longer ones usually hold verbs or clauses
        if not left or not right or len(left.split()) > 5 or len(right.split()) > 5 or "," in left + right:
            continue
        if left.lower() == right.lower():
            return None
        new_left = right[0].upper() + right[1:] if left[0].isupper() else right
        first = left.split()[0]
        # "A red cube" moves to the end as "a red cube"; a name or acronym keeps its capital
        lower = first in ("A", "An", "The") or first[1:].islower()
        new_right = left[0].lower() + left[1:] if left[0].isupper() and lower else left
        text = f"{new_left} {m.group()} {new_right}{end_punct}"
        return Negative("relation_swap", text, {"relation": m.group(), "swapped": [left, right]})
    return None


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _article_before(prefix: str, word: str) -> str:
    """Make the "a"/"an" that ends ``prefix`` agree with the replacement ``word``."""
    m = re.search(r"\b(an?)(\s+)$", prefix, re.IGNORECASE)
    if m is None:
        return prefix
    want = "an" if word[:1].lower() in "aeiou" else "a"
    return prefix[: m.start()] + _match_case(m.group(1), want) + m.group(2)
