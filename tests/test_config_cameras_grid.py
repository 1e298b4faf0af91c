from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest
import torch

from coherendream.cameras import Camera, OrbitSpec, look_at, opencv_to_opengl
from coherendream.config import ConfigError, from_dict, load_config, parse_overrides
from coherendream.grid import GridLayout, tile, untile


@dataclass
class Inner:
    size: int = 4
    scale: float = 1.0
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    mode: Literal["x", "y"] = "x"
    weights: dict[str, float] = field(default_factory=dict)
    path: str | None = None


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("inner:\n  size: 8\nmode: y\n")
    cfg = load_config(Outer, cfg_file, ["inner.scale=2", "weights.color=0.5", "inner.names=[b, c]"])
    assert cfg.inner.size == 8 and cfg.inner.scale == 2.0 and cfg.mode == "y"
    assert cfg.weights == {"color": 0.5} and cfg.inner.names == ["b", "c"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"sise": 3}}, "inner.sise"),
        ({"mode": "z"}, "mode"),
        ({"inner": {"size": "big"}}, "inner.size"),
        ({"inner": {"size": True}}, "inner.size"),
    ],
)
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])
    assert parse_overrides(["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}


def test_front_view_convention():
    cam = Camera.orbit(0.0, 0.0, 2.5, 40.0, 64)
    # front camera sits on +Z looking at the origin; +X world is image right, +Y world is image up
    assert np.allclose(cam.position, [0, 0, 2.5])
    (u_right, v_right), (u_up, v_up), (u0, v0) = cam.project(np.array([[0.3, 0, 0], [0, 0.3, 0], [0, 0, 0]]))
    assert u_right > u0 and abs(v_right - v0) < 1e-9
    assert v_up < v0 and abs(u_up - u0) < 1e-9
    assert np.allclose([u0, v0], [32, 32])
    # azimuth 90 looks from +X: world -Z (the back) is image right
    side = Camera.orbit(90.0, 0.0, 2.5, 40.0, 64)
    assert np.allclose(side.position, [2.5, 0, 0], atol=1e-9)
    (u_back, _), (u_c, _) = side.project(np.array([[0, 0, -0.3], [0, 0, 0]]))
    assert u_back > u_c


def test_camera_matrices_are_rigid_and_convertible():
    c2w = look_at([1.0, 2.0, 3.0])
    assert np.allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(c2w[:3, :3]), 1.0)
    gl = opencv_to_opengl(c2w)
    # OpenGL cameras look down their -z axis: towards the origin here
    assert np.allclose(-gl[:3, 2], -np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0]))
    assert np.allclose(opencv_to_opengl(gl), c2w)


def test_random_orbit_views_need_and_use_the_seed():
    spec = OrbitSpec(random_views=6)
    with pytest.raises(ValueError):
        spec.cameras(32)
    a = spec.cameras(32, np.random.default_rng(1))
    b = spec.cameras(32, np.random.default_rng(1))
    assert len(a) == 6 and all(np.allclose(x.c2w, y.c2w) for x, y in zip(a, b))
    assert all(-10 <= c.elevation <= 45 for c in a)


def test_grid_tile_layout_and_inverse():
    views = np.stack([np.full((2, 3, 1), i) for i in range(4)])  # [V=4, H=2, W=3, C=1]
    grid = tile(views, GridLayout(2, 2))
    assert grid.shape == (4, 6, 1)
    assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == 1 and grid[2, 0, 0] == 2 and grid[3, 5, 0] == 3
    assert np.array_equal(untile(grid, GridLayout(2, 2)), views)
    t = torch.rand(2, 4, 3, 5, 7, requires_grad=True)
    g = tile(t, GridLayout(1, 4), channels_last=False)
    assert g.shape == (2, 3, 5, 28)
    assert torch.equal(g[:, :, :, 7:14], t[:, 1])
    assert torch.equal(untile(g, GridLayout(1, 4), channels_last=False), t)
    g.sum().backward()
    assert torch.equal(t.grad, torch.ones_like(t))


def test_grid_layout_choice():
    assert GridLayout.for_views(4) == GridLayout(2, 2)
    assert GridLayout.for_views(6) == GridLayout(2, 3)
    assert GridLayout.for_views(4, rows=1) == GridLayout(1, 4)
    with pytest.raises(ValueError):
        GridLayout.for_views(5, rows=2, cols=2)


def test_yaml_booleans_are_only_true_and_false(tmp_path):
    # transformers' eval_strategy "no" and similar strings must not turn into False (YAML 1.1)
    assert parse_overrides(["training.eval_strategy=no", "a=off", "b=true", "c=False"]) == {"training": {"eval_strategy": "no"}, "a": "off", "b": True, "c": False}
    # and 1e-3 is a number (YAML 1.1 needs "1.0e-3"); integers stay integers
    assert parse_overrides(["lr=1e-3", "n=12", "x=.5", "v=1.0.0"]) == {"lr": 1e-3, "n": 12, "x": 0.5, "v": "1.0.0"}
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("weights: {yes: 1.0}\nmode: y\n")
    assert load_config(Outer, cfg_file).weights == {"yes": 1.0}


def test_ring_spaces_the_views_evenly_from_the_front():
    ring = Camera.ring(3, 10.0, 2.0, 40.0, 32, 24)
    assert [c.azimuth for c in ring] == [0.0, 120.0, 240.0]
    for cam in ring:
        ref = Camera.orbit(cam.azimuth, 10.0, 2.0, 40.0, 32, 24)
        assert np.allclose(cam.c2w, ref.c2w) and (cam.width, cam.height) == (32, 24)


def test_camera_tensors_and_the_scorers_orbit():
    import torch

    from coherendream.cameras import camera_tensors, scorer_orbit
    from coherendream.critic.model import CriticConfig

    cams = Camera.ring(3, 20.0, 3.0, 45.0, 32)
    viewmats, Ks = camera_tensors(cams, dtype=torch.float64)
    assert viewmats.shape == (3, 4, 4) and Ks.shape == (3, 3, 3) and viewmats.dtype == torch.float64
    for k, cam in enumerate(cams):
        assert np.allclose(viewmats[k].numpy(), np.linalg.inv(cam.c2w)) and np.allclose(Ks[k].numpy(), cam.K)
    assert camera_tensors(cams)[0].dtype == torch.float32

    trained = scorer_orbit(type("S", (), {"config": CriticConfig(num_views=6, view_elevation=30.0, view_distance=4.0)})())
    assert trained.azimuths == [0.0, 60.0, 120.0, 180.0, 240.0, 300.0] and (trained.elevation, trained.distance) == (30.0, 4.0)
    bare = scorer_orbit(type("S", (), {"config": type("C", (), {"num_views": 2})()})())  # a scorer without an orbit
    assert bare.azimuths == [0.0, 180.0] and bare.elevation == OrbitSpec().elevation
    assert scorer_orbit(object()) == OrbitSpec()


@pytest.mark.parametrize("value", ["a red cube: on a blue sphere # 2", "一个红色的立方体 🎲", "line\nbreak", 'quote " and \\ back', "", " spaced ", "\x85\x80 c\x01"])
def test_an_override_string_reads_back_exactly(value):
    from coherendream.config import override, parse_overrides

    assert parse_overrides([override("prompt", value)]) == {"prompt": value}
