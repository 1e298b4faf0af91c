"""The words the toolkit reads and writes about scenes, and what its relation words mean.

One place, free of heavy dependencies (numpy only), for what data, critic, generation and eval
must agree on:

* the **colour palette** of procedural scenes (and extra colour words that seed a colour in
  generation), the **shapes** with their plurals, the **number words**;
* the **caption grammar** of procedural scenes: :class:`Group`, :class:`SceneCaption`,
  :func:`parse_caption`, :func:`caption_words`;
* the **relation vocabulary**: canonical keys, their caption phrases, the synonyms accepted from
  LLMs (:func:`normalise_relation`), and one geometric reading of each relation on axis-aligned
  boxes (:func:`relation_holds`) that the data builder, the layout planner and the ground-truth
  checker share, each with the tolerance it needs.

Frame (see ``coherendream.cameras``): y is up, the front camera (azimuth 0) looks along -z, so
"left of" is smaller x and "in front of" is larger z.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Named palette: linear-ish sRGB in [0, 1]; chosen far apart in hue so that a caption's colour word
# is decidable from pixels. White is left out on purpose: the background is white.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "green": (0.10, 0.62, 0.16),
    "blue": (0.10, 0.24, 0.92),
    "yellow": (0.96, 0.84, 0.08),
    "orange": (0.98, 0.50, 0.04),
    "purple": (0.52, 0.14, 0.74),
    "pink": (0.98, 0.46, 0.72),
    "cyan": (0.08, 0.80, 0.86),
    "brown": (0.48, 0.28, 0.10),
    "black": (0.07, 0.07, 0.07),
}
# Colour words beyond the palette, so that e.g. "white" or "golden" in a free prompt still seed a
# colour in generation. Never used for procedural scenes.
EXTRA_COLORS: dict[str, tuple[float, float, float]] = {
    "white": (0.95, 0.95, 0.95), "gray": (0.5, 0.5, 0.5), "grey": (0.5, 0.5, 0.5), "silver": (0.75, 0.75, 0.78),
    "gold": (0.85, 0.68, 0.20), "golden": (0.85, 0.68, 0.20), "beige": (0.90, 0.85, 0.70),
    "ivory": (0.95, 0.93, 0.85), "burgundy": (0.50, 0.05, 0.15), "emerald": (0.10, 0.60, 0.35),
    "navy": (0.05, 0.10, 0.40), "violet": (0.55, 0.25, 0.80), "magenta": (0.85, 0.10, 0.65),
    "turquoise": (0.20, 0.80, 0.75), "teal": (0.05, 0.50, 0.50), "crimson": (0.75, 0.05, 0.15),
    "tan": (0.80, 0.68, 0.50), "bronze": (0.60, 0.40, 0.20), "brass": (0.70, 0.60, 0.25),
    "copper": (0.72, 0.45, 0.20), "neon": (0.60, 1.00, 0.20), "cherry": (0.80, 0.05, 0.15),
    "mahogany": (0.40, 0.15, 0.10),
}  # fmt: skip
GREY = (0.5, 0.5, 0.5)
# Every colour word, the palette's values winning where a word is in both.
ALL_COLORS: dict[str, tuple[float, float, float]] = {**EXTRA_COLORS, **PALETTE}
COLOR_WORDS = frozenset(ALL_COLORS)

SHAPES: dict[str, str] = {"cube": "cubes", "sphere": "spheres", "cylinder": "cylinders", "cone": "cones", "torus": "tori"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4  # objects in a procedural scene, all groups together

# Canonical relation keys. The first six are the procedural grammar's, with their caption phrases.
RELATIONS: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "on_top_of": "on top of",
    "in_front_of": "in front of",
    "behind": "behind",
    "next_to": "next to",
}
RELATION_KEYS: tuple[str, ...] = (*RELATIONS, "below", "above", "inside", "with")
# Relations whose two boxes may overlap on purpose: declared containment or attachment.
OVERLAP_OK_RELATIONS = frozenset({"inside", "with"})
# Phrasings (lower case, words joined by "_") accepted from LLMs and mapped to canonical keys.
_RELATION_SYNONYMS: dict[str, str] = {
    "left": "left_of", "to_the_left_of": "left_of", "on_the_left_of": "left_of", "left_of": "left_of",
    "right": "right_of", "to_the_right_of": "right_of", "on_the_right_of": "right_of", "right_of": "right_of",
    "on": "on_top_of", "on_top": "on_top_of", "on_top_of": "on_top_of", "atop": "on_top_of", "upon": "on_top_of",
    "on_top_on": "on_top_of", "resting_on": "on_top_of", "sitting_on": "on_top_of", "stacked_on": "on_top_of",
    "in_front": "in_front_of", "in_front_of": "in_front_of", "front_of": "in_front_of",
    "behind": "behind", "in_back_of": "behind", "back_of": "behind", "behind_of": "behind",
    "next_to": "next_to", "beside": "next_to", "besides": "next_to", "near": "next_to", "by": "next_to",
    "alongside": "next_to", "adjacent_to": "next_to", "close_to": "next_to", "near_to": "next_to",
    "against": "next_to", "around": "next_to", "between": "next_to",
    "below": "below", "under": "below", "underneath": "below", "beneath": "below",
    "above": "above", "over": "above",
    "inside": "inside", "in": "inside", "within": "inside", "inside_of": "inside", "into": "inside",
    "with": "with", "holding": "with", "wearing": "with", "attached_to": "with", "has": "with", "carrying": "with",
}  # fmt: skip


def normalise_relation(word: str) -> str:
    """Map a relation phrase (``"to the left of"``, ``"Left-Of"``, ``"beside"``) to its canonical key."""
    if not isinstance(word, str):
        raise ValueError(f"relation must be a string, got {type(word).__name__}")
    key = re.sub(r"[\s\-]+", "_", word.strip().lower())
    if key in _RELATION_SYNONYMS:
        return _RELATION_SYNONYMS[key]
    raise ValueError(f"unknown relation {word[:40]!r}; known relations: {', '.join(RELATION_KEYS)}")


def first_color_word(text: str, colors: dict | frozenset = PALETTE) -> str | None:
    """The first word of ``text`` that names a colour in ``colors`` (the palette by default)."""
    for word in re.split(r"[^a-z]+", text.lower()):
        if word in colors:
            return word
    return None


# ---------------------------------------------------------------------------------------------------
# Caption grammar of procedural scenes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """``count`` identical primitives: ``Group("cube", "red", 2)`` is "two red cubes"."""

    shape: str
    color: str
    count: int = 1

    def phrase(self) -> str:
        if self.count == 1:
            article = "an" if self.color[0] in "aeiou" else "a"
            return f"{article} {self.color} {self.shape}"
        return f"{NUMBER_WORDS[self.count]} {self.color} {SHAPES[self.shape]}"


@dataclass(frozen=True)
class SceneCaption:
    """The structured content of a caption: one group, or two groups and a relation."""

    groups: tuple[Group, ...]
    relation: str | None = None

    def text(self) -> str:
        if self.relation is None:
            return self.groups[0].phrase()
        return f"{self.groups[0].phrase()} {RELATIONS[self.relation]} {self.groups[1].phrase()}"


def caption_words() -> list[str]:
    """Every word the caption grammar can write (articles, colours, shapes and plurals, number
    words, relation phrases), in a fixed order: the vocabulary of the embedded models' tokenizers."""
    words = ["a", "an", "the", "and", "of", "with", "object", "objects", *PALETTE]
    for singular, plural in SHAPES.items():
        words += [singular, plural]
    words += list(NUMBER_WORDS.values())
    for phrase in RELATIONS.values():
        words += phrase.split()
    return list(dict.fromkeys(words))


_ARTICLES = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()}}
_PLURAL_SHAPES = {plural: shape for shape, plural in SHAPES.items()}


def parse_caption(text: str) -> SceneCaption | None:
    """Inverse of ``SceneCaption.text`` for the procedural grammar; None for any other text.

    ``parse_caption("two red cubes to the left of a blue sphere")`` gives the structured caption,
    so that any caption of this grammar (a swapped one, a prompt given to the generator) can be
    checked against a scene (``coherendream.data.procedural.caption_holds``).
    """
    words = text.strip().rstrip(".").lower().split()

    def group(ws: list[str]) -> Group | None:
        if len(ws) != 3 or ws[0] not in _ARTICLES or ws[1] not in PALETTE:
            return None
        count = _ARTICLES[ws[0]]
        shape = ws[2] if count == 1 else _PLURAL_SHAPES.get(ws[2])
        if shape not in SHAPES or (count == 1 and ws[2] not in SHAPES):
            return None
        return Group(shape, ws[1], count)

    if len(words) == 3:
        g = group(words)
        return SceneCaption((g,)) if g else None
    for key, phrase in RELATIONS.items():
        p = phrase.split()
        if len(words) == 6 + len(p) and words[3 : 3 + len(p)] == p:
            a, b = group(words[:3]), group(words[3 + len(p) :])
            if a and b:
                return SceneCaption((a, b), key)
    return None


# ---------------------------------------------------------------------------------------------------
# What a relation means for two boxes
# ---------------------------------------------------------------------------------------------------


def relation_holds(relation: str, a_lo, a_hi, b_lo, b_hi, tol: float = 0.0) -> bool:
    """Whether box ``a`` stands in ``relation`` (a canonical key) to box ``b``.

    Boxes are axis-aligned, given by their corners ``lo`` and ``hi`` (3-vectors); a point is a box
    with ``lo == hi``. ``tol`` is how far the reading bends: boxes may overlap by up to ``tol``
    along the axis of a side-by-side relation, and faces within ``tol`` count as touching. Callers
    choose it: exact scenes use 0 (the data builder decides negatives with it), planned layouts a
    little (LLM boxes are rounded), and centroids of generated objects 0.

    * ``left_of``/``right_of`` (x), ``in_front_of``/``behind`` (z): the centres are ordered along
      the axis and the boxes overlap along it by less than ``tol``;
    * ``above``/``below``: the bottom of one is at least the top of the other, less ``tol``;
    * ``on_top_of``: ``a``'s bottom is within ``tol`` of ``b``'s top and their footprints (x and z)
      overlap; two points cannot touch, so for points it reads as ``above``;
    * ``next_to``: side by side along x (the camera's horizontal): the boxes are further apart along
      x than along z or y, and overlap along x by less than ``tol``;
    * ``inside``: ``a``'s centre within ``b``'s footprint and ``a``'s bottom within ``b``'s height;
    * ``with``: the boxes touch or overlap (gap at most ``tol``).
    """
    a_lo, a_hi, b_lo, b_hi = (np.asarray(v, dtype=float) for v in (a_lo, a_hi, b_lo, b_hi))
    # Per-axis separation: positive when the boxes are apart along the axis, minus the depth of
    # their overlap when they overlap.
    sep = np.maximum(a_lo - b_hi, b_lo - a_hi)
    delta = (a_lo + a_hi) / 2 - (b_lo + b_hi) / 2
    apart = sep > -tol
    if relation == "left_of":
        return bool(delta[0] < 0 and apart[0])
    if relation == "right_of":
        return bool(delta[0] > 0 and apart[0])
    if relation == "in_front_of":
        return bool(delta[2] > 0 and apart[2])
    if relation == "behind":
        return bool(delta[2] < 0 and apart[2])
    if relation == "above":
        return bool(a_lo[1] >= b_hi[1] - tol)
    if relation == "below":
        return bool(a_hi[1] <= b_lo[1] + tol)
    if relation == "on_top_of":
        if np.array_equal(a_lo, a_hi) and np.array_equal(b_lo, b_hi):
            return bool(delta[1] > 0)
        # a floor of 1e-6 on the contact tolerance: stacked boxes meet up to float rounding
        return bool(abs(a_lo[1] - b_hi[1]) <= max(tol, 1e-6) and sep[0] < tol and sep[2] < tol)
    if relation == "next_to":
        return bool(apart[0] and sep[0] >= sep[2] and sep[1] < sep[0])
    if relation == "inside":
        centre = (a_lo + a_hi) / 2
        in_footprint = bool((centre[[0, 2]] >= b_lo[[0, 2]] - tol).all() and (centre[[0, 2]] <= b_hi[[0, 2]] + tol).all())
        return in_footprint and bool(b_lo[1] - tol <= a_lo[1] <= b_hi[1])
    if relation == "with":
        return float(np.linalg.norm(np.clip(sep, 0.0, None))) <= tol
    raise ValueError(f"unknown relation {relation!r}; known relations: {', '.join(RELATION_KEYS)}")
