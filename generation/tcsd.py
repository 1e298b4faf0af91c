"""TCSD: score distillation with a text-alignment critic, as small functions over explicit tensors.

The objective of one optimisation step, over the ``V`` views ``I`` rendered at the step's cameras
(``I``: ``[V, 3, H, W]`` in [0, 1], one object seen from V azimuths), is

    L(I) = L_SDS(I) + lambda * L_critic(I),        L_critic(I) = -log sigmoid(margin(I, prompt))

where ``margin = logit(Yes) - logit(No)`` of a critic shown the V views as one sample
(``critic.score(I[None], [prompt]).margin``). Any object with a ``score(views [B, V, 3, H, W],
prompts) -> .margin [B]`` method is a critic here (``coherendream.critic.model.Critic`` is one);
nothing else of it is used.

Gradient-norm matching (why and how)
    The SDS gradient's size depends on the prior, the CFG scale and t; the critic's on the critic
    and how sure it already is. A fixed lambda lets one of them dominate by accident, so lambda is
    chosen each time the critic term is applied so that, on the rendered images,

        || lambda * dL_critic/dI ||_2  =  grad_ratio * || dL_SDS/dI ||_2
        =>  lambda = grad_ratio * ||g_sds|| / (||g_critic|| + eps)            (detached)

    (clamped to ``max_lambda``). Both gradients are taken with ``torch.autograd.grad`` with respect
    to a *detached copy* of the renders, combined as ``g = g_sds + lambda * g_critic`` and pushed
    into the Gaussians with one vector-Jacobian product, ``rgb.backward(g)``. This is exactly the
    gradient of ``L_SDS + lambda * L_critic`` with lambda held constant (chain rule: dL/dtheta =
    (dI/dtheta)^T (g_sds + lambda g_critic)), but the rasteriser's backward runs once, not twice.
    Without a prior (``prior: none``) there is no SDS gradient to match: lambda is the fixed
    ``weight``.

Schedule
    The term is on at steps ``s >= start_step`` with ``(s - start_step) % every_k == 0`` (a
    warm-up lets SDS lay down a shape first; every k-th step saves critic passes).

x0 straight-through (optional)
    The critic sees ``img = rgb - (rgb - x0_rgb).detach()``: its *value* is the prior's one-step
    clean prediction ``x0_rgb`` (decoded from the SDS step's ``pred_x0``, resized to the renders'
    size), which looks more like a finished object than an early render does; its *gradient*
    w.r.t. ``rgb`` is the identity, so the critic's gradient on x0 is applied to the renders
    (DreamReward's estimator).

Reward-weighted SDS (the ablation mode)
    K noise draws ``eps_k`` at one shared ``t`` on the same latents give K SDS gradients ``g_k``
    and K clean predictions ``x0_k``. The critic scores each decoded ``x0_k`` (no gradient), and

        w = softmax(score / temperature)   (sums to 1),       g = sum_k w_k g_k

    is applied with the detached-target loss ``sds_loss(latents, g)``. Noise draws whose denoised
    image the critic finds better aligned pull harder; ``temperature -> inf`` gives plain SDS
    averaged over K draws, ``-> 0`` keeps only the best draw.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from coherendream.generation.guidance import sds_loss

__all__ = [
    "CriticLike",
    "CriticTermConfig",
    "RewardWeightedConfig",
    "TCSDConfig",
    "CriticTerm",
    "ObjectCriticTerm",
    "ObjectGroup",
    "object_groups",
    "StepGradients",
    "critic_loss",
    "match_gradient_norm",
    "straight_through",
    "augment_views",
    "decode_x0_views",
    "reward_weights",
    "reward_weighted_sds",
    "tcsd_step",
]


class CriticLike(Protocol):
    """What TCSD needs of a critic: a differentiable score of ``[B, V, 3, H, W]`` views in [0, 1]."""

    def score(self, views: Tensor, prompts: Sequence[str]) -> Any: ...  # returns an object with .margin [B]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass
class CriticTermConfig:
    """The critic term ``lambda * L_critic`` of TCSD.

    Attributes:
        grad_ratio: With a prior, lambda makes ``||lambda g_critic|| = grad_ratio * ||g_sds||`` on
            the rendered images (0.5: the critic steers, SDS still shapes).
        weight: lambda when there is no SDS gradient to match (``prior: none``).
        max_lambda: Upper bound on the matched lambda (a critic gradient near zero would otherwise
            be blown up to SDS's size); ``None`` = no bound.
        start_step: First optimisation step at which the term is applied (warm-up before it).
        every_k: Apply the term every k-th step from ``start_step`` on.
        x0_straight_through: The critic sees the prior's x0 prediction through the straight-through
            estimator (needs a prior).
        views: Cameras of the steps the term is on. ``"orbit"``: the critic's own training orbit
            (``critic.config.orbit()``: first view at the front, its elevation, distance and FoV),
            turned by a shared ``U[-azimuth_jitter, azimuth_jitter]`` and raised by
            ``U[-elevation_jitter, elevation_jitter]`` degrees; the prior then distils from those
            views too, so one render serves both terms. ``"step"``: the step's random orbit
            cameras (the first view anywhere in the first quarter turn), where a critic trained
            with the front view first cannot tell left from right. Reward-weighted SDS, whose
            critic judges every step, follows the same setting.
        augment_copies: The critic scores this many randomly augmented copies of the views in one
            batch and its loss is their mean (expectation over transformations), so that its
            gradient follows what survives small shifts and noise rather than one pixel pattern.
            1 with no shift and no noise = the views as rendered.
        augment_shift: Largest shift of a copy in pixels (each copy and view its own, edge pixels
            repeated).
        augment_noise: Standard deviation of Gaussian pixel noise added to each copy.
        saturate_prob: A hinge on the critic's belief: at steps where its mean P(yes) over the
            copies is already at least this, the term adds nothing (it stops pushing an image the
            critic accepts further into the critic's own blind spots). ``None``: never saturates.
        per_object_weight: The per-object term (:class:`ObjectCriticTerm`): each layout group's
            Gaussians rendered alone, framed on the group's own box as the critic's training renders
            frame a whole asset, from the same jittered orbit, and scored against the group's own
            caption ("two red cubes"). In a multi-object scene at 32 px an object covers a few
            pixels; framed, the critic sees it at full size. Its lambda matches
            ``per_object_weight * grad_ratio * ||g_sds||`` on its own renders (without a prior:
            ``per_object_weight * weight``). 0: off.
        scene_term: Whether the whole-scene term is applied; False with ``per_object_weight > 0``
            uses the per-object term instead of it.
        eps: Added to ``||g_critic||`` in the lambda denominator.
    """

    grad_ratio: float = 0.5
    weight: float = 1.0
    max_lambda: float | None = 1.0e4
    start_step: int = 0
    every_k: int = 1
    x0_straight_through: bool = False
    views: Literal["orbit", "step"] = "orbit"
    azimuth_jitter: float = 10.0
    elevation_jitter: float = 5.0
    augment_copies: int = 1
    augment_shift: int = 0
    augment_noise: float = 0.0
    saturate_prob: float | None = None
    per_object_weight: float = 0.0
    scene_term: bool = True
    eps: float = 1.0e-12

    def __post_init__(self) -> None:
        if self.grad_ratio < 0 or self.weight < 0:
            raise ValueError(f"grad_ratio and weight must be >= 0, got {self.grad_ratio}, {self.weight}")
        if self.every_k < 1:
            raise ValueError(f"every_k must be >= 1, got {self.every_k}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        if self.max_lambda is not None and self.max_lambda <= 0:
            raise ValueError(f"max_lambda must be positive or None, got {self.max_lambda}")
        if self.views not in ("orbit", "step"):
            raise ValueError(f"views must be 'orbit' or 'step', got {self.views!r}")
        if self.azimuth_jitter < 0 or self.elevation_jitter < 0:
            raise ValueError(f"azimuth_jitter and elevation_jitter must be >= 0, got {self.azimuth_jitter}, {self.elevation_jitter}")
        if self.augment_copies < 1 or self.augment_shift < 0 or self.augment_noise < 0:
            raise ValueError(
                f"augment_copies must be >= 1 and augment_shift, augment_noise >= 0, got "
                f"{self.augment_copies}, {self.augment_shift}, {self.augment_noise}"
            )
        if self.saturate_prob is not None and not 0 < self.saturate_prob <= 1:
            raise ValueError(f"saturate_prob must be in (0, 1] or None, got {self.saturate_prob}")
        if self.per_object_weight < 0 or (not self.scene_term and self.per_object_weight == 0):
            raise ValueError(f"per_object_weight must be >= 0, and > 0 when scene_term is false (got {self.per_object_weight})")


@dataclass
class RewardWeightedConfig:
    """Reward-weighted SDS: ``num_draws`` noise draws at one t, softmax(score / temperature) weights.

    ``score`` picks the critic output used as the reward (``"margin"``, a logit difference, or
    ``"prob_yes"`` in (0, 1)).
    """

    num_draws: int = 4
    temperature: float = 1.0
    score: Literal["margin", "prob_yes"] = "margin"

    def __post_init__(self) -> None:
        if self.num_draws < 1:
            raise ValueError(f"num_draws must be >= 1, got {self.num_draws}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.score not in ("margin", "prob_yes"):
            raise ValueError(f"score must be 'margin' or 'prob_yes', got {self.score!r}")


@dataclass
class TCSDConfig:
    critic: CriticTermConfig = field(default_factory=CriticTermConfig)
    reward_weighted: RewardWeightedConfig = field(default_factory=RewardWeightedConfig)


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def critic_loss(critic: CriticLike, views: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Any]:
    """``L_critic = mean_b -log sigmoid(margin_b)`` and the critic's output.

    Args:
        views: ``[B, V, 3, H, W]`` in [0, 1], differentiable.
        prompts: ``B`` captions.
    Returns:
        ``(loss, output)``: scalar loss (float32 or wider) and whatever ``critic.score`` returned
        (with ``.margin [B]``, and for :class:`~coherendream.critic.model.Critic` ``.prob_yes``).
        ``-logsigmoid`` is the numerically stable form of ``-log P(Yes)``.
    """
    out = critic.score(views, list(prompts))
    margin = out.margin.to(torch.promote_types(out.margin.dtype, torch.float32))  # float64 stays float64 (checks)
    return -F.logsigmoid(margin).mean(), out


def match_gradient_norm(g_sds: Tensor, g_critic: Tensor, grad_ratio: float, eps: float = 1e-12, max_lambda: float | None = None) -> Tensor:
    """Detached scalar ``lambda = grad_ratio * ||g_sds|| / (||g_critic|| + eps)``, clamped to ``max_lambda``.

    Both gradients are taken on the same images (any equal shapes); norms are the flat L2 norms.
    """
    lam = grad_ratio * g_sds.detach().float().norm() / (g_critic.detach().float().norm() + eps)
    if max_lambda is not None:
        lam = lam.clamp(max=max_lambda)
    return lam.detach()


def augment_views(views: Tensor, copies: int, shift: int = 0, noise: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """``copies`` randomly shifted, noised versions of ``views`` ``[V, 3, H, W]``: ``[copies, V, 3, H, W]``.

    Each copy and view is shifted by whole pixels in ``[-shift, shift]`` along each axis (the edge
    pixels repeated into the gap, as a render's background continues past its border) and gets
    ``N(0, noise^2)`` pixel noise; differentiable in ``views``. With ``shift = 0`` and
    ``noise = 0`` every copy is ``views``.
    """
    V, C, H, W = views.shape
    out = views.unsqueeze(0).expand(copies, V, C, H, W)
    if shift > 0:
        padded = F.pad(views.reshape(1, V * C, H, W), (shift, shift, shift, shift), mode="replicate")[0].reshape(V, C, H + 2 * shift, W + 2 * shift)
        offsets = torch.randint(0, 2 * shift + 1, (copies, V, 2), generator=generator, device="cpu").tolist()
        out = torch.stack([torch.stack([padded[v, :, dy : dy + H, dx : dx + W] for v, (dy, dx) in enumerate(row)]) for row in offsets])
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=generator, device="cpu").to(out)
    return out


def straight_through(rgb: Tensor, x0_rgb: Tensor) -> Tensor:
    """``rgb - (rgb - x0_rgb).detach()``: the value of ``x0_rgb``, the gradient path of ``rgb``."""
    return rgb - (rgb - x0_rgb.to(rgb)).detach()


def decode_x0_views(guidance: Any, pred_x0: Tensor, size: tuple[int, int]) -> Tensor:
    """Decode clean-latent predictions ``[B, C, h, w]`` to RGB ``[B, 3, *size]`` in [0, 1], no grad.

    ``guidance`` is an :class:`~coherendream.generation.guidance.SDSGuidance` (its VAE decoder).
    Resized (bilinear, antialiased when shrinking) to the renders' size so that the critic sees
    the same resolution whichever image it is given.
    """
    with torch.no_grad():
        x0 = guidance.decode_latents(pred_x0)
        if tuple(x0.shape[-2:]) != tuple(size):
            x0 = F.interpolate(x0, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x0.clamp(0.0, 1.0)


def reward_weights(scores: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(scores / temperature)`` over ``[K]`` scores (float32; sums to 1).

    Non-finite scores get weight 0 (a draw the critic could not score does not count), unless all
    are non-finite, where the weights are uniform.
    """
    s = scores.detach().float() / temperature
    finite = torch.isfinite(s)
    if not finite.any():
        return torch.full_like(s, 1.0 / s.numel())
    s = torch.where(finite, s, torch.full_like(s, -math.inf))
    return torch.softmax(s, dim=0)


# --------------------------------------------------------------------------------------------
# The critic term
# --------------------------------------------------------------------------------------------


@dataclass
class StepGradients:
    """Result of one step's objective, as a gradient on the renders plus numbers to log.

    Attributes:
        grad: ``[V, 3, H, W]`` float32 ``dL/dI`` to push into the Gaussians with
            ``rgb.backward(grad)`` (None when no term was active this step).
        loss: Scalar float ``L_SDS + lambda * L_critic`` (NaN possible: the caller checks).
        loss_sds, loss_critic: The two terms' values (None when not computed).
        lam: The lambda used (None when the critic term was off).
        margin, prob_yes: Critic outputs on the views it saw (None when off).
        grad_norm_sds, grad_norm_critic: ``||g_sds||``, ``||g_critic||`` (unweighted) on the images.
        grad_norm: ``||grad||``.
        t: SDS timestep (None without a prior).
        critic_active: Whether the critic term was applied.
        reward_weights: ``[K]`` weights of reward-weighted SDS (None otherwise).
        reward_scores: ``[K]`` the critic scores behind them.
    """

    grad: Tensor | None
    loss: float
    loss_sds: float | None = None
    loss_critic: float | None = None
    lam: float | None = None
    margin: float | None = None
    prob_yes: float | None = None
    grad_norm_sds: float | None = None
    grad_norm_critic: float | None = None
    grad_norm: float | None = None
    t: int | None = None
    critic_active: bool = False
    reward_weights: list[float] | None = None
    reward_scores: list[float] | None = None

    def log_record(self) -> dict[str, Any]:
        """JSON-ready numbers (non-finite floats become None: JSON has no NaN)."""
        keys = ("loss", "loss_sds", "loss_critic", "lam", "margin", "prob_yes", "grad_norm_sds", "grad_norm_critic", "grad_norm", "t")
        rec: dict[str, Any] = {k: _finite_or_none(getattr(self, k)) for k in keys}
        rec["critic_active"] = self.critic_active
        if self.reward_weights is not None:
            rec["reward_weights"] = [_finite_or_none(w) for w in self.reward_weights]
            rec["reward_scores"] = [_finite_or_none(s) for s in self.reward_scores or []]
        return rec


def _finite_or_none(x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return x
    x = float(x)
    return x if math.isfinite(x) else None


def _prob_yes(out: Any) -> Tensor:
    return out.prob_yes if hasattr(out, "prob_yes") else torch.sigmoid(out.margin.float())


def _item(x: Tensor) -> float:
    return float(x.detach().float().mean().cpu())


class CriticTerm:
    """TCSD's critic term: when it is on, its lambda, and the combined image gradient.

    Args:
        critic: Any :class:`CriticLike` (it receives ``[1, V, 3, H, W]`` and ``[prompt]``).
        config: :class:`CriticTermConfig`.
    """

    def __init__(self, critic: CriticLike, config: CriticTermConfig | None = None) -> None:
        self.critic = critic
        self.config = config if config is not None else CriticTermConfig()

    def active(self, step: int) -> bool:
        """Whether the term applies at optimisation ``step`` (0-based)."""
        c = self.config
        return step >= c.start_step and (step - c.start_step) % c.every_k == 0

    def gradient(
        self,
        images: Tensor,
        prompt: str,
        g_sds: Tensor | None = None,
        x0_images: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Any]:
        """The critic's weighted image gradient.

        Args:
            images: ``[V, 3, H, W]`` leaf with ``requires_grad`` (a detached copy of the renders).
            prompt: The caption the critic checks.
            g_sds: ``[V, 3, H, W]`` ``dL_SDS/dI`` to match the norm of, or None (no prior: lambda
                is the fixed ``weight``).
            x0_images: ``[V, 3, H, W]`` decoded x0 for the straight-through input, or None.
            generator: Source of the augmentations (CPU).
        Returns:
            ``(g_critic, lambda, L_critic, critic_output)``; ``g_critic = dL_critic/dI`` (unweighted:
            the caller adds ``lambda * g_critic``); zero when the term is saturated.
        """
        c = self.config
        seen = straight_through(images, x0_images) if x0_images is not None else images
        copies = augment_views(seen, c.augment_copies, c.augment_shift, c.augment_noise, generator)
        loss, out = critic_loss(self.critic, copies, [prompt] * c.augment_copies)
        (g_critic,) = torch.autograd.grad(loss, images)
        if c.saturate_prob is not None and _item(_prob_yes(out)) >= c.saturate_prob:
            g_critic = torch.zeros_like(g_critic)
        if g_sds is None:
            lam = torch.tensor(float(c.weight), device=images.device)
        else:
            lam = match_gradient_norm(g_sds, g_critic, c.grad_ratio, c.eps, c.max_lambda)
        return g_critic, lam, loss.detach(), out


@dataclass
class ObjectGroup:
    """One group of a layout for the per-object term: its objects' indices, its caption, and the
    centre and longest side of its box (the frame its Gaussians are rendered in)."""

    objects: list[int]
    caption: str
    center: tuple[float, float, float]
    extent: float

    @classmethod
    def framing(cls, objects: list[int], caption: str, boxes: Sequence[tuple[Sequence[float], Sequence[float]]]) -> ObjectGroup:
        """The group of ``objects`` framed on the union of their ``boxes`` (``(center, size)`` each)."""
        lo = [min(c[i] - s[i] / 2 for c, s in boxes) for i in range(3)]
        hi = [max(c[i] + s[i] / 2 for c, s in boxes) for i in range(3)]
        return cls(objects, caption, tuple((a + b) / 2 for a, b in zip(lo, hi)), max(b - a for a, b in zip(lo, hi)))


def object_groups(layout: Any) -> list[ObjectGroup]:
    """The layout's objects grouped by their prompt ("a red cube" twice -> one group, captioned
    "two red cubes" where the procedural grammar reads the prompt, else each object alone)."""
    from coherendream.vocabulary import SceneCaption, parse_caption

    by_prompt: dict[str, list[int]] = {}
    for k, obj in enumerate(layout.objects):
        by_prompt.setdefault(obj.prompt, []).append(k)
    groups = []
    for prompt, members in by_prompt.items():
        parsed = parse_caption(prompt)
        if len(members) > 1 and (parsed is None or len(parsed.groups) != 1 or parsed.groups[0].count != 1):
            parts = [[k] for k in members]  # a prompt that cannot be counted: each object alone
        else:
            parts = [members]
        for part in parts:
            caption = prompt
            if len(part) > 1:
                g = parsed.groups[0]
                caption = SceneCaption((dataclasses.replace(g, count=len(part)),)).text()
            groups.append(ObjectGroup.framing(part, caption, [(layout.objects[k].center, layout.objects[k].size) for k in part]))
    return groups


class ObjectCriticTerm:
    """The per-object critic term (``CriticTermConfig.per_object_weight``): each group's Gaussians
    alone, moved into the frame of its own box (centre at the origin, longest side 1: where the
    critic's training renders put a whole asset), rendered from the given cameras and scored
    against the group's caption, all groups in one batch. :meth:`backward` adds the weighted
    gradient to the Gaussians' parameters."""

    def __init__(self, critic: CriticLike, config: CriticTermConfig, groups: Sequence[ObjectGroup]) -> None:
        self.critic, self.config, self.groups = critic, config, list(groups)

    def render(self, model: Any, viewmats: Tensor, Ks: Tensor, resolution: int, background: Tensor, backend: str = "auto") -> Tensor:
        """``[G, V, 3, R, R]``: every group's framed renders (differentiable)."""
        from coherendream.generation.rasterize import rasterize_gaussians

        inputs = model.render_inputs()
        out = []
        for g in self.groups:
            mask = torch.isin(model.object_ids, torch.tensor(g.objects, device=model.object_ids.device))
            centre = torch.tensor(g.center, dtype=inputs["means"].dtype, device=inputs["means"].device)
            part = {k: (v[mask] if isinstance(v, Tensor) else v) for k, v in inputs.items()}
            part["means"] = (part["means"] - centre) / g.extent
            part["scales"] = part["scales"] / g.extent
            ras = rasterize_gaussians(**part, viewmats=viewmats, Ks=Ks, width=resolution, height=resolution, backgrounds=background, backend=backend)
            out.append(ras.rgb.permute(0, 3, 1, 2))
        return torch.stack(out)

    def backward(self, model: Any, viewmats: Tensor, Ks: Tensor, resolution: int, background: Tensor, grad_norm_sds: float | None,
                 backend: str = "auto") -> dict[str, float]:  # fmt: skip
        """Render, score, and accumulate ``lambda * dL/dparams`` into the model's ``.grad``; its log record."""
        c = self.config
        rendered = self.render(model, viewmats, Ks, resolution, background, backend)
        images = rendered.detach().float().requires_grad_(True)
        loss, out = critic_loss(self.critic, images, [g.caption for g in self.groups])
        (g_obj,) = torch.autograd.grad(loss, images)
        if grad_norm_sds is None:
            lam = c.weight * c.per_object_weight
        else:
            lam = min(c.per_object_weight * c.grad_ratio * grad_norm_sds / (float(g_obj.norm()) + c.eps), c.max_lambda or math.inf)
        rendered.backward(lam * g_obj.to(rendered.dtype))
        return {"lam_object": float(lam), "loss_object": float(loss.detach()), "prob_yes_object": float(_prob_yes(out).detach().float().mean())}


def tcsd_step(
    rgb: Tensor,
    prompt: str,
    step: int,
    *,
    guidance: Any | None = None,
    critic_term: CriticTerm | None = None,
    sds_prompts: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
) -> StepGradients:
    """One TCSD step's image gradient ``g_sds + lambda * g_critic`` (either term may be absent).

    Args:
        rgb: ``[V, 3, H, W]`` renders in [0, 1]; only their values are used (the caller applies
            the returned gradient with ``rgb.backward(out.grad)``).
        prompt: The scene's caption (the critic's question).
        step: Optimisation step (t annealing, the critic's schedule).
        guidance: An ``SDSGuidance`` or None (``prior: none``).
        critic_term: A :class:`CriticTerm` or None (plain SDS).
        sds_prompts: ``V`` prompts for the prior (e.g. view-dependent); default ``prompt``.
        generator: Source of t and the noise.
    """
    images = rgb.detach().float().requires_grad_(True)
    V = images.shape[0]
    g_sds = loss_sds = None
    t = None
    x0_images = None
    if guidance is not None:
        sds = guidance(images, list(sds_prompts) if sds_prompts is not None else [prompt] * V, step, generator)
        (g_sds,) = torch.autograd.grad(sds.loss_sds, images)
        loss_sds = sds.loss_sds.detach()
        t = int(sds.t[0])
        if critic_term is not None and critic_term.config.x0_straight_through and critic_term.active(step):
            x0_images = decode_x0_views(guidance, sds.pred_x0, tuple(images.shape[-2:]))
    out = StepGradients(grad=None, loss=0.0, t=t)
    grad = g_sds.float() if g_sds is not None else None
    total = loss_sds.float() if loss_sds is not None else None
    if g_sds is not None:
        out.loss_sds = _item(loss_sds)
        out.grad_norm_sds = _item(g_sds.float().norm())
    if critic_term is not None and critic_term.active(step) and critic_term.config.scene_term:
        if critic_term.config.x0_straight_through and guidance is None:
            raise ValueError("x0_straight_through needs a prior (the x0 prediction comes from SDS)")
        g_critic, lam, l_c, c_out = critic_term.gradient(images, prompt, g_sds, x0_images, generator)
        g_c = lam * g_critic.float()
        grad = g_c if grad is None else grad + g_c
        total = lam * l_c if total is None else total + lam * l_c
        out.critic_active = True
        out.lam = _item(lam)
        out.loss_critic = _item(l_c)
        out.margin = _item(c_out.margin)
        out.prob_yes = _item(_prob_yes(c_out))
        out.grad_norm_critic = _item(g_critic.float().norm())
    if grad is not None:
        out.grad = grad
        out.loss = _item(total)
        out.grad_norm = _item(grad.norm())
    return out


def reward_weighted_sds(
    rgb: Tensor,
    prompt: str,
    step: int,
    guidance: Any,
    critic: CriticLike,
    config: RewardWeightedConfig | None = None,
    *,
    sds_prompts: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
) -> StepGradients:
    """Reward-weighted SDS (see the module docstring): K draws at one t, critic-softmax weights.

    Args:
        rgb: ``[V, 3, H, W]`` renders in [0, 1] (values only; apply ``out.grad`` with backward).
        guidance: An ``SDSGuidance`` (encode once, :meth:`guidance_from_latents` per draw).
        critic: Scores each draw's decoded x0 views, all K draws in one batch ``[K, V, 3, H, W]``.
    Returns:
        :class:`StepGradients` whose ``grad`` is ``d sds_loss(latents, sum_k w_k g_k) / d images``
        and whose ``reward_weights`` / ``reward_scores`` are the ``[K]`` weights and scores.
    """
    config = config if config is not None else RewardWeightedConfig()
    images = rgb.detach().float().requires_grad_(True)
    V = images.shape[0]
    prompts = list(sds_prompts) if sds_prompts is not None else [prompt] * V
    latents = guidance.encode_images(images)
    t = guidance.sample_timesteps(step, V, generator)
    grads, x0s = [], []
    for _ in range(config.num_draws):
        # Same latents and t, a fresh noise draw each time (drawn from ``generator``).
        o = guidance.guidance_from_latents(latents, prompts, step, generator, t=t)
        grads.append(o.grad)
        x0s.append(decode_x0_views(guidance, o.pred_x0, tuple(images.shape[-2:])))
    with torch.no_grad():
        c_out = critic.score(torch.stack(x0s), [prompt] * config.num_draws)  # [K, V, 3, H, W]
    raw = c_out.margin if config.score == "margin" else c_out.prob_yes
    scores = raw.detach().float().reshape(-1)
    w = reward_weights(scores, config.temperature).to(grads[0].device)
    g = (w.reshape(-1, *[1] * grads[0].ndim) * torch.stack(grads)).sum(dim=0)
    loss = sds_loss(latents, g)
    (g_img,) = torch.autograd.grad(loss, images)
    best = int(torch.argmax(w))
    margins = c_out.margin.detach().float().reshape(-1)
    return StepGradients(
        grad=g_img.float(),
        loss=_item(loss),
        loss_sds=_item(loss),
        margin=_item(margins[best]),
        prob_yes=_item(torch.sigmoid(margins[best])),
        grad_norm_sds=_item(g_img.norm()),
        grad_norm=_item(g_img.norm()),
        t=int(t[0]),
        reward_weights=[float(x) for x in w.cpu()],
        reward_scores=[float(x) for x in scores.cpu()],
    )
