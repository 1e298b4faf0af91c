"""Scene layouts for seeding text-to-3D generation: schema, validation, repair, seeding.

A *layout* is a list of axis-aligned boxes, one per object, plus the spatial relations between them,
in the unit cube ``[-0.5, 0.5]^3`` and the frame of ``coherendream.cameras`` (+Y up, +Z towards the
front viewer, +X to the right in the front view). JSON form::

    {"objects": [{"name": "cube", "prompt": "a red cube", "center": [x, y, z], "size": [w, h, d]}],
     "relations": [{"subject": 0, "relation": "left_of", "object": 1}]}

Layouts come from an LLM (``coherendream.generation.layout_llm``) or from the rule-based planner
(``coherendream.generation.layout_rules.RuleBasedPlanner``), which also serves as the fallback when the
LLM's answer fails validation; both answer the :class:`LayoutPlanner` protocol defined here. LLM
output is untrusted input, so :func:`parse_layout_text` bounds the text length and the object count
*before* building any model, rejects NaN/Infinity, and reports in plain words what was wrong.

Relations use the keys of ``coherendream.vocabulary.RELATION_KEYS`` (the procedural grammar's
``left_of``, ``right_of``, ``on_top_of``, ``in_front_of``, ``behind``, ``next_to``, plus ``below``,
``above``, ``inside`` and ``with``: attached to / held by / worn by); common phrasings ("on top of",
"beside", "under", "in") are normalised to these keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from coherendream.llm import extract_json as llm_extract_json
from coherendream.vocabulary import ALL_COLORS, GREY, OVERLAP_OK_RELATIONS, first_color_word, normalise_relation, relation_holds

# Limits on untrusted input (the answer's length is bounded by coherendream.llm.extract_json first).
MAX_OBJECTS = 16
MAX_RELATIONS = 64
MAX_NAME_CHARS = 64
MAX_PROMPT_CHARS = 300
# Boxes may poke out of the cube by this much (float noise in LLM answers) and still validate.
BOUNDS_TOL = 1e-3
# Largest allowed intersection volume as a fraction of the *smaller* box's volume: catches a small
# box buried in a big one, which IoU would not. Touching faces (stacking) give zero.
DEFAULT_MAX_OVERLAP = 0.25
MIN_SIZE = 1e-3

# How far the layout reading of a relation bends (see coherendream.vocabulary.relation_holds):
# LLM boxes are rounded to a few decimals, so faces within 0.02 touch.
RELATION_TOL = 0.02


class LayoutError(ValueError):
    """An answer or a layout that cannot be used; the message says which input was wrong and why."""


def _vec3(value: Any, what: str) -> tuple[float, float, float]:
    """Three finite numbers; booleans and strings are refused rather than silently coerced."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{what} must be a list of 3 numbers [x, y, z], got {str(value)[:60]!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{what} must hold numbers, got {v!r}")
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"{what} must be finite, got {v!r}")
        out.append(f)
    return out[0], out[1], out[2]


class LayoutObject(BaseModel):
    """One object's box: ``center`` and full extent ``size`` along x, y, z in unit-cube units."""

    # Extra keys (an LLM adding "color") are ignored: they are harmless and refusing them would send
    # otherwise good answers to the fallback.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    center: tuple[float, float, float]
    size: tuple[float, float, float]

    @field_validator("center", mode="before")
    @classmethod
    def _center(cls, v: Any) -> tuple[float, float, float]:
        return _vec3(v, "center")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> tuple[float, float, float]:
        size = _vec3(v, "size")
        if min(size) < MIN_SIZE:
            raise ValueError(f"size must be > {MIN_SIZE} along every axis, got {list(size)}")
        return size

    @property
    def lo(self) -> np.ndarray:
        return np.asarray(self.center) - np.asarray(self.size) / 2

    @property
    def hi(self) -> np.ndarray:
        return np.asarray(self.center) + np.asarray(self.size) / 2

    @property
    def volume(self) -> float:
        return float(np.prod(self.size))


class LayoutRelation(BaseModel):
    """``subject`` stands in ``relation`` to ``object``; both are object indices or names."""

    model_config = ConfigDict(extra="ignore")

    subject: int | str
    relation: str
    object: int | str

    @field_validator("subject", "object", mode="before")
    @classmethod
    def _ref(cls, v: Any) -> int | str:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError(f"must be an object index or name, got {str(v)[:40]!r}")
        if isinstance(v, str) and len(v) > MAX_NAME_CHARS:
            raise ValueError(f"object name longer than {MAX_NAME_CHARS} characters")
        return v

    @field_validator("relation")
    @classmethod
    def _relation(cls, v: str) -> str:
        return normalise_relation(v)


def box_overlap_fraction(a: LayoutObject, b: LayoutObject) -> float:
    """Intersection volume over the smaller box's volume (0 when the boxes only touch)."""
    inter = np.clip(np.minimum(a.hi, b.hi) - np.maximum(a.lo, b.lo), 0.0, None)
    return float(np.prod(inter)) / max(min(a.volume, b.volume), 1e-12)


class Layout(BaseModel):
    """A validated layout. Relations are stored with integer indices once validated.

    Validation context (``Layout.model_validate(data, context=...)``): ``check_geometry`` (default
    True) checks that boxes lie inside the cube and overlap at most ``max_overlap``; repair builds a
    draft with it off.
    """

    model_config = ConfigDict(extra="ignore")

    objects: list[LayoutObject] = Field(min_length=1, max_length=MAX_OBJECTS)
    relations: list[LayoutRelation] = Field(default_factory=list, max_length=MAX_RELATIONS)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Layout":
        ctx = info.context or {}
        self.relations = [self._resolve(i, r) for i, r in enumerate(self.relations)]
        if ctx.get("check_geometry", True):
            problems = geometry_problems(self, max_overlap=ctx.get("max_overlap", DEFAULT_MAX_OVERLAP))
            if problems:
                raise ValueError("; ".join(problems))
        return self

    def _resolve(self, i: int, rel: LayoutRelation) -> LayoutRelation:
        ids = [self._index(rel.subject, f"relations[{i}].subject"), self._index(rel.object, f"relations[{i}].object")]
        if ids[0] == ids[1]:
            raise ValueError(f"relations[{i}] relates object {ids[0]} to itself")
        return LayoutRelation(subject=ids[0], relation=rel.relation, object=ids[1])

    def _index(self, ref: int | str, where: str) -> int:
        n = len(self.objects)
        if isinstance(ref, int):
            if not 0 <= ref < n:
                raise ValueError(f"{where} = {ref} is not an object index (there are {n} objects)")
            return ref
        key = ref.strip().casefold()
        hits = [k for k, o in enumerate(self.objects) if o.name.casefold() == key]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(f"{where} = {ref!r} is ambiguous: {len(hits)} objects have that name")
        if key.isdigit() and int(key) < n:
            return int(key)
        raise ValueError(f"{where} = {ref!r} names no object (names: {[o.name for o in self.objects][:16]})")

    # -- convenience -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def overlap_exempt_pairs(self) -> set[frozenset[int]]:
        return {frozenset((r.subject, r.object)) for r in self.relations if r.relation in OVERLAP_OK_RELATIONS}

    def relation_violations(self) -> list[str]:
        """Relations that the boxes do not satisfy (``coherendream.vocabulary.relation_holds`` with ``RELATION_TOL``)."""
        out = []
        for r in self.relations:
            a, b = self.objects[r.subject], self.objects[r.object]
            if not relation_holds(r.relation, a.lo, a.hi, b.lo, b.hi, RELATION_TOL):
                out.append(f"{a.name!r} {r.relation} {b.name!r} does not hold for the boxes")
        return out


def geometry_problems(layout: Layout, max_overlap: float = DEFAULT_MAX_OVERLAP) -> list[str]:
    """Boxes outside the cube and pairs overlapping more than ``max_overlap`` (empty when fine)."""
    problems = []
    for i, o in enumerate(layout.objects):
        lo, hi = o.lo, o.hi
        if (lo < -0.5 - BOUNDS_TOL).any() or (hi > 0.5 + BOUNDS_TOL).any():
            problems.append(
                f"object {i} ({o.name!r}) spans {np.round(lo, 3).tolist()}..{np.round(hi, 3).tolist()}, "
                f"outside the unit cube [-0.5, 0.5]^3"
            )
    exempt = layout.overlap_exempt_pairs()
    objs = layout.objects
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            if frozenset((i, j)) in exempt:
                continue
            frac = box_overlap_fraction(objs[i], objs[j])
            if frac > max_overlap:
                problems.append(
                    f"objects {i} ({objs[i].name!r}) and {j} ({objs[j].name!r}) overlap by {frac:.0%} of the "
                    f"smaller box (at most {max_overlap:.0%} allowed unless related by inside/with)"
                )
    return problems


def _summarise_validation_error(err: ValidationError, limit: int = 6) -> str:
    parts = []
    for e in err.errors()[:limit]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "layout"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------------------
# Parsing untrusted text
# ---------------------------------------------------------------------------------------------------

def extract_json(text: str) -> dict:
    """The layout JSON object inside an LLM answer: bare, in a ```json fence, or wrapped in prose
    (``coherendream.llm.extract_json``). Raises :class:`LayoutError` when the text is too long,
    holds NaN/Infinity, or holds no JSON object."""
    return llm_extract_json(text, LayoutError, key="objects")


def _precheck(data: Any) -> None:
    """Cheap shape checks before pydantic builds anything: bounded counts, right container types."""
    if not isinstance(data, dict):
        raise LayoutError(f"the layout must be a JSON object, got {type(data).__name__}")
    objects = data.get("objects")
    if not isinstance(objects, list):
        raise LayoutError('the layout needs an "objects" list')
    if len(objects) > MAX_OBJECTS:
        raise LayoutError(f"the layout has {len(objects)} objects; at most {MAX_OBJECTS} are allowed")
    relations = data.get("relations", [])
    if not isinstance(relations, list):
        raise LayoutError('"relations" must be a list')
    if len(relations) > MAX_RELATIONS:
        raise LayoutError(f"the layout has {len(relations)} relations; at most {MAX_RELATIONS} are allowed")


def validate_layout(data: Any, *, max_overlap: float = DEFAULT_MAX_OVERLAP, check_geometry: bool = True) -> Layout:
    """A :class:`Layout` from a dict (or a Layout), fully checked; raises :class:`LayoutError`."""
    if isinstance(data, Layout):
        data = data.to_dict()
    _precheck(data)
    try:
        return Layout.model_validate(data, context={"check_geometry": check_geometry, "max_overlap": max_overlap})
    except ValidationError as e:
        raise LayoutError(f"invalid layout: {_summarise_validation_error(e)}") from None


def repair_layout(
    data: Any,
    *,
    max_shift: float = 0.1,
    min_scale: float = 0.6,
    max_overlap: float = DEFAULT_MAX_OVERLAP,
) -> tuple[Layout, list[str]]:
    """Fix mild geometric problems where it is safe, and say what was changed.

    Safe means: a box that pokes out of the cube by at most ``max_shift`` is moved (and, if larger
    than the cube by at most ``max_shift``, shrunk) inside; two boxes overlapping too much are shrunk
    about their centres, each to no less than ``min_scale`` of its size. Anything else (schema
    errors, far-out boxes, coincident boxes) is not guessed at: :class:`LayoutError` is raised.
    """
    if isinstance(data, Layout):
        data = data.to_dict()
    draft = validate_layout(data, check_geometry=False)
    repairs: list[str] = []
    centers = [np.asarray(o.center, dtype=np.float64) for o in draft.objects]
    sizes = [np.asarray(o.size, dtype=np.float64) for o in draft.objects]
    for i, o in enumerate(draft.objects):
        c, s = centers[i], sizes[i]
        if (s > 1.0).any():
            if (s > 1.0 + max_shift).any():
                raise LayoutError(f"object {i} ({o.name!r}) has size {list(o.size)}, far larger than the unit cube")
            s = np.minimum(s, 1.0)
            repairs.append(f"shrank object {i} ({o.name!r}) to fit the unit cube")
        lo, hi = c - s / 2, c + s / 2
        shift = np.where(lo < -0.5, -0.5 - lo, 0.0) + np.where(hi > 0.5, 0.5 - hi, 0.0)
        if np.abs(shift).max() > max_shift:
            raise LayoutError(
                f"object {i} ({o.name!r}) lies {np.abs(shift).max():.3f} outside the unit cube, more than the "
                f"{max_shift} that repair moves"
            )
        if np.abs(shift).max() > BOUNDS_TOL:
            repairs.append(f"moved object {i} ({o.name!r}) by {np.round(shift, 3).tolist()} into the unit cube")
        centers[i], sizes[i] = c + shift, s
    original = [s.copy() for s in sizes]
    exempt = draft.overlap_exempt_pairs()

    def current() -> Layout:
        objs = [
            {"name": o.name, "prompt": o.prompt, "center": centers[k].tolist(), "size": sizes[k].tolist()}
            for k, o in enumerate(draft.objects)
        ]
        return Layout.model_validate({"objects": objs, "relations": draft.to_dict()["relations"]}, context={"check_geometry": False})

    shrunk: set[int] = set()
    for _ in range(50):  # each round shrinks one pair by 10%; bounded by min_scale anyway
        lay = current()
        worst, pair = 0.0, None
        for i in range(len(lay.objects)):
            for j in range(i + 1, len(lay.objects)):
                if frozenset((i, j)) in exempt:
                    continue
                f = box_overlap_fraction(lay.objects[i], lay.objects[j])
                if f > max_overlap and f > worst:
                    worst, pair = f, (i, j)
        if pair is None:
            break
        for k in pair:
            if (sizes[k] * 0.9 < original[k] * min_scale - 1e-9).any():
                raise LayoutError(
                    f"objects {pair[0]} and {pair[1]} overlap by {worst:.0%}; shrinking them further than "
                    f"{min_scale:.0%} of their size would change the layout too much"
                )
            sizes[k] = sizes[k] * 0.9
            shrunk.add(k)
    for k in sorted(shrunk):
        scale = float(sizes[k][0] / original[k][0])
        repairs.append(f"shrank object {k} ({draft.objects[k].name!r}) to {scale:.0%} of its size to reduce overlap")
    final = current()
    problems = geometry_problems(final, max_overlap=max_overlap)
    if problems:
        raise LayoutError("could not repair the layout safely: " + "; ".join(problems))
    return validate_layout(final, max_overlap=max_overlap), repairs


def parse_layout_text(text: str, *, repair: bool = True, max_overlap: float = DEFAULT_MAX_OVERLAP) -> tuple[Layout, list[str]]:
    """Extract, bound-check and validate a layout from an LLM answer; returns ``(layout, repairs)``.

    With ``repair`` mild geometric problems are fixed (see :func:`repair_layout`) and listed;
    everything else raises :class:`LayoutError` with the reason.
    """
    data = extract_json(text)
    _precheck(data)
    try:
        return validate_layout(data, max_overlap=max_overlap), []
    except LayoutError as strict_error:
        if not repair:
            raise
        try:
            return repair_layout(data, max_overlap=max_overlap)
        except LayoutError as e:
            raise LayoutError(f"{strict_error}; repair failed: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Planner interface
# ---------------------------------------------------------------------------------------------------

@dataclass
class LayoutResult:
    """A planner's answer: the layout, where it came from, and what went wrong on the way.

    ``source`` is ``"llm"`` (the model's answer validated, possibly after repairs), ``"fallback"``
    (the model failed ``attempts`` times; ``errors`` says why; the rule-based layout was used),
    ``"rules"`` (the rule-based planner was asked directly) or ``"none"`` (no layout: one box for
    the whole prompt).
    """

    layout: Layout
    source: Literal["llm", "fallback", "rules", "none"]
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    raw_answers: list[str] = field(default_factory=list)


@runtime_checkable
class LayoutPlanner(Protocol):
    """Anything that turns a prompt into a :class:`LayoutResult`."""

    def plan(self, prompt: str) -> LayoutResult: ...


# ---------------------------------------------------------------------------------------------------
# Seeding the Gaussian model
# ---------------------------------------------------------------------------------------------------

def _allocate(volumes: np.ndarray, total: int, minimum: int) -> np.ndarray:
    """Integer counts summing to ``total``: at least ``minimum`` each, the rest by volume (largest remainder)."""
    k = len(volumes)
    minimum = min(minimum, total // k)
    counts = np.full(k, minimum, dtype=np.int64)
    rest = total - counts.sum()
    share = volumes / volumes.sum() * rest
    counts += np.floor(share).astype(np.int64)
    left = int(total - counts.sum())
    if left > 0:
        order = np.argsort(-(share - np.floor(share)), kind="stable")
        counts[order[:left]] += 1
    return counts


def sample_points_in_layout(
    layout: Layout,
    num_points: int,
    generator: torch.Generator | None = None,
    *,
    min_per_object: int = 64,
    shape: Literal["ellipsoid", "box"] = "ellipsoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points spread inside each object's box, to seed the Gaussian model.

    Counts are proportional to box volume, with at least ``min_per_object`` per object (fewer when
    ``num_points`` cannot cover that), so small objects are not starved. ``shape="ellipsoid"`` fills
    the ellipsoid inscribed in each box (a rounder start than box corners). Returns ``points [N, 3]``
    (float32) and ``object_ids [N]`` (int64, indices into ``layout.objects``).
    """
    if num_points < len(layout.objects):
        raise ValueError(f"num_points={num_points} is fewer than the {len(layout.objects)} objects to seed")
    if shape not in ("ellipsoid", "box"):
        raise ValueError(f"shape must be 'ellipsoid' or 'box', got {shape!r}")
    volumes = np.array([o.volume for o in layout.objects], dtype=np.float64)
    counts = _allocate(volumes, num_points, min_per_object)
    pts, ids = [], []
    for k, (o, m) in enumerate(zip(layout.objects, counts.tolist(), strict=True)):
        if m == 0:
            continue
        if shape == "box":
            unit = torch.rand(m, 3, generator=generator) * 2 - 1
        else:  # uniform in the unit ball: gaussian direction, radius ~ U^(1/3)
            d = torch.randn(m, 3, generator=generator)
            d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
            unit = d * torch.rand(m, 1, generator=generator).pow(1.0 / 3.0)
        half = torch.tensor(o.size, dtype=torch.float32) / 2
        pts.append(torch.tensor(o.center, dtype=torch.float32) + unit.float() * half)
        ids.append(torch.full((m,), k, dtype=torch.long))
    return torch.cat(pts), torch.cat(ids)


# ---------------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------------


def colors_from_prompts(layout: Layout) -> torch.Tensor:
    """Initial RGB ``[num_objects, 3]`` per object from the first colour word in its prompt.

    The procedural palette where the word is in it, a few extra common colours ("white", "golden",
    "silver") otherwise, grey when the prompt names no colour (``coherendream.vocabulary``).
    """
    words = [first_color_word(o.prompt, ALL_COLORS) for o in layout.objects]
    return torch.tensor([ALL_COLORS[w] if w else GREY for w in words], dtype=torch.float32)
