"""TCSD objective: gradient-norm matching, the critic term's gradient, schedule, x0 straight-through,
reward-weighted SDS. Stub critics (tiny differentiable functions of the views) keep this fast; the
tests with an SDS side run on the tiny SD-shaped (latent) and IF-shaped (pixel-space) priors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coherendream.generation.guidance import SDSConfig, SDSGuidance
from coherendream.generation.tcsd import (
    augment_views,
    CriticTerm,
    CriticTermConfig,
    RewardWeightedConfig,
    critic_loss,
    match_gradient_norm,
    reward_weighted_sds,
    reward_weights,
    straight_through,
    tcsd_step,
)
from coherendream.generation.tiny_prior import build_tiny_prior


@dataclass
class Out:
    margin: torch.Tensor
    prob_yes: torch.Tensor


class StubCritic:
    """margin = <w, views> + b per sample: a smooth, differentiable critic of [B, V, 3, H, W]."""

    def __init__(self, shape, seed=0, dtype=torch.float32, nonlinear=True):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(shape, generator=g, dtype=dtype) / shape.numel() ** 0.5
        self.nonlinear = nonlinear
        self.calls = 0

    def score(self, views, prompts):
        assert views.ndim == 5 and len(prompts) == views.shape[0]
        self.calls += 1
        x = views * self.w.to(views)
        m = x.flatten(1).sum(1)
        if self.nonlinear:
            m = m + 0.5 * torch.tanh(3 * x).flatten(1).sum(1)
        return Out(margin=m, prob_yes=torch.sigmoid(m))


class BrightnessCritic:
    """Scores mean brightness: the reward-weighted test wants a known ordering of draws."""

    def score(self, views, prompts):
        m = 10.0 * (views.flatten(1).mean(1) - 0.5)
        return Out(margin=m, prob_yes=torch.sigmoid(m))


@pytest.fixture(scope="module", params=["latent", "pixel"])
def tiny_guidance(request, tmp_path_factory):
    """The SDS side on both kinds of prior: the tiny SD-shaped one and the tiny IF-shaped one."""
    if request.param == "latent":
        path = build_tiny_prior(tmp_path_factory.mktemp("prior"), seed=0)
    else:
        path = request.getfixturevalue("tiny_if_prior_dir")
    return SDSGuidance.from_pretrained(path, SDSConfig(local_files_only=True), device="cpu")


def _images(seed=0, v=4, h=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(v, 3, h, h, generator=g)


# ----------------------------------------------------------------------------- gradient matching


def test_match_gradient_norm_gives_the_stated_ratio():
    g = torch.Generator().manual_seed(1)
    g_sds = torch.randn(4, 3, 8, 8, generator=g) * 7.0
    g_c = torch.randn(4, 3, 8, 8, generator=g) * 1e-3
    for ratio in (0.1, 0.5, 2.0):
        lam = match_gradient_norm(g_sds, g_c, ratio)
        assert not lam.requires_grad
        assert torch.isclose((lam * g_c).norm() / g_sds.norm(), torch.tensor(ratio), rtol=1e-5)
    assert match_gradient_norm(g_sds, g_c, 0.5, max_lambda=3.0) == 3.0


def test_tcsd_step_matches_ratio_with_real_sds(tiny_guidance):
    rgb = _images(v=4, h=32)
    critic = StubCritic(torch.Size([1, 4, 3, 32, 32]))
    term = CriticTerm(critic, CriticTermConfig(grad_ratio=0.3))
    gen = torch.Generator().manual_seed(0)
    out = tcsd_step(rgb, "a red cube", 0, guidance=tiny_guidance, critic_term=term, generator=gen)
    # Recompute both image gradients independently, with the same t and noise draws.
    gen = torch.Generator().manual_seed(0)
    img = rgb.clone().requires_grad_(True)
    sds = tiny_guidance(img, ["a red cube"] * 4, 0, gen)
    (g_sds,) = torch.autograd.grad(sds.loss_sds, img)
    img2 = rgb.clone().requires_grad_(True)
    (g_c,) = torch.autograd.grad(-F.logsigmoid(critic.score(img2[None], ["a red cube"]).margin).mean(), img2)
    assert torch.allclose(out.grad, g_sds + out.lam * g_c, rtol=1e-4, atol=1e-6)
    assert (out.lam * g_c).norm() / g_sds.norm() == pytest.approx(0.3, rel=1e-4)
    assert out.grad_norm_sds == pytest.approx(float(g_sds.norm()), rel=1e-5)
    assert out.grad_norm_critic == pytest.approx(float(g_c.norm()), rel=1e-5)
    assert out.t == int(sds.t[0]) and out.critic_active


# ----------------------------------------------------------------------------- critic gradient


def test_critic_term_gradient_is_autograd_of_neg_logsigmoid_and_finite_differences():
    rgb = _images(v=4, h=6).double()
    critic = StubCritic(torch.Size([1, 4, 3, 6, 6]), dtype=torch.float64)
    term = CriticTerm(critic, CriticTermConfig(weight=1.0))
    img = rgb.clone().requires_grad_(True)
    g_critic, lam, loss, _ = term.gradient(img, "p")
    assert float(lam) == 1.0
    ref_img = rgb.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(-F.logsigmoid(critic.score(ref_img[None], ["p"]).margin).sum(), ref_img)
    assert torch.allclose(g_critic, ref, atol=1e-12)
    # Central finite differences on a few pixels, float64.
    f = lambda x: float(critic_loss(critic, x[None], ["p"])[0])  # noqa: E731
    h = 1e-6
    for idx in [(0, 0, 0, 0), (1, 2, 3, 4), (3, 1, 5, 5), (2, 0, 2, 1)]:
        plus, minus = rgb.clone(), rgb.clone()
        plus[idx] += h
        minus[idx] -= h
        fd = (f(plus) - f(minus)) / (2 * h)
        assert fd == pytest.approx(float(g_critic[idx]), rel=1e-5, abs=1e-9)
    assert float(loss) == pytest.approx(f(rgb), rel=1e-12)


def test_no_prior_uses_fixed_weight():
    rgb = _images(v=4, h=8)
    critic = StubCritic(torch.Size([1, 4, 3, 8, 8]))
    out = tcsd_step(rgb, "p", 0, guidance=None, critic_term=CriticTerm(critic, CriticTermConfig(weight=2.5)))
    img = rgb.clone().requires_grad_(True)
    (g_c,) = torch.autograd.grad(-F.logsigmoid(critic.score(img[None], ["p"]).margin).mean(), img)
    assert out.lam == 2.5 and out.loss_sds is None and out.t is None
    assert torch.allclose(out.grad, 2.5 * g_c, atol=1e-7)


# ----------------------------------------------------------------------------- schedule


def test_warmup_and_every_k_switching():
    critic = StubCritic(torch.Size([1, 4, 3, 8, 8]))
    term = CriticTerm(critic, CriticTermConfig(start_step=3, every_k=2))
    assert [s for s in range(12) if term.active(s)] == [3, 5, 7, 9, 11]
    rgb = _images(v=4, h=8)
    calls = []
    for step in range(6):
        before = critic.calls
        out = tcsd_step(rgb, "p", step, critic_term=term)
        calls.append(critic.calls - before)
        assert out.critic_active == term.active(step)
        assert (out.grad is None) == (not term.active(step))  # no prior: nothing else to apply
    assert calls == [0, 0, 0, 1, 0, 1]  # the critic is not even run when the term is off
    with pytest.raises(ValueError):
        CriticTermConfig(every_k=0)


# ----------------------------------------------------------------------------- x0 straight-through


def test_straight_through_value_of_x0_gradient_to_rgb():
    rgb = _images(0, v=2, h=4).requires_grad_(True)
    x0 = _images(1, v=2, h=4)
    img = straight_through(rgb, x0)
    assert torch.allclose(img, x0)
    w = torch.randn_like(x0)
    (img * w).sum().backward()
    assert torch.allclose(rgb.grad, w)  # identity Jacobian: the critic's gradient on x0 lands on rgb


def test_x0_straight_through_in_tcsd_step(tiny_guidance):
    rgb = _images(v=4, h=32)
    seen = []

    class Recorder(StubCritic):
        def score(self, views, prompts):
            seen.append(views.detach().clone())
            return super().score(views, prompts)

    critic = Recorder(torch.Size([1, 4, 3, 32, 32]))
    term = CriticTerm(critic, CriticTermConfig(x0_straight_through=True))
    out = tcsd_step(rgb, "p", 0, guidance=tiny_guidance, critic_term=term, generator=torch.Generator().manual_seed(0))
    # The critic saw the decoded x0 (not the renders), and its gradient still reached the renders.
    gen = torch.Generator().manual_seed(0)
    sds = tiny_guidance(rgb, ["p"] * 4, 0, gen)
    x0 = F.interpolate(tiny_guidance.decode_latents(sds.pred_x0), size=(32, 32), mode="bilinear", antialias=True).clamp(0, 1)
    assert torch.allclose(seen[0][0], x0, atol=1e-5)
    assert not torch.allclose(seen[0][0], rgb, atol=1e-2)
    x0_req = x0.clone().requires_grad_(True)
    (g_c,) = torch.autograd.grad(-F.logsigmoid(critic.score(x0_req[None], ["p"]).margin).mean(), x0_req)
    assert out.grad_norm_critic == pytest.approx(float(g_c.norm()), rel=1e-4)


# ----------------------------------------------------------------------------- reward-weighted SDS


def test_reward_weights_sum_to_one_and_favour_higher_scores():
    s = torch.tensor([0.1, 2.0, -1.0, 0.5])
    for temp in (0.1, 1.0, 10.0):
        w = reward_weights(s, temp)
        assert w.sum() == pytest.approx(1.0, abs=1e-6)
        assert torch.equal(torch.argsort(w), torch.argsort(s))
    assert reward_weights(s, 0.01)[1] > 0.99
    assert torch.allclose(reward_weights(s, 1e6), torch.full((4,), 0.25), atol=1e-4)
    w = reward_weights(torch.tensor([float("nan"), 1.0, 0.0]))
    assert w[0] == 0 and w.sum() == pytest.approx(1.0)


def test_reward_weighted_sds_weights_draws_by_critic(tiny_guidance):
    rgb = _images(v=4, h=32)
    cfg = RewardWeightedConfig(num_draws=3, temperature=0.5)
    out = reward_weighted_sds(rgb, "p", 0, tiny_guidance, BrightnessCritic(), cfg, generator=torch.Generator().manual_seed(0))
    w, s = torch.tensor(out.reward_weights), torch.tensor(out.reward_scores)
    assert w.sum() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(torch.argsort(w), torch.argsort(s)) and int(w.argmax()) == int(s.argmax())
    assert torch.allclose(w, torch.softmax(s / 0.5, 0), atol=1e-6)
    # Recompute: same latents and t, the same three noise draws, weighted sum of their gradients.
    gen = torch.Generator().manual_seed(0)
    img = rgb.clone().requires_grad_(True)
    lat = tiny_guidance.encode_images(img)
    t = tiny_guidance.sample_timesteps(0, 4, gen)
    grads = [tiny_guidance.guidance_from_latents(lat, ["p"] * 4, 0, gen, t=t).grad for _ in range(3)]
    g = sum(wk * gk for wk, gk in zip(w, grads))
    from coherendream.generation.guidance import sds_loss

    (ref,) = torch.autograd.grad(sds_loss(lat, g), img)
    assert torch.allclose(out.grad, ref, rtol=1e-4, atol=1e-7)
    assert out.t == int(t[0])


def test_augmented_copies_shift_whole_pixels_add_noise_and_carry_gradients():
    views = torch.zeros(2, 3, 8, 8)
    views[:, :, 4, 4] = 1.0
    views.requires_grad_(True)
    same = augment_views(views, 3)
    assert same.shape == (3, 2, 3, 8, 8) and torch.equal(same[1], views)
    shifted = augment_views(views, 4, shift=2, generator=torch.Generator().manual_seed(0))
    for copy in shifted.detach():
        for view in copy:
            (ys, xs) = torch.nonzero(view[0] == 1.0, as_tuple=True)
            assert len(ys) == 1 and abs(int(ys[0]) - 4) <= 2 and abs(int(xs[0]) - 4) <= 2
    assert len({tuple(torch.nonzero(v[0]).flatten().tolist()) for c in shifted.detach() for v in c}) > 1  # not all the same shift
    noisy = augment_views(views, 2, noise=0.1, generator=torch.Generator().manual_seed(0))
    assert 0.05 < float((noisy - views).detach().std()) < 0.15
    # d(sum of copies)/d(views) counts how many copies each pixel reaches: 2 copies -> 2 everywhere
    (g,) = torch.autograd.grad(noisy.sum(), views)
    assert torch.allclose(g, torch.full_like(g, 2.0))


def test_saturated_critic_term_stops_pushing():
    critic = StubCritic(torch.Size([4, 3, 8, 8]))
    rgb = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    free = tcsd_step(rgb, "p", 0, critic_term=CriticTerm(critic, CriticTermConfig(weight=1.0)))
    p = free.prob_yes
    below = tcsd_step(rgb, "p", 0, critic_term=CriticTerm(critic, CriticTermConfig(weight=1.0, saturate_prob=min(1.0, p + 1e-3))))
    above = tcsd_step(rgb, "p", 0, critic_term=CriticTerm(critic, CriticTermConfig(weight=1.0, saturate_prob=max(1e-6, p - 1e-3))))
    assert torch.equal(below.grad, free.grad) and free.grad.abs().sum() > 0
    assert above.critic_active and above.grad.abs().sum() == 0  # P(yes) already above the hinge


def test_jittered_orbit_keeps_the_front_view_first():
    from coherendream.cameras import OrbitSpec
    from coherendream.generation.camera_sampler import sample_jittered_orbit

    orbit = OrbitSpec(elevation=15.0, distance=2.5, fov_y=40.0)
    exact = sample_jittered_orbit(orbit, 16)
    assert exact.azimuths.tolist() == [0.0, 90.0, 180.0, 270.0] and exact.elevations.tolist() == [15.0] * 4
    reference = orbit.cameras(16)
    assert torch.allclose(exact.viewmats, torch.tensor(np.stack([c.viewmat for c in reference]), dtype=torch.float32), atol=1e-6)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        cams = sample_jittered_orbit(orbit, 16, azimuth_jitter=10.0, elevation_jitter=5.0, generator=g)
        a = cams.azimuths.double()
        assert torch.allclose((a - a[0]) % 360, torch.tensor([0.0, 90.0, 180.0, 270.0], dtype=torch.float64), atol=1e-4)
        assert min(float(a[0]), 360 - float(a[0])) <= 10.0 and abs(float(cams.elevations[0]) - 15.0) <= 5.0


class RednessCritic:
    """margin = 20 * mean(R - (G + B) / 2) of each sample's views, whatever its caption: a critic
    that wants red, to see where the per-object term's gradient goes."""

    def __init__(self):
        self.captions = []

    def score(self, views, prompts):
        self.captions.append(list(prompts))
        m = 20 * (views[:, :, 0] - (views[:, :, 1] + views[:, :, 2]) / 2).mean(dim=(1, 2, 3))
        return Out(margin=m, prob_yes=torch.sigmoid(m))


def _two_group_scene():
    from coherendream.cameras import OrbitSpec, camera_tensors
    from coherendream.generation.gaussians import GaussianModel
    from coherendream.generation.layout import sample_points_in_layout
    from coherendream.generation.layout_rules import RuleBasedPlanner

    layout = RuleBasedPlanner().plan("two red cubes to the left of a blue sphere").layout
    points, ids = sample_points_in_layout(layout, 300, torch.Generator().manual_seed(0), min_per_object=64)
    model = GaussianModel.from_points(points, torch.full((len(points), 3), 0.5), scale=0.03, opacity=0.8, object_ids=ids)
    viewmats, Ks = camera_tensors(OrbitSpec().cameras(24))
    return layout, model, viewmats, Ks


def test_object_groups_caption_each_group_and_frame_its_box():
    from coherendream.generation.tcsd import object_groups

    layout, *_ = _two_group_scene()
    groups = object_groups(layout)
    assert [(g.objects, g.caption) for g in groups] == [([0, 1], "two red cubes"), ([2], "a blue sphere")]
    cubes = groups[0]
    lo = min(layout.objects[k].center[0] - layout.objects[k].size[0] / 2 for k in (0, 1))
    hi = max(layout.objects[k].center[0] + layout.objects[k].size[0] / 2 for k in (0, 1))
    assert cubes.extent == pytest.approx(hi - lo) and cubes.center[0] == pytest.approx((lo + hi) / 2)


def test_per_object_term_frames_each_group_and_its_gradient_reaches_only_that_group():
    from coherendream.generation.tcsd import ObjectCriticTerm, object_groups

    layout, model, viewmats, Ks = _two_group_scene()
    critic = RednessCritic()
    term = ObjectCriticTerm(critic, CriticTermConfig(per_object_weight=1.0, weight=1.0), object_groups(layout)[1:])  # the sphere alone
    background = torch.ones(3)
    framed = term.render(model, viewmats, Ks, 24, background)
    scene = model.render(viewmats, Ks, 24, 24, backgrounds=background).rgb
    # framed on its own box, the sphere covers far more of the view than in the whole scene
    cover = lambda img: float(((img - 1).abs().sum(dim=-3 if img.shape[-3] == 3 else -1) > 0.05).float().mean())  # noqa: E731
    assert cover(framed[0]) > 3 * cover(scene)
    record = term.backward(model, viewmats, Ks, 24, background, grad_norm_sds=None)
    assert critic.captions[-1] == ["a blue sphere"] and set(record) == {"lam_object", "loss_object", "prob_yes_object"}
    grad = model.colors.grad
    sphere = model.object_ids == 2
    assert grad[~sphere].abs().max() == 0 and grad[sphere].abs().max() > 0  # only the group's own Gaussians move
    # -grad on red raises redness: descending the loss makes the sphere's Gaussians redder
    assert float(grad[sphere][:, 0].sum()) < 0 < float(grad[sphere][:, 1:].sum())


def test_per_object_term_gradient_matches_finite_differences():
    from coherendream.generation.tcsd import ObjectCriticTerm, object_groups

    layout, model, viewmats, Ks = _two_group_scene()
    term = ObjectCriticTerm(RednessCritic(), CriticTermConfig(per_object_weight=1.0, weight=1.0), object_groups(layout))
    background = torch.ones(3)
    term.backward(model, viewmats, Ks, 24, background, grad_norm_sds=None)
    k = int(torch.nonzero(model.object_ids == 2)[0])

    def loss_at(delta):
        with torch.no_grad():
            model.colors[k, 0] += delta
            views = term.render(model, viewmats, Ks, 24, background)
            value = float(critic_loss(term.critic, views, [g.caption for g in term.groups])[0])
            model.colors[k, 0] -= delta
        return value

    numeric = (loss_at(1e-2) - loss_at(-1e-2)) / 2e-2
    assert float(model.colors.grad[k, 0]) == pytest.approx(numeric, rel=0.05, abs=1e-6)


def test_scene_term_off_leaves_only_the_per_object_term():
    with pytest.raises(ValueError, match="per_object_weight"):
        CriticTermConfig(scene_term=False)
    term = CriticTerm(StubCritic(torch.Size((1, 4, 3, 16, 16))), CriticTermConfig(scene_term=False, per_object_weight=1.0))
    out = tcsd_step(_images(), "a red cube", 0, critic_term=term)
    assert out.grad is None and not out.critic_active
