"""Renders checked by their content: colours, positions, depth, normals, textures."""

import numpy as np
import pytest

from coherendream.cameras import Camera, OrbitSpec
from coherendream.data.assets import load_mesh
from coherendream.data.procedural import _place, Scene
from coherendream.vocabulary import PALETTE, Group, SceneCaption
from coherendream.data.render import MeshRenderer

ASSIMP = "/usr/share/assimp/models"


@pytest.fixture(scope="module")
def renderer():
    r = MeshRenderer(96)
    yield r
    r.release()


def scene_of(caption: SceneCaption, seed: int = 0) -> Scene:
    return Scene(caption, _place(caption, np.random.default_rng(seed), (0.8, 0.8)), seed)


def hue_mask(img: np.ndarray, color: str) -> np.ndarray:
    """Pixels whose chromaticity is close to the palette colour's (shading scales brightness only)."""
    rgb = img[..., :3].astype(np.float32) / 255.0
    target = np.asarray(PALETTE[color])
    norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)  # noqa: E731
    return (np.sum(norm(rgb) * norm(target), axis=-1) > 0.985) & (img[..., 3] == 255) & (rgb.max(-1) > 0.15)


def test_red_cube_is_red_on_white(renderer):
    scene = scene_of(SceneCaption((Group("cube", "red"),)))
    out = renderer.render(scene.to_asset("c"), OrbitSpec().cameras(96))
    for view in out.rgba:
        covered = view[..., 3] == 255
        assert covered.mean() > 0.15
        rgb = view[..., :3].astype(int)
        assert np.all(rgb[covered][:, 0] > rgb[covered][:, 1] + 60)  # every object pixel is red
        assert np.all(view[~(view[..., 3] > 0)][:, :3] == 255)  # background white


def test_left_object_is_on_the_left_in_front_view(renderer):
    caption = SceneCaption((Group("sphere", "red"), Group("cube", "blue")), "left_of")
    scene = scene_of(caption)
    front, back = renderer.render(scene.to_asset("lr"), [Camera.orbit(a, 15, 2.5, 40, 96) for a in (0, 180)]).rgba
    red_x = np.nonzero(hue_mask(front, "red"))[1].mean()
    blue_x = np.nonzero(hue_mask(front, "blue"))[1].mean()
    assert red_x < blue_x
    # seen from behind, left and right swap
    assert np.nonzero(hue_mask(back, "red"))[1].mean() > np.nonzero(hue_mask(back, "blue"))[1].mean()


def test_on_top_of_is_higher_in_the_image(renderer):
    scene = scene_of(SceneCaption((Group("cube", "green"), Group("cylinder", "yellow")), "on_top_of"))
    (front,) = renderer.render(scene.to_asset("st"), [Camera.orbit(0, 15, 2.5, 40, 96)]).rgba
    assert np.nonzero(hue_mask(front, "green"))[0].mean() < np.nonzero(hue_mask(front, "yellow"))[0].mean()


def test_depth_and_normals(renderer):
    scene = scene_of(SceneCaption((Group("cube", "purple"),)))
    cam = Camera.orbit(0, 0, 2.5, 40, 96)
    out = renderer.render(scene.to_asset("d"), [cam], depth=True, normals=True)
    depth, normals, alpha = out.depth[0], out.normals[0], out.rgba[0, ..., 3]
    inside = alpha == 255
    # the unit cube's front face is at z = 0.5: 2.0 from a camera at distance 2.5, looking straight at it
    assert np.isclose(np.median(depth[inside]), 2.0, atol=0.02)
    assert np.all(np.isinf(depth[alpha == 0]))
    assert np.allclose(np.median(normals[inside], axis=0), [0, 0, 1], atol=0.05)


def test_gltf_texture_is_sampled(renderer):
    asset = load_mesh(f"{ASSIMP}/glTF2/BoxTextured-glTF/BoxTextured.gltf")
    assert asset.parts[0].texture is not None
    (front,) = renderer.render(asset, [Camera.orbit(0, 0, 2.5, 40, 96)]).rgba
    face = front[30:66, 30:66, :3].reshape(-1, 3).astype(int)
    # the Cesium logo has blue sky and green ground: a flat-shaded untextured face would have one colour
    blueish = np.mean((face[:, 2] > face[:, 0] + 30))
    greenish = np.mean((face[:, 1] > face[:, 2] + 20) & (face[:, 1] > face[:, 0]))
    assert blueish > 0.1 and greenish > 0.1


def test_vertex_colours_are_used(renderer):
    asset = load_mesh(f"{ASSIMP}/PLY/float-color.ply")
    assert asset.parts[0].colors is not None
    (view,) = renderer.render(asset, [Camera.orbit(0, 15, 2.5, 40, 96)]).rgba
    covered = view[..., 3] == 255
    expected = np.asarray(asset.parts[0].colors[:, :3]).mean(0)
    got = view[covered][:, :3].mean(0) / 255.0
    # same dominant channel as the file's vertex colours
    assert np.argmax(got) == np.argmax(expected)
