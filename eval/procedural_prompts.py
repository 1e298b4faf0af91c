"""The procedural text-to-3D prompt set: prompts with exact answers, fixed and versioned.

Every prompt comes from the procedural grammar (``coherendream.data.procedural``), so its ground
truth is known exactly: each group's colour, shape and count, and the relation between two groups.
Four categories, ``per_category`` prompts each:

- ``single``: one object ("a red cube");
- ``count``: one counted group ("three blue spheres");
- ``relation``: two single objects in a relation ("a red cube to the left of a blue sphere"),
  the relations taken in turn;
- ``two_groups``: two groups, at least one counted ("two red cubes behind a blue cone").

Two groups never share a colour (so that which object got which colour is decidable), and
colours and shapes are dealt from reshuffled decks so that each category covers the palette. The set is
drawn once from ``seed`` (no seed the embedded critic or prior was trained on) and committed as
``procedural_prompts_v{VERSION}.jsonl`` beside this module; ``build_prompt_set`` regenerates it
and a test checks that the committed file is exactly that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coherendream.vocabulary import MAX_OBJECTS, PALETTE, RELATIONS, SHAPES, Group, SceneCaption, parse_caption

__all__ = ["VERSION", "SEED", "CATEGORIES", "PromptSpec", "build_prompt_set", "read_prompt_set", "default_prompt_set_path"]

VERSION = 1
SEED = 20261204
CATEGORIES = ("single", "count", "relation", "two_groups")


@dataclass(frozen=True)
class PromptSpec:
    """One benchmark prompt and its ground truth."""

    id: str
    category: str
    caption: SceneCaption

    @property
    def prompt(self) -> str:
        return self.caption.text()

    def to_dict(self) -> dict:
        return {
            "version": VERSION,
            "id": self.id,
            "category": self.category,
            "prompt": self.prompt,
            "groups": [{"color": g.color, "shape": g.shape, "count": g.count} for g in self.caption.groups],
            "relation": self.caption.relation,
        }


def default_prompt_set_path() -> Path:
    return Path(__file__).resolve().parent / f"procedural_prompts_v{VERSION}.jsonl"


def build_prompt_set(seed: int = SEED, per_category: int = 6) -> list[PromptSpec]:
    """Draw the prompt set (deterministic in ``seed``); see the module docstring."""
    rng = np.random.default_rng(seed)
    # Colours and shapes are dealt from decks reshuffled whenever they run out: every category
    # covers the palette and the shapes, without the pairs repeating in step.
    decks: dict[str, list[str]] = {"color": [], "shape": []}

    def deal(kind: str, values: list[str]) -> str:
        if not decks[kind]:
            decks[kind] = [values[i] for i in rng.permutation(len(values))]
        return decks[kind].pop()

    def next_group(count: int, avoid_color: str | None = None) -> Group:
        color = deal("color", list(PALETTE))
        while color == avoid_color:
            decks["color"].insert(0, color)  # back under the deck, dealt later
            color = deal("color", list(PALETTE))
        return Group(deal("shape", list(SHAPES)), color, count)

    relations = [r for r in RELATIONS]
    grouped = [r for r in RELATIONS if r != "on_top_of"]  # stacking is for single objects only
    out: list[PromptSpec] = []
    for i in range(per_category):
        out.append(PromptSpec(f"single-{i:02d}", "single", SceneCaption((next_group(1),))))
    for i in range(per_category):
        out.append(PromptSpec(f"count-{i:02d}", "count", SceneCaption((next_group(int(rng.integers(2, MAX_OBJECTS + 1))),))))
    for i in range(per_category):
        a = next_group(1)
        out.append(PromptSpec(f"relation-{i:02d}", "relation", SceneCaption((a, next_group(1, a.color)), relations[i % len(relations)])))
    for i in range(per_category):
        n0 = int(rng.integers(1, MAX_OBJECTS))
        n1 = int(rng.integers(1, MAX_OBJECTS - n0 + 1))
        if n0 == n1 == 1:
            n0 = 2
        a = next_group(n0)
        out.append(PromptSpec(f"two_groups-{i:02d}", "two_groups", SceneCaption((a, next_group(n1, a.color)), grouped[i % len(grouped)])))
    return out


def read_prompt_set(path: str | Path | None = None) -> list[PromptSpec]:
    """Read a prompt set JSONL (default: the committed one), checking each row's version and ground truth."""
    path = Path(path) if path is not None else default_prompt_set_path()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FileNotFoundError(f"prompt set {path}: cannot be read ({getattr(err, 'strerror', None) or err})") from err
    specs: list[PromptSpec] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from err
        if row.get("version") != VERSION:
            raise ValueError(f"{path}:{n}: version {row.get('version')!r}, this toolkit reads version {VERSION}")
        caption = parse_caption(str(row.get("prompt", "")))
        if caption is None:
            raise ValueError(f"{path}:{n}: prompt {row.get('prompt')!r} is not of the procedural grammar")
        spec = PromptSpec(str(row.get("id", "")), str(row.get("category", "")), caption)
        if spec.to_dict() != row:
            raise ValueError(f"{path}:{n}: the ground truth does not match the prompt {spec.prompt!r}")
        if spec.category not in CATEGORIES or not spec.id or spec.id in seen:
            raise ValueError(f"{path}:{n}: bad or repeated id/category ({spec.id!r}, {spec.category!r})")
        seen.add(spec.id)
        specs.append(spec)
    if not specs:
        raise ValueError(f"{path}: no prompts")
    return specs
