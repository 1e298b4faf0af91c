"""Headless multiview rendering of meshes with moderngl over EGL.

On a machine without a GPU, EGL runs on Mesa's llvmpipe (software); on a GPU machine the same code
uses the vendor driver. Install ``libegl1 libegl-mesa0 libgl1-mesa-dri`` (Debian) for the former.

Shading is deliberately simple, the same for every asset so that a critic learns content and not
lighting: albedo (vertex colour x base colour x base-colour texture) times an ambient term plus a
headlight and a light from above, lit on both sides of each face. Colour is anti-aliased with 4x
MSAA; depth and normal maps come from a second, single-sample pass when asked for.

Output convention (``RenderOutput.rgba``): uint8 ``[V, H, W, 4]``; the RGB channels are already
composited over the background colour and alpha is the coverage, so ``Image.convert("RGB")`` gives
the picture a model should see and alpha remains available as a mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from coherendream.cameras import Camera, opencv_to_opengl, opengl_projection
from coherendream.data.assets import MeshAsset

_VERTEX_SHADER = """
#version 330
uniform mat4 mvp;
uniform mat4 view;
in vec3 in_pos;
in vec3 in_normal;
in vec4 in_color;
in vec2 in_uv;
out vec3 v_normal;
out vec4 v_color;
out vec2 v_uv;
out float v_depth;
void main() {
    gl_Position = mvp * vec4(in_pos, 1.0);
    v_normal = in_normal;
    v_color = in_color;
    v_uv = in_uv;
    v_depth = -(view * vec4(in_pos, 1.0)).z;  // OpenGL camera looks down -z
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform vec4 base_color;
uniform bool use_texture;
uniform sampler2D tex;
uniform vec3 view_dir;   // world-space direction from the object towards the camera
in vec3 v_normal;
in vec4 v_color;
in vec2 v_uv;
in float v_depth;
layout(location = 0) out vec4 f_color;
layout(location = 1) out vec4 f_normal;
layout(location = 2) out float f_depth;
void main() {
    vec4 albedo = v_color * base_color;
    if (use_texture) albedo *= texture(tex, v_uv);
    vec3 n = length(v_normal) > 0.0 ? normalize(v_normal) : view_dir;
    if (!gl_FrontFacing) n = -n;
    if (dot(n, view_dir) < 0.0) n = -n;  // two-sided: many real meshes have inconsistent winding
    float shade = 0.45 + 0.45 * max(dot(n, view_dir), 0.0) + 0.2 * max(n.y, 0.0);
    f_color = vec4(clamp(albedo.rgb * shade, 0.0, 1.0), 1.0);
    f_normal = vec4(n, 1.0);
    f_depth = v_depth;
}
"""


@dataclass
class RenderOutput:
    """Views of one asset.

    Attributes:
        rgba: uint8 ``[V, H, W, 4]``, RGB composited over the background, alpha = coverage.
        depth: float32 ``[V, H, W]`` distance along the camera's viewing axis; ``inf`` on background.
        normals: float32 ``[V, H, W, 3]`` world-space unit normals; 0 on background.
    """

    rgba: np.ndarray
    depth: np.ndarray | None = None
    normals: np.ndarray | None = None


class MeshRenderer:
    """Renders :class:`MeshAsset` objects from :class:`Camera` views.

    One OpenGL context per renderer (and so per process: worker processes make their own).
    """

    def __init__(self, resolution: int = 256, background: tuple[float, float, float] = (1.0, 1.0, 1.0), samples: int = 4, near: float = 0.05, far: float = 20.0):
        import moderngl

        self.resolution = int(resolution)
        self.background = np.asarray(background, dtype=np.float32)
        self.near, self.far = near, far
        try:
            self.ctx = moderngl.create_context(standalone=True, backend="egl")
        except Exception as err:  # noqa: BLE001
            raise RuntimeError(
                "could not create a headless OpenGL context through EGL; on Debian/Ubuntu install "
                "`libegl1 libegl-mesa0 libgl1-mesa-dri` (make system-deps) "
                f"({type(err).__name__}: {err})"
            ) from err
        self.program = self.ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        # All views of a call are drawn side by side into one strip: one MSAA resolve and one read
        # per asset instead of one per view (each costs a pipeline flush on llvmpipe).
        self.max_views = max(1, min(8, int(self.ctx.info["GL_MAX_RENDERBUFFER_SIZE"]) // self.resolution))
        size = (self.resolution * self.max_views, self.resolution)
        samples = min(samples, int(self.ctx.max_samples))
        self._msaa = self.ctx.framebuffer(
            color_attachments=[self.ctx.renderbuffer(size, 4, samples=samples)],
            depth_attachment=self.ctx.depth_renderbuffer(size, samples=samples),
        )
        self._resolved = self.ctx.framebuffer(color_attachments=[self.ctx.renderbuffer(size, 4)])
        self._aux = self.ctx.framebuffer(
            color_attachments=[
                self.ctx.renderbuffer(size, 4),
                self.ctx.renderbuffer(size, 4, dtype="f4"),
                self.ctx.renderbuffer(size, 1, dtype="f4"),
            ],
            depth_attachment=self.ctx.depth_renderbuffer(size),
        )
        self._white = self.ctx.texture((1, 1), 4, bytes([255, 255, 255, 255]))

    def render(self, asset: MeshAsset, cameras: list[Camera], depth: bool = False, normals: bool = False) -> RenderOutput:
        res = self.resolution
        for cam in cameras:
            if (cam.width, cam.height) != (res, res):
                raise ValueError(f"camera is {cam.width}x{cam.height} but the renderer is {res}x{res}")
        draws = [self._upload(part) for part in asset.parts]
        rgba = np.empty((len(cameras), res, res, 4), dtype=np.uint8)
        depth_maps = np.empty((len(cameras), res, res), dtype=np.float32) if depth else None
        normal_maps = np.empty((len(cameras), res, res, 3), dtype=np.float32) if normals else None
        # Cleared to the background colour with alpha 0, the MSAA resolve averages covered samples
        # with the background: RGB comes out composited over the background and alpha = coverage.
        background = (*(float(x) for x in self.background), 0.0)
        try:
            self.ctx.enable(self.ctx.DEPTH_TEST)
            for start in range(0, len(cameras), self.max_views):
                group = cameras[start : start + self.max_views]
                n = len(group)
                self._draw_strip(self._msaa, draws, group, background)
                self.ctx.copy_framebuffer(self._resolved, self._msaa)
                rgba[start : start + n] = self._read_strip(self._resolved, 0, 4, "f1", n)
                if depth or normals:
                    self._draw_strip(self._aux, draws, group, (0.0, 0.0, 0.0, 0.0))
                    if normals:
                        normal_maps[start : start + n] = self._read_strip(self._aux, 1, 4, "f4", n)[..., :3]
                    if depth:
                        d = self._read_strip(self._aux, 2, 1, "f4", n)[..., 0]
                        cover = self._read_strip(self._aux, 0, 4, "f1", n)[..., 3] > 0
                        depth_maps[start : start + n] = np.where(cover, d, np.inf)
        finally:
            for vao, buffers, texture, _ in draws:
                vao.release()
                for b in buffers:
                    b.release()
                if texture is not None:
                    texture.release()
        return RenderOutput(rgba, depth_maps, normal_maps)

    def _set_camera(self, cam: Camera) -> None:
        view = np.linalg.inv(opencv_to_opengl(cam.c2w))
        proj = opengl_projection(cam.fov_y, cam.width / cam.height, self.near, self.far)
        # moderngl takes column-major bytes: pass the transpose of the row-major numpy matrix
        self.program["mvp"].write((proj @ view).T.astype("f4").tobytes())
        self.program["view"].write(view.T.astype("f4").tobytes())
        self.program["view_dir"].value = tuple(float(x) for x in -cam.c2w[:3, 2])

    def _upload(self, part):
        # Triangle soup (no index buffer): per-face data such as colours needs no special casing.
        idx = part.faces.reshape(-1)
        n = len(idx)
        colors = part.colors[idx] if part.colors is not None else np.ones((n, 4), np.float32)
        uv = part.uv[idx] if part.uv is not None else np.zeros((n, 2), np.float32)
        data = np.concatenate([part.vertices[idx], part.normals[idx], colors, uv], axis=1).astype("f4")
        vbo = self.ctx.buffer(data.tobytes())
        vao = self.ctx.vertex_array(self.program, [(vbo, "3f 3f 4f 2f", "in_pos", "in_normal", "in_color", "in_uv")])
        texture = None
        if part.texture is not None:
            img = np.ascontiguousarray(part.texture[::-1])  # image rows top-down, GL textures bottom-up
            texture = self.ctx.texture((img.shape[1], img.shape[0]), 4, img.tobytes())
            texture.build_mipmaps()
            texture.repeat_x = texture.repeat_y = True
        return vao, [vbo], texture, part.base_color

    def _draw_strip(self, fbo, draws, cameras: list[Camera], clear: tuple[float, float, float, float]) -> None:
        """Draw view j of ``cameras`` into the j-th ``res x res`` cell of the strip."""
        res = self.resolution
        fbo.use()
        fbo.scissor = None
        fbo.viewport = (0, 0, res * len(cameras), res)
        fbo.clear(*clear, depth=1.0, viewport=fbo.viewport)
        for j, cam in enumerate(cameras):
            cell = (j * res, 0, res, res)
            fbo.viewport = cell
            fbo.scissor = cell  # nothing of view j may spill into its neighbours
            self._set_camera(cam)
            for vao, _, texture, base_color in draws:
                (texture or self._white).use(0)
                self.program["tex"].value = 0
                self.program["use_texture"].value = texture is not None
                self.program["base_color"].value = tuple(float(x) for x in base_color)
                vao.render()
        fbo.scissor = None

    def _read_strip(self, fbo, attachment: int, components: int, dtype: str, n: int) -> np.ndarray:
        """``[n, res, res, components]`` views, rows top-down, from the strip's first ``n`` cells."""
        res = self.resolution
        raw = fbo.read(viewport=(0, 0, res * n, res), components=components, attachment=attachment, dtype=dtype)
        arr = np.frombuffer(raw, dtype=np.uint8 if dtype == "f1" else np.float32).reshape(res, n, res, components)
        return arr[::-1].transpose(1, 0, 2, 3)  # GL rows are bottom-up; images are top-down

    def release(self) -> None:
        self.ctx.release()


def configure_llvmpipe_threads(threads: int | None) -> None:
    """Cap Mesa llvmpipe's rasteriser threads (set before the first context in a process).

    Small views rasterise faster on one thread than with per-view thread hand-offs, and parallel
    build workers already use every core.
    """
    if threads is not None:
        os.environ.setdefault("LP_NUM_THREADS", str(threads))
