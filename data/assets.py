"""3D assets as the renderer sees them: triangle meshes with colours or a base-colour texture.

``load_mesh`` reads glTF/GLB, OBJ (+MTL and textures), PLY, STL and OFF with trimesh, and every
other format the system's assimp library reads (FBX, COLLADA, 3DS, Blender, X, LWO, MD2/MD3/MD5,
AC3D, ASE, B3D, MS3D, glTF 1.0, ... through ``pyassimp`` over Debian's ``libassimp5``) with assimp,
as well as the glTF files trimesh cannot read right: triangle fans and strips, and Draco-compressed
meshes (assimp decodes them with libdraco). It flattens the scene graph (node transforms applied),
keeps base colours, vertex colours and diffuse textures, checks the result and normalises it into
the unit cube ``[-0.5, 0.5]^3`` (see ``coherendream.cameras`` for the frame). Anything unusable
raises :class:`AssetError` with a short machine-readable ``reason`` and a human message, which
batch jobs write to ``rejected.jsonl`` before going on.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import trimesh

TRIMESH_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
# What assimp lists but are not meshes: animations, cameras, levels, and generic XML.
_NOT_MESHES = {".bvh", ".md5anim", ".md5camera", ".mot", ".vta", ".pk3", ".bsp", ".xml", ".mesh.xml", ".assbin", ".prj"}
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


@functools.cache
def assimp_extensions() -> tuple[str, ...]:
    """Mesh formats the installed assimp reads (asked from the library), or () without assimp."""
    try:
        import ctypes

        import pyassimp
        from pyassimp.structs import String
    except Exception:  # noqa: BLE001 - pyassimp raises its own error when libassimp is missing
        return ()
    names = String()
    pyassimp.core._assimp_lib.dll.aiGetExtensionList(ctypes.byref(names))
    listed = names.data[: names.length].decode("utf-8", "replace").split(";")
    return tuple(sorted({e.strip().lstrip("*").lower() for e in listed if e.strip()} - _NOT_MESHES))


def mesh_extensions() -> tuple[str, ...]:
    """Every file extension :func:`load_mesh` reads here (trimesh's, plus assimp's when installed)."""
    return tuple(sorted(set(TRIMESH_EXTENSIONS) | set(assimp_extensions())))


def load_mesh(path: str | Path, uid: str | None = None, caption: str = "") -> MeshAsset:
    """Load, check and normalise a mesh file. Raises :class:`AssetError` for unusable input."""
    path = Path(path)
    uid = uid or path.stem
    if not path.exists():
        raise AssetError("missing_file", f"{path}: file not found")
    if not path.is_file():
        raise AssetError("not_a_file", f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix not in mesh_extensions():
        hint = "" if assimp_extensions() else " (assimp is not installed: `make system-deps` adds libassimp5 for FBX, DAE, 3DS, ...)"
        raise AssetError("unsupported_format", f"{path}: format {path.suffix or '(none)'} is not one of {', '.join(mesh_extensions())}{hint}")
    if path.stat().st_size == 0:
        raise AssetError("empty_file", f"{path}: file is empty")
    if suffix not in TRIMESH_EXTENSIONS or _draco_compressed(path):
        return asset_from_trimesh(_assimp_meshes(path), uid=uid, caption=caption, source=str(path))
    try:
        return asset_from_trimesh(_trimesh_meshes(path), uid=uid, caption=caption, source=str(path))
    except AssetError as err:
        # glTF triangle fans and strips (trimesh reads them as nothing), glTF 1.0 and other files
        # trimesh's parsers refuse get a second reader; if assimp fails too, trimesh's reason stands.
        if err.reason not in ("no_triangles", "corrupt", "unsupported_format") or not assimp_extensions():
            raise
        try:
            return asset_from_trimesh(_assimp_meshes(path), uid=uid, caption=caption, source=str(path))
        except AssetError:
            raise err from None


def _trimesh_meshes(path: Path) -> list:
    try:
        # trimesh logs parse problems at error level and warns freely; the reason is raised to the caller
        logging.getLogger("trimesh").setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            scene = trimesh.load(str(path), force="scene", process=False)
            return scene.dump(concatenate=False) if len(scene.geometry) else []
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


def _draco_compressed(path: Path) -> bool:
    """A glTF whose meshes are Draco-compressed: trimesh would read the compressed buffers as garbage."""
    suffix = path.suffix.lower()
    if suffix not in (".gltf", ".glb"):
        return False
    with open(path, "rb") as fh:
        head = fh.read(1 << 20)
    return b"KHR_draco_mesh_compression" in head


ASSIMP_TIMEOUT_S = 300  # a file assimp has not read by then is rejected rather than left to hang a batch
ASSIMP_MEMORY_BYTES = 8 << 30  # more memory than this (on top of the process's own) and the file is refused


def _assimp_meshes(path: Path) -> list:
    """The triangle meshes of a file read by assimp, node transforms applied, as trimesh meshes
    carrying each material's diffuse texture (with UVs), vertex colours or base colour.

    assimp runs in a forked child process: on some broken files it aborts the process (a failed
    internal assertion) or allocates without bound, which would otherwise end a whole batch job.
    Such a file becomes an ``AssetError`` like any other.
    """
    if not assimp_extensions():
        raise AssetError("unsupported_format", f"{path}: needs assimp, which is not installed (`make system-deps` adds libassimp5)")
    # os.fork rather than multiprocessing: the data builder's worker processes are daemonic, and
    # multiprocessing refuses children to those.
    import pickle
    import select
    import signal
    import time

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read, send, and leave without running the parent's exit handlers
        os.close(read_fd)
        try:
            with os.fdopen(write_fd, "wb") as out:
                _assimp_child(str(path), out)
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + ASSIMP_TIMEOUT_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssetError("timeout", f"{path}: assimp did not finish reading it within {ASSIMP_TIMEOUT_S} s")
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, wait_status = os.waitpid(pid, 0)
    try:
        status, payload = pickle.loads(b"".join(chunks))
    except (pickle.UnpicklingError, EOFError, ValueError):
        code = os.waitstatus_to_exitcode(wait_status)
        raise AssetError("corrupt", f"{path}: assimp crashed reading it (child exit code {code})") from None
    if status == "error":
        raise AssetError(*payload)
    meshes = []
    for m in payload:
        if m["texture"] is not None:
            from PIL import Image

            material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(m["texture"]), diffuse=m["rgba"])
            visual = trimesh.visual.TextureVisuals(uv=m["uv"], material=material)
        else:
            visual = trimesh.visual.ColorVisuals(vertex_colors=m["colors"])
        meshes.append(trimesh.Trimesh(vertices=m["vertices"], faces=m["faces"], process=False, visual=visual))
    return meshes


def _assimp_child(path: str, out) -> None:
    """In the child: read with assimp and write (pickled) ``("ok", [mesh arrays])`` or ``("error", (reason, message))`` to ``out``."""
    import pickle

    def send(message: tuple) -> None:
        pickle.dump(message, out, protocol=pickle.HIGHEST_PROTOCOL)

    try:
        # assimp prints its own assertion failures and warnings, and a crash here is expected and
        # handled by the parent: the reason reaches the caller as the AssetError
        import faulthandler

        faulthandler.disable()
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        _limit_memory(ASSIMP_MEMORY_BYTES)
        result = ("ok", _assimp_read(Path(path)))
    except AssetError as err:
        result = ("error", (err.reason, str(err)))
    except BaseException as err:  # noqa: BLE001 - whatever happens here is reported, never raised
        result = ("error", ("corrupt", f"{path}: assimp read a mesh that cannot be used ({type(err).__name__}: {str(err)[:160]})"))
    send(result)


def _limit_memory(extra: int) -> None:
    """Cap this process's address space at its current size plus ``extra`` bytes, so that a file
    declaring an impossible size fails its allocation at once instead of swapping for minutes."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            vm_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return  # not Linux: no cap
    limit = vm_kb * 1024 + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _assimp_read(path: Path) -> list[dict]:
    """Plain arrays per triangle mesh: ``vertices``, ``faces``, ``uv`` and ``texture`` (uint8 RGBA)
    or vertex ``colors`` (uint8 RGBA; the material's colour where the mesh has none), ``rgba``."""
    import pyassimp
    from pyassimp import postprocess as pp
    from pyassimp.errors import AssimpError

    flags = pp.aiProcess_Triangulate | pp.aiProcess_PreTransformVertices | pp.aiProcess_SortByPType | pp.aiProcess_JoinIdenticalVertices
    out = []
    with contextlib.ExitStack() as stack:
        try:
            scene = stack.enter_context(pyassimp.load(str(path), processing=flags))
        except (AssimpError, Exception) as err:  # noqa: BLE001 - AssimpError derives from BaseException
            raise AssetError("corrupt", f"{path}: assimp cannot read it ({_assimp_error() or err})") from err
        for mesh in scene.meshes:
            faces = np.asarray(mesh.faces)
            if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
                continue  # points and lines (SortByPType keeps them in meshes of their own)
            material = scene.materials[mesh.materialindex] if len(scene.materials) > mesh.materialindex else None
            props = dict(dict.items(material.properties)) if material is not None else {}  # keys (name, semantic)
            color = props.get(("base", 0), props.get(("diffuse", 0)))
            rgba = (np.clip(_rgba01(color if color is not None else (0.8, 0.8, 0.8, 1.0)), 0, 1) * 255).astype(np.uint8)
            n = len(mesh.vertices)
            uv = np.asarray(mesh.texturecoords)[0][:, :2].astype(np.float32) if len(mesh.texturecoords) else None
            # aiTextureType: 12 = BASE_COLOR (glTF 2), 1 = DIFFUSE (everything else)
            file = props.get(("file", 12), props.get(("file", 1)))
            image = _assimp_texture(file, scene, path) if file and uv is not None and len(uv) == n else None
            if len(mesh.colors):
                colors = (np.clip(np.asarray(mesh.colors)[0], 0, 1) * 255).astype(np.uint8)
            else:
                colors = np.tile(rgba, (n, 1))
            out.append({"vertices": np.asarray(mesh.vertices, dtype=np.float64), "faces": faces.astype(np.int64), "rgba": rgba,
                        "uv": uv if image is not None else None, "texture": None if image is None else _texture_array(image),
                        "colors": colors})  # fmt: skip
    return out


def _assimp_error() -> str:
    """The importer's own message for the last failure (pyassimp only says "Could not import file!")."""
    import ctypes

    import pyassimp

    get = pyassimp.core._assimp_lib.dll.aiGetErrorString
    get.restype = ctypes.c_char_p
    return " ".join((get() or b"").decode("utf-8", "replace").split())[:200]


def _assimp_texture(file: str, scene, path: Path):
    """The image a material names: embedded (``*N``) or a file beside the model (the name alone,
    Windows or absolute paths reduced to it, never read from outside the model's folder)."""
    from PIL import Image

    try:
        if file.startswith("*"):
            texture = scene.textures[int(file[1:])]
            if texture.height != 0:  # raw texels, rare; the material colour is used instead
                return None
            return Image.open(io.BytesIO(bytes(np.asarray(texture.data, dtype=np.uint8)))).convert("RGBA")
        folder = path.parent.resolve()
        relative = file.replace("\\", "/")
        for candidate in (folder / relative, folder / Path(relative).name):
            full = candidate.resolve()
            if full.is_file() and full.is_relative_to(folder):
                return Image.open(full).convert("RGBA")
    except (OSError, ValueError, IndexError):
        return None  # an unreadable texture leaves the material colour, as a viewer would show it
    return None


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
