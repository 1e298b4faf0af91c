"""A tiny, randomly initialised Stable-Diffusion-shaped prior for offline tests.

``build_tiny_prior(save_dir)`` writes a standard diffusers pipeline folder (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; weights as safetensors)
that ``StableDiffusionPipeline.from_pretrained(save_dir, safety_checker=None)`` and
``SDSGuidance.from_pretrained(save_dir)`` load without any network access. Nothing is
downloaded: every component is built from a config with random weights, and the CLIP tokenizer's
vocabulary is generated here (the 256 byte-level symbols, each with and without the ``</w>``
end-of-word suffix, plus the two CLIP special tokens; no merges), so every string tokenizes.

Shapes of the tiny prior (chosen so that one UNet pass on CPU takes milliseconds):

- VAE: 3 blocks, block_out_channels ``(32, 32, 64)`` -> spatial **downsampling x4** (the pipeline's
  ``vae_scale_factor = 2 ** (len(block_out_channels) - 1)``), 4 latent channels; SD's
  ``scaling_factor`` 0.18215 is kept so the latent scale convention is the real one.
- UNet: block_out_channels ``(32, 64)``, 1 layer per block, cross-attention dim 32,
  ``sample_size`` 8 latents -> the native image size is ``8 * 4 = 32`` pixels.
- Text encoder: 2-layer CLIP text transformer, hidden size 32, 77 positions (SD's context).
- Scheduler: ``DDPMScheduler`` with 1000 steps and SD's ``scaled_linear`` betas
  (0.00085 -> 0.012), epsilon prediction.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: Native image resolution of the tiny prior: UNet sample_size (8) x VAE downsampling (4).
TINY_PRIOR_RESOLUTION = 32
TINY_PRIOR_LATENT_SIZE = 8
TINY_PRIOR_VAE_SCALE = 4

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: each of the 256 bytes -> one printable unicode character.

    Printable Latin-1 bytes map to themselves; the rest are shifted above U+0100 so that no
    byte maps to whitespace or a control character (the BPE model splits on neither).
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_clip_vocab() -> dict[str, int]:
    """Vocabulary of the tiny CLIP tokenizer: 256 symbols, 256 ``symbol</w>``, BOS, EOS (514 ids)."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    # CLIP's BPE marks the last symbol of each word with "</w>"; without merges every word
    # becomes single symbols, the last one suffixed, so both forms must be in the vocabulary.
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    return vocab


def build_tiny_prior(save_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random SD-style pipeline and save it (safetensors) under ``save_dir``.

    Args:
        save_dir: Folder to write; created if missing. Existing component files are overwritten.
        seed: Seed of the random initialisation, so the same seed gives the same weights.

    Returns:
        ``Path(save_dir)``, loadable offline with
        ``StableDiffusionPipeline.from_pretrained(save_dir, safety_checker=None)``.
    """
    # Imported here so that importing the generation package stays cheap for callers that run
    # with ``prior: none`` and never touch diffusers.
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)

    # A private generator-seeded init: fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_PRIOR_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=32,
            # SD 2.x uses linear projections in its transformer blocks; keep the same layout.
            use_linear_projection=True,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=TINY_PRIOR_RESOLUTION,
            scaling_factor=0.18215,
        )
        vocab = tiny_clip_vocab()
        text_config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=vocab[_BOS],
            eos_token_id=vocab[_EOS],
            pad_token_id=vocab[_EOS],
        )
        text_encoder = CLIPTextModel(text_config)

    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(save_dir, safe_serialization=True)
    # A short note for whoever finds the folder: these weights are noise, not a model.
    (save_dir / "README.md").write_text(
        "# Tiny random Stable-Diffusion-shaped prior\n\n"
        "Built by `coherendream.generation.tiny_prior.build_tiny_prior` for offline tests. "
        f"Random weights (seed {seed}); outputs are meaningless. "
        f"Native resolution {TINY_PRIOR_RESOLUTION} px, VAE downsampling x{TINY_PRIOR_VAE_SCALE}.\n",
        encoding="utf-8",
    )
    # json dump of the key facts, handy for tests and tooling that should not parse README text.
    (save_dir / "tiny_prior.json").write_text(
        json.dumps(
            {"seed": seed, "resolution": TINY_PRIOR_RESOLUTION, "latent_size": TINY_PRIOR_LATENT_SIZE, "vae_scale_factor": TINY_PRIOR_VAE_SCALE}
        ),
        encoding="utf-8",
    )
    return save_dir
