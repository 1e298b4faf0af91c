"""GaussianModel: activations, constructors, checkpoints and 3DGS PLY files."""

from __future__ import annotations

import pytest
import torch

from coherendream.cameras import Camera, camera_tensors
from coherendream.generation.gaussians import SH_C0, GaussianModel, read_ply_vertices
from coherendream.generation.rasterize import spherical_harmonics


def _random_model(n=50, sh_degree=3, seed=0) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    colors = torch.randn(n, 3, generator=g) if sh_degree is None else torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g)
    return GaussianModel(
        means=torch.randn(n, 3, generator=g) * 0.3,
        log_scales=torch.randn(n, 3, generator=g) - 3.0,
        quats=torch.randn(n, 4, generator=g),
        opacity_logits=torch.randn(n, generator=g),
        colors=colors,
        sh_degree=sh_degree,
        object_ids=torch.randint(0, 4, (n,), generator=g),
    )


def test_activations():
    m = _random_model(sh_degree=None)
    torch.testing.assert_close(m.scales, torch.exp(m.log_scales))
    torch.testing.assert_close(m.opacities, torch.sigmoid(m.opacity_logits))
    torch.testing.assert_close(m.rotations.norm(dim=-1), torch.ones(m.num_gaussians))
    torch.testing.assert_close(m.rotations, m.quats / m.quats.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(m.rgb, torch.sigmoid(m.colors))
    inputs = m.render_inputs()
    assert inputs["sh_degree"] is None and inputs["colors"].shape == (m.num_gaussians, 3)
    assert ((inputs["opacities"] > 0) & (inputs["opacities"] < 1)).all() and (inputs["scales"] > 0).all()


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        GaussianModel(torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, 4, 3), sh_degree=2)
    with pytest.raises(ValueError):
        GaussianModel(torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, 3))


@pytest.mark.parametrize("sh_degree", [None, 0, 2])
def test_from_points(sh_degree):
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.3]])
    cols = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.8], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    m = GaussianModel.from_points(pts, cols, scale=0.05, opacity=0.3, object_ids=[0, 0, 1, 2], sh_degree=sh_degree)
    assert torch.equal(m.means.data, pts)
    torch.testing.assert_close(m.scales, torch.full((4, 3), 0.05))
    torch.testing.assert_close(m.opacities, torch.full((4,), 0.3))
    torch.testing.assert_close(m.rotations, torch.tensor([[1.0, 0, 0, 0]]).expand(4, 4))
    # RGB logits cannot hold exact 0/1, so those start 1e-4 inside the range; SH DC is exact
    expected = cols.clamp(1e-4, 1 - 1e-4) if sh_degree is None else cols
    torch.testing.assert_close(m.rgb, expected, atol=1e-5, rtol=0)
    assert m.object_ids.tolist() == [0, 0, 1, 2] and m.object_ids.dtype == torch.long
    if sh_degree is not None:
        # the rasteriser's SH colour (view independent at init) is the requested colour
        rgb = spherical_harmonics(sh_degree, torch.randn(4, 3), m.colors) + 0.5
        torch.testing.assert_close(rgb, cols, atol=1e-5, rtol=0)
        assert m.colors.shape == (4, (sh_degree + 1) ** 2, 3)
    knn = GaussianModel.from_points(pts, cols, scale=None)
    assert (knn.scales > 0.05).all() and (knn.scales < 0.4).all()


def test_render_and_gradients_reach_parameters():
    g = torch.Generator().manual_seed(0)
    pts, cols = torch.rand(30, 3, generator=g) - 0.5, torch.rand(30, 3, generator=g)
    scales = 0.02 + 0.08 * torch.rand(30, 3, generator=g)  # anisotropic, so rotations matter
    m = GaussianModel.from_points(pts, cols, scale=scales, opacity=0.5, sh_degree=1)
    with torch.no_grad():
        m.quats.copy_(torch.randn(30, 4, generator=g))
    cams = [Camera.orbit(a, 10.0, 2.5, 40.0, 16) for a in (0.0, 180.0)]
    vm, ks = camera_tensors(cams)
    out = m.render(vm, ks, 16, 16, backgrounds=torch.ones(3), backend="torch")
    assert out.rgb.shape == (2, 16, 16, 3) and out.alpha.max() > 0.3
    out.rgb.mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_state_dict_save_load(tmp_path):
    m = _random_model(n=25, sh_degree=2)
    m.save(tmp_path / "g.pt")
    back = GaussianModel.load(tmp_path / "g.pt")
    assert back.sh_degree == 2
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    # load_state_dict resizes a model of another size (a checkpoint of a run with another num_gaussians)
    other = _random_model(n=7, sh_degree=2, seed=1)
    other.load_state_dict(m.state_dict())
    assert other.num_gaussians == 25 and torch.equal(other.means, m.means)
    assert "object_ids" in m.state_dict()


@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_ply_round_trip_is_exact(tmp_path, sh_degree):
    m = _random_model(n=33, sh_degree=sh_degree)
    path = tmp_path / "g.ply"
    m.export_ply(path)
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    names = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    k = (sh_degree + 1) ** 2
    expected = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    expected += [f"f_rest_{i}" for i in range(3 * (k - 1))]
    expected += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3", "object_id"]
    assert names == expected and "format binary_little_endian 1.0" in header and "element vertex 33" in header
    back = GaussianModel.from_ply(path)
    assert back.sh_degree == sh_degree
    for name in ("means", "log_scales", "quats", "opacity_logits", "colors", "object_ids"):
        assert torch.equal(getattr(back, name), getattr(m, name)), name
    # f_rest is channel-major like the 3DGS code: f_rest_0 is red's first higher-order coefficient
    cols = read_ply_vertices(path)
    if sh_degree > 0:
        assert cols["f_rest_0"][0] == m.colors[0, 1, 0].item()
        assert cols[f"f_rest_{k - 1}"][0] == m.colors[0, 1, 1].item()
    # without the object tags the file is plain 3DGS and still loads (tags default to 0)
    m.export_ply(tmp_path / "plain.ply", include_object_ids=False)
    plain = GaussianModel.from_ply(tmp_path / "plain.ply")
    assert "object_id" not in read_ply_vertices(tmp_path / "plain.ply") and (plain.object_ids == 0).all()


def test_a_ply_header_claiming_more_vertices_than_the_file_holds_is_refused_before_reading(tmp_path):
    path = tmp_path / "g.ply"
    _random_model(n=5, sh_degree=0).export_ply(path)
    data = path.read_bytes().replace(b"element vertex 5\n", b"element vertex 99999999999\n")
    (tmp_path / "huge.ply").write_bytes(data)
    with pytest.raises(ValueError, match="claims 99999999999 vertices"):
        read_ply_vertices(tmp_path / "huge.ply")  # a MemoryError if the claimed bytes were read first


def test_rgb_model_exports_as_sh_dc(tmp_path):
    m = _random_model(n=10, sh_degree=None)
    m.export_ply(tmp_path / "rgb.ply")
    back = GaussianModel.from_ply(tmp_path / "rgb.ply")
    assert back.sh_degree == 0
    torch.testing.assert_close(back.colors[:, 0] * SH_C0 + 0.5, torch.sigmoid(m.colors), atol=1e-6, rtol=0)
    torch.testing.assert_close(back.rgb, m.rgb, atol=1e-6, rtol=0)


def test_export_rejects_non_finite(tmp_path):
    m = _random_model(n=5, sh_degree=0)
    with torch.no_grad():
        m.means[2, 1] = float("nan")
        m.log_scales[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        m.export_ply(tmp_path / "bad.ply")
    assert not (tmp_path / "bad.ply").exists()


def test_read_rejects_non_3dgs_files(tmp_path):
    (tmp_path / "a.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n0\n")
    with pytest.raises(ValueError):
        GaussianModel.from_ply(tmp_path / "a.ply")
