"""Critic scoring on the tiny random LLaVA: shapes, batching, image paths, gradients, adapters."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from coherendream.critic import Critic, CriticConfig, build_tiny_critic, resolve_answer_token_ids
from coherendream.grid import GridLayout, tile
from coherendream.prompts import prompt_messages

# Prompts of clearly different token lengths, so a batch needs padding.
PROMPTS = ["one torus", "two blue spheres to the left of a green cone", "a red cube on top of a yellow cylinder"]
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # A wider weight init than the default 0.02, so scores depend visibly on image and caption.
    return build_tiny_critic(tmp_path_factory.mktemp("tiny") / "critic", seed=0, initializer_range=0.2)


@pytest.fixture(scope="module")
def critic(tiny_dir):
    return Critic.from_pretrained(tiny_dir, device="cpu")


def random_views(batch: int, size: int = 32, num_views: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, num_views, 3, size, size, generator=gen)


def test_loads_frozen_in_eval_mode_in_float32_on_cpu(critic):
    assert critic.device.type == "cpu" and critic.dtype == torch.float32
    assert not critic.model.training
    assert not any(p.requires_grad for p in critic.model.parameters())
    assert critic.image_size == (64, 64)
    assert critic.config == CriticConfig()


def test_yes_no_ids_are_single_known_tokens(critic):
    tok = critic.tokenizer
    assert critic.yes_ids == [tok.convert_tokens_to_ids(w) for w in ("Yes", "yes", "YES")]
    assert critic.no_ids == [tok.convert_tokens_to_ids(w) for w in ("No", "no", "NO")]
    assert tok.unk_token_id not in critic.yes_ids + critic.no_ids
    # " Yes" is the same token as "Yes" here: deduplicated; unknown spellings are dropped.
    assert resolve_answer_token_ids(tok, ["Yes", " Yes", "Yup"]) == [tok.convert_tokens_to_ids("Yes")]
    with pytest.raises(ValueError, match="single token"):
        resolve_answer_token_ids(tok, ["Yup", "yes yes"])


def test_score_shapes_range_and_sigmoid_of_margin(critic):
    out = critic.score(random_views(3), PROMPTS)
    assert out.prob_yes.shape == (3,) and out.margin.shape == (3,)
    assert out.prob_yes.dtype == torch.float32
    assert ((out.prob_yes > 0) & (out.prob_yes < 1)).all()
    torch.testing.assert_close(out.prob_yes, torch.sigmoid(out.margin))

    # The margin is logsumexp(yes) - logsumexp(no) at the last prompt token of an unpadded call.
    ids = critic.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        logits = critic.model(**ids, pixel_values=critic.pixel_values(random_views(3)[:1])).logits[0, -1]
    expected = torch.logsumexp(logits[critic.yes_ids], 0) - torch.logsumexp(logits[critic.no_ids], 0)
    torch.testing.assert_close(out.margin[0].detach(), expected, rtol=1e-5, atol=1e-5)


def test_batch_equals_single_calls_despite_padding(critic):
    views = random_views(3)
    lengths = critic.encode_prompts(PROMPTS)["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3  # the batch really is padded
    with torch.no_grad():
        batched = critic.score(views, PROMPTS).margin
        single = torch.cat([critic.score(views[i : i + 1], [PROMPTS[i]]).margin for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    # Scores depend on the caption and on the image, so the equality above is not trivial.
    with torch.no_grad():
        same_views = critic.score(views[:1].expand(3, -1, -1, -1, -1), PROMPTS).margin
        same_prompt = critic.score(views, [PROMPTS[0]] * 3).margin
    assert same_views.max() - same_views.min() > 1e-3
    assert same_prompt.max() - same_prompt.min() > 1e-3


def test_tensor_pil_and_file_inputs_agree(critic, tmp_path):
    from PIL import Image

    pixels = (random_views(2, size=40) * 255).round().to(torch.uint8)  # [B, V, 3, H, W]
    images = [[Image.fromarray(v.permute(1, 2, 0).numpy()) for v in sample] for sample in pixels]
    paths = []
    for b, sample in enumerate(images):
        paths.append([])
        for v, image in enumerate(sample):
            image.save(tmp_path / f"{b}_{v}.png")
            paths[-1].append(tmp_path / f"{b}_{v}.png")
    prompts = PROMPTS[:2]
    with torch.no_grad():
        from_tensor = critic.score(pixels.float() / 255, prompts).margin
        from_uint8 = critic.score(pixels, prompts).margin
        from_pil = critic.score(images, prompts).margin
        from_files = critic.score([[str(p) for p in row] for row in paths], prompts).margin
    torch.testing.assert_close(from_pil, from_tensor, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_files, from_tensor, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_uint8, from_tensor, rtol=0, atol=1e-6)


def test_torch_preprocessing_matches_the_hf_image_processor(critic):
    from PIL import Image

    # A 2x2 grid of 32 px views is a 64 px image: no resize, so only rescale + normalise differ.
    pixels = (random_views(1) * 255).round().to(torch.uint8)
    grid = tile(pixels, GridLayout(2, 2), channels_last=False)[0]  # [3, 64, 64]
    reference = critic.image_processor(images=[grid.permute(1, 2, 0).numpy()], return_tensors="pt")["pixel_values"]
    ours = critic.pixel_values(pixels.float() / 255)
    assert ours.shape == (1, 3, 64, 64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)

    # Downsizing a 2x2 grid of 48 px views (96 -> 64): torch antialiased bicubic vs PIL bicubic on
    # uint8 agree to within a few grey levels.
    big = (random_views(1, size=48, seed=3) * 255).round().to(torch.uint8)
    grid = tile(big, GridLayout(2, 2), channels_last=False)[0]
    reference = critic.image_processor(images=[Image.fromarray(grid.permute(1, 2, 0).numpy())], return_tensors="pt")["pixel_values"]
    diff = (critic.pixel_values(big.float() / 255) - reference).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.3  # normalised units: 1 grey level is ~0.015


def test_non_square_grid_is_padded_with_the_mean_colour(tiny_dir, critic):
    wide = Critic(critic.model, critic.processor, CriticConfig(grid_rows=1, grid_cols=4))
    pixel_values = wide.pixel_values(torch.ones(1, 4, 3, 16, 16))  # a 16x64 strip, padded to 64x64
    assert pixel_values.shape == (1, 3, 64, 64)
    # The padding (rows 0-23 and 40-63 of the resized square) is the mean colour, 0 when normalised.
    torch.testing.assert_close(pixel_values[..., :20, :], torch.zeros(1, 3, 20, 64), rtol=0, atol=1e-5)
    torch.testing.assert_close(pixel_values[..., -20:, :], torch.zeros(1, 3, 20, 64), rtol=0, atol=1e-5)
    white = (1 - torch.tensor(wide._mean)) / torch.tensor(wide._std)
    torch.testing.assert_close(pixel_values[0, :, 32, 32], white, rtol=0, atol=1e-4)


def test_views_mode_sends_one_image_per_view(critic):
    multi = Critic(critic.model, critic.processor, CriticConfig(image_mode="views"))
    views = random_views(2)
    assert multi.pixel_values(views).shape == (8, 3, 64, 64)
    ids = multi.encode_prompts(PROMPTS[:2])["input_ids"]
    assert ((ids == critic.model.config.image_token_id).sum(1) == 4 * 64).all()
    with torch.no_grad():
        out = multi.score(views, PROMPTS[:2])
        single = multi.score(views[1:], PROMPTS[1:2])
        grid = critic.score(views, PROMPTS[:2])
    torch.testing.assert_close(out.margin[1:], single.margin, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.margin, grid.margin)


# the description before the images, so that a causal model's image tokens can attend to it
TEXT_FIRST = 'the description "{text}"\n<image>Does this 3D object match the description? Please answer yes or no.'


@pytest.mark.parametrize(("image_mode", "template"), [("grid", None), ("views", None), ("grid", TEXT_FIRST), ("views", TEXT_FIRST)])
def test_prompt_ids_after_the_first_call_equal_the_processors(critic, image_mode, template):
    """Later calls expand <image> themselves instead of preprocessing blank images: same ids."""
    config = CriticConfig(image_mode=image_mode) if template is None else CriticConfig(image_mode=image_mode, question_template=template)
    fresh = Critic(critic.model, critic.processor, config)
    first = fresh.encode_prompts(PROMPTS[:1])
    assert fresh._tokens_per_image == 64  # learnt and checked on the first call
    later = fresh.encode_prompts(PROMPTS)
    n_images = fresh.config.images_per_sample
    texts = [
        fresh.processor.apply_chat_template(prompt_messages(q, n_images), add_generation_prompt=True, tokenize=False)
        for q in fresh.questions(PROMPTS)
    ]
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    assert all(t.startswith(fresh.tokenizer.bos_token) for t in texts)  # so no second BOS from the tokenizer
    reference = fresh.processor(
        text=texts, images=[[blank] * n_images] * 3, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt"
    )
    assert torch.equal(later["input_ids"], reference["input_ids"])
    assert torch.equal(later["attention_mask"], reference["attention_mask"])
    assert torch.equal(first["input_ids"], reference["input_ids"][:1, : first["input_ids"].shape[1]])
    # the image tokens sit where the template puts them: after the caption's words or before them
    ids = later["input_ids"][1].tolist()
    image_id, green = critic.processor.image_token_id, critic.tokenizer.convert_tokens_to_ids("green")
    assert ids.count(image_id) == 64 * n_images
    assert (ids.index(green) < ids.index(image_id)) == (template is not None)


def test_prompt_ids_keep_using_the_processor_when_expanding_by_hand_differs(critic, monkeypatch):
    fresh = Critic(critic.model, critic.processor, CriticConfig())
    # A processor that adds something besides the image tokens: expanding by hand would be wrong.
    real_call = type(critic.processor).__call__
    monkeypatch.setattr(
        type(critic.processor), "__call__", lambda self, text, **kw: real_call(self, text=[t + " cube" for t in text], **kw)
    )
    cube = critic.tokenizer.convert_tokens_to_ids("cube")
    for _ in range(2):  # the first call finds the mismatch, the second still goes through the processor
        ids = fresh.encode_prompts(["one torus"])["input_ids"]
        assert fresh._tokens_per_image == 0
        assert ids[0, -1] == cube


def _rms_norm_in_input_precision(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_margin_gradient_matches_central_finite_differences(critic, monkeypatch):
    from transformers.models.llama import modeling_llama

    # Llama's RMSNorm computes in float32 even in a float64 model, which leaves ~1e-7 noise in the
    # scores, too much for finite differences; the same norm kept in float64 makes them exact.
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_precision)
    critic64 = Critic(copy.deepcopy(critic.model).double(), critic.processor, critic.config)
    # 24 px views: the 48 px grid is resized to 64 px, so the gradient goes through interpolation.
    views = random_views(2, size=24, seed=5).double().requires_grad_()
    critic64.score(views, PROMPTS[:2]).margin.sum().backward()
    grad = views.grad
    assert grad.shape == views.shape and torch.isfinite(grad).all()
    assert grad.abs().max() > 0

    gen = torch.Generator().manual_seed(1)
    flat = torch.randint(0, views.numel(), (6,), generator=gen).tolist()
    flat.append(int(grad.abs().flatten().argmax()))
    eps = 1e-5
    with torch.no_grad():
        for index in flat:
            bumped = views.detach().clone().flatten()
            bumped[index] += eps
            plus = critic64.score(bumped.view_as(views), PROMPTS[:2]).margin.sum()
            bumped[index] -= 2 * eps
            minus = critic64.score(bumped.view_as(views), PROMPTS[:2]).margin.sum()
            numeric = (plus - minus) / (2 * eps)
            analytic = grad.flatten()[index]
            assert torch.isclose(analytic, numeric, rtol=1e-5, atol=1e-8), (index, analytic.item(), numeric.item())


@pytest.mark.parametrize(
    ("views", "prompts", "match"),
    [
        (torch.rand(2, 4, 3, 8, 8), ["a red cube", " "], "empty"),
        (torch.rand(2, 4, 3, 8, 8), ["a red cube"], "2 samples of views but 1 prompts"),
        (torch.rand(1, 3, 3, 8, 8), ["a red cube"], "configured for 4"),
        (torch.rand(4, 3, 8, 8), ["a red cube"], "batch dimension"),
        (torch.rand(1, 4, 1, 8, 8), ["a red cube"], "3 \\(RGB\\) channels"),
        (torch.rand(1, 4, 3, 8, 8), "a red cube", "list of captions"),
        ([["not/a/file.png"] * 4], ["a red cube"], "cannot read image file"),
        ([[None] * 3], ["a red cube"], "has 3 views"),
        (torch.rand(1, 4, 3, 8, 8), ["a red <image> cube"], "image marker"),
    ],
)
def test_bad_input_gets_a_clear_error(critic, views, prompts, match):
    with pytest.raises(ValueError, match=match):
        critic.score(views, prompts)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="image_mode"):
        CriticConfig(image_mode="mosaic")
    with pytest.raises(ValueError, match="grid"):
        CriticConfig(num_views=4, grid_rows=3, grid_cols=3)
    with pytest.raises(ValueError, match="once"):
        CriticConfig(question_template="<image>{text}<image>")
    with pytest.raises(ValueError, match="view_distance"):
        CriticConfig(view_distance=0.0)
    with pytest.raises(ValueError, match="view_fov_y"):
        CriticConfig(view_fov_y=180.0)
    with pytest.raises(ValueError, match="view_distance"):
        CriticConfig(view_distance=float("nan"))


def test_orbit_is_the_recorded_training_camera(tmp_path):
    from coherendream.cameras import OrbitSpec

    assert CriticConfig().orbit() == OrbitSpec()  # nothing recorded: the design's default views
    config = CriticConfig(num_views=3, view_elevation=20.0, view_distance=2.1, view_fov_y=35.0)
    orbit = CriticConfig.load(config.save(tmp_path).parent).orbit()
    assert orbit.azimuths == [0.0, 120.0, 240.0]
    assert (orbit.elevation, orbit.distance, orbit.fov_y) == (20.0, 2.1, 35.0)


def test_adapter_round_trip_gives_the_in_memory_scores(tiny_dir, critic, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_dir, use_safetensors=True)
    from coherendream.library_warnings import library_deprecations_hidden

    with library_deprecations_hidden():  # PEFT's own deprecation, not the code under test
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # zero at init: perturb so the adapter changes the scores
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    config = CriticConfig(grid_rows=1, grid_cols=4)
    in_memory = Critic(peft_model.eval(), critic.processor, config)

    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    from_adapter = Critic.from_pretrained(tiny_dir, adapter=adapter_dir, device="cpu", config=config)
    saved = Critic.from_pretrained(in_memory.save_pretrained(tmp_path / "critic"), device="cpu")
    assert saved.config == config  # critic_config.json travels with the adapter
    assert not (tmp_path / "critic" / "model.safetensors").exists()  # adapter only, not the full model

    views = random_views(3, seed=7)
    with torch.no_grad():
        expected = in_memory.score(views, PROMPTS).margin
        plain = Critic(critic.model, critic.processor, config).score(views, PROMPTS).margin
        got_adapter = from_adapter.score(views, PROMPTS).margin
        got_saved = saved.score(views, PROMPTS).margin
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(got_adapter, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_saved, expected, rtol=1e-5, atol=1e-5)


def test_full_model_save_round_trip(critic, tmp_path):
    config = CriticConfig(image_mode="views", question_template='Is this "{text}"? Answer yes or no.')
    out_dir = Critic(critic.model, critic.processor, config).save_pretrained(tmp_path / "full")
    assert (out_dir / "model.safetensors").is_file()
    reloaded = Critic.from_pretrained(out_dir, device="cpu")
    assert reloaded.config == config
    views = random_views(2, seed=9)
    with torch.no_grad():
        expected = Critic(critic.model, critic.processor, config).score(views, PROMPTS[:2]).margin
        torch.testing.assert_close(reloaded.score(views, PROMPTS[:2]).margin, expected, rtol=1e-6, atol=1e-6)
    assert np.isfinite(expected.numpy()).all()
