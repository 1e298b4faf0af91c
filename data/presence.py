"""Attribute-presence questions about a procedural scene, an auxiliary task for training critics.

A caption check ("two red cubes to the left of a blue sphere": yes or no?) gives one bit per row,
and on a scene of two groups a "no" can hang on any one of its colour or shape words. Presence
questions train that word-against-views check one word at a time: the critic's own question asked
about a single colour (``"red"``) or shape (``"cube"``), answered Yes exactly when some object of
the scene has it. A bare word is not a caption of the procedural grammar (no article, no count),
so these rows never contradict a caption row.

The truth comes from the scene's layout (the ``layout`` column of a procedural build), so it is
exact. Half the questions are about an attribute that is present, half about one that is absent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from coherendream.vocabulary import PALETTE, SHAPES


def presence_questions(
    objects: Iterable[tuple[str, str]],
    count: int,
    rng: np.random.Generator,
    colors: Sequence[str] = tuple(PALETTE),
    shapes: Sequence[str] = tuple(SHAPES),
) -> list[tuple[str, bool]]:
    """``count`` (word, present) questions about a scene whose objects have these (colour, shape)s.

    Each question is about a colour or a shape (equally likely), present with probability 1/2; a
    word is drawn uniformly from the present, or the absent, ``colors`` / ``shapes``.

    Raises:
        ValueError: on an empty scene or an attribute outside ``colors`` / ``shapes``.
    """
    objects = [(str(c), str(s)) for c, s in objects]
    if not objects:
        raise ValueError("presence questions need a scene with at least one object")
    attributes = ({c for c, _ in objects}, {s for _, s in objects})
    outside = (attributes[0] - set(colors)) | (attributes[1] - set(shapes))
    if outside:
        raise ValueError(f"scene attributes {sorted(outside)} are not among the known colours and shapes")
    out: list[tuple[str, bool]] = []
    for _ in range(count):
        which = int(rng.integers(2))
        present = attributes[which]
        absent = set((colors, shapes)[which]) - present
        is_present = bool(rng.random() < 0.5) or not absent
        options = sorted(present if is_present else absent)
        out.append((options[int(rng.integers(len(options)))], is_present))
    return out
