"""SDS prior: tiny offline priors (latent SD-shaped and pixel-space IF-shaped), gradient maths, CFG,
timestep annealing, text cache. The gradient tests run on both kinds of prior."""

from __future__ import annotations

import dataclasses
import math
import socket

import pytest
import torch

from coherendream.generation.guidance import (
    GuidanceOutput,
    SDSConfig,
    SDSGuidance,
    predict_x0,
    sds_gradient,
    sds_loss,
    sds_weight,
    to_epsilon,
    view_direction,
)
from coherendream.generation.tiny_prior import TINY_PRIOR_RESOLUTION, build_tiny_prior


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    return build_tiny_prior(tmp_path_factory.mktemp("tiny_prior"), seed=0)


@pytest.fixture(scope="module")
def pixel_prior_dir(tiny_if_prior_dir):
    return tiny_if_prior_dir


@pytest.fixture(scope="module")
def latent_guidance(prior_dir):
    # grad_clip=None so that the exactness tests compare against the unclipped formula.
    return SDSGuidance.from_pretrained(prior_dir, config=SDSConfig(local_files_only=True, grad_clip=None), device="cpu")


@pytest.fixture(scope="module")
def pixel_guidance(pixel_prior_dir):
    return SDSGuidance.from_pretrained(pixel_prior_dir, config=SDSConfig(local_files_only=True, grad_clip=None), device="cpu")


@pytest.fixture(params=["latent", "pixel"])
def guidance(request):
    """Each gradient test runs on the latent (SD-shaped) and the pixel-space (IF-shaped) prior."""
    return request.getfixturevalue(f"{request.param}_guidance")


def _latent_shape(g: SDSGuidance, batch: int) -> tuple[int, int, int, int]:
    side = g.resolution // g.vae_scale_factor
    return (batch, g.latent_channels, side, side)


def _eps(g: SDSGuidance, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction, its learned-variance half (if any) dropped."""
    return g.unet(x, t, encoder_hidden_states=hidden).sample[:, : x.shape[1]]


def _with_config(g: SDSGuidance, **changes) -> SDSGuidance:
    """A new SDSGuidance sharing g's (frozen) components, with a fresh text cache."""
    return SDSGuidance(g.unet, g.vae, g.text_encoder, g.tokenizer, g.scheduler, config=dataclasses.replace(g.config, **changes))


def _embed(g: SDSGuidance, prompt: str) -> torch.Tensor:
    """Text embedding computed independently of SDSGuidance's cache: CLIP unmasked (SD), T5 with
    its attention mask (IF), both padded to 77 tokens."""
    tokens = g.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    mask = tokens.attention_mask if g.text_encoder.config.model_type == "t5" else None
    with torch.no_grad():
        return g.text_encoder(tokens.input_ids, attention_mask=mask)[0]


# --------------------------------------------------------------------------------------------
# Tiny prior: save / load offline
# --------------------------------------------------------------------------------------------


def test_tiny_prior_saves_standard_folder_and_pipeline_loads_offline(prior_dir, no_network):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert (prior_dir / "model_index.json").is_file()
    for sub in ("unet", "vae", "text_encoder"):
        assert list((prior_dir / sub).glob("*.safetensors")), f"{sub} has no safetensors weights"
    assert not list(prior_dir.rglob("*.bin")), "pickled weights were written"

    pipe = StableDiffusionPipeline.from_pretrained(prior_dir, safety_checker=None)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.vae_scale_factor == 4
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == TINY_PRIOR_RESOLUTION
    # Every string tokenizes to known ids (no unknown-token fallback for ordinary text).
    ids = pipe.tokenizer("A red cube, side view!").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) == 2 + len("aredcube,sideview!")  # no merges: one id per character

    generator = torch.Generator().manual_seed(0)
    image = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np", generator=generator).images
    assert image.shape == (1, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


def test_tiny_prior_is_seeded(tmp_path, prior_dir):
    from safetensors.torch import load_file

    again = build_tiny_prior(tmp_path / "same", seed=0)
    other = build_tiny_prior(tmp_path / "other", seed=1)
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(str(d / name)) for d in (prior_dir, again, other))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_sds_guidance_from_pretrained_local_dir(prior_dir, no_network):
    cfg = SDSConfig(pretrained_model_name_or_path="not/used", local_files_only=True)
    g = SDSGuidance.from_pretrained(prior_dir, config=cfg, device="cpu")
    assert g.config.pretrained_model_name_or_path == str(prior_dir)  # the argument wins
    assert g.resolution == TINY_PRIOR_RESOLUTION and g.vae_scale_factor == 4
    assert g.dtype == torch.float32  # half precision is for CUDA only
    for module in (g.unet, g.vae, g.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    # SD's scaled_linear schedule: betas = linspace(sqrt(b0), sqrt(b1), T) ** 2.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(g.alphas_cumprod, torch.cumprod(1 - betas, 0).float())
    # And from the config's path alone.
    g2 = SDSGuidance.from_pretrained(config=dataclasses.replace(cfg, pretrained_model_name_or_path=str(prior_dir)), device="cpu")
    assert g2.num_train_timesteps == 1000


# --------------------------------------------------------------------------------------------
# Images <-> latents
# --------------------------------------------------------------------------------------------


def test_encode_images_formula_resize_and_differentiability(latent_guidance):
    g = latent_guidance
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = g.vae.encode(rgb * 2 - 1).latent_dist.mode() * g.vae.config.scaling_factor
    torch.testing.assert_close(g.encode_images(rgb), expected)

    big = torch.rand(2, 3, 48, 40, requires_grad=True)  # non-square, resized to 32x32
    latents = g.encode_images(big)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    latents.square().sum().backward()
    assert big.grad is not None and torch.isfinite(big.grad).all() and big.grad.abs().sum() > 0

    image = g.decode_latents(latents.detach())
    assert image.shape == (2, 3, 32, 32)
    assert image.min() >= 0 and image.max() <= 1

    with pytest.raises(ValueError):
        g.encode_images(torch.rand(2, 4, 32, 32))


def test_pixel_prior_folder_has_if_layout_and_loads_as_pixel_space(pixel_prior_dir, pixel_guidance, no_network):
    from transformers import T5EncoderModel

    d = pixel_prior_dir
    assert {p.name for p in d.iterdir() if p.is_dir()} == {"unet", "text_encoder", "tokenizer", "scheduler"}  # no vae/
    assert list((d / "unet").glob("*.safetensors")) and not list(d.rglob("*.bin"))
    g = SDSGuidance.from_pretrained(d, config=SDSConfig(local_files_only=True), device="cpu")
    assert g.pixel_space and g.vae is None and isinstance(g.text_encoder, T5EncoderModel)
    assert g.resolution == 32 and g.vae_scale_factor == 1 and g.latent_channels == 3
    assert g.unet.config.out_channels == 6  # noise + learned variance, as IF stage I
    # IF's cosine schedule (squaredcos_cap_v2), not SD's scaled-linear one.
    steps = torch.arange(1001, dtype=torch.float64) / 1000
    f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    torch.testing.assert_close(g.alphas_cumprod, torch.cumprod(1 - betas, 0).float())


def test_pixel_encode_is_scaled_pixels_and_the_gradient_reaches_the_image(pixel_guidance):
    g = pixel_guidance
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(11), requires_grad=True)
    torch.testing.assert_close(g.encode_images(rgb), rgb.detach() * 2 - 1)
    torch.testing.assert_close(g.decode_latents(g.encode_images(rgb).detach()), rgb.detach())
    assert g.encode_images(torch.rand(1, 3, 64, 48)).shape == (1, 3, 32, 32)  # resized to the UNet's size

    # At the native size the image is the latent up to x -> 2x - 1: d loss / d rgb = 2 * grad / B.
    out = g(rgb, "a red cube", t=400, noise=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12)))
    out.loss_sds.backward()
    torch.testing.assert_close(rgb.grad, 2 * out.grad / 2)
    assert out.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# SDS gradient and CFG against independent computations
# --------------------------------------------------------------------------------------------


def test_loss_gradient_on_latents_equals_weighted_noise_residual(guidance):
    g = guidance
    B, t_value = 2, 500
    rgb = torch.rand(B, 3, 32, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    noise = torch.randn(_latent_shape(g, B), generator=torch.Generator().manual_seed(3))
    out = g(rgb, "a red cube", t=t_value, noise=noise)
    assert isinstance(out, GuidanceOutput)
    assert out.t.tolist() == [t_value] * B

    # Independent computation of w(t) * (eps_hat - eps): forward noising, two separate UNet passes.
    ab = g.scheduler.alphas_cumprod[t_value].float()
    latents = out.latents.detach()
    noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    torch.testing.assert_close(out.latents_noisy, noisy)
    tt = torch.full((B,), t_value)
    with torch.no_grad():
        eps_c = _eps(g, noisy, tt, _embed(g, "a red cube").expand(B, -1, -1))
        eps_u = _eps(g, noisy, tt, _embed(g, "").expand(B, -1, -1))
    eps_hat = eps_u + 100.0 * (eps_c - eps_u)
    expected = (1 - ab) * (eps_hat - noise)
    scale = expected.abs().max().item()
    assert scale > 0
    # s = 100 amplifies float32 round-off of batched vs separate UNet passes; 1e-4 of the scale
    # still catches any wrong weight, sign or branch order.
    torch.testing.assert_close(out.grad, expected, rtol=1e-4, atol=1e-4 * scale)

    # Autograd through the detached-target trick: d loss / d latents == grad / B.
    (dlatents,) = torch.autograd.grad(out.loss_sds, out.latents, retain_graph=True)
    torch.testing.assert_close(dlatents, out.grad / B)
    torch.testing.assert_close(out.loss_sds, 0.5 * out.grad.square().sum() / B)
    torch.testing.assert_close(out.w, torch.full((B,), float(1 - ab)))


def test_cfg_matches_separate_conditional_and_unconditional_passes(guidance):
    g = _with_config(guidance, guidance_scale=7.5, negative_prompt="blurry")
    prompts = ["a red cube", "a blue ball"]  # per-view prompts: order must be kept
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = g(rgb, prompts, t=torch.tensor([250, 250]), noise=torch.randn(_latent_shape(g, 2), generator=torch.Generator().manual_seed(5)))
    for i, prompt in enumerate(prompts):
        x, tt = out.latents_noisy[i : i + 1], out.t[i : i + 1]
        with torch.no_grad():
            eps_c = _eps(g, x, tt, _embed(g, prompt))
            eps_u = _eps(g, x, tt, _embed(g, "blurry"))
        torch.testing.assert_close(out.noise_pred_text[i : i + 1], eps_c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.noise_pred_uncond[i : i + 1], eps_u, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.noise_pred[i : i + 1], eps_u + 7.5 * (eps_c - eps_u), rtol=1e-4, atol=1e-4)
    # The two prompts really condition differently (so the order check above means something).
    assert not torch.allclose(out.noise_pred_text[0], out.noise_pred_text[1], atol=1e-6)


def test_pred_x0_inverts_the_forward_noising_and_decodes(guidance):
    alphas = guidance.alphas_cumprod
    x0 = torch.randn(_latent_shape(guidance, 3))
    eps = torch.randn(_latent_shape(guidance, 3))
    t = torch.tensor([10, 400, 900])
    torch.testing.assert_close(predict_x0(guidance.scheduler.add_noise(x0, eps, t), eps, alphas, t), x0, rtol=1e-4, atol=1e-4)

    out = guidance(torch.rand(2, 3, 32, 32), "a cat", t=300)
    torch.testing.assert_close(out.pred_x0, predict_x0(out.latents_noisy, out.noise_pred, alphas, out.t))
    with torch.no_grad():
        image = guidance.decode_latents(out.pred_x0)
    assert image.shape == (2, 3, 32, 32) and image.min() >= 0 and image.max() <= 1


def test_to_epsilon_converts_v_and_sample_predictions(latent_guidance):
    alphas = latent_guidance.alphas_cumprod
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    ab = alphas[t].reshape(-1, 1, 1, 1)
    x_t = latent_guidance.scheduler.add_noise(x0, eps, t)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    torch.testing.assert_close(to_epsilon(v, x_t, alphas, t, "v_prediction"), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(to_epsilon(x0, x_t, alphas, t, "sample"), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(to_epsilon(eps, x_t, alphas, t, "epsilon"), eps)
    with pytest.raises(ValueError):
        to_epsilon(eps, x_t, alphas, t, "flow")


# --------------------------------------------------------------------------------------------
# Timesteps
# --------------------------------------------------------------------------------------------


def test_timesteps_stay_within_the_annealed_range(guidance):
    g = _with_config(guidance, min_step_percent=0.02, max_step_percent=0.98, max_step_percent_end=0.5,
                     min_step_percent_end=0.1, anneal_start_step=100, anneal_end_step=200)
    assert g.timestep_range(None) == (20, 980)
    assert g.timestep_range(0) == (20, 980)
    assert g.timestep_range(150) == (60, 740)
    assert g.timestep_range(200) == (100, 500)
    assert g.timestep_range(10_000) == (100, 500)

    generator = torch.Generator().manual_seed(0)
    for step, (lo, hi) in ((0, (20, 980)), (200, (100, 500))):
        ts = torch.stack([g.sample_timesteps(step, 4, generator) for _ in range(300)])
        assert (ts == ts[:, :1]).all(), "t must be shared by the views of a batch"
        assert ts.min() >= lo and ts.max() <= hi
        # The whole range is used, not a corner of it (failure probability < 1e-10).
        span = hi - lo
        assert ts.min() < lo + 0.15 * span and ts.max() > hi - 0.15 * span

    out = g(torch.rand(2, 3, 32, 32), "a cat", step=5_000, generator=generator)
    assert out.t.shape == (2,) and 100 <= int(out.t[0]) <= 500 and out.t[0] == out.t[1]

    with pytest.raises(ValueError):
        SDSConfig(min_step_percent=0.5, max_step_percent=0.4)
    with pytest.raises(ValueError):
        SDSConfig(max_step_percent_end=0.01)  # below min_step_percent at the end of annealing


def test_same_generator_seed_gives_same_draws(guidance):
    rgb = torch.rand(2, 3, 32, 32)
    a = guidance(rgb, "a cat", step=0, generator=torch.Generator().manual_seed(7))
    b = guidance(rgb, "a cat", step=0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.t, b.t) and torch.equal(a.noise, b.noise) and torch.equal(a.grad, b.grad)


# --------------------------------------------------------------------------------------------
# Robustness: nan_to_num and clipping
# --------------------------------------------------------------------------------------------


def test_sds_gradient_nan_to_num_and_clip():
    alphas = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([500, 500])
    w = float(1 - alphas[500])
    eps_u = torch.zeros(2, 1, 2, 3)
    eps_c = torch.tensor([[1e-3, float("nan"), float("inf")], [-float("inf"), 1e30, -1e30]]).reshape(1, 1, 2, 3).repeat(2, 1, 1, 1)
    noise = torch.zeros_like(eps_u)

    clipped = sds_gradient(eps_u, eps_c, noise, alphas, t, guidance_scale=1.0, clip=2.0)
    assert torch.isfinite(clipped).all()
    flat = clipped[0].flatten()
    torch.testing.assert_close(flat[0], torch.tensor(w * 1e-3))  # small values untouched
    assert flat[1] == 0 and flat[2] == 0 and flat[3] == 0  # NaN, +inf, -inf -> 0
    assert flat[4] == 2.0 and flat[5] == -2.0  # huge -> +-clip

    unclipped = sds_gradient(eps_u, eps_c, noise, alphas, t, guidance_scale=1.0, clip=None)
    assert torch.isfinite(unclipped).all()
    assert unclipped[0].flatten()[4] == pytest.approx(w * 1e30, rel=1e-5)

    uniform = sds_gradient(eps_u, eps_c, noise, alphas, t, guidance_scale=1.0, clip=None, weighting="uniform")
    assert uniform[0].flatten()[0] == pytest.approx(1e-3)
    assert torch.equal(sds_weight(alphas, t, "uniform"), torch.ones(2))


def test_module_survives_a_fake_noise_prediction_with_nans(guidance, monkeypatch):
    g = _with_config(guidance, grad_clip=0.5)

    def fake_predict_noise(latents_noisy, t, prompts):
        eps = torch.randn_like(latents_noisy) * 1e6
        eps[:, 0, 0, 0] = float("nan")
        eps[:, 1, 0, 0] = float("inf")
        return torch.zeros_like(eps), eps

    monkeypatch.setattr(g, "predict_noise", fake_predict_noise)
    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = g(rgb, "a cat", t=400)
    assert torch.isfinite(out.grad).all() and out.grad.abs().max() <= 0.5
    assert out.grad.abs().max() == 0.5  # the 1e6-sized predictions were clipped, not dropped
    assert (out.grad[:, :2, 0, 0] == 0).all()
    assert torch.isfinite(out.loss_sds)
    out.loss_sds.backward()
    assert torch.isfinite(rgb.grad).all()


# --------------------------------------------------------------------------------------------
# An optimisation step through a differentiable image
# --------------------------------------------------------------------------------------------


def test_sds_step_updates_an_image_parameter(guidance):
    g = _with_config(guidance, grad_clip=8.0)
    param = torch.nn.Parameter(0.1 * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8)))
    before = param.detach().clone()
    optimizer = torch.optim.Adam([param], lr=1e-2)

    out = g(torch.sigmoid(param), ["a dog, front view", "a dog, side view"], step=10, generator=torch.Generator().manual_seed(9))
    # The gradient reaching the image is exactly the SDS latent gradient pulled back through the VAE.
    (expected,) = torch.autograd.grad(out.latents, param, grad_outputs=out.grad / 2, retain_graph=True)
    optimizer.zero_grad()
    out.loss_sds.backward()
    assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    torch.testing.assert_close(param.grad, expected)
    optimizer.step()
    assert not torch.equal(param.detach(), before)
    # The prior stays frozen: nothing accumulates on its weights.
    for module in (g.unet, g.vae, g.text_encoder):
        assert module is None or all(p.grad is None for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Text embeddings cache, view-dependent prompts
# --------------------------------------------------------------------------------------------


def test_text_encoder_runs_once_per_distinct_prompt(guidance):
    g = _with_config(guidance, view_dependent_prompting=True)  # fresh, empty cache
    calls: list[int] = []
    handle = g.text_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        prompts = g.prompts_for_views("a dog", [0.0, 90.0, 180.0, 270.0], 10.0)
        assert prompts == ["a dog, front view", "a dog, side view", "a dog, back view", "a dog, side view"]
        rgb = torch.rand(4, 3, 32, 32)
        out = g(rgb, prompts, t=300)
        assert len(calls) == 4  # 3 distinct view prompts + the negative prompt ""
        g(rgb, prompts, t=600)
        g(rgb[:2], prompts[:2], step=3)
        assert len(calls) == 4  # everything cached
        g(rgb[:1], "a cat", t=300)
        assert len(calls) == 5
        assert all(n == 1 for n in calls)

        emb = g.get_text_embeddings(prompts)
        assert emb.shape[0] == 4
        assert torch.equal(emb[1], emb[3]) and not torch.equal(emb[0], emb[1])
        torch.testing.assert_close(emb[2:3], _embed(g, "a dog, back view"))
        assert torch.isfinite(out.grad).all() and out.grad.shape == _latent_shape(g, 4)
    finally:
        handle.remove()

    plain = _with_config(guidance, view_dependent_prompting=False)
    assert plain.prompts_for_views("a dog", [0.0, 180.0], [0.0, 0.0]) == ["a dog", "a dog"]
    with pytest.raises(ValueError):
        g(torch.rand(3, 3, 32, 32), ["a", "b"], t=10)


def test_view_direction_convention():
    assert view_direction(0.0, 0.0) == "front"
    assert view_direction(350.0, 20.0) == "front"
    assert view_direction(90.0, 0.0) == "side"
    assert view_direction(-90.0, 0.0) == "side"
    assert view_direction(180.0, 0.0) == "back"
    assert view_direction(-170.0, 0.0) == "back"
    assert view_direction(180.0, 75.0) == "overhead"


def test_sds_loss_is_half_squared_norm_per_sample():
    latents = torch.randn(3, 4, 2, 2, requires_grad=True)
    grad = torch.randn(3, 4, 2, 2)
    loss = sds_loss(latents, grad)
    assert math.isclose(loss.item(), 0.5 * grad.square().sum().item() / 3, rel_tol=1e-5)
    loss.backward()
    torch.testing.assert_close(latents.grad, grad / 3)


def test_bf16_on_cpu_only_where_the_cpu_has_bf16_units(monkeypatch):
    from coherendream.devices import BF16_ENV, cpu_has_fast_bf16

    for forced, expected in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv(BF16_ENV, forced)
        cpu_has_fast_bf16.cache_clear()
        assert SDSConfig(half_dtype="bf16").torch_dtype("cpu") == expected
        assert SDSConfig().torch_dtype("cpu") == torch.float32  # fp16 is never used on a CPU
        assert SDSConfig(half_dtype="bf16", half_precision=False).torch_dtype("cpu") == torch.float32
        assert SDSConfig(half_dtype="bf16").wanted_dtype() == torch.bfloat16
    monkeypatch.setenv(BF16_ENV, "yes")
    cpu_has_fast_bf16.cache_clear()
    with pytest.raises(ValueError, match=BF16_ENV):
        cpu_has_fast_bf16()
    monkeypatch.delenv(BF16_ENV)
    cpu_has_fast_bf16.cache_clear()


def test_bf16_on_cpu_when_asked_and_the_gradient_stays_close(pixel_prior_dir, monkeypatch):
    from coherendream.devices import BF16_ENV, cpu_has_fast_bf16

    monkeypatch.setenv(BF16_ENV, "1")  # bf16 forced, so that the comparison runs on any CPU
    cpu_has_fast_bf16.cache_clear()
    full = SDSGuidance.from_pretrained(pixel_prior_dir, config=SDSConfig(local_files_only=True, grad_clip=None, guidance_scale=5.0), device="cpu")
    half = SDSGuidance.from_pretrained(pixel_prior_dir, config=SDSConfig(local_files_only=True, grad_clip=None, guidance_scale=5.0, half_dtype="bf16"), device="cpu")
    assert half.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(14))
    a, b = full(rgb, "a red cube", t=300, noise=noise), half(rgb, "a red cube", t=300, noise=noise)
    assert b.grad.dtype == torch.float32 and torch.isfinite(b.grad).all()
    assert (a.grad - b.grad).norm() < 0.05 * a.grad.norm()  # bf16 rounding, not a different gradient
    monkeypatch.delenv(BF16_ENV)
    cpu_has_fast_bf16.cache_clear()
