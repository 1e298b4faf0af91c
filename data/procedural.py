"""Procedural compositional scenes: primitives with known colours, shapes, counts and relations.

A scene is one or two *groups* of identical primitives ("two red cubes"), the second placed in a
spatial relation to the first ("... to the left of a blue sphere"). Everything about it is known,
so its caption is exact and so are its hard negatives: :func:`caption_holds` decides whether any
caption of the same grammar is true of the scene from the objects' boxes, which is how negatives
are checked to be false (see ``coherendream.data.negatives``). The grammar itself (palette, shapes,
relations, :class:`~coherendream.vocabulary.SceneCaption`, ``parse_caption``) and what each
relation means for two boxes live in ``coherendream.vocabulary``.

Units and frame: see ``coherendream.cameras``. Objects stand on the plane y = 0 (stacked ones on
the object below), rows of a group run along x; "in front of" means larger z (nearer the front
camera at azimuth 0). Scenes are built in loose units and normalised to the unit cube by the
asset loader like any mesh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import trimesh

from coherendream.data.assets import MeshAsset, MeshPart, normalise
from coherendream.vocabulary import MAX_OBJECTS, PALETTE, RELATIONS, SHAPES, Group, SceneCaption, relation_holds


@dataclass
class PlacedObject:
    shape: str
    color: str
    group: int
    center: np.ndarray  # [3] box centre
    size: np.ndarray  # [3] box extent along x, y, z

    @property
    def lo(self) -> np.ndarray:
        return self.center - self.size / 2

    @property
    def hi(self) -> np.ndarray:
        return self.center + self.size / 2


@dataclass
class Scene:
    caption: SceneCaption
    objects: list[PlacedObject]
    seed: int

    @property
    def text(self) -> str:
        return self.caption.text()

    def group_box(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        objs = [o for o in self.objects if o.group == g]
        return np.min([o.lo for o in objs], axis=0), np.max([o.hi for o in objs], axis=0)

    def to_asset(self, uid: str) -> MeshAsset:
        """Triangle meshes of the scene, normalised into the unit cube."""
        parts = [_primitive_part(o) for o in self.objects]
        return normalise(MeshAsset(uid=uid, parts=parts, caption=self.text))

    def to_layout(self) -> dict:
        """Boxes and colours in the normalised unit-cube frame (for ground-truth checks)."""
        lo = np.min([o.lo for o in self.objects], axis=0)
        hi = np.max([o.hi for o in self.objects], axis=0)
        centre, scale = (lo + hi) / 2, 1.0 / float(np.max(hi - lo))
        return {
            "caption": self.text,
            "relation": self.caption.relation,
            "objects": [
                {
                    "shape": o.shape,
                    "color": o.color,
                    "group": o.group,
                    "center": [float(x) for x in (o.center - centre) * scale],
                    "size": [float(x) for x in o.size * scale],
                }
                for o in self.objects
            ],
        }


@dataclass
class ProceduralConfig:
    """What scenes to draw. Kinds: one object, a counted group, or two groups in a relation."""

    kind_weights: dict[str, float] = field(default_factory=lambda: {"single": 1.0, "count": 1.0, "relation": 2.0})
    colors: list[str] = field(default_factory=lambda: list(PALETTE))
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    relations: list[str] = field(default_factory=lambda: list(RELATIONS))
    size_range: tuple[float, float] = (0.7, 1.0)

    def __post_init__(self) -> None:
        for name, known, values in (("colors", PALETTE, self.colors), ("shapes", SHAPES, self.shapes), ("relations", RELATIONS, self.relations)):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise ValueError(f"procedural.{name}: unknown or empty {bad or values} (known: {list(known)})")
        bad_kinds = set(self.kind_weights) - {"single", "count", "relation"}
        if bad_kinds or sum(self.kind_weights.values()) <= 0:
            raise ValueError(f"procedural.kind_weights: needs positive weights over single/count/relation, got {self.kind_weights}")
        if len(self.colors) < 2 or len(self.shapes) < 2:
            raise ValueError("procedural scenes need at least two colours and two shapes (for negatives)")


def sample_scene(seed: int, config: ProceduralConfig | None = None) -> Scene:
    """Draw one scene, deterministically from ``seed``."""
    cfg = config or ProceduralConfig()
    rng = np.random.default_rng(seed)
    kinds = list(cfg.kind_weights)
    weights = np.array([cfg.kind_weights[k] for k in kinds], dtype=float)
    kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]

    def group(count: int, avoid: Group | None = None) -> Group:
        while True:
            g = Group(str(rng.choice(cfg.shapes)), str(rng.choice(cfg.colors)), count)
            if avoid is None or (g.shape, g.color) != (avoid.shape, avoid.color):
                return g

    if kind == "single":
        caption = SceneCaption((group(1),))
    elif kind == "count":
        caption = SceneCaption((group(int(rng.integers(2, MAX_OBJECTS + 1))),))
    else:
        relation = str(rng.choice(cfg.relations))
        if relation == "on_top_of":
            counts = (1, 1)  # stacking a row on a row is not a plausible or decidable scene
        else:
            a = int(rng.integers(1, MAX_OBJECTS))
            counts = (a, int(rng.integers(1, MAX_OBJECTS - a + 1)))
        g0 = group(counts[0])
        caption = SceneCaption((g0, group(counts[1], avoid=g0)), relation)
    objects = _place(caption, rng, cfg.size_range)
    scene = Scene(caption, objects, seed)
    if not caption_holds(scene, caption):  # placement bug: never ship a wrong positive
        raise AssertionError(f"scene {seed}: placement does not satisfy its own caption {caption.text()!r}")
    return scene


def scene_for_caption(caption: SceneCaption, seed: int, config: ProceduralConfig | None = None) -> Scene:
    """A scene that ``caption`` describes exactly, its sizes and spacing drawn from ``seed``."""
    cfg = config or ProceduralConfig()
    scene = Scene(caption, _place(caption, np.random.default_rng(seed), cfg.size_range), seed)
    if not caption_holds(scene, caption):
        raise AssertionError(f"scene {seed}: placement does not satisfy its own caption {caption.text()!r}")
    return scene


def _object_size(shape: str, s: float, rng: np.random.Generator) -> np.ndarray:
    if shape in ("cylinder", "cone"):
        return np.array([s, s * rng.uniform(0.9, 1.3), s])
    if shape == "torus":  # stands upright facing the front camera: thin along z
        return np.array([s, s, s * 0.3])
    return np.array([s, s, s])


def _row(shapes_sizes: list[np.ndarray], gap: float) -> tuple[list[np.ndarray], float]:
    """x centres of boxes laid left to right with ``gap`` between them, centred on 0; total width."""
    width = sum(sz[0] for sz in shapes_sizes) + gap * (len(shapes_sizes) - 1)
    xs, x = [], -width / 2
    for sz in shapes_sizes:
        xs.append(x + sz[0] / 2)
        x += sz[0] + gap
    return xs, width


def _place(caption: SceneCaption, rng: np.random.Generator, size_range: tuple[float, float]) -> list[PlacedObject]:
    gap = 0.25
    sizes = []
    for g in caption.groups:
        s = rng.uniform(*size_range)  # one size per group: "two red cubes" are alike
        sizes.append([_object_size(g.shape, s, rng) for _ in range(g.count)])
    rows = [_row(sz, gap * rng.uniform(0.8, 1.5)) for sz in sizes]
    offsets = [np.zeros(3) for _ in caption.groups]
    rel = caption.relation
    if rel is not None:
        (_, w0), (_, w1) = rows
        d0 = max(s[2] for s in sizes[0]) / 2
        d1 = max(s[2] for s in sizes[1]) / 2
        sep = gap * rng.uniform(1.0, 2.0)
        if rel == "next_to":
            rel_used = "left_of" if rng.random() < 0.5 else "right_of"
        else:
            rel_used = rel
        if rel_used in ("left_of", "right_of"):
            dx = (w0 + w1) / 2 + sep
            offsets[0][0] = -dx / 2 if rel_used == "left_of" else dx / 2
            offsets[1][0] = -offsets[0][0]
            offsets[1][2] = rng.uniform(-0.1, 0.1) * min(d0, d1)
        elif rel_used in ("in_front_of", "behind"):
            dz = d0 + d1 + sep
            offsets[0][2] = dz / 2 if rel_used == "in_front_of" else -dz / 2
            offsets[1][2] = -offsets[0][2]
            # a small sideways shift so the back group is not hidden, keeping x ranges overlapping
            offsets[0][0] = rng.uniform(-0.25, 0.25) * min(w0, w1)
        elif rel_used == "on_top_of":
            offsets[0][1] = max(s[1] for s in sizes[1])
            offsets[0][0] = rng.uniform(-0.1, 0.1) * w1
    objects = []
    for gi, (g, sz, (xs, _)) in enumerate(zip(caption.groups, sizes, rows)):
        for size, x in zip(sz, xs):
            centre = np.array([x, size[1] / 2, 0.0]) + offsets[gi]
            objects.append(PlacedObject(g.shape, g.color, gi, centre, size))
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            if np.all(a.lo < b.hi - 1e-6) and np.all(b.lo < a.hi - 1e-6):
                raise AssertionError("procedural placement produced overlapping objects")
    return objects


def caption_holds(scene: Scene, caption: SceneCaption) -> bool:
    """True when the structured caption describes the scene exactly (counts, colours, shapes, relation)."""
    actual = scene.caption.groups

    def matches(cg: Group, gi: int) -> bool:
        return cg == actual[gi]

    if caption.relation is None:
        if len(caption.groups) != 1:
            return False
        # "a red cube" is true of a scene whose only group is one red cube; with two groups, a
        # one-group caption leaves out half the scene and is not an exact description.
        return len(actual) == 1 and matches(caption.groups[0], 0)
    if len(actual) != 2 or len(caption.groups) != 2:
        return False
    for a, b in ((0, 1), (1, 0)):
        if matches(caption.groups[0], a) and matches(caption.groups[1], b) and relation_holds(caption.relation, *scene.group_box(a), *scene.group_box(b)):
            return True
    return False


def _primitive_part(obj: PlacedObject) -> MeshPart:
    s = obj.size
    if obj.shape == "cube":
        mesh = trimesh.creation.box(extents=s)
    elif obj.shape == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=3, radius=s[0] / 2)
    elif obj.shape == "cylinder":
        mesh = trimesh.creation.cylinder(radius=s[0] / 2, height=s[1], sections=32)
        mesh.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]))
    elif obj.shape == "cone":
        mesh = trimesh.creation.cone(radius=s[0] / 2, height=s[1], sections=32)
        mesh.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0]))
    elif obj.shape == "torus":
        minor = s[2] / 2
        mesh = trimesh.creation.torus(major_radius=s[0] / 2 - minor, minor_radius=minor, major_sections=32, minor_sections=12)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    mesh.apply_translation(obj.center - (mesh.bounds[0] + mesh.bounds[1]) / 2)
    smooth = obj.shape in ("sphere", "torus")
    color = np.array([*PALETTE[obj.color], 1.0], dtype=np.float32)
    return MeshPart.from_trimesh(mesh, smooth=smooth, base_color=color)
