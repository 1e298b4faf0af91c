"""The critic term for a training loop of your own (a threestudio system, your 3DGS or NeRF loop).

:class:`CriticGuidance` follows threestudio's guidance call: renders and the prompt (with the
cameras' elevation, azimuth and distance) in, a dict of losses and diagnostics out. Add
``lambda * out["loss_critic"]`` to your loss, or let it match ``lambda`` to your SDS gradient's
norm as ``generate`` does (``sds_grad_norm``). Example (docs/generation.md)::

    guidance = CriticGuidance.from_pretrained()          # the embedded critic; or a folder / hub id
    out = guidance(rgb, "a red cube to the left of a blue sphere", elevation, azimuth, distances)
    (loss_sds + out["lambda"] * out["loss_critic"]).backward()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coherendream.generation.tcsd import CriticTermConfig, critic_loss, match_gradient_norm

__all__ = ["CriticGuidance"]


class CriticGuidance:
    """A multiview critic's ``-log P(yes)`` on one asset's renders, differentiable in the renders.

    Args:
        critic: A :class:`~coherendream.critic.Critic` (anything with ``score(views, prompts)`` and
            ``config.num_views``).
        config: Lambda and schedule settings (:class:`CriticTermConfig`: ``grad_ratio``,
            ``weight``, ``max_lambda``, ``start_step``, ``every_k``, ``saturate_prob``), the same
            keys as ``generate``'s ``tcsd.critic``.
    """

    def __init__(self, critic: Any, config: CriticTermConfig | None = None) -> None:
        self.critic = critic
        self.config = config if config is not None else CriticTermConfig()

    @classmethod
    def from_pretrained(cls, critic: str | Path | None = None, config: CriticTermConfig | None = None, **load: Any) -> CriticGuidance:
        """Load the critic (``None``: the embedded one) with ``Critic.from_pretrained(critic, **load)``."""
        from coherendream.critic.model import Critic, default_critic_path

        return cls(Critic.from_pretrained(critic if critic is not None else default_critic_path(), **load), config)

    @property
    def num_views(self) -> int:
        return int(self.critic.config.num_views)

    def __call__(self, rgb: Tensor, prompt: str, elevation: Tensor | None = None, azimuth: Tensor | None = None,
                 camera_distances: Tensor | None = None, *, step: int | None = None, sds_grad_norm: float | Tensor | None = None) -> dict[str, Any]:  # fmt: skip
        """Score the renders of one asset against ``prompt``.

        Args:
            rgb: ``[V, H, W, 3]`` (threestudio's layout) or ``[V, 3, H, W]`` renders in [0, 1],
                differentiable; ``V`` must be the critic's number of views, in the order of its
                training orbit (front first: ``coherendream.cameras.scorer_orbit(critic)``).
            prompt: The caption the critic checks.
            elevation, azimuth, camera_distances: ``[V]`` degrees / world units of the cameras.
                The critic judges the views as given; these only check the count and that the
                first view faces the front (azimuth within 45 degrees of 0), where a critic
                trained front-first tells left from right.
            step: Your optimisation step, for ``start_step``/``every_k`` (None: always on).
            sds_grad_norm: ``||dL_SDS/d rgb||`` of the same renders: ``lambda`` then makes the
                critic's gradient ``grad_ratio`` times that norm (None: ``lambda`` = ``weight``).

        Returns:
            ``{"loss_critic"}`` (scalar, differentiable; 0 when the term is off or saturated),
            ``"lambda"`` (float), ``"prob_yes"``, ``"margin"`` (floats), ``"grad_norm"`` (of the
            unweighted critic gradient w.r.t. ``rgb``) and ``"active"``.
        """
        c = self.config
        views = rgb.permute(0, 3, 1, 2) if rgb.shape[-1] == 3 and rgb.shape[1] != 3 else rgb  # [V, 3, H, W]
        if views.dim() != 4 or views.shape[0] != self.num_views:
            raise ValueError(f"rgb: {self.num_views} views of one asset expected ([V, H, W, 3] or [V, 3, H, W]), got {tuple(rgb.shape)}")
        for name, value in (("elevation", elevation), ("azimuth", azimuth), ("camera_distances", camera_distances)):
            if value is not None and torch.as_tensor(value).numel() != self.num_views:
                raise ValueError(f"{name}: one value per view ({self.num_views}) expected, got {torch.as_tensor(value).numel()}")
        if azimuth is not None and abs((float(torch.as_tensor(azimuth).reshape(-1)[0]) + 180.0) % 360.0 - 180.0) > 45.0:
            raise ValueError("azimuth: the first view must face the front (within 45 degrees of 0): the critic was trained front-first")
        active = step is None or (step >= c.start_step and (step - c.start_step) % c.every_k == 0)
        if not active:
            return {"loss_critic": rgb.sum() * 0.0, "lambda": 0.0, "prob_yes": None, "margin": None, "grad_norm": None, "active": False}
        if not views.requires_grad:  # renders with no graph (a check, a log): the diagnostics all the same
            views = views.detach().requires_grad_(True)
        loss, out = critic_loss(self.critic, views[None], [prompt])
        (grad,) = torch.autograd.grad(loss, views, retain_graph=True)
        prob = float(torch.sigmoid(out.margin.detach().float()).reshape(-1)[0])
        if c.saturate_prob is not None and prob >= c.saturate_prob:
            lam = 0.0
        elif sds_grad_norm is None:
            lam = float(c.weight)
        else:
            norm = torch.as_tensor(float(sds_grad_norm))
            lam = float(match_gradient_norm(norm.reshape(1), grad.norm().detach().reshape(1).cpu(), c.grad_ratio, c.eps, c.max_lambda))
        return {"loss_critic": loss, "lambda": lam, "prob_yes": prob, "margin": float(out.margin.detach().float().reshape(-1)[0]),
                "grad_norm": float(grad.norm()), "active": True}  # fmt: skip
