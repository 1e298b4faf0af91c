"""Rasteriser and camera-sampler tests (CPU, float64 where gradients are compared)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coherendream.cameras import Camera, camera_tensors
from coherendream.generation.camera_sampler import (
    OrbitCameraSampler,
    sample_orbit_cameras,
    view_direction,
    view_prompt,
)
from coherendream.generation.rasterize import (
    covariance_3d,
    project_gaussians,
    rasterize_gaussians,
    rasterize_gaussians_dense,
    spherical_harmonics,
)


def _cams(cams: list[Camera], dtype=torch.float64):
    vm, ks = camera_tensors(cams, dtype=dtype)
    return vm, ks


def _scene(n: int, seed: int = 0, dtype=torch.float64, spread=0.8, scale=(0.02, 0.08), opacity=(0.1, 0.9)):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * spread
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 3, generator=g, dtype=dtype)
    opac = opacity[0] + (opacity[1] - opacity[0]) * torch.rand(n, generator=g, dtype=dtype)
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, quats, scales, opac, colors


def _single(mean, scale=0.03, dtype=torch.float64):
    means = torch.tensor([mean], dtype=dtype)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=dtype)
    scales = torch.full((1, 3), scale, dtype=dtype)
    return means, quats, scales, torch.tensor([0.9], dtype=dtype), torch.ones(1, 3, dtype=dtype)


def _alpha_centroid(alpha: torch.Tensor) -> tuple[float, float]:
    """Alpha-weighted centroid (u, v) in pixel coordinates (pixel centres at +0.5)."""
    a = alpha[..., 0]
    h, w = a.shape
    v, u = torch.meshgrid(torch.arange(h, dtype=a.dtype) + 0.5, torch.arange(w, dtype=a.dtype) + 0.5, indexing="ij")
    return float((a * u).sum() / a.sum()), float((a * v).sum() / a.sum())


# ------------------------------------------------------------------------------ conventions


def test_left_and_up_in_front_view():
    vm, ks = _cams([Camera.orbit(0.0, 0.0, 2.5, 40.0, 32)])
    left = rasterize_gaussians(*_single([-0.3, 0.0, 0.0]), vm, ks, 32, 32, backend="torch")
    u, v = _alpha_centroid(left.alpha[0])
    assert u < 16 and abs(v - 16) < 0.5
    up = rasterize_gaussians(*_single([0.0, 0.3, 0.0]), vm, ks, 32, 32, backend="torch")
    u, v = _alpha_centroid(up.alpha[0])
    assert v < 16 and abs(u - 16) < 0.5


def test_projected_centre_matches_camera_project():
    cam = Camera.orbit(37.0, 21.0, 2.3, 45.0, 48, 40)
    vm, ks = _cams([cam])
    means, quats, scales, opac, colors = _scene(20, seed=3, spread=0.6)
    proj = project_gaussians(means, quats, scales, vm, ks, 48, 40)
    np.testing.assert_allclose(proj.means2d[0].numpy(), cam.project(means.numpy()), atol=1e-9)
    # depth is camera-space z, the distance along the optical axis
    np.testing.assert_allclose(proj.depths[0].numpy(), (means.numpy() @ cam.viewmat[:3, :3].T + cam.viewmat[:3, 3])[:, 2])
    # and a rendered isotropic Gaussian is centred where Camera.project puts it (pixel centres +0.5)
    point = [0.1, -0.05, 0.12]
    out = rasterize_gaussians(*_single(point, scale=0.04), vm, ks, 48, 40, backend="torch")
    np.testing.assert_allclose(_alpha_centroid(out.alpha[0]), cam.project(np.array([point]))[0], atol=0.05)


def test_depth_is_expected_camera_z():
    cam = Camera.orbit(0.0, 0.0, 2.0, 40.0, 16)
    vm, ks = _cams([cam])
    out = rasterize_gaussians(*_single([0.0, 0.0, 0.25], scale=0.05), vm, ks, 16, 16, backend="torch")
    assert out.depth[0, 8, 8, 0] == pytest.approx(1.75, abs=1e-9)
    assert out.depth[0, 0, 0, 0] == 0.0 and out.alpha[0, 0, 0, 0] == 0.0


def test_background_and_behind_camera_culling():
    cam = Camera.orbit(0.0, 0.0, 1.0, 40.0, 16)
    vm, ks = _cams([cam])
    means, quats, scales, opac, colors = _single([0.0, 0.0, 1.5])  # behind the camera at z = 1
    means.requires_grad_(True)
    bg = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)
    out = rasterize_gaussians(means, quats, scales, opac, colors, vm, ks, 16, 16, backgrounds=bg, backend="torch")
    assert torch.allclose(out.rgb, bg.expand_as(out.rgb)) and out.alpha.abs().max() == 0
    out.rgb.sum().backward()
    assert torch.isfinite(means.grad).all()


def test_backend_selection():
    vm, ks = _cams([Camera.orbit(0.0, 10.0, 2.5, 40.0, 16)])
    scene = _scene(10)
    with pytest.raises(ValueError):
        rasterize_gaussians(*scene, vm, ks, 16, 16, backend="opengl")
    with pytest.raises(RuntimeError):
        rasterize_gaussians(*scene, vm, ks, 16, 16, backend="gsplat")  # CPU tensors
    auto = rasterize_gaussians(*scene, vm, ks, 16, 16, backend="auto")
    torch_ = rasterize_gaussians(*scene, vm, ks, 16, 16, backend="torch")
    assert torch.equal(auto.rgb, torch_.rgb)


# ------------------------------------------------------------------------------ tiled == dense


@pytest.mark.parametrize(
    "tile_size,chunk_size,opacity",
    [(4, 32, (0.1, 0.9)), (16, 7, (0.1, 0.9)), (8, 5, (0.9, 1.0))],  # the last one saturates: early exit
)
def test_tiled_equals_dense(tile_size, chunk_size, opacity):
    cams = [Camera.orbit(a, e, 2.2, 40.0, 30, 22) for a, e in ((0, 0), (130, 25), (250, -15))]
    vm, ks = _cams(cams)
    means, quats, scales, opac, colors = _scene(300, seed=1, opacity=opacity)
    bg = torch.tensor([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    args = (means, quats, scales, opac, colors, vm, ks, 30, 22)
    tiled = rasterize_gaussians(*args, backgrounds=bg, backend="torch", tile_size=tile_size, chunk_size=chunk_size)
    dense = rasterize_gaussians_dense(*args, backgrounds=bg)
    assert tiled.rgb.shape == (3, 22, 30, 3) and tiled.alpha.shape == (3, 22, 30, 1) and tiled.depth.shape == (3, 22, 30, 1)
    torch.testing.assert_close(tiled.rgb, dense.rgb, atol=1e-10, rtol=0)
    torch.testing.assert_close(tiled.alpha, dense.alpha, atol=1e-10, rtol=0)
    torch.testing.assert_close(tiled.depth, dense.depth, atol=1e-8, rtol=0)
    assert dense.alpha.max() > 0.5


def test_tiled_equals_dense_with_sh_and_per_camera_inputs():
    cams = [Camera.orbit(a, 20.0, 2.5, 40.0, 24) for a in (0, 120, 240)]
    vm, ks = _cams(cams)
    means, quats, scales, opac, _ = _scene(80, seed=5)
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(80, 16, 3, generator=g, dtype=torch.float64) * 0.3
    per_cam_opac = opac[None].repeat(3, 1) * torch.tensor([[1.0], [0.5], [0.8]], dtype=torch.float64)
    args = (means, quats, scales, per_cam_opac, sh, vm, ks, 24, 24)
    tiled = rasterize_gaussians(*args, backend="torch", sh_degree=3, tile_size=8, chunk_size=16)
    dense = rasterize_gaussians_dense(*args, sh_degree=3)
    torch.testing.assert_close(tiled.rgb, dense.rgb, atol=1e-10, rtol=0)
    # per-camera features [C, N, D] with D != 3
    feats = torch.rand(3, 80, 5, generator=g, dtype=torch.float64)
    tiled = rasterize_gaussians(means, quats, scales, opac, feats, vm, ks, 24, 24, backend="torch")
    dense = rasterize_gaussians_dense(means, quats, scales, opac, feats, vm, ks, 24, 24)
    assert tiled.rgb.shape == (3, 24, 24, 5)
    torch.testing.assert_close(tiled.rgb, dense.rgb, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------ gradients


def test_gradients_match_finite_differences():
    cams = [Camera.orbit(a, 15.0, 2.0, 40.0, 12) for a in (10.0, 200.0)]
    vm, ks = _cams(cams)
    means, quats, scales, opac, colors = _scene(6, seed=7, spread=0.3, scale=(0.05, 0.12), opacity=(0.3, 0.8))
    g = torch.Generator().manual_seed(1)
    w_rgb = torch.rand(2, 12, 12, 3, generator=g, dtype=torch.float64)
    w_alpha = torch.rand(2, 12, 12, 1, generator=g, dtype=torch.float64)
    w_depth = torch.rand(2, 12, 12, 1, generator=g, dtype=torch.float64)
    bg = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)

    def loss(m, q, s, o, c):
        out = rasterize_gaussians(m, q, s, o, c, vm, ks, 12, 12, backgrounds=bg, backend="torch", chunk_size=4)
        return (out.rgb * w_rgb).sum() + (out.alpha * w_alpha).sum() + 0.1 * (out.depth * w_depth).sum()

    inputs = [t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors)]
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ gsplat agreement


def _gsplat_impl():
    # gsplat is in the dev extra: its pure-PyTorch reference functions run on CPU
    import gsplat.cuda._torch_impl as ref

    return ref


def test_projection_matches_gsplat_reference():
    ref = _gsplat_impl()
    cams = [Camera.orbit(a, e, 2.0, 50.0, 40, 32) for a, e in ((0, 0), (75, 30), (200, -20))]
    vm, ks = _cams(cams)
    means, quats, scales, opac, colors = _scene(200, seed=11, spread=1.6)  # some off-screen / near the edge
    covars, _ = ref._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    torch.testing.assert_close(covariance_3d(quats, scales), covars)
    radii, means2d, depths, conics, _ = ref._fully_fused_projection(means, covars, vm, ks, 40, 32, eps2d=0.3, near_plane=0.01)
    proj = project_gaussians(means, quats, scales, vm, ks, 40, 32, eps2d=0.3, near_plane=0.01)
    torch.testing.assert_close(proj.means2d, means2d)
    torch.testing.assert_close(proj.depths, depths)
    torch.testing.assert_close(proj.conics, conics)
    assert torch.equal(proj.radii, radii.to(proj.radii.dtype))
    assert (radii > 0).any() and (radii == 0).any()


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_spherical_harmonics_match_gsplat_reference(degree):
    ref = _gsplat_impl()
    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(50, 3, generator=g, dtype=torch.float64)
    coeffs = torch.randn(50, 16, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(spherical_harmonics(degree, dirs, coeffs), ref._spherical_harmonics(degree, dirs, coeffs))


# ------------------------------------------------------------------------------ camera sampler


def test_sampler_spreads_views_and_is_deterministic():
    batch = sample_orbit_cameras(4, 32, generator=torch.Generator().manual_seed(0))
    az = batch.azimuths.double()
    gaps = torch.diff(torch.cat([az, az[:1] + 360.0]))
    torch.testing.assert_close(gaps, torch.full((4,), 90.0, dtype=torch.float64), atol=1e-4, rtol=0)
    assert (az >= 0).all() and (az < 360).all()
    assert len(set(batch.elevations.tolist())) == 1 and len(set(batch.fov_y.tolist())) == 1
    again = sample_orbit_cameras(4, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch.viewmats, again.viewmats) and torch.equal(batch.azimuths, again.azimuths)
    other = sample_orbit_cameras(4, 32, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(batch.azimuths, other.azimuths)
    a = OrbitCameraSampler(num_views=6, width=16).sample(np.random.default_rng(3))
    b = OrbitCameraSampler(num_views=6, width=16).sample(np.random.default_rng(3))
    assert torch.equal(a.viewmats, b.viewmats) and len(a) == 6
    assert torch.allclose(torch.diff(a.azimuths.double()), torch.full((5,), 60.0, dtype=torch.float64), atol=1e-4)


def test_sampler_matches_camera_conventions():
    batch = sample_orbit_cameras(3, 40, 30, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for i, cam in enumerate(batch.cameras()):
        ref = Camera.orbit(float(batch.azimuths[i]), float(batch.elevations[i]), float(batch.distances[i]), float(batch.fov_y[i]), 40, 30)
        np.testing.assert_allclose(batch.viewmats[i].numpy(), ref.viewmat, atol=1e-12)
        np.testing.assert_allclose(batch.Ks[i].numpy(), ref.K)
        np.testing.assert_allclose(cam.c2w, batch.c2w[i].numpy(), atol=1e-12)
    lo, hi = 0.0, 30.0
    assert lo <= float(batch.elevations[0]) <= hi


def test_view_prompts():
    assert view_direction(0.0, 10.0) == "front"
    assert view_direction(350.0, 10.0) == "front"
    assert view_direction(90.0, 10.0) == "side" and view_direction(270.0, 0.0) == "side"
    assert view_direction(180.0, 10.0) == "back" and view_direction(-170.0, 0.0) == "back"
    assert view_direction(180.0, 75.0) == "overhead"
    assert view_prompt("a red chair", 180.0, 0.0) == "a red chair, back view"
    batch = sample_orbit_cameras(4, 16, generator=np.random.default_rng(0), elevation_range=(0.0, 0.0))
    prompts = batch.view_prompts("a cat")
    assert len(prompts) == 4 and all(p.startswith("a cat, ") for p in prompts)
    assert not math.isnan(float(batch.distances[0]))
