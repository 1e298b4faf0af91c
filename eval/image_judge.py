"""Ground truth for 2D images of procedural prompts: colour, shape and placement, without a model.

A text-to-image prior trained on procedural renders is judged by what its samples show, not by a
network that could share its mistakes. The judge is calibrated on real renders of the procedural
scenes (``MeshRenderer``, the renderer of the training data):

- **Foreground**: the image's own background is the median of its one-pixel border; a pixel is
  foreground when some channel differs from it by more than ``fg_threshold``. (A sample's
  background need not be the white of the renders.)
- **Colour**: each foreground pixel takes the colour of its nearest *reference*: per palette
  colour, the mean rendered RGB in each of ``shades`` brightness bands of that colour's pixels on
  all five shapes. Shading moves red towards brown and blue towards purple, so the nominal
  palette values would misread real renders; measured references do not. Anti-aliased edges mix
  an object's colour with the background (a red edge on white reads as pink): pixels nearer to
  such a mix (each reference blended 30% and 60% with the image's background) than to any
  reference are edge pixels and are not counted.
- **Count** (one group of up to :data:`COUNT_MAX` objects, seen from the front): the separate
  parts of the foreground at least a fifth of the largest part's size.
- **Shape**: the largest connected part of the foreground (sampling speckle dropped), cropped to
  its bounding box, padded to a square (the aspect ratio is part of the shape) and resized to
  16 x 16, is matched to the nearest silhouette (L2) among real renders of every shape from
  random views.
- **Placement** (two-group prompts with two different colours, seen from the front): a group's
  colour is present when its pixels hold at least ``min_share`` of the share its object count
  predicts (``count / total count`` of the foreground); the centroids of the two colours' pixels
  are compared along the relation's image axis (x for left/right, y for on top).
- **Each object's colour** (the same prompts; next to as well, in either order): the foreground
  is cut along the relation's axis where the groups' object counts put the boundary, and each
  group's colour must be the majority colour of its own part. Stricter than "present": two
  purple objects with pink bases have both colours present but the pink object's part is
  purple.

:meth:`ImageJudge.accuracy_on_renders` measures the judge itself on fresh real renders, so every
figure made with it can be read against the judge's own ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coherendream.cameras import Camera
from coherendream.data.procedural import scene_for_caption
from coherendream.vocabulary import PALETTE, SHAPES, Group, SceneCaption

__all__ = ["COUNT_MAX", "ImageJudge", "SingleVerdict", "RelationVerdict", "to_float_rgb"]

# Image-space axis and sign of each relation whose subject/object order is visible from the front:
# (axis, sign) with axis 0 = x (image right), 1 = y (image down); subject centroid * sign < object's.
_FRONT_AXES = {"left_of": (0, 1.0), "right_of": (0, -1.0), "on_top_of": (1, 1.0)}
_SILHOUETTE = 16
#: A separate foreground part counts as an object when it is at least this fraction of the largest
#: part's size (sampling speckle does not). On real renders of one to three objects, 0.1 to 0.3 all
#: count every scene right (60 scenes, front view, 32 px).
COUNT_MIN_PART = 0.2
#: The largest count the judge tells apart: four objects of a group touch or hide one another in
#: 32 px views from any elevation (0.3-0.5 right on real renders, against 0.95-1.0 up to three).
COUNT_MAX = 3


def to_float_rgb(image) -> np.ndarray:
    """``[H, W, 3]`` float in [0, 1] from a PIL image, a uint8 array or a float array/tensor
    (``[3, H, W]`` tensors are transposed); RGBA is composited over white."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    elif hasattr(image, "detach"):  # torch
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (3, 4):
            image = image.transpose(1, 2, 0)
    arr = np.asarray(image)
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    if arr.shape[-1] == 4:
        arr = arr[..., :3] * arr[..., 3:] + (1.0 - arr[..., 3:])
    return arr


@dataclass
class SingleVerdict:
    color: str | None  # majority colour of the foreground (None: no foreground)
    shape: str | None
    foreground: float  # fraction of the image that is foreground
    count: int = 0  # separate parts of the foreground of at least COUNT_MIN_PART of the largest one's size


@dataclass
class RelationVerdict:
    colors_present: tuple[bool, bool]  # each group's colour holds >= min_share of the foreground
    placement_ok: bool | None  # centroids in the relation's order (None: not decidable from the front)
    swapped: bool | None  # both colours present, in the opposite order: the colours went to the wrong objects
    object_colors: tuple[bool, bool] | None = None  # each group's colour is the majority of its own part (None: not decidable)


class ImageJudge:
    """Colour, shape and placement of procedural objects in images, calibrated on real renders.

    Args:
        resolution: Side of the images to judge (samples are resized to it).
        views_per_shape: Random views rendered per colour and shape for the references.
        shades: Brightness bands per colour (references per colour).
        fg_threshold: Per-channel difference from the background that makes a pixel foreground.
        min_share: Fraction of its expected share of the foreground (``count / total count``) that a
            group's colour needs to count as present.
        seed: Seed of the reference renders' cameras and sizes.
    """

    def __init__(self, resolution: int = 32, views_per_shape: int = 8, shades: int = 4, fg_threshold: float = 0.15,
                 min_share: float = 0.3, elevation_range: tuple[float, float] = (0.0, 30.0), distance: float = 2.5,
                 fov_y: float = 40.0, seed: int = 12345) -> None:  # fmt: skip
        self.resolution, self.fg_threshold, self.min_share = resolution, fg_threshold, min_share
        self._orbit = (elevation_range, distance, fov_y)
        self._renderer = None
        refs, names, silhouettes, shape_names = [], [], [], []
        rng = np.random.default_rng(seed)
        for color in PALETTE:
            pixels = []
            for shape in SHAPES:
                rgba = self.render(SceneCaption((Group(shape, color, 1),)), int(rng.integers(1 << 30)), views_per_shape, rng)
                alpha = rgba[..., 3]
                pixels.append(rgba[..., :3][alpha > 0.99])
                if color == "black":  # silhouettes once, from the darkest colour (the clearest mask)
                    for a in alpha:
                        silhouettes.append(self._silhouette(a > 0.5))
                        shape_names.append(shape)
            px = np.concatenate(pixels)
            order = np.argsort(px.sum(axis=1))
            for band in np.array_split(order, shades):
                refs.append(px[band].mean(axis=0))
                names.append(color)
        self.references = np.stack(refs)  # [colours * shades, 3]
        self.reference_names = names
        self._reference_index = np.array([list(PALETTE).index(n) for n in names])  # palette index of each reference
        self.silhouettes = np.stack(silhouettes)
        self.silhouette_shapes = shape_names

    # ----- rendering real references -----------------------------------------------------------

    def render(self, caption: SceneCaption, seed: int, num_views: int, rng: np.random.Generator, azimuths: list[float] | None = None) -> np.ndarray:
        """``[V, R, R, 4]`` float renders of a scene for ``caption`` (random orbit views, or ``azimuths``)."""
        from coherendream.data.render import MeshRenderer

        if self._renderer is None:
            self._renderer = MeshRenderer(self.resolution)
        (lo, hi), distance, fov = self._orbit
        if azimuths is None:
            azimuths = list(rng.uniform(0.0, 360.0, num_views))
        cams = [Camera.orbit(float(a), float(rng.uniform(lo, hi)), distance, fov, self.resolution) for a in azimuths]
        asset = scene_for_caption(caption, seed).to_asset("judge")
        return self._renderer.render(asset, cams).rgba.astype(np.float32) / 255.0

    # ----- measuring one image -------------------------------------------------------------------

    @staticmethod
    def background(rgb: np.ndarray) -> np.ndarray:
        """``[3]`` the median colour of the image's one-pixel border."""
        return np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0)

    def foreground(self, rgb: np.ndarray) -> np.ndarray:
        """``[H, W]`` bool: pixels that differ from the border's median colour."""
        return np.abs(rgb - self.background(rgb)).max(axis=-1) > self.fg_threshold

    def pixel_colors(self, rgb: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
        """``[H, W]`` palette index of each pixel's nearest reference; -1 for edge pixels (nearer
        to a blend of a reference with ``background``, default the border's median)."""
        if background is None:
            background = self.background(rgb)
        blends = [a * self.references + (1.0 - a) * background for a in (0.3, 0.6)]
        candidates = np.concatenate([self.references, *blends])
        d = ((rgb[..., None, :] - candidates) ** 2).sum(-1)
        lookup = np.concatenate([self._reference_index, np.full(2 * len(self.references), -1)])
        return lookup[d.argmin(-1)]

    @staticmethod
    def _largest_part(mask: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        labels, n = ndimage.label(mask)
        if n <= 1:
            return mask
        sizes = np.bincount(labels.ravel())[1:]
        return labels == (int(sizes.argmax()) + 1)

    def _silhouette(self, mask: np.ndarray) -> np.ndarray:
        from PIL import Image

        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            return np.zeros(_SILHOUETTE * _SILHOUETTE, dtype=np.float32)
        crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
        h, w = crop.shape
        side = max(h, w)
        square = np.zeros((side, side), dtype=np.float32)
        square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = crop
        img = Image.fromarray((square * 255).astype(np.uint8)).resize((_SILHOUETTE, _SILHOUETTE), Image.BILINEAR)
        return np.asarray(img, dtype=np.float32).reshape(-1) / 255.0

    def _prepare(self, image) -> np.ndarray:
        rgb = to_float_rgb(image)
        if rgb.shape[:2] != (self.resolution, self.resolution):
            from PIL import Image

            pil = Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8)).resize((self.resolution, self.resolution), Image.BILINEAR)
            rgb = np.asarray(pil, dtype=np.float32) / 255.0
        return rgb

    def judge_single(self, image) -> SingleVerdict:
        """Majority colour and nearest silhouette's shape of the image's foreground."""
        rgb = self._prepare(image)
        fg = self.foreground(rgb)
        if not fg.any():
            return SingleVerdict(None, None, 0.0)
        labels = self.pixel_colors(rgb)[fg]
        solid = labels[labels >= 0]
        counts = np.bincount(solid if len(solid) else np.zeros(0, dtype=int), minlength=len(PALETTE))
        color = list(PALETTE)[int(counts.argmax())] if len(solid) else None
        d = ((self.silhouettes - self._silhouette(self._largest_part(fg))) ** 2).sum(-1)
        return SingleVerdict(color, self.silhouette_shapes[int(d.argmin())], float(fg.mean()), self.count_parts(fg))

    @staticmethod
    def count_parts(mask: np.ndarray) -> int:
        """Separate (8-connected) parts of ``mask`` at least :data:`COUNT_MIN_PART` of the largest."""
        from scipy import ndimage

        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        if n == 0:
            return 0
        sizes = np.bincount(labels.ravel())[1:]
        return int((sizes >= COUNT_MIN_PART * sizes.max()).sum())

    def judge_relation(self, image, caption: SceneCaption) -> RelationVerdict:
        """Colours present and their placement for a two-group caption, the image seen from the front.

        Placement is None when it cannot be told from colours: a relation not visible from the
        front (in front of, behind, next to), or two groups of the same colour.
        """
        rgb = self._prepare(image)
        fg = self.foreground(rgb)
        names = list(PALETTE)
        colors = self.pixel_colors(rgb)
        a, b = (names.index(g.color) for g in caption.groups)
        total = max(int((fg & (colors >= 0)).sum()), 1)  # solid foreground pixels
        masks = [fg & (colors == a), fg & (colors == b)]
        counts = [g.count for g in caption.groups]
        present = tuple(bool(m.sum() / total >= self.min_share * n / sum(counts)) for m, n in zip(masks, counts))
        objects = self._object_colors(fg & (colors >= 0), colors, caption) if a != b else None
        axis_sign = _FRONT_AXES.get(caption.relation or "") if a != b else None
        if axis_sign is None or not all(present):
            return RelationVerdict(present, None if axis_sign is None else False, None, objects)
        axis, sign = axis_sign
        coords = np.indices(fg.shape)[::-1]  # [x, y] grids
        ca, cb = (float(coords[axis][m].mean()) for m in masks)
        ok = ca * sign < cb * sign
        return RelationVerdict(present, ok, not ok, objects)

    @staticmethod
    def _object_colors(solid: np.ndarray, colors: np.ndarray, caption: SceneCaption) -> tuple[bool, bool] | None:
        """Whether each group's colour is the majority of its own part of the foreground, the parts
        cut along the relation's axis in proportion to the groups' object counts."""
        rel = caption.relation or ""
        axis_sign = _FRONT_AXES.get("left_of" if rel == "next_to" else rel)
        if axis_sign is None:
            return None
        if not solid.any():  # nothing coloured: neither object has its colour
            return False, False
        axis, sign = axis_sign
        names = list(PALETTE)
        want = [names.index(g.color) for g in caption.groups]
        pos = np.indices(solid.shape)[::-1][axis]
        lo, hi = float(pos[solid].min()), float(pos[solid].max()) + 1.0

        def parts(first: int) -> list[np.ndarray]:  # group `first` on the low side of the axis
            n = [caption.groups[first].count, caption.groups[1 - first].count]
            cut = lo + (hi - lo) * n[0] / sum(n)
            low, high = solid & (pos < cut), solid & (pos >= cut)
            return [low, high] if first == 0 else [high, low]

        def verdict(masks: list[np.ndarray]) -> tuple[bool, bool]:
            out = []
            for m, w in zip(masks, want):
                votes = np.bincount(colors[m], minlength=len(names)) if m.any() else np.zeros(len(names), dtype=int)
                out.append(bool(m.any() and votes.argmax() == w))
            return out[0], out[1]

        if rel == "next_to":  # either side: the better of the two orders
            return max(verdict(parts(0)), verdict(parts(1)), key=sum)
        return verdict(parts(0 if sign > 0 else 1))

    # ----- the judge's own accuracy ----------------------------------------------------------------

    def accuracy_on_renders(self, singles: list[SceneCaption], relations: list[SceneCaption], seed: int = 777,
                            counts: list[SceneCaption] = ()) -> dict[str, float]:  # fmt: skip
        """The judge's figures on real renders: colour and shape of single objects (random views),
        colours present and placement of front views of two-group scenes, and the object count of
        front views of one-group scenes (``counts``)."""
        rng = np.random.default_rng(seed)
        color_ok, shape_ok, present, placed, objects, counted = [], [], [], [], [], []
        for cap in singles:
            for view in self.render(cap, int(rng.integers(1 << 30)), 2, rng):
                v = self.judge_single(view)
                color_ok.append(v.color == cap.groups[0].color)
                shape_ok.append(v.shape == cap.groups[0].shape)
        for cap in counts:
            front = self.render(cap, int(rng.integers(1 << 30)), 1, rng, azimuths=[0.0])[0]
            counted.append(self.judge_single(front).count == cap.groups[0].count)
        for cap in relations:
            view = self.render(cap, int(rng.integers(1 << 30)), 1, rng, azimuths=[0.0])[0]
            v = self.judge_relation(view, cap)
            present += list(v.colors_present)
            if v.placement_ok is not None:
                placed.append(v.placement_ok)
            if v.object_colors is not None:
                objects += list(v.object_colors)
        return {
            "single_color": float(np.mean(color_ok)) if color_ok else float("nan"),
            "single_shape": float(np.mean(shape_ok)) if shape_ok else float("nan"),
            "relation_color_present": float(np.mean(present)) if present else float("nan"),
            "relation_placement": float(np.mean(placed)) if placed else float("nan"),
            "relation_object_color": float(np.mean(objects)) if objects else float("nan"),
            "count": float(np.mean(counted)) if counted else float("nan"),
        }
