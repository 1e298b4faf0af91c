"""Small pixel-space text-to-image priors with DeepFloyd IF's folder layout, built offline.

``build_pixel_prior(...)`` returns a :class:`PixelPriorPipeline` whose four components have the
layout of ``DeepFloyd/IF-I-XL-v1.0`` (``unet/``, ``text_encoder/`` a T5 encoder, ``tokenizer/``,
``scheduler/``, ``model_index.json``; no ``vae/``), at a size that trains on a CPU:

- UNet: ``UNet2DConditionModel`` on RGB pixels in [-1, 1] at ``sample_size`` px, cross-attention
  to the text encoder's last hidden state. ``learned_variance=True`` doubles the output channels
  (noise + variance, as IF's UNet); the embedded prior predicts the noise only.
- Text encoder: a randomly initialised ``T5EncoderModel`` (v1.1 style, gated-GELU) of a few
  layers, trained together with the UNet.
- Tokenizer: word level (``tokenizers``' ``WordLevel`` wrapped in ``PreTrainedTokenizerFast``)
  over the procedural vocabulary and the view words that view-dependent prompting appends
  ("..., front view"), with T5's conventions: ``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2,
  lower-cased input. 77 positions, the length IF's pipeline pads to.
- Scheduler: ``DDPMScheduler`` with 1000 steps and the cosine (``squaredcos_cap_v2``) betas of IF.

The same function builds the random IF-shaped pipeline of the tests and the initial weights of the
embedded prior (``coherendream.generation.embedded``), which its recipe then trains from scratch
(``recipes/embedded_prior/train.py``). ``save_pretrained`` writes safetensors; the folder loads
with ``PixelPriorPipeline.from_pretrained`` (sampling) and ``SDSGuidance.from_pretrained`` (SDS).
diffusers' own ``IFPipeline`` needs learned-variance channels, which the embedded prior does not
predict, hence a pipeline class of our own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from coherendream.vocabulary import caption_words
from coherendream.generation.guidance import TEXT_MAX_LENGTH, classifier_free_guidance, has_vae, read_model_index
from coherendream.grid import GridLayout, tile
from coherendream.io import check_safetensors

__all__ = [
    "EMBEDDED_PRIOR",
    "PixelPriorPipeline",
    "PixelPriorShapes",
    "build_pixel_prior",
    "build_word_tokenizer",
    "default_prior_path",
    "image_grid",
    "load_prior_pipeline",
    "prior_vocabulary",
    "sample_images",
]

#: The embedded prior shipped with the package (trained by ``recipes/embedded_prior``).
EMBEDDED_PRIOR = Path(__file__).resolve().parent / "embedded"

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
_PUNCTUATION = tuple(".,:;?!\"'()-/")
# What view-dependent prompting appends (``camera_sampler.view_prompt``: "<prompt>, <dir> view").
_VIEW_WORDS = ("front", "side", "back", "overhead", "view")


def default_prior_path() -> Path:
    """The embedded prior: the default prior wherever none is named on a CPU."""
    if not (EMBEDDED_PRIOR / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded prior is missing at {EMBEDDED_PRIOR}; give a prior path or hub id")
    return EMBEDDED_PRIOR


def prior_vocabulary() -> list[str]:
    """Words of the word-level tokenizer: procedural captions, view words, punctuation (fixed order)."""
    words = caption_words()
    words += _VIEW_WORDS
    words += _PUNCTUATION
    return list(dict.fromkeys(words))


def build_word_tokenizer(words: list[str] | None = None, model_max_length: int = TEXT_MAX_LENGTH) -> Any:
    """Word-level ``PreTrainedTokenizerFast`` with T5's special-token conventions.

    Input is lower-cased and split on whitespace and punctuation; every word not in ``words``
    becomes ``<unk>``; ``</s>`` ends every sequence. Its ``save_pretrained`` folder loads with
    ``AutoTokenizer.from_pretrained`` (no remote code).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in dict.fromkeys(words or prior_vocabulary()) if w not in (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)]
    vocab = {tok: i for i, tok in enumerate((PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    backend.post_processor = processors.TemplateProcessing(single=f"$A {EOS_TOKEN}", pair=f"$A $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, vocab[EOS_TOKEN])])
    backend.add_special_tokens([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
        padding_side="right", model_max_length=model_max_length,
    )  # fmt: skip


class PixelPriorPipeline(DiffusionPipeline):
    """Text-to-image sampling from a pixel-space prior (IF stage I's components, or the embedded prior).

    ``PixelPriorPipeline.from_pretrained(folder)`` loads ``unet/``, ``text_encoder/``,
    ``tokenizer/`` and ``scheduler/`` of a folder with IF's layout. Unlike diffusers' ``IFPipeline``
    it also takes a UNet that predicts the noise only (3 output channels); with learned-variance
    channels it keeps the noise half, so any scheduler (e.g. DDIM, for few steps) can sample.
    Prompts are padded to 77 tokens, the text encoder sees the attention mask, and the
    unconditional branch is the encoding of ``negative_prompt`` (IF's convention).
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: Any, text_encoder: Any, tokenizer: Any, scheduler: Any) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """``[B, 77, D]`` last hidden state of the text encoder (padding masked inside the encoder)."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt")
        device = self.text_encoder.device
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)).last_hidden_state
        return hidden.to(self.unet.device, self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        output_type: str = "pt",
    ) -> Any:
        """Sample images: ``output_type="pt"`` gives ``.images`` ``[B, 3, S, S]`` float in [0, 1],
        ``"pil"`` a list of PIL images (``B = len(prompts) * num_images_per_prompt``)."""
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        B, C = len(prompts), int(self.unet.config.in_channels)
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        cfg = guidance_scale > 1.0
        text = self.encode_prompt(prompts)
        if cfg:
            text = torch.cat([text, self.encode_prompt([negative_prompt] * B)])
        self.scheduler.set_timesteps(num_inference_steps, device=self.unet.device)
        x = randn_tensor((B, C, size, size), generator=generator, device=self.unet.device, dtype=self.unet.dtype)
        x = x * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
            out = self.unet(x_in, t, encoder_hidden_states=text).sample[:, :C]  # the noise half
            if cfg:
                eps_c, eps_u = out.chunk(2)
                out = classifier_free_guidance(eps_u, eps_c, guidance_scale).to(x.dtype)
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        images = (x.float() / 2 + 0.5).clamp(0, 1).cpu()
        if output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
        return ImagePipelineOutput(images=images)


@dataclass
class PixelPriorShapes:
    """Sizes of a pixel-space prior (defaults: the embedded prior, 2.8 M parameters in all).

    ``block_out_channels``: UNet widths per resolution level (the first level has no attention,
    the others cross-attend to the text); ``attention_head_dim`` is diffusers' name for the
    number of attention heads of ``UNet2DConditionModel``; ``text_*``: the T5 encoder.
    """

    sample_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    layers_per_block: int = 1
    attention_head_dim: int = 2
    norm_num_groups: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 128
    learned_variance: bool = False


def build_pixel_prior(shapes: PixelPriorShapes | None = None, *, words: list[str] | None = None, seed: int = 0) -> PixelPriorPipeline:
    """A randomly initialised pixel-space prior as a :class:`PixelPriorPipeline` (see the module docstring).

    Args:
        shapes: Model sizes; default :class:`PixelPriorShapes()`.
        words: Tokenizer vocabulary; default :func:`prior_vocabulary`.
        seed: Seed of the initial weights (the caller's global RNG state is left untouched).
    Returns:
        :class:`PixelPriorPipeline` over ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    s = shapes or PixelPriorShapes()
    tokenizer = build_word_tokenizer(words)
    levels = len(s.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer), d_model=s.text_hidden, d_kv=s.text_hidden // s.text_heads, d_ff=s.text_ff,
                num_layers=s.text_layers, num_heads=s.text_heads, relative_attention_num_buckets=16,
                dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            )
        )  # fmt: skip
        unet = UNet2DConditionModel(
            sample_size=s.sample_size,
            in_channels=3,
            out_channels=6 if s.learned_variance else 3,
            block_out_channels=tuple(s.block_out_channels),
            layers_per_block=s.layers_per_block,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            cross_attention_dim=s.text_hidden,
            attention_head_dim=s.attention_head_dim,
            norm_num_groups=s.norm_num_groups,
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        variance_type="learned_range" if s.learned_variance else "fixed_small",
        # No clipping of the x0 prediction: with guidance it pins the white background's +1 and
        # sampling (DDIM, CFG 3-5) then turns into noise-covered squares; unclipped it does not.
        clip_sample=False,
    )
    return PixelPriorPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def load_prior_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu", local_files_only: bool = False) -> DiffusionPipeline:
    """A text-to-image pipeline for sampling from any prior folder, with a DDIM scheduler.

    ``path``: a pixel-space folder (no ``vae/``: the embedded prior, IF stage I) loads as a
    :class:`PixelPriorPipeline`; a latent one (SD) as diffusers' ``StableDiffusionPipeline``
    without safety checker. ``None`` = the embedded prior. Weights from safetensors only.
    """
    from diffusers import DDIMScheduler

    path = str(path) if path is not None else str(default_prior_path())
    check_safetensors(path, "prior")
    index = read_model_index(path, local_files_only=local_files_only)
    kwargs = {"use_safetensors": True, "local_files_only": local_files_only}
    if has_vae(index):
        # imported here: importing it loads transformers' CLIP/SigLIP image processors, which warn
        # on every command of a machine without torchvision, where the embedded prior needs neither
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False, **kwargs)
    else:
        pipe = PixelPriorPipeline.from_pretrained(path, **kwargs)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe.to(device)


def sample_images(pipe: DiffusionPipeline, prompts: list[str], num_inference_steps: int = 50, guidance_scale: float = 5.0,
                  seed: int = 0, batch_size: int = 64) -> torch.Tensor:  # fmt: skip
    """``[len(prompts), 3, S, S]`` float samples in [0, 1], one per prompt, in batches.

    Each batch draws from its own generator, seeded ``seed + index of its first prompt``: the same
    prompts, seed and batch size give the same images.
    """
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(prompts), batch_size):
        generator = torch.Generator().manual_seed(seed + start)
        chunk = prompts[start : start + batch_size]
        images = pipe(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator, output_type="pt").images
        out.append(images.float().cpu())
    return torch.cat(out)


def image_grid(images: torch.Tensor, rows: int, labels: list[str] | None = None, scale: int = 2) -> Any:
    """A PIL grid of ``[N, 3, S, S]`` images in [0, 1], ``rows`` rows, each row's label on its left."""
    from PIL import Image, ImageDraw

    n, _, s, _ = images.shape
    cols = -(-n // rows)
    cell = s * scale
    margin = 8 + 7 * max((len(t) for t in labels), default=0) if labels else 0
    cells = torch.ones(rows * cols, 3, s, s)  # white where the last row is short
    cells[:n] = images.clamp(0, 1)
    body = (tile(cells, GridLayout(rows, cols), channels_last=False).permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
    grid = Image.new("RGB", (margin + cols * cell, rows * cell), "white")
    grid.paste(Image.fromarray(body).resize((cols * cell, rows * cell), Image.NEAREST), (margin, 0))
    draw = ImageDraw.Draw(grid)
    for r, text in enumerate(labels or []):
        draw.text((4, r * cell + cell // 2 - 5), text, fill="black")
    return grid
