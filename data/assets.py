"""3D assets as the renderer sees them: triangle meshes with colours or a base-colour texture.

``load_mesh`` reads glTF/GLB, OBJ (+MTL and textures), PLY, STL and OFF with trimesh, flattens the
scene graph (node transforms applied), checks the result and normalises it into the unit cube
``[-0.5, 0.5]^3`` (see ``coherendream.cameras`` for the frame). Anything unusable raises
:class:`AssetError` with a short machine-readable ``reason`` and a human message, which batch jobs
write to ``rejected.jsonl`` before going on.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import trimesh

MESH_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
MAX_TEXTURE_SIZE = 1024  # larger base-colour textures are downscaled: views are a few hundred px
MAX_FACES = 2_000_000  # a guard against files that would exhaust memory when expanded for rendering


class AssetError(Exception):
    """An input that cannot be used. ``reason`` is a short code, ``str(err)`` says why in words."""

    def __init__(self, reason: str, message: str, stage: str = "load"):
        super().__init__(message)
        self.reason = reason
        self.stage = stage


@dataclass
class MeshPart:
    """One triangle mesh with one material.

    Attributes:
        vertices: ``[N, 3]`` float32 positions.
        faces: ``[F, 3]`` int32 vertex indices.
        normals: ``[N, 3]`` float32 unit normals.
        colors: ``[N, 4]`` float32 RGBA in [0, 1] per vertex, or None.
        uv: ``[N, 2]`` float32 texture coordinates (OpenGL convention, v up), or None.
        texture: ``[h, w, 4]`` uint8 RGBA base-colour image (first row = top of the image), or None.
        base_color: ``[4]`` float32 RGBA multiplier in [0, 1] (glTF's baseColorFactor).
    """

    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    colors: np.ndarray | None = None
    uv: np.ndarray | None = None
    texture: np.ndarray | None = None
    base_color: np.ndarray = field(default_factory=lambda: np.ones(4, dtype=np.float32))

    @classmethod
    def from_trimesh(cls, mesh: trimesh.Trimesh, smooth: bool = True, base_color: np.ndarray | None = None) -> MeshPart:
        """Convert a trimesh mesh; ``smooth=False`` splits vertices per face for flat shading."""
        if not smooth:
            mesh = mesh.copy()
            mesh.unmerge_vertices()
        colors = uv = texture = None
        base = np.ones(4, dtype=np.float32) if base_color is None else np.asarray(base_color, dtype=np.float32)
        visual = mesh.visual
        if visual is not None and visual.kind == "texture":
            material = getattr(visual, "material", None)
            if isinstance(material, trimesh.visual.material.PBRMaterial):
                # glTF: colour = baseColorFactor (default white) x baseColorTexture
                image = material.baseColorTexture
                factor = material.baseColorFactor
                if factor is not None:
                    base = _rgba01(factor)
            else:
                # OBJ/PLY: the diffuse map alone when there is one (Blender's reading), else Kd
                image = getattr(material, "image", None)
                if image is None and getattr(material, "main_color", None) is not None:
                    base = _rgba01(material.main_color)
            if image is not None and visual.uv is not None and len(visual.uv) == len(mesh.vertices):
                texture = _texture_array(image)
                uv = np.asarray(visual.uv, dtype=np.float32)[:, :2]
        elif visual is not None and visual.kind in ("vertex", "face"):
            if visual.kind == "face":
                # face colours become vertex colours once every face has its own three vertices
                mesh = mesh.copy()
                face_colors = np.asarray(mesh.visual.face_colors)
                mesh.unmerge_vertices()
                colors = np.repeat(face_colors, 3, axis=0).astype(np.float32) / 255.0
            else:
                colors = np.asarray(visual.vertex_colors, dtype=np.float32) / 255.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            normals = np.asarray(mesh.vertex_normals, dtype=np.float32)
        return cls(
            vertices=np.asarray(mesh.vertices, dtype=np.float32),
            faces=np.asarray(mesh.faces, dtype=np.int32),
            normals=normals,
            colors=colors,
            uv=uv,
            texture=texture,
            base_color=base,
        )


@dataclass
class MeshAsset:
    uid: str
    parts: list[MeshPart]
    caption: str = ""

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.min([p.vertices.min(axis=0) for p in self.parts], axis=0)
        hi = np.max([p.vertices.max(axis=0) for p in self.parts], axis=0)
        return lo, hi

    @property
    def num_faces(self) -> int:
        return int(sum(len(p.faces) for p in self.parts))


def normalise(asset: MeshAsset) -> MeshAsset:
    """Centre the asset's bounding box on the origin and scale its longest side to 1."""
    lo, hi = asset.bounds
    extent = float(np.max(hi - lo))
    if not np.isfinite(extent) or extent <= 1e-12:
        raise AssetError("degenerate", f"asset {asset.uid}: zero-size bounding box")
    centre = (lo + hi) / 2
    parts = [replace(p, vertices=((p.vertices - centre) / extent).astype(np.float32)) for p in asset.parts]
    return replace(asset, parts=parts)


def load_mesh(path: str | Path, uid: str | None = None, caption: str = "") -> MeshAsset:
    """Load, check and normalise a mesh file. Raises :class:`AssetError` for unusable input."""
    path = Path(path)
    uid = uid or path.stem
    if not path.exists():
        raise AssetError("missing_file", f"{path}: file not found")
    if not path.is_file():
        raise AssetError("not_a_file", f"{path}: not a regular file")
    if path.suffix.lower() not in MESH_EXTENSIONS:
        raise AssetError("unsupported_format", f"{path}: format {path.suffix or '(none)'} is not one of {', '.join(MESH_EXTENSIONS)}")
    if path.stat().st_size == 0:
        raise AssetError("empty_file", f"{path}: file is empty")
    try:
        # trimesh logs parse problems at error level and warns freely; the reason is raised to the caller
        logging.getLogger("trimesh").setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            scene = trimesh.load(str(path), force="scene", process=False)
            meshes = scene.dump(concatenate=False) if len(scene.geometry) else []
    except AssetError:
        raise
    except (MemoryError, OverflowError) as err:
        raise AssetError("corrupt", f"{path}: declares an impossible size ({type(err).__name__})") from err
    except IndexError as err:
        raise AssetError("index_out_of_range", f"{path}: an index points outside its array ({err})") from err
    except NotImplementedError as err:
        raise AssetError("unsupported_format", f"{path}: {err}") from err
    except Exception as err:  # noqa: BLE001 - any parser failure is a property of the input file
        raise AssetError("corrupt", f"{path}: cannot be parsed ({type(err).__name__}: {str(err)[:200]})") from err
    return asset_from_trimesh(meshes, uid=uid, caption=caption, source=str(path))


def asset_from_trimesh(meshes: list, uid: str, caption: str = "", source: str = "") -> MeshAsset:
    """Check a list of trimesh geometries and turn the triangle meshes among them into an asset."""
    where = source or uid
    tri = [m for m in meshes if isinstance(m, trimesh.Trimesh) and len(m.faces) > 0]
    if not tri:
        kinds = sorted({"mesh without faces" if isinstance(m, trimesh.Trimesh) else type(m).__name__ for m in meshes})
        detail = f" (only: {', '.join(kinds)})" if kinds else ""
        raise AssetError("no_triangles", f"{where}: contains no triangle faces{detail}")
    if sum(len(m.faces) for m in tri) > MAX_FACES:
        raise AssetError("too_large", f"{where}: more than {MAX_FACES} faces")
    parts = []
    for m in tri:
        v, f = np.asarray(m.vertices), np.asarray(m.faces)
        if not np.all(np.isfinite(v)):
            raise AssetError("non_finite", f"{where}: vertices contain NaN or inf")
        if f.min() < 0 or f.max() >= len(v):
            bad = int(f.min()) if f.min() < 0 else int(f.max())  # the offending index, negative or too large
            raise AssetError("index_out_of_range", f"{where}: face index {bad} outside the {len(v)} vertices (valid: 0-{len(v) - 1})")
        with np.errstate(all="ignore"):
            parts.append(MeshPart.from_trimesh(m))
    for p in parts:
        bad = ~np.all(np.isfinite(p.normals), axis=1)
        p.normals[bad] = 0.0  # degenerate faces give NaN normals; they render unlit, not as errors
    return normalise(MeshAsset(uid=uid, parts=parts, caption=caption))


def _rgba01(color) -> np.ndarray:
    c = np.asarray(color, dtype=np.float32).reshape(-1)
    if c.size and c.max() > 1.0:  # trimesh stores uint8 colours
        c = c / 255.0
    return np.concatenate([c[:4], np.ones(4 - min(c.size, 4), dtype=np.float32)]).astype(np.float32)


def _texture_array(image) -> np.ndarray:
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGBA")
    if max(img.size) > MAX_TEXTURE_SIZE:
        img.thumbnail((MAX_TEXTURE_SIZE, MAX_TEXTURE_SIZE))
    return np.asarray(img, dtype=np.uint8)
