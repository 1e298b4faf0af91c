"""Differentiable rasterisation of 3D Gaussians behind one function, with two backends.

``rasterize_gaussians`` mirrors ``gsplat.rasterization``'s functional style: *activated* values
in (unit-or-not quaternions, positive scales, opacities in [0, 1], colours or SH coefficients),
world-to-camera ``viewmats`` and pinhole ``Ks`` in the OpenCV convention of
``coherendream.cameras`` (camera x right, y down, z forward; pixel ``(u, v)`` covers
``[u, u+1) x [v, v+1)``, so pixel centres sit at ``u + 0.5``), images out.

Backends
    ``"gsplat"``  ``gsplat.rasterization`` (CUDA kernels, the field's standard); only on CUDA
                 tensors with gsplat installed.
    ``"torch"``   the pure-PyTorch rasteriser in this module. It exists because no maintained
                 library ships a CPU rasteriser for 3D Gaussians (gsplat's ``_torch_impl``
                 reference functions still call CUDA kernels for tile intersection and need
                 nerfacc), and tests, the embedded default and machines without CUDA need one.
                 It follows gsplat's "classic" maths so both backends agree: EWA splatting with
                 the perspective Jacobian, a 0.3 px^2 low-pass dilation, alpha = min(0.99, o *
                 exp(-sigma)), Gaussians below alpha 1/255 skipped, front-to-back compositing
                 that stops once transmittance would fall to 1e-4. Gradients come from autograd.
    ``"auto"``    gsplat on CUDA tensors when it imports, else torch.

The torch backend bins Gaussians into square pixel tiles (4x4 by default) (a Gaussian is listed in every tile its
opacity-aware bounding box touches, so no pixel it can reach with alpha >= 1/255 is missed) and
then composites all tiles together, ``chunk_size`` depth-sorted Gaussians at a time, dropping tiles
whose pixels are all saturated. Memory per step is ``tiles x chunk_size x tile_size^2`` floats, not
``Gaussians x pixels``. ``rasterize_gaussians_dense`` is the naive reference (every Gaussian
against every pixel) used by tests and as the benchmark baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "RasterOutput",
    "Projection",
    "quat_to_rotmat",
    "covariance_3d",
    "project_gaussians",
    "spherical_harmonics",
    "rasterize_gaussians",
    "rasterize_gaussians_dense",
    "gsplat_available",
]

Backend = Literal["auto", "gsplat", "torch"]

# exp(-30) ~ 1e-13: no opacity <= 1 reaches a useful min_alpha beyond this exponent.
_SIGMA_MAX = 30.0

# Real spherical-harmonics constants (degrees 0-3), the basis 3DGS and gsplat use.
_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


@dataclass
class RasterOutput:
    """Rendered images of ``C`` cameras.

    rgb:   ``[C, H, W, D]`` colours composited over ``backgrounds`` (D = 3 for RGB).
    alpha: ``[C, H, W, 1]`` accumulated opacity in [0, 1].
    depth: ``[C, H, W, 1]`` expected camera-space z (``sum w_i z_i / alpha``), 0 where empty.
    meta:  extras, e.g. ``means2d [C, N, 2]`` (in the autograd graph; call ``retain_grad`` for
           gradient-based densification) and ``radii``; contents differ slightly per backend.
    """

    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Projection:
    """Gaussians projected into ``C`` cameras (output of ``project_gaussians``).

    means2d: ``[C, N, 2]`` pixel coordinates (u right, v down).
    conics:  ``[C, N, 3]`` upper triangle ``(a, b, c)`` of the inverse 2D covariance, so that
             ``sigma = 0.5 * (a dx^2 + c dy^2) + b dx dy`` (gsplat's layout).
    cov2d:   ``[C, N, 2, 2]`` dilated 2D covariance in px^2.
    depths:  ``[C, N]`` camera-space z.
    radii:   ``[C, N, 2]`` int, gsplat-style 3.33-sigma half extents in px, 0 where culled.
    valid:   ``[C, N]`` bool: in front of ``near_plane``, before ``far_plane``, positive
             determinant (the image-bounds test is left to the rasteriser).
    """

    means2d: Tensor
    conics: Tensor
    cov2d: Tensor
    depths: Tensor
    radii: Tensor
    valid: Tensor


def gsplat_available() -> bool:
    """True when gsplat imports and CUDA is available (its kernels compile on first use)."""
    if not torch.cuda.is_available():
        return False
    try:
        import gsplat  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` from quaternions ``[..., 4]`` (wxyz, any norm > 0)."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariance ``R S S^T R^T`` ``[..., 3, 3]`` from ``quats [..., 4]``, ``scales [..., 3] > 0``."""
    m = quat_to_rotmat(quats) * scales[..., None, :]  # R @ diag(s): scale the columns
    return m @ m.transpose(-1, -2)


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
) -> Projection:
    """EWA projection of ``N`` Gaussians into ``C`` pinhole cameras.

    Args:
        means: ``[N, 3]`` world positions. quats: ``[N, 4]`` wxyz. scales: ``[N, 3]`` > 0.
        viewmats: ``[C, 4, 4]`` world-to-camera (OpenCV). Ks: ``[C, 3, 3]`` pinhole intrinsics.
        eps2d: low-pass dilation added to the 2D covariance's diagonal (px^2), so that every
            splat covers about a pixel and sub-pixel Gaussians do not alias.
    """
    rot, trans = viewmats[:, :3, :3], viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", rot, means) + trans[:, None, :]  # [C, N, 3]
    cov_c = rot[:, None] @ covariance_3d(quats, scales)[None] @ rot[:, None].transpose(-1, -2)  # [C, N, 3, 3]

    x, y, z = means_c.unbind(-1)
    valid_z = (z > near_plane) & (z < far_plane)
    # Behind-camera Gaussians are culled; a placeholder depth keeps their (unused) maths finite.
    z_safe = torch.where(valid_z, z, torch.ones_like(z))
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]

    # The affine (Jacobian) approximation degrades far off-axis; like 3DGS/gsplat, evaluate it at
    # the view direction clamped to 1.3x the image's half extent so off-screen splats stay tame.
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    tx = z_safe * torch.minimum(torch.maximum(x / z_safe, -lim_x_neg), lim_x_pos)
    ty = z_safe * torch.minimum(torch.maximum(y / z_safe, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(z_safe)
    jac = torch.stack(
        [fx / z_safe, zero, -fx * tx / z_safe**2, zero, fy / z_safe, -fy * ty / z_safe**2], dim=-1
    ).reshape(*z.shape, 2, 3)
    cov2d = jac @ cov_c @ jac.transpose(-1, -2)
    cov2d = cov2d + eps2d * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)

    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = a * c - b * b
    valid = valid_z & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)

    means2d = torch.stack([fx * x / z_safe + cx, fy * y / z_safe + cy], dim=-1)
    radii = torch.ceil(3.33 * torch.sqrt(torch.stack([a, c], dim=-1).clamp_min(0))).detach()
    inside = (
        (means2d[..., 0] + radii[..., 0] > 0)
        & (means2d[..., 0] - radii[..., 0] < width)
        & (means2d[..., 1] + radii[..., 1] > 0)
        & (means2d[..., 1] - radii[..., 1] < height)
    )
    radii = torch.where((valid & inside)[..., None], radii, torch.zeros_like(radii)).to(torch.int32)
    return Projection(means2d, conics, cov2d, z, radii, valid)


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluate real SH of ``degree`` (0-3) at ``dirs [..., 3]`` (any norm) with ``coeffs [..., K, 3]``.

    ``K >= (degree + 1)^2``; extra coefficients are ignored. Returns ``[..., 3]`` (no +0.5 offset).
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be in 0..3, got {degree}")
    if coeffs.shape[-2] < (degree + 1) ** 2:
        raise ValueError(f"degree {degree} needs {(degree + 1) ** 2} coefficients, got {coeffs.shape[-2]}")
    out = _SH_C0 * coeffs[..., 0, :]
    if degree == 0:
        return out
    d = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    x, y, z = (t[..., None] for t in d.unbind(-1))
    out = out - _SH_C1 * y * coeffs[..., 1, :] + _SH_C1 * z * coeffs[..., 2, :] - _SH_C1 * x * coeffs[..., 3, :]
    if degree == 1:
        return out
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    out = (
        out
        + _SH_C2[0] * xy * coeffs[..., 4, :]
        + _SH_C2[1] * yz * coeffs[..., 5, :]
        + _SH_C2[2] * (2 * zz - xx - yy) * coeffs[..., 6, :]
        + _SH_C2[3] * xz * coeffs[..., 7, :]
        + _SH_C2[4] * (xx - yy) * coeffs[..., 8, :]
    )
    if degree == 2:
        return out
    return (
        out
        + _SH_C3[0] * y * (3 * xx - yy) * coeffs[..., 9, :]
        + _SH_C3[1] * xy * z * coeffs[..., 10, :]
        + _SH_C3[2] * y * (4 * zz - xx - yy) * coeffs[..., 11, :]
        + _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * coeffs[..., 12, :]
        + _SH_C3[4] * x * (4 * zz - xx - yy) * coeffs[..., 13, :]
        + _SH_C3[5] * z * (xx - yy) * coeffs[..., 14, :]
        + _SH_C3[6] * x * (xx - 3 * yy) * coeffs[..., 15, :]
    )


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def rasterize_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,
    backend: Backend = "auto",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    tile_size: int | None = None,
    chunk_size: int = 32,
    min_alpha: float = 1.0 / 255.0,
    max_alpha: float = 0.99,
    min_transmittance: float = 1e-4,
) -> RasterOutput:
    """Render ``N`` Gaussians into ``C`` cameras.

    Args:
        means: ``[N, 3]`` world positions.
        quats: ``[N, 4]`` rotations, wxyz, normalised here.
        scales: ``[N, 3]`` standard deviations along the local axes (> 0, world units).
        opacities: ``[N]`` or ``[C, N]`` in [0, 1].
        colors: ``[N, D]`` / ``[C, N, D]`` features (D = 3 for RGB, values usually in [0, 1]), or
            with ``sh_degree`` set, SH coefficients ``[N, K, 3]`` / ``[C, N, K, 3]``; those are
            evaluated towards each camera and mapped to ``max(sh + 0.5, 0)`` like gsplat.
        viewmats: ``[C, 4, 4]`` world-to-camera (OpenCV, ``Camera.viewmat``).
        Ks: ``[C, 3, 3]`` pinhole intrinsics (``Camera.K``).
        width, height: image size in pixels.
        backgrounds: ``[C, D]`` or ``[D]`` colour behind the Gaussians; None = 0 (black).
        backend: ``"auto"`` | ``"gsplat"`` | ``"torch"`` (see the module docstring).
        near_plane, far_plane: camera-space z range; Gaussians outside it are culled.
        eps2d: 2D low-pass dilation in px^2.
        tile_size: pixels per tile side; None = the backend's default (gsplat 16, torch 4:
            on CPU, small tiles waste less work on pixels a Gaussian cannot reach, measured
            fastest at 64-256 px in ``benchmarks/generation.py``).
        chunk_size, min_alpha, max_alpha, min_transmittance: torch backend only (gsplat's
            kernels hard-code the same values: 1/255, 0.99, 1e-4). ``chunk_size`` is how many
            depth-sorted Gaussians per tile are composited per step; it trades Python overhead
            against work wasted past saturation.

    Returns:
        ``RasterOutput(rgb [C, H, W, D], alpha [C, H, W, 1], depth [C, H, W, 1], meta)``.
    """
    if backend not in ("auto", "gsplat", "torch"):
        raise ValueError(f"unknown backend {backend!r}; use 'auto', 'gsplat' or 'torch'")
    if backend == "auto":
        backend = "gsplat" if means.is_cuda and gsplat_available() else "torch"
    if backend == "gsplat":
        return _rasterize_gsplat(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            backgrounds, near_plane, far_plane, eps2d, sh_degree, tile_size or 16,
        )  # fmt: skip
    proj, opac, feats = _prepare(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane, eps2d, sh_degree
    )
    return _composite_tiled(
        proj, opac, feats, width, height, backgrounds, tile_size or 4, chunk_size, min_alpha, max_alpha, min_transmittance
    )


def rasterize_gaussians_dense(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    min_alpha: float = 1.0 / 255.0,
    max_alpha: float = 0.99,
    min_transmittance: float = 1e-4,
) -> RasterOutput:
    """Naive reference: every Gaussian against every pixel, one camera at a time.

    Same arguments and maths as ``rasterize_gaussians(backend="torch")`` without tiling or early
    exit; memory is ``N x H x W`` floats per intermediate, so keep scenes small.
    """
    proj, opac, feats = _prepare(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane, eps2d, sh_degree
    )
    num_cams = feats.shape[0]
    dtype, device = feats.dtype, feats.device
    vs, us = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device), torch.arange(width, dtype=dtype, device=device), indexing="ij"
    )
    pix = torch.stack([us, vs], dim=-1).reshape(-1, 2) + 0.5  # [HW, 2] pixel centres
    rgbs, alphas, depths = [], [], []
    for cam in range(num_cams):
        order = torch.argsort(proj.depths[cam].detach(), stable=True)
        order = order[proj.valid[cam][order]]
        delta = pix[None] - proj.means2d[cam, order][:, None]  # [N, HW, 2]
        con = proj.conics[cam, order]
        sigma = (
            0.5 * (con[:, 0:1] * delta[..., 0] ** 2 + con[:, 2:3] * delta[..., 1] ** 2)
            + con[:, 1:2] * delta[..., 0] * delta[..., 1]
        )
        alpha = torch.clamp_max(opac[cam, order][:, None] * torch.exp(-sigma.clamp_max(_SIGMA_MAX)), max_alpha)
        keep = (sigma >= 0) & (sigma < _SIGMA_MAX) & (alpha >= min_alpha)
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        trans_incl = torch.cumprod(1 - alpha, dim=0)  # [N, HW]
        trans_excl = torch.cat([torch.ones_like(trans_incl[:1]), trans_incl[:-1]], dim=0)
        # Stop (like gsplat) at the first Gaussian that would take transmittance to <= 1e-4.
        weights = torch.where(trans_incl > min_transmittance, alpha * trans_excl, torch.zeros_like(alpha))
        rgbs.append(weights.T @ feats[cam, order])
        alphas.append(weights.sum(0))
        depths.append(weights.T @ proj.depths[cam, order])
    rgb = torch.stack(rgbs).reshape(num_cams, height, width, -1)
    alpha = torch.stack(alphas).reshape(num_cams, height, width, 1)
    depth = torch.stack(depths).reshape(num_cams, height, width, 1)
    return _finish(rgb, alpha, depth, backgrounds, proj, (proj.means2d, opac, feats))


# --------------------------------------------------------------------------------------------
# Torch backend internals
# --------------------------------------------------------------------------------------------


def _prepare(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane, eps2d, sh_degree):
    """Project and broadcast opacities ``[C, N]`` and features ``[C, N, D]``."""
    num_cams, n = viewmats.shape[0], means.shape[0]
    if means.shape != (n, 3) or quats.shape != (n, 4) or scales.shape != (n, 3):
        raise ValueError(f"expected means [N,3], quats [N,4], scales [N,3]; got {means.shape}, {quats.shape}, {scales.shape}")
    if viewmats.shape != (num_cams, 4, 4) or Ks.shape != (num_cams, 3, 3):
        raise ValueError(f"expected viewmats [C,4,4] and Ks [C,3,3]; got {viewmats.shape}, {Ks.shape}")
    viewmats, Ks = viewmats.to(means.dtype), Ks.to(means.dtype)
    proj = project_gaussians(means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane, far_plane)
    opac = opacities.expand(num_cams, n) if opacities.dim() == 1 else opacities
    if opac.shape != (num_cams, n):
        raise ValueError(f"opacities must be [N] or [C, N], got {tuple(opacities.shape)}")
    if sh_degree is not None:
        coeffs = colors if colors.dim() == 4 else colors[None].expand(num_cams, *colors.shape)
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # camera centres [C, 3]
        dirs = means[None] - campos[:, None]  # view rays towards each Gaussian [C, N, 3]
        feats = torch.clamp_min(spherical_harmonics(sh_degree, dirs, coeffs) + 0.5, 0.0)
    else:
        feats = colors if colors.dim() == 3 else colors[None].expand(num_cams, *colors.shape)
    if feats.shape[:2] != (num_cams, n):
        raise ValueError(f"colors must be [N, D] or [C, N, D] (or SH [.., N, K, 3]), got {tuple(colors.shape)}")
    return proj, opac, feats


def _finish(rgb, alpha, depth_acc, backgrounds, proj, anchors=()) -> RasterOutput:
    if not rgb.requires_grad and any(t.requires_grad for t in anchors) and torch.is_grad_enabled():
        # Nothing visible: keep the outputs in the graph (zero gradients) so that a training step
        # whose Gaussians are all culled still runs `loss.backward()` like with gsplat.
        zero = sum(t.sum() for t in anchors if t.requires_grad) * 0.0
        rgb, alpha, depth_acc = rgb + zero, alpha + zero, depth_acc + zero
    # Expected depth, gsplat's "ED": normalise the weighted depth by the accumulated opacity.
    depth = depth_acc / alpha.clamp_min(1e-10)
    if backgrounds is not None:
        bg = backgrounds.to(rgb.dtype)
        bg = bg.expand(rgb.shape[0], rgb.shape[-1]) if bg.dim() == 1 else bg
        rgb = rgb + bg[:, None, None, :] * (1.0 - alpha)
    return RasterOutput(rgb, alpha, depth, {"means2d": proj.means2d, "radii": proj.radii, "depths": proj.depths})


def _composite_tiled(proj, opac, feats, width, height, backgrounds, tile_size, chunk_size, min_alpha, max_alpha, min_trans):
    num_cams, n, dim = feats.shape
    dtype, device = feats.dtype, feats.device
    ts = int(tile_size)
    ntx, nty = -(-width // ts), -(-height // ts)
    tiles_per_cam = ntx * nty
    num_tiles = num_cams * tiles_per_cam
    npix = ts * ts

    # ---- binning (no gradients needed: it only decides which pairs to evaluate) ----
    with torch.no_grad():
        op = opac.detach()
        # A pixel centre at Mahalanobis distance d gets alpha = o * exp(-d^2 / 2) >= min_alpha only
        # while d^2 <= 2 ln(o / min_alpha): that ellipse's bounding box is exact, not a heuristic.
        d2max = 2.0 * torch.log(op.clamp_min(1e-30) / min_alpha)
        visible = proj.valid & (d2max > 0)
        cov = proj.cov2d.detach()
        ext = torch.sqrt(d2max.clamp_min(0)[..., None] * torch.stack([cov[..., 0, 0], cov[..., 1, 1]], -1)) * 1.0001
        m2 = proj.means2d.detach()
        # Pixel u is reached when |u + 0.5 - mean| <= ext; clamp before casting (means may be huge).
        lo = torch.ceil(m2 - ext - 0.5)
        hi = torch.floor(m2 + ext - 0.5)
        size = torch.tensor([width, height], dtype=dtype, device=device)
        visible &= (hi[..., 0] >= 0) & (hi[..., 1] >= 0) & (lo[..., 0] <= size[0] - 1) & (lo[..., 1] <= size[1] - 1)
        visible &= torch.isfinite(lo).all(-1) & torch.isfinite(hi).all(-1)
        lo = torch.minimum(torch.maximum(lo, torch.zeros_like(lo)), size - 1).long() // ts
        hi = torch.minimum(torch.maximum(hi, torch.zeros_like(hi)), size - 1).long() // ts
        cam_idx, g_idx = torch.nonzero(visible, as_tuple=True)  # visible (camera, Gaussian) pairs
        lo, hi = lo[cam_idx, g_idx], hi[cam_idx, g_idx]
        span = hi - lo + 1  # [P, 2] tiles in x and y
        counts = span[:, 0] * span[:, 1]
        pair = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        local = torch.arange(len(pair), device=device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        tile_x = lo[pair, 0] + local % span[pair, 0]
        tile_y = lo[pair, 1] + local // span[pair, 0]
        tile_of = cam_idx[pair] * tiles_per_cam + tile_y * ntx + tile_x  # [M] global tile id
        # Depth rank within each camera; the sort key orders intersections by tile, then depth.
        rank = torch.empty_like(proj.depths, dtype=torch.long)
        order = torch.argsort(proj.depths.detach(), dim=1, stable=True)
        rank.scatter_(1, order, torch.arange(n, device=device).expand(num_cams, n).contiguous())
        key = tile_of * n + rank[cam_idx[pair], g_idx[pair]]
        key, perm = torch.sort(key, stable=True)
        flat_g = (cam_idx * n + g_idx)[pair[perm]]  # [M] index into the [C*N] flattened arrays
        tile_count = torch.bincount(tile_of, minlength=num_tiles)
        tile_start = torch.cumsum(tile_count, 0) - tile_count

        # Pixel centres of every tile [num_tiles, npix, 2], and a mask for pixels past the border.
        ly, lx = torch.meshgrid(torch.arange(ts, device=device), torch.arange(ts, device=device), indexing="ij")
        t = torch.arange(tiles_per_cam, device=device)
        px = (t % ntx)[:, None] * ts + lx.reshape(1, -1)
        py = (t // ntx)[:, None] * ts + ly.reshape(1, -1)
        in_image = ((px < width) & (py < height)).repeat(num_cams, 1)
        tile_pix = torch.stack([px, py], dim=-1).to(dtype).repeat(num_cams, 1, 1) + 0.5

    means2d = proj.means2d.reshape(-1, 2)
    conics = proj.conics.reshape(-1, 3)
    opac_f = opac.reshape(-1)
    feats_f = feats.reshape(-1, dim)
    depth_f = proj.depths.reshape(-1)

    trans = torch.ones(num_tiles, npix, dtype=dtype, device=device)
    acc_rgb = torch.zeros(num_tiles, npix, dim, dtype=dtype, device=device)
    acc_depth = torch.zeros(num_tiles, npix, dtype=dtype, device=device)
    done = ~in_image  # pixels outside the image never need work
    offs = torch.arange(chunk_size, device=device)
    step = 0
    while True:
        with torch.no_grad():
            active = torch.nonzero((tile_count > step) & ~done.all(1), as_tuple=True)[0]
        if len(active) == 0:
            break
        with torch.no_grad():
            slot = step + offs[None]  # [A, B]
            real = slot < tile_count[active, None]
            pos = torch.where(real, tile_start[active, None] + slot, torch.zeros_like(slot))
            g = flat_g[pos] if len(flat_g) else torch.zeros_like(pos)
        delta = tile_pix[active][:, None] - means2d[g][:, :, None]  # [A, B, P, 2]
        con = conics[g]  # [A, B, 3]
        sigma = (
            0.5 * (con[..., 0:1] * delta[..., 0] ** 2 + con[..., 2:3] * delta[..., 1] ** 2)
            + con[..., 1:2] * delta[..., 0] * delta[..., 1]
        )  # [A, B, P]
        # exp of a clamped exponent: beyond ~ 30 alpha is far below min_alpha anyway, and the
        # clamp keeps float32 out of denormals, which are very slow on CPUs.
        alpha = torch.clamp_max(opac_f[g][..., None] * torch.exp(-sigma.clamp_max(_SIGMA_MAX)), max_alpha)
        keep = (sigma >= 0) & (sigma < _SIGMA_MAX) & (alpha >= min_alpha) & real[..., None]
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        t0 = trans[active][:, None]  # [A, 1, P] transmittance entering this chunk
        cum = torch.cumprod(1 - alpha, dim=1)
        trans_incl = t0 * cum
        trans_excl = t0 * torch.cat([torch.ones_like(cum[:, :1]), cum[:, :-1]], dim=1)
        with torch.no_grad():
            # gsplat stops a pixel at the first Gaussian that would take T to <= 1e-4 and skips
            # everything behind it; transmittance only falls, so this is a prefix test.
            include = (trans_incl > min_trans) & ~done[active][:, None]
        w = torch.where(include, alpha * trans_excl, torch.zeros_like(alpha))  # [A, B, P]
        acc_rgb = acc_rgb.index_add(0, active, torch.einsum("abp,abd->apd", w, feats_f[g]))
        acc_depth = acc_depth.index_add(0, active, torch.einsum("abp,ab->ap", w, depth_f[g]))
        trans = trans.index_copy(0, active, trans[active] - w.sum(1))  # T_after = T_before - sum(w)
        with torch.no_grad():
            done = done.index_copy(0, active, done[active] | (trans_incl[:, -1] <= min_trans))
        step += chunk_size

    def untile(x: Tensor) -> Tensor:  # [num_tiles, npix, K] -> [C, H, W, K]
        k = x.shape[-1]
        x = x.reshape(num_cams, nty, ntx, ts, ts, k).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(num_cams, nty * ts, ntx * ts, k)[:, :height, :width]

    rgb = untile(acc_rgb)
    alpha = untile((1 - trans)[..., None])
    depth = untile(acc_depth[..., None])
    out = _finish(rgb, alpha, depth, backgrounds, proj, (means2d, opac_f, feats_f))
    out.meta["num_intersections"] = int(len(flat_g))
    return out


# --------------------------------------------------------------------------------------------
# gsplat backend
# --------------------------------------------------------------------------------------------


def _rasterize_gsplat(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds, near_plane, far_plane, eps2d, sh_degree, tile_size
) -> RasterOutput:
    if not gsplat_available():
        raise RuntimeError("backend='gsplat' needs CUDA and `pip install gsplat`; use backend='torch' on CPU")
    if not means.is_cuda:
        raise RuntimeError("backend='gsplat' needs CUDA tensors; move the Gaussians to the GPU or use backend='torch'")
    import gsplat

    num_cams = viewmats.shape[0]
    if backgrounds is not None and backgrounds.dim() == 1:
        backgrounds = backgrounds.expand(num_cams, backgrounds.shape[0])
    renders, alphas, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats.to(means.dtype), Ks.to(means.dtype), width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, sh_degree=sh_degree, packed=False,
        tile_size=tile_size, backgrounds=None, render_mode="RGB+ED", rasterize_mode="classic",
    )  # fmt: skip
    rgb, depth = renders[..., :-1], renders[..., -1:]
    if backgrounds is not None:
        # Applied here rather than by gsplat so that depth stays unaffected by the background.
        rgb = rgb + backgrounds.to(rgb.dtype)[:, None, None, :] * (1.0 - alphas)
    return RasterOutput(rgb, alphas, depth, {"means2d": meta.get("means2d"), "radii": meta.get("radii"), "depths": meta.get("depths")})
