"""Camera conventions shared by the mesh renderer (``coherendream.data``) and the Gaussian
rasteriser (``coherendream.generation``).

World frame
    Right-handed, +Y up, +Z towards the viewer of the asset's front (glTF's convention). Assets are
    normalised into the unit cube ``[-0.5, 0.5]^3`` centred on the origin.

Orbit angles
    ``azimuth`` (degrees) turns about +Y, starting on +Z and moving towards +X; ``elevation``
    (degrees) is the angle above the XZ plane. Azimuth 0 is the *front view*: world +X is image
    right, world +Y is image up. So "A to the left of B" means ``A.x < B.x``.

Camera matrices
    ``c2w`` is a 4x4 camera-to-world matrix in the **OpenCV** convention (camera x right, y down,
    z forward along the viewing direction), the convention of gsplat and COLMAP. ``viewmat`` is its
    inverse (world-to-camera), what ``gsplat.rasterization`` takes. OpenGL-style matrices (camera
    x right, y up, z backwards) are derived with ``opencv_to_opengl``.

Intrinsics
    Pinhole ``K = [[f, 0, W/2], [0, f, H/2], [0, 0, 1]]`` with ``f = (H/2) / tan(fov_y/2)``: pixel
    ``(u, v)`` covers ``[u, u+1) x [v, v+1)`` in image coordinates, ``v`` growing downwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Flips camera y and z: OpenCV (y down, z forward) <-> OpenGL (y up, z backward). Its own inverse.
_CV_GL_FLIP = np.diag([1.0, -1.0, -1.0, 1.0])


def look_at(eye: np.ndarray, target: np.ndarray = (0.0, 0.0, 0.0), up: np.ndarray = (0.0, 1.0, 0.0)) -> np.ndarray:
    """OpenCV camera-to-world matrix ``[4, 4]`` for a camera at ``eye`` looking at ``target``."""
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-8:  # looking straight up or down: any right vector will do
        right = np.cross(forward, np.array([0.0, 0.0, -1.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def orbit_position(azimuth: float, elevation: float, distance: float) -> np.ndarray:
    az, el = math.radians(azimuth), math.radians(elevation)
    return distance * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])


def ring_azimuths(num_views: int) -> list[float]:
    """``num_views`` azimuths (degrees) ``360 / num_views`` apart, the first at 0 (the front): the
    views a critic is trained and scored on, and the ones the generator scores and saves."""
    return [360.0 * i / num_views for i in range(num_views)]


def intrinsics(fov_y: float, width: int, height: int) -> np.ndarray:
    """Pinhole ``K [3, 3]`` for a vertical field of view ``fov_y`` in degrees."""
    f = 0.5 * height / math.tan(math.radians(fov_y) / 2.0)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def opencv_to_opengl(c2w: np.ndarray) -> np.ndarray:
    """Convert a camera-to-world matrix between the OpenCV and OpenGL camera conventions."""
    return np.asarray(c2w) @ _CV_GL_FLIP


def opengl_projection(fov_y: float, aspect: float, near: float, far: float) -> np.ndarray:
    """OpenGL clip-space projection ``[4, 4]`` (camera looks down -z) for the same pinhole."""
    t = 1.0 / math.tan(math.radians(fov_y) / 2.0)
    return np.array(
        [
            [t / aspect, 0.0, 0.0, 0.0],
            [0.0, t, 0.0, 0.0],
            [0.0, 0.0, (far + near) / (near - far), 2.0 * far * near / (near - far)],
            [0.0, 0.0, -1.0, 0.0],
        ]
    )


@dataclass
class Camera:
    """One pinhole view: OpenCV ``c2w [4, 4]``, vertical FoV in degrees and image size in pixels.

    ``azimuth``/``elevation``/``distance`` are kept for orbit cameras (NaN otherwise) so that
    dataset rows can say which view is which.
    """

    c2w: np.ndarray
    fov_y: float
    width: int
    height: int
    azimuth: float = float("nan")
    elevation: float = float("nan")
    distance: float = float("nan")

    @classmethod
    def orbit(cls, azimuth: float, elevation: float, distance: float, fov_y: float, width: int, height: int | None = None) -> Camera:
        c2w = look_at(orbit_position(azimuth, elevation, distance))
        return cls(c2w, fov_y, width, height or width, azimuth, elevation, distance)

    @classmethod
    def ring(cls, num_views: int, elevation: float, distance: float, fov_y: float, width: int, height: int | None = None) -> list[Camera]:
        """``num_views`` orbit cameras at :func:`ring_azimuths`."""
        return [cls.orbit(a, elevation, distance, fov_y, width, height) for a in ring_azimuths(num_views)]

    @property
    def viewmat(self) -> np.ndarray:
        """World-to-camera ``[4, 4]`` (OpenCV), gsplat's ``viewmats``."""
        return np.linalg.inv(self.c2w)

    @property
    def K(self) -> np.ndarray:
        return intrinsics(self.fov_y, self.width, self.height)

    @property
    def position(self) -> np.ndarray:
        return self.c2w[:3, 3].copy()

    def project(self, points: np.ndarray) -> np.ndarray:
        """Pixel coordinates ``[N, 2]`` (u right, v down) of world points ``[N, 3]``."""
        cam = (self.viewmat[:3, :3] @ np.asarray(points, dtype=np.float64).T).T + self.viewmat[:3, 3]
        uvw = (self.K @ cam.T).T
        return uvw[:, :2] / uvw[:, 2:3]

    def to_meta(self) -> dict:
        """Row metadata for datasets: angles, distance, FoV and the flattened OpenCV c2w."""
        return {
            "azimuth": float(self.azimuth),
            "elevation": float(self.elevation),
            "distance": float(self.distance),
            "fov_y": float(self.fov_y),
            "c2w": [float(x) for x in np.asarray(self.c2w).reshape(-1)],
        }


@dataclass
class OrbitSpec:
    """Where the V views of an asset are taken from (the design's default: 4 views at 0/90/180/270)."""

    azimuths: list[float] = field(default_factory=lambda: [0.0, 90.0, 180.0, 270.0])
    elevation: float = 15.0
    distance: float = 2.5
    fov_y: float = 40.0
    # With random_views > 0 the fixed azimuths are replaced by that many random views, azimuth
    # uniform in [0, 360) and elevation uniform in elevation_range, drawn from the asset's seed.
    random_views: int = 0
    elevation_range: tuple[float, float] = (-10.0, 45.0)

    @property
    def num_views(self) -> int:
        return self.random_views or len(self.azimuths)

    def cameras(self, resolution: int, rng: np.random.Generator | None = None) -> list[Camera]:
        if self.random_views:
            if rng is None:
                raise ValueError("random views need a random generator (the asset's seed)")
            az = rng.uniform(0.0, 360.0, size=self.random_views)
            el = rng.uniform(*self.elevation_range, size=self.random_views)
            return [Camera.orbit(float(a), float(e), self.distance, self.fov_y, resolution) for a, e in zip(az, el)]
        return [Camera.orbit(a, self.elevation, self.distance, self.fov_y, resolution) for a in self.azimuths]


def camera_tensors(cameras: list[Camera], device=None, dtype=None):
    """``(viewmats [N, 4, 4], Ks [N, 3, 3])`` torch tensors of ``cameras``: the world-to-camera
    matrices and intrinsics that ``gsplat.rasterization`` (and the PyTorch rasteriser) take.
    ``dtype`` defaults to float32. torch is imported here, not at module level, so that the mesh
    renderer's users do not load it."""
    import torch

    dtype = dtype or torch.float32
    viewmats = torch.tensor(np.stack([c.viewmat for c in cameras]), dtype=dtype, device=device)
    Ks = torch.tensor(np.stack([c.K for c in cameras]), dtype=dtype, device=device)
    return viewmats, Ks


def scorer_orbit(scorer: object) -> OrbitSpec:
    """The cameras a critic-like ``scorer`` judges views from: its ``config.orbit()`` (the orbit it
    was trained on, see ``CriticConfig``), else the design's orbit with ``config.num_views``
    azimuths evenly spaced from the front (4 without a config)."""
    config = getattr(scorer, "config", None)
    if callable(getattr(config, "orbit", None)):
        return config.orbit()
    num_views = getattr(config, "num_views", None)
    return OrbitSpec(azimuths=ring_azimuths(int(num_views))) if num_views else OrbitSpec()
