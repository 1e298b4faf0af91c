"""Tiling V views into one grid image, the critic's default multiview input.

The layout is row-major: view 0 top-left, view 1 to its right, and so on, so the front view
(azimuth 0) is the top-left tile of the default 2x2 grid. The same function serves numpy arrays
(dataset building) and torch tensors (the differentiable critic path), because it is only a
reshape and an axis permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GridLayout:
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"grid layout needs rows, cols >= 1, got {self.rows}x{self.cols}")

    @classmethod
    def for_views(cls, num_views: int, rows: int | None = None, cols: int | None = None) -> GridLayout:
        """The given layout, or the most square one with ``cols >= rows`` that holds every view."""
        if rows and cols:
            layout = cls(rows, cols)
        elif rows:
            layout = cls(rows, math.ceil(num_views / rows))
        elif cols:
            layout = cls(math.ceil(num_views / cols), cols)
        else:
            r = int(math.floor(math.sqrt(num_views)))
            layout = cls(r, math.ceil(num_views / r))
        if layout.rows * layout.cols != num_views:
            raise ValueError(f"a {layout.rows}x{layout.cols} grid does not hold exactly {num_views} views")
        return layout


def tile(views: Any, layout: GridLayout, channels_last: bool = True) -> Any:
    """Tile views into a grid.

    Args:
        views: ``[..., V, H, W, C]`` if ``channels_last`` else ``[..., V, C, H, W]``; numpy array or
            torch tensor, any dtype.
        layout: ``rows * cols == V``.

    Returns:
        ``[..., rows*H, cols*W, C]`` (or ``[..., C, rows*H, cols*W]``), same type and dtype.
    """
    shape = tuple(views.shape)
    lead, (v, a, b, c) = shape[:-4], shape[-4:]
    if v != layout.rows * layout.cols:
        raise ValueError(f"got {v} views for a {layout.rows}x{layout.cols} grid")
    n = len(lead)
    x = views.reshape(*lead, layout.rows, layout.cols, a, b, c)
    if channels_last:  # a=H, b=W, c=C -> [..., rows, H, cols, W, C]
        order = (*range(n), n, n + 2, n + 1, n + 3, n + 4)
        out_shape = (*lead, layout.rows * a, layout.cols * b, c)
    else:  # a=C, b=H, c=W -> [..., C, rows, H, cols, W]
        order = (*range(n), n + 2, n, n + 3, n + 1, n + 4)
        out_shape = (*lead, a, layout.rows * b, layout.cols * c)
    x = x.permute(*order) if hasattr(x, "permute") else x.transpose(order)
    return x.reshape(*out_shape)


def untile(grid: Any, layout: GridLayout, channels_last: bool = True) -> Any:
    """Inverse of :func:`tile`: ``[..., rows*H, cols*W, C] -> [..., V, H, W, C]``."""
    shape = tuple(grid.shape)
    lead, (a, b, c) = shape[:-3], shape[-3:]
    n = len(lead)
    if channels_last:
        h, w = a // layout.rows, b // layout.cols
        x = grid.reshape(*lead, layout.rows, h, layout.cols, w, c)
        order = (*range(n), n, n + 2, n + 1, n + 3, n + 4)
        out_shape = (*lead, layout.rows * layout.cols, h, w, c)
    else:
        h, w = b // layout.rows, c // layout.cols
        x = grid.reshape(*lead, a, layout.rows, h, layout.cols, w)
        order = (*range(n), n + 1, n + 3, n, n + 2, n + 4)
        out_shape = (*lead, layout.rows * layout.cols, a, h, w)
    x = x.permute(*order) if hasattr(x, "permute") else x.transpose(order)
    return x.reshape(*out_shape)
