"""3D Gaussians as an ``nn.Module`` of raw, unconstrained parameters.

Raw parameters (what the optimiser sees) and their activations (what the rasteriser takes):

    means           [N, 3]        world positions                      identity
    log_scales      [N, 3]        log standard deviations              exp      -> scales > 0
    quats           [N, 4]        rotations, wxyz, any norm            normalise -> unit quaternions
    opacity_logits  [N]           opacity logits                       sigmoid  -> opacities in (0, 1)
    colors          [N, 3]        RGB logits (``sh_degree=None``)      sigmoid  -> RGB in (0, 1)
                    [N, K, 3]     SH coefficients, K = (d + 1)^2       evaluated per view by the
                                                                       rasteriser: max(SH + 0.5, 0)

plus ``object_ids [N]`` (int64 buffer): which layout object each Gaussian was seeded in, carried
through checkpoints and PLY files (as an extra ``object_id`` property that standard 3DGS viewers
ignore). The number of Gaussians is fixed during a generation: at the CPU scale (a few thousand
Gaussians, a few hundred steps) adaptive density control has nothing to add, and on a GPU gsplat's
``gsplat.strategy.DefaultStrategy`` is the maintained implementation of 3DGS's densify-and-prune
(screen-space gradients, optimiser state kept for the survivors).

The PLY layout is the one of the original 3DGS code that viewers read: ``x y z nx ny nz f_dc_0..2
f_rest_0.. opacity scale_0..2 rot_0..3``, all float32 little-endian, ``f_dc``/``f_rest`` being SH
coefficients (``f_rest`` channel-major: all of red's higher-order coefficients, then green's, then
blue's), ``opacity`` a logit, ``scale_*`` logs and ``rot_*`` a wxyz quaternion. RGB-logit models are
written as SH degree 0 (``f_dc = (rgb - 0.5) / C0``). SH models in float32 read back bit-exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from coherendream.io import atomic_path

from .rasterize import RasterOutput, rasterize_gaussians

__all__ = ["GaussianModel", "SH_C0", "rgb_to_sh", "sh_to_rgb", "read_ply_vertices", "write_ply_vertices"]

SH_C0 = 0.28209479177387814  # degree-0 real SH basis constant: colour = C0 * f_dc + 0.5

_PARAMS = ("means", "log_scales", "quats", "opacity_logits", "colors")


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """RGB in [0, 1] -> SH DC coefficient (the inverse of the rasteriser's ``C0 * dc + 0.5``)."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(dc: Tensor) -> Tensor:
    return dc * SH_C0 + 0.5


def _logit(p: Tensor, eps: float = 1e-4) -> Tensor:
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


class GaussianModel(nn.Module):
    """A set of ``N`` 3D Gaussians (see the module docstring for the parameter table).

    Args:
        means: ``[N, 3]``. log_scales: ``[N, 3]``. quats: ``[N, 4]`` wxyz. opacity_logits: ``[N]``.
        colors: ``[N, 3]`` RGB logits when ``sh_degree`` is None, else ``[N, (sh_degree+1)^2, 3]``.
        sh_degree: None for plain RGB colours, or 0..3 for view-dependent SH colours.
        object_ids: ``[N]`` integer tags (default 0).
    """

    def __init__(
        self,
        means: Tensor,
        log_scales: Tensor,
        quats: Tensor,
        opacity_logits: Tensor,
        colors: Tensor,
        sh_degree: int | None = None,
        object_ids: Tensor | None = None,
    ) -> None:
        super().__init__()
        n = means.shape[0]
        if sh_degree is not None and not 0 <= sh_degree <= 3:
            raise ValueError(f"sh_degree must be None or 0..3, got {sh_degree}")
        want_colors = (n, 3) if sh_degree is None else (n, (sh_degree + 1) ** 2, 3)
        shapes = {"means": (n, 3), "log_scales": (n, 3), "quats": (n, 4), "opacity_logits": (n,), "colors": want_colors}
        values = {"means": means, "log_scales": log_scales, "quats": quats, "opacity_logits": opacity_logits, "colors": colors}
        for name, shape in shapes.items():
            if tuple(values[name].shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(values[name].shape)}")
            setattr(self, name, nn.Parameter(values[name].detach().clone()))
        self.sh_degree = sh_degree
        ids = torch.zeros(n, dtype=torch.long) if object_ids is None else torch.as_tensor(object_ids, dtype=torch.long)
        if ids.shape != (n,):
            raise ValueError(f"object_ids must have shape ({n},), got {tuple(ids.shape)}")
        self.register_buffer("object_ids", ids.to(means.device).clone())

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_points(
        cls,
        points: Tensor | np.ndarray,
        colors: Tensor | np.ndarray,
        scale: float | Tensor | None = 0.02,
        opacity: float = 0.1,
        object_ids: Tensor | np.ndarray | None = None,
        sh_degree: int | None = None,
    ) -> GaussianModel:
        """Isotropic, axis-aligned Gaussians at ``points [N, 3]`` with ``colors [N, 3]`` in [0, 1].

        ``scale`` is the standard deviation in world units: a float, a tensor ``[N]`` / ``[N, 3]``,
        or None for 3DGS's rule (the RMS distance to the 3 nearest neighbours, clamped to 1e-7).
        ``opacity`` in (0, 1) is the same for all Gaussians (low values such as 0.1 are the usual
        start of 3DGS text-to-3D).
        """
        pts = torch.as_tensor(points, dtype=torch.float32)
        cols = torch.as_tensor(colors, dtype=torch.float32, device=pts.device)
        n = pts.shape[0]
        if pts.shape != (n, 3) or cols.shape != (n, 3):
            raise ValueError(f"points and colors must both be [N, 3], got {tuple(pts.shape)}, {tuple(cols.shape)}")
        if not 0.0 < opacity < 1.0:
            raise ValueError(f"opacity must be in (0, 1), got {opacity}")
        if scale is None:
            s = _knn_scale(pts)[:, None].expand(n, 3)
        else:
            s = torch.as_tensor(scale, dtype=torch.float32, device=pts.device)
            s = s.expand(n, 3) if s.dim() == 0 else (s[:, None].expand(n, 3) if s.dim() == 1 else s)
            if (s <= 0).any():
                raise ValueError("scales must be positive")
        quats = torch.zeros(n, 4, device=pts.device)
        quats[:, 0] = 1.0
        opac = _logit(torch.full((n,), float(opacity), device=pts.device))
        if sh_degree is None:
            feats = _logit(cols)
        else:
            feats = torch.zeros(n, (sh_degree + 1) ** 2, 3, device=pts.device)
            feats[:, 0] = rgb_to_sh(cols)
        return cls(pts, torch.log(s), quats, opac, feats, sh_degree, object_ids)

    # ---------------------------------------------------------------- activations

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    @property
    def scales(self) -> Tensor:
        """``[N, 3]`` standard deviations > 0."""
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> Tensor:
        """``[N]`` in (0, 1)."""
        return torch.sigmoid(self.opacity_logits)

    @property
    def rotations(self) -> Tensor:
        """``[N, 4]`` unit quaternions (wxyz)."""
        return self.quats / self.quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @property
    def rgb(self) -> Tensor:
        """``[N, 3]`` view-independent colour in [0, 1] (SH models: the DC term)."""
        if self.sh_degree is None:
            return torch.sigmoid(self.colors)
        return torch.clamp_min(sh_to_rgb(self.colors[:, 0]), 0.0)

    def render_inputs(self) -> dict[str, Tensor | int | None]:
        """Activated tensors as keyword arguments of ``rasterize_gaussians``."""
        return {
            "means": self.means,
            "quats": self.rotations,
            "scales": self.scales,
            "opacities": self.opacities,
            "colors": torch.sigmoid(self.colors) if self.sh_degree is None else self.colors,
            "sh_degree": self.sh_degree,
        }

    def render(self, viewmats: Tensor, Ks: Tensor, width: int, height: int, **kwargs) -> RasterOutput:
        """``rasterize_gaussians`` on this model; ``kwargs`` go through (backgrounds, backend...)."""
        return rasterize_gaussians(**self.render_inputs(), viewmats=viewmats, Ks=Ks, width=width, height=height, **kwargs)

    # ---------------------------------------------------------------- checkpoints

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like ``nn.Module.load_state_dict`` but first resizes to the checkpoint's number of Gaussians."""
        for name in (*_PARAMS, "object_ids"):
            if name in state_dict and getattr(self, name).shape != state_dict[name].shape:
                empty = torch.empty_like(state_dict[name], device=self.means.device, dtype=getattr(self, name).dtype)
                if name == "object_ids":
                    self.object_ids = empty
                else:
                    setattr(self, name, nn.Parameter(empty))
        if "colors" in state_dict:
            self.sh_degree = None if state_dict["colors"].dim() == 2 else int(math.isqrt(state_dict["colors"].shape[1])) - 1
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor]) -> GaussianModel:
        colors = state_dict["colors"]
        sh_degree = None if colors.dim() == 2 else int(math.isqrt(colors.shape[1])) - 1
        return cls(*(state_dict[name] for name in _PARAMS), sh_degree=sh_degree, object_ids=state_dict.get("object_ids"))

    def save(self, path: str | Path) -> None:
        """Atomic ``torch.save`` of the state dict (loadable with ``weights_only=True``)."""
        with atomic_path(path) as tmp:
            torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, tmp)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> GaussianModel:
        return cls.from_state_dict(torch.load(path, map_location=map_location, weights_only=True))

    # ---------------------------------------------------------------- PLY

    def ply_fields(self) -> dict[str, np.ndarray]:
        """The standard 3DGS PLY columns (float32 ``[N]`` each, in file order) plus ``object_id``."""
        with torch.no_grad():
            n = self.num_gaussians
            sh = rgb_to_sh(torch.sigmoid(self.colors))[:, None] if self.sh_degree is None else self.colors
            to_np = lambda t: t.detach().cpu().to(torch.float32).numpy()  # noqa: E731
            cols: dict[str, np.ndarray] = {}
            for i, axis in enumerate("xyz"):
                cols[axis] = to_np(self.means[:, i])
            for axis in ("nx", "ny", "nz"):
                cols[axis] = np.zeros(n, dtype=np.float32)
            for c in range(3):
                cols[f"f_dc_{c}"] = to_np(sh[:, 0, c])
            rest = sh[:, 1:].transpose(1, 2).reshape(n, -1)  # channel-major, like 3DGS
            for i in range(rest.shape[1]):
                cols[f"f_rest_{i}"] = to_np(rest[:, i])
            cols["opacity"] = to_np(self.opacity_logits)
            for i in range(3):
                cols[f"scale_{i}"] = to_np(self.log_scales[:, i])
            for i in range(4):
                cols[f"rot_{i}"] = to_np(self.quats[:, i])
        bad = {k: int((~np.isfinite(v)).sum()) for k, v in cols.items() if not np.isfinite(v).all()}
        if bad:
            raise ValueError(f"cannot export Gaussians with non-finite values (field: count): {bad}")
        cols["object_id"] = self.object_ids.detach().cpu().numpy().astype(np.int32)
        return cols

    def export_ply(self, path: str | Path, include_object_ids: bool = True) -> None:
        """Write a binary little-endian 3DGS PLY (atomic). Raises ``ValueError`` on NaN/inf."""
        cols = self.ply_fields()
        if not include_object_ids:
            cols.pop("object_id")
        write_ply_vertices(path, cols)

    @classmethod
    def from_ply(cls, path: str | Path) -> GaussianModel:
        """Read a 3DGS PLY; SH degree from the number of ``f_rest_*`` columns (0, 9, 24 or 45)."""
        cols = read_ply_vertices(path)
        missing = [k for k in ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                               "rot_0", "rot_1", "rot_2", "rot_3") if k not in cols]  # fmt: skip
        if missing:
            raise ValueError(f"{path}: not a 3DGS PLY, missing properties {missing}")
        num_rest = sum(1 for k in cols if k.startswith("f_rest_"))
        k = num_rest // 3 + 1
        degree = math.isqrt(k) - 1
        if num_rest % 3 or (degree + 1) ** 2 != k or degree > 3:
            raise ValueError(f"{path}: {num_rest} f_rest properties do not match an SH degree 0..3")
        t = lambda name: torch.from_numpy(np.ascontiguousarray(cols[name], dtype=np.float32))  # noqa: E731
        n = len(cols["x"])
        means = torch.stack([t("x"), t("y"), t("z")], dim=-1)
        dc = torch.stack([t(f"f_dc_{c}") for c in range(3)], dim=-1)[:, None]
        rest = torch.stack([t(f"f_rest_{i}") for i in range(num_rest)], dim=-1) if num_rest else torch.zeros(n, 0)
        rest = rest.reshape(n, 3, k - 1).transpose(1, 2)
        ids = torch.from_numpy(cols["object_id"].astype(np.int64)) if "object_id" in cols else None
        return cls(
            means,
            torch.stack([t(f"scale_{i}") for i in range(3)], dim=-1),
            torch.stack([t(f"rot_{i}") for i in range(4)], dim=-1),
            t("opacity"),
            torch.cat([dc, rest], dim=1),
            sh_degree=degree,
            object_ids=ids,
        )


def _knn_scale(points: Tensor, k: int = 3) -> Tensor:
    """RMS distance of each point to its ``k`` nearest neighbours (3DGS's initial scale)."""
    from scipy.spatial import cKDTree

    pts = points.detach().cpu().numpy().astype(np.float64)
    if len(pts) < 2:
        return torch.full((len(pts),), 0.01, device=points.device)
    dist, _ = cKDTree(pts).query(pts, k=min(k, len(pts) - 1) + 1)
    rms = np.sqrt((dist[:, 1:] ** 2).mean(axis=1))
    return torch.from_numpy(np.maximum(rms, 1e-7)).to(points.device, torch.float32)


# ------------------------------------------------------------------------------------------------
# Minimal PLY vertex I/O (numpy structured arrays; no plyfile dependency)
# ------------------------------------------------------------------------------------------------

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_NP_TO_PLY = {"f4": "float", "f8": "double", "i4": "int", "u1": "uchar", "i1": "char", "u4": "uint", "i2": "short", "u2": "ushort"}


def write_ply_vertices(path: str | Path, columns: dict[str, np.ndarray]) -> None:
    """Write equally long 1D ``columns`` as the ``vertex`` element of a binary little-endian PLY."""
    n = len(next(iter(columns.values())))
    dtype = np.dtype([(name, np.asarray(col).dtype.newbyteorder("<")) for name, col in columns.items()])
    data = np.empty(n, dtype=dtype)
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"column {name} has {len(col)} rows, expected {n}")
        data[name] = col
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {_NP_TO_PLY[dtype[name].str[1:]]} {name}" for name in columns]
    header.append("end_header")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(("\n".join(header) + "\n").encode("ascii"))
            fh.write(data.tobytes())


def read_ply_vertices(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of the ``vertex`` element of a binary PLY (little or big endian, scalar properties)."""
    with open(path, "rb") as fh:
        if fh.readline().strip() != b"ply":
            raise ValueError(f"{path}: not a PLY file")
        fmt, elements, current = None, [], None
        while True:
            line = fh.readline()
            if not line:
                raise ValueError(f"{path}: PLY header has no end_header")
            words = line.decode("ascii", errors="replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                current = (words[1], int(words[2]), [])
                elements.append(current)
            elif words[0] == "property":
                if current is None or words[1] == "list":
                    raise ValueError(f"{path}: unsupported PLY property line {line!r}")
                if words[1] not in _PLY_TYPES:
                    raise ValueError(f"{path}: unknown PLY type {words[1]}")
                current[2].append((words[2], _PLY_TYPES[words[1]]))
        if fmt not in ("binary_little_endian", "binary_big_endian"):
            raise ValueError(f"{path}: only binary PLY is supported, got format {fmt}")
        if not elements or elements[0][0] != "vertex":
            raise ValueError(f"{path}: the first PLY element must be 'vertex'")
        _, n, props = elements[0]
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, order + code) for name, code in props])
        # The header's count is checked against the file's size before anything is read: a header
        # may claim any number of vertices, and reading that many bytes first would exhaust memory.
        need, left = n * dtype.itemsize, os.fstat(fh.fileno()).st_size - fh.tell()
        if n < 0 or need > left:
            raise ValueError(f"{path}: truncated PLY (the header claims {n} vertices, {need} bytes; the file holds {max(left, 0)} after the header)")
        raw = fh.read(need)
    data = np.frombuffer(raw, dtype=dtype)
    return {name: data[name].astype(data[name].dtype.newbyteorder("=")) for name, _ in props}
