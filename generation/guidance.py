"""Score distillation sampling (SDS) from a diffusers text-to-image diffusion model.

This is the "Prior" of TCSD generation (design card, "Generation (TCSD)"). Two kinds of model sit
behind one interface, chosen from the pipeline folder's contents:

- **latent** (a ``vae/`` folder: Stable Diffusion): renders are resized to the model's size and
  encoded by the VAE; the "latents" below are the VAE's scaled latents;
- **pixel-space** (no ``vae/``: DeepFloyd IF stage I, the embedded prior): renders are resized to
  the UNet's ``sample_size`` and mapped to [-1, 1]; the "latents" below are those pixels. A UNet
  whose output carries learned-variance channels (IF: 6 = noise + variance) contributes its noise
  half only.

The renders are noised at a random timestep ``t``, and the frozen UNet's classifier-free-guided
noise prediction gives the per-latent gradient

    grad = w(t) * (eps_hat - eps),   eps_hat = eps_u + s * (eps_c - eps_u),   w(t) = 1 - alpha_bar_t

which is made finite (``nan_to_num``), optionally clipped elementwise, and applied with the
detached-target trick

    loss_sds = 0.5 * mse(latents, (latents - grad).detach(), reduction="sum") / B

whose derivative with respect to ``latents`` is exactly ``grad / B``: autograd then carries the
gradient through the VAE encoder (or the resize) into the renders without ever differentiating the
UNet.

Conventions:

- Images are ``[B, 3, H, W]`` float tensors in ``[0, 1]``; latents are ``[B, C, h, w]`` in the
  model's scaled latent space (``vae.encode(2 * rgb - 1).mode() * scaling_factor``), or for a
  pixel-space model ``2 * resize(rgb) - 1`` (``C = 3``).
- **One timestep per call, shared by every sample of the batch** (MVDream style): the B images
  of a call are views of the same object at the same optimisation step, and a shared ``t`` keeps
  their gradients at one noise level (and makes the weights ``w(t)`` equal across views). The
  noise ``eps`` is drawn independently per sample.
- The range ``t ~ U[min_step, max_step]`` (integer timesteps, both ends included) can be annealed
  linearly over a window of optimisation steps, see :class:`SDSConfig`.
- ``prior: none`` is the generator's business: it simply does not build an :class:`SDSGuidance`.

Noising is the scheduler's own ``add_noise`` and noise is diffusers' ``randn_tensor``; the pure
functions (:func:`classifier_free_guidance`, :func:`sds_weight`, :func:`sds_gradient`, :func:`sds_loss`, :func:`predict_x0`, :func:`to_epsilon`) hold all of the
maths, so that reward-weighted SDS can encode once (:meth:`SDSGuidance.encode_images`), call
:meth:`SDSGuidance.guidance_from_latents` for several noise draws at one ``t``, and weight the
resulting gradients before applying :func:`sds_loss` to their weighted sum.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch
import torch.nn.functional as F

from coherendream.devices import cpu_dtype
from coherendream.io import check_safetensors
from coherendream.prompts import unreadable_text
from coherendream.generation.camera_sampler import view_direction, view_prompt  # re-exported in __all__

if TYPE_CHECKING:  # pragma: no cover - typing only; diffusers/transformers load lazily.
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: The prior used on a GPU when none is named (the design's default latent prior).
DEFAULT_GPU_PRIOR = "stabilityai/stable-diffusion-2-1-base"
# Text encoders a prior folder may name in its model_index.json. The class is looked up in this
# table, never imported from the name, so a downloaded config cannot select code to run.
_TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
#: SD's CLIP context, and the length IF's pipeline pads its T5 prompts to.
TEXT_MAX_LENGTH = 77
TEXT_CACHE_SIZE = 256  # prompts whose text embeddings an SDSGuidance keeps (least recently used dropped)


def has_vae(model_index: dict) -> bool:
    """Whether a pipeline's ``model_index.json`` names a VAE: a latent model (SD); else pixel-space (IF)."""
    return (model_index.get("vae") or [None, None])[1] is not None


def read_model_index(path: str, **hub: Any) -> dict:
    """A diffusers pipeline folder's or hub repo's ``model_index.json`` (``hub``: ``revision``,
    ``local_files_only``); ``FileNotFoundError`` naming the prior when there is none."""
    from diffusers import DiffusionPipeline

    from coherendream.library_warnings import library_deprecations_hidden

    try:
        with library_deprecations_hidden():
            return DiffusionPipeline.load_config(path, **hub)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"prior {path!r}: no diffusers pipeline there (model_index.json could not be read: {err})") from err


__all__ = [
    "SDSConfig",
    "GuidanceOutput",
    "SDSGuidance",
    "classifier_free_guidance",
    "sds_weight",
    "sds_gradient",
    "sds_loss",
    "predict_x0",
    "to_epsilon",
    "view_direction",
    "view_prompt",
]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class SDSConfig:
    """Settings of the SDS prior.

    Attributes:
        pretrained_model_name_or_path: Hub id or local folder of a diffusers pipeline: latent
            (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; SD) or
            pixel-space (the same without ``vae/``; DeepFloyd IF stage I, the embedded prior).
            Weights must be safetensors; no remote code is ever run. ``None``: the embedded prior
            on a CPU, ``stabilityai/stable-diffusion-2-1-base`` on a GPU.
        revision: Hub revision (branch, tag or commit) to pin; ``None`` = the default branch.
        variant: Weights variant to load, e.g. ``"fp16"`` for IF's ``*.fp16.safetensors``.
        local_files_only: Never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
        guidance_scale: CFG scale ``s`` in ``eps_u + s * (eps_c - eps_u)``; 100 is SDS's usual
            value for SD (DreamFusion/threestudio), much higher than sampling's 7.5; 20 for IF.
        negative_prompt: Text of the unconditional branch ("" = the usual unconditional).
        min_step_percent, max_step_percent: ``t`` range as fractions of the training timesteps
            at the start of the annealing window (``0.02, 0.98`` -> t in [20, 980] for 1000 steps).
        min_step_percent_end, max_step_percent_end: The bounds reached at ``anneal_end_step``;
            ``None`` keeps that bound constant. Default: the upper bound falls from 0.98 to 0.5,
            so late steps refine details with less noise instead of re-imagining the shape.
        anneal_start_step, anneal_end_step: Optimisation-step window of the linear annealing.
            Before the window the start values apply, after it the end values; set the window to
            (a fraction of) the run's length. ``step=None`` in a call means "no annealing".
        weighting: ``"sds"``: ``w(t) = 1 - alpha_bar_t`` (DreamFusion); ``"uniform"``: ``w = 1``.
        grad_clip: Elementwise bound ``|grad| <= grad_clip`` on the latent gradient, a safety
            net against rare exploding predictions at high CFG; ``None`` disables clipping.
        half_precision: Load the networks in half precision (``half_dtype``): on CUDA either kind;
            on a CPU only bf16 and only where the CPU has bf16 units (AVX512-BF16, AMX, Arm BF16):
            there it ran the embedded prior's UNet 1.7x faster than float32, while a CPU without
            them emulates bf16 23x slower (docs/benchmarks.md), so it gets float32. fp16 is
            float32 on any CPU. The SDS gradient itself is always computed in float32.
        half_dtype: ``"fp16"`` or ``"bf16"`` (bf16 has fp32's range: no VAE overflows).
        text_encoder_device: Where the text encoder runs; ``None`` = with the UNet. ``"cpu"``
            keeps a large encoder (IF's T5-XXL, 9.5 GB in fp16) off the GPU: each distinct prompt
            is encoded once per run and cached, so its slowness there costs seconds, not steps.
        resolution: Side (px) the renders are resized to before the VAE (or, pixel-space, the
            UNet). ``None`` = the model's native size, ``unet.sample_size * vae_scale_factor``
            (512 for SD 2.1-base, 64 for IF stage I, 32 for the embedded and tiny test priors).
        view_dependent_prompting: Whether :meth:`SDSGuidance.prompts_for_views` appends
            "front/side/back/overhead view" to the prompt (DreamFusion's view-dependent text).
    """

    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    local_files_only: bool = False
    guidance_scale: float = 100.0
    negative_prompt: str = ""
    min_step_percent: float = 0.02
    max_step_percent: float = 0.98
    min_step_percent_end: float | None = None
    max_step_percent_end: float | None = 0.5
    anneal_start_step: int = 0
    anneal_end_step: int = 5000
    weighting: Literal["sds", "uniform"] = "sds"
    grad_clip: float | None = 8.0
    half_precision: bool = True
    half_dtype: Literal["fp16", "bf16"] = "fp16"
    text_encoder_device: str | None = None
    resolution: int | None = None
    view_dependent_prompting: bool = True

    def __post_init__(self) -> None:
        lo_end = self.min_step_percent if self.min_step_percent_end is None else self.min_step_percent_end
        hi_end = self.max_step_percent if self.max_step_percent_end is None else self.max_step_percent_end
        for name, lo, hi in (("start", self.min_step_percent, self.max_step_percent), ("end", lo_end, hi_end)):
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"t range at the {name} of annealing must satisfy 0 <= min <= max <= 1, got [{lo}, {hi}]")
        if self.anneal_end_step < self.anneal_start_step:
            raise ValueError(f"anneal_end_step ({self.anneal_end_step}) < anneal_start_step ({self.anneal_start_step})")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.resolution is not None and self.resolution <= 0:
            raise ValueError(f"resolution must be positive or None, got {self.resolution}")
        if self.weighting not in ("sds", "uniform"):
            raise ValueError(f"weighting must be 'sds' or 'uniform', got {self.weighting!r}")
        if self.half_dtype not in ("fp16", "bf16"):
            raise ValueError(f"half_dtype must be 'fp16' or 'bf16', got {self.half_dtype!r}")

    def step_percent_range(self, step: int | None) -> tuple[float, float]:
        """``(min, max)`` fractions of the t range at optimisation ``step`` (linear annealing)."""
        lo0, hi0 = self.min_step_percent, self.max_step_percent
        if step is None:
            return lo0, hi0
        lo1 = lo0 if self.min_step_percent_end is None else self.min_step_percent_end
        hi1 = hi0 if self.max_step_percent_end is None else self.max_step_percent_end
        span = self.anneal_end_step - self.anneal_start_step
        if span == 0:
            frac = 0.0 if step < self.anneal_start_step else 1.0
        else:
            frac = min(max((step - self.anneal_start_step) / span, 0.0), 1.0)
        return lo0 + frac * (lo1 - lo0), hi0 + frac * (hi1 - hi0)

    def wanted_dtype(self) -> torch.dtype:
        """The dtype the settings ask for (:meth:`torch_dtype` decides what a device gets)."""
        if not self.half_precision:
            return torch.float32
        return torch.bfloat16 if self.half_dtype == "bf16" else torch.float16

    def torch_dtype(self, device: torch.device | str) -> torch.dtype:
        """Weights dtype for ``device``: on CUDA the asked-for one; on a CPU bf16 only where the CPU
        has bf16 units (:func:`coherendream.devices.cpu_dtype`), float32 otherwise."""
        if torch.device(device).type == "cpu":
            return cpu_dtype(self.wanted_dtype())
        return self.wanted_dtype()


@dataclass
class GuidanceOutput:
    """Result of one SDS evaluation (B samples, latents ``[B, C, h, w]``).

    Attributes:
        loss_sds: Scalar; ``d loss_sds / d latents == grad / B``. Backpropagate it to the renders.
        grad: ``[B, C, h, w]`` float32, ``w(t) * (eps_hat - eps)``, finite and clipped.
        t: ``[B]`` long timesteps (all equal within a call).
        w: ``[B]`` float32 weights ``w(t)``.
        noise: ``[B, C, h, w]`` the Gaussian noise ``eps`` that was added.
        noise_pred: ``[B, C, h, w]`` CFG prediction ``eps_hat`` (as epsilon, whatever the
            model's prediction type).
        noise_pred_text, noise_pred_uncond: ``[B, C, h, w]`` the two branches of the CFG.
        latents: ``[B, C, h, w]`` encoded renders, attached to the renders' autograd graph.
        latents_noisy: ``[B, C, h, w]`` ``sqrt(ab_t) * latents + sqrt(1 - ab_t) * noise`` (detached).
        pred_x0: ``[B, C, h, w]`` one-step clean-latent prediction from ``eps_hat`` (detached);
            :meth:`SDSGuidance.decode_latents` turns it into RGB in [0, 1].
    """

    loss_sds: torch.Tensor
    grad: torch.Tensor
    t: torch.Tensor
    w: torch.Tensor
    noise: torch.Tensor
    noise_pred: torch.Tensor
    noise_pred_text: torch.Tensor
    noise_pred_uncond: torch.Tensor
    latents: torch.Tensor
    latents_noisy: torch.Tensor
    pred_x0: torch.Tensor


# --------------------------------------------------------------------------------------------
# Pure functions (no model state): the maths of SDS
# --------------------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather ``values[t]`` ([B]) and shape it ``[B, 1, ..., 1]`` to broadcast against ``like``."""
    out = values.to(device=like.device, dtype=torch.float32)[t.to(like.device).long()]
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def classifier_free_guidance(noise_pred_uncond: torch.Tensor, noise_pred_text: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``eps_u + s * (eps_c - eps_u)`` (float32)."""
    eps_u = noise_pred_uncond.float()
    return eps_u + guidance_scale * (noise_pred_text.float() - eps_u)


def sds_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, weighting: str = "sds") -> torch.Tensor:
    """``[B]`` SDS weights: ``1 - alpha_bar_t`` (``"sds"``) or ones (``"uniform"``)."""
    ab = alphas_cumprod.to(torch.float32)[t.to(alphas_cumprod.device).long()]
    if weighting == "sds":
        return 1.0 - ab
    if weighting == "uniform":
        return torch.ones_like(ab)
    raise ValueError(f"unknown SDS weighting {weighting!r}")


def sds_gradient(
    noise_pred_uncond: torch.Tensor,
    noise_pred_text: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t: torch.Tensor,
    guidance_scale: float,
    clip: float | None = None,
    weighting: str = "sds",
) -> torch.Tensor:
    """SDS gradient on the latents, ``w(t) * (eps_hat - eps)``, made finite and clipped.

    Args:
        noise_pred_uncond, noise_pred_text: ``[B, C, h, w]`` epsilon predictions of the two CFG
            branches at ``x_t``.
        noise: ``[B, C, h, w]`` the noise ``eps`` that produced ``x_t``.
        alphas_cumprod: ``[T]``; t: ``[B]`` integer timesteps.
        guidance_scale: CFG scale ``s``.
        clip: Elementwise bound on ``|grad|``; ``None`` = no clipping.
        weighting: see :func:`sds_weight`.
    Returns:
        ``[B, C, h, w]`` float32 on ``noise``'s device. Non-finite entries (NaN, +-inf) become 0:
        a non-finite prediction says nothing about the direction to move, and mapping inf to the
        dtype's maximum (``torch.nan_to_num``'s default) would blow up the step when ``clip`` is
        ``None``. Clipping happens after, so it bounds every entry that survives.
    """
    eps_hat = classifier_free_guidance(noise_pred_uncond, noise_pred_text, guidance_scale)
    w = sds_weight(alphas_cumprod, t, weighting).to(eps_hat.device).reshape(-1, *([1] * (eps_hat.ndim - 1)))
    grad = w * (eps_hat - noise.float())
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if clip is not None:
        grad = grad.clamp(-clip, clip)
    return grad


def sds_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Detached-target SDS loss ``0.5 * sum((latents - (latents - grad).detach())**2) / B``.

    Its value is ``0.5 * ||grad||^2 / B`` (a diagnostic, not an objective being minimised) and its
    derivative with respect to ``latents`` is ``grad / B``, so backpropagating it applies the SDS
    gradient, averaged over the batch, to whatever produced ``latents``.
    """
    latents = latents.float()
    target = (latents - grad.to(latents.device, torch.float32)).detach()
    return 0.5 * F.mse_loss(latents, target, reduction="sum") / latents.shape[0]


def predict_x0(latents_noisy: torch.Tensor, noise_pred: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One-step clean-latent estimate ``(x_t - sqrt(1 - ab_t) * eps_hat) / sqrt(ab_t)`` (float32)."""
    ab = _per_sample(alphas_cumprod, t, latents_noisy)
    return (latents_noisy.float() - (1.0 - ab).sqrt() * noise_pred.float()) / ab.sqrt()


def to_epsilon(model_output: torch.Tensor, latents_noisy: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a UNet output to an epsilon prediction.

    ``"epsilon"`` passes through; ``"v_prediction"`` (SD 2.x at 768 px) uses
    ``eps = sqrt(ab_t) * v + sqrt(1 - ab_t) * x_t``; ``"sample"`` uses
    ``eps = (x_t - sqrt(ab_t) * x0) / sqrt(1 - ab_t)``. Returns float32.
    """
    out = model_output.float()
    if prediction_type == "epsilon":
        return out
    ab = _per_sample(alphas_cumprod, t, latents_noisy)
    x_t = latents_noisy.float()
    if prediction_type == "v_prediction":
        return ab.sqrt() * out + (1.0 - ab).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - ab.sqrt() * out) / (1.0 - ab).sqrt()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


# --------------------------------------------------------------------------------------------
# The guidance module
# --------------------------------------------------------------------------------------------


class SDSGuidance:
    """Frozen diffusion prior (latent or pixel-space) that turns renders into an SDS loss.

    Build it with :meth:`from_pretrained` (hub id or local folder) or from already loaded
    components (``vae=None``: pixel-space). All networks are frozen (``requires_grad_(False)``,
    ``eval()``); the only gradients that flow are those from ``loss_sds`` back through the VAE
    encoder (or the resize) into the renders.

    Text embeddings are computed once per distinct prompt (the negative prompt included) and kept
    in a per-instance cache, so view-dependent prompts ("..., side view") cost one text-encoder
    pass each for the whole run.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL | None,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: SchedulerMixin,
        config: SDSConfig | None = None,
    ) -> None:
        self.config = config if config is not None else SDSConfig()
        self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler = unet, vae, text_encoder, tokenizer, scheduler
        for module in (unet, vae, text_encoder):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = str(getattr(scheduler.config, "prediction_type", "epsilon"))
        # Kept in float32 whatever the weights' dtype: 1 - ab_t near t=0 underflows in fp16.
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(self.device, torch.float32)
        self.vae_scale_factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(unet.config.in_channels)
        sample_size = unet.config.sample_size
        sample_size = sample_size[0] if isinstance(sample_size, (tuple, list)) else int(sample_size)
        self.resolution = self.config.resolution or sample_size * self.vae_scale_factor
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ----- construction ---------------------------------------------------------------------

    @property
    def pixel_space(self) -> bool:
        """True for a model without a VAE (IF stage I, the embedded prior)."""
        return self.vae is None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path | None = None,
        config: SDSConfig | None = None,
        device: torch.device | str | None = None,
    ) -> SDSGuidance:
        """Load a diffusers pipeline's components and freeze them.

        The folder's ``model_index.json`` decides the kind: a ``vae`` entry means a latent model,
        none a pixel-space one; its ``text_encoder`` entry must name one of CLIP's or T5's
        encoders (looked up in a fixed table). Safety checkers, watermarkers and feature
        extractors are never loaded.

        Args:
            pretrained_model_name_or_path: Hub id or local folder; overrides
                ``config.pretrained_model_name_or_path`` when given. Neither given: the embedded
                prior on a CPU, :data:`DEFAULT_GPU_PRIOR` on CUDA.
            config: Settings; defaults to :class:`SDSConfig()`.
            device: Where to run; default CUDA when available, else CPU. The weights dtype
                follows :meth:`SDSConfig.torch_dtype`.
        """
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer

        config = config if config is not None else SDSConfig()
        if pretrained_model_name_or_path is not None:
            config = dataclasses.replace(config, pretrained_model_name_or_path=str(pretrained_model_name_or_path))
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if config.pretrained_model_name_or_path is None:
            from coherendream.generation.pixel_prior import default_prior_path

            default = str(default_prior_path()) if device.type == "cpu" else DEFAULT_GPU_PRIOR
            config = dataclasses.replace(config, pretrained_model_name_or_path=default)
        text_device = torch.device(config.text_encoder_device) if config.text_encoder_device else device
        dtype = config.torch_dtype(device)
        path = config.pretrained_model_name_or_path
        check_safetensors(path, "prior")
        hub = {"revision": config.revision, "local_files_only": config.local_files_only}
        index = read_model_index(path, **hub)
        text_class = (index.get("text_encoder") or [None, None])[1]
        if text_class not in _TEXT_ENCODERS:
            raise ValueError(f"prior {path!r}: text encoder {text_class!r} is not supported (one of {', '.join(_TEXT_ENCODERS)})")
        latent = has_vae(index)
        weights = {"use_safetensors": True, "variant": config.variant, **hub}
        # Concrete classes, not Auto*: nothing named in a downloaded config can select code to
        # run, and use_safetensors=True refuses pickled weights outright.
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **weights)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **weights) if latent else None
        text_encoder = getattr(transformers, text_class).from_pretrained(path, subfolder="text_encoder", dtype=config.torch_dtype(text_device), **weights)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **hub)
        # Only alphas_cumprod and the prediction type are used; DDPMScheduler reads any SD or IF
        # scheduler config (PNDM, DDIM...) since they share the beta schedule fields.
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **hub)
        unet.to(device)
        if vae is not None:
            vae.to(device)
        text_encoder.to(text_device)
        return cls(unet, vae, text_encoder, tokenizer, scheduler, config=config)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # ----- text -----------------------------------------------------------------------------

    def unreadable_text(self, prompt: str) -> str | None:
        """What of ``prompt`` the prior's text encoder cannot read (words outside its vocabulary,
        tokens past the :meth:`_encode_prompt` length, which are cut off), as one sentence, or None."""
        max_length = min(int(self.tokenizer.model_max_length), TEXT_MAX_LENGTH)
        special = len(self.tokenizer("", add_special_tokens=True)["input_ids"])  # BOS/EOS take their places too
        return unreadable_text(self.tokenizer, prompt, max_length - special, "the prior")

    @torch.no_grad()
    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """``[1, L, D]`` last hidden state of the text encoder for one prompt (the UNet's conditioning).

        Padded to ``min(tokenizer.model_max_length, 77)`` tokens: CLIP's context, and what IF's
        pipeline pads T5 prompts to (T5's own limit is 512).
        """
        max_length = min(int(self.tokenizer.model_max_length), TEXT_MAX_LENGTH)
        tokens = self.tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        device = self.text_encoder.device
        # SD's CLIP is trained without a text attention mask (follow the encoder's config); IF's
        # T5 always sees it.
        use_mask = self.text_encoder.config.model_type == "t5" or getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if use_mask else None
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return hidden.to(device=self.device, dtype=self.dtype)

    def get_text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, L, D]`` embeddings of ``prompts``; each distinct prompt is encoded once and kept
        while it is among the ``TEXT_CACHE_SIZE`` most recently used (one guidance object serves
        a whole benchmark of prompts, each with its view suffixes)."""
        cache = self._text_cache
        for prompt in dict.fromkeys(prompts):  # distinct, in order
            if prompt in cache:
                cache.move_to_end(prompt)
            else:
                cache[prompt] = self._encode_prompt(prompt)
        out = torch.cat([cache[p] for p in prompts], dim=0)
        while len(cache) > TEXT_CACHE_SIZE:
            cache.popitem(last=False)
        return out

    def prompts_for_views(self, prompt: str, azimuths: Sequence[float], elevations: Sequence[float] | float) -> list[str]:
        """One prompt per view; view-dependent ("..., back view") if the config asks for it."""
        if isinstance(elevations, (int, float)):
            elevations = [float(elevations)] * len(azimuths)
        if len(elevations) != len(azimuths):
            raise ValueError(f"{len(azimuths)} azimuths but {len(elevations)} elevations")
        if not self.config.view_dependent_prompting:
            return [prompt] * len(azimuths)
        return [view_prompt(prompt, a, e) for a, e in zip(azimuths, elevations)]

    # ----- images <-> latents ---------------------------------------------------------------

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """Encode renders to scaled latents (pixel-space: to pixels in [-1, 1]), differentiably.

        Args:
            rgb: ``[B, 3, H, W]`` in ``[0, 1]`` (any H, W: resized to ``self.resolution``).
        Returns:
            ``[B, C, R/f, R/f]`` float32 latents (R = resolution, f = VAE downsampling),
            ``(posterior.mode() - shift) * scaling_factor``. The posterior mode (not a sample)
            keeps the encoding deterministic; its std is negligible for SD's VAE anyway.
            Pixel-space: ``[B, 3, R, R]``, ``2 * resize(rgb) - 1``.
        """
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"expected rgb of shape [B, 3, H, W], got {tuple(rgb.shape)}")
        size = (self.resolution, self.resolution)
        x = rgb.to(self.device)
        if tuple(x.shape[-2:]) != size:
            # antialias matters only when downsampling large renders; it is a no-op upwards.
            x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        if self.vae is None:
            return x.float() * 2.0 - 1.0
        x = (x * 2.0 - 1.0).to(self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents ``[B, C, h, w]`` to RGB ``[B, 3, h*f, w*f]`` float32 in ``[0, 1]``.

        Pixel-space: ``(x + 1) / 2``, clamped. Not wrapped in ``no_grad``: callers decide (e.g. wrap
        it to save memory when the result only feeds a straight-through estimator).
        """
        if self.vae is None:
            return (latents.float().to(self.device) / 2.0 + 0.5).clamp(0.0, 1.0)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor + shift
        image = self.vae.decode(z).sample
        return (image.float() / 2.0 + 0.5).clamp(0.0, 1.0)

    # ----- timesteps ------------------------------------------------------------------------

    def timestep_range(self, step: int | None) -> tuple[int, int]:
        """Integer ``(min_step, max_step)`` (both included) at optimisation ``step``."""
        lo, hi = self.config.step_percent_range(step)
        last = self.num_train_timesteps - 1
        min_step = min(int(self.num_train_timesteps * lo), last)
        max_step = min(int(self.num_train_timesteps * hi), last)
        return min_step, max(max_step, min_step)

    def sample_timesteps(self, step: int | None, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[batch_size]`` long timesteps, one ``t ~ U[min_step, max_step]`` shared by the batch."""
        min_step, max_step = self.timestep_range(step)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(min_step, max_step + 1, (1,), generator=generator, device=gen_device)
        return t.to(self.device).repeat(batch_size)

    # ----- UNet -----------------------------------------------------------------------------

    @torch.no_grad()
    def predict_noise(self, latents_noisy: torch.Tensor, t: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both CFG branches in one UNet pass of ``2B``.

        Args:
            latents_noisy: ``[B, C, h, w]``; t: ``[B]`` long; prompts: ``B`` strings.
        Returns:
            ``(eps_uncond, eps_text)``, each ``[B, C, h, w]`` float32 epsilon predictions. A UNet
            with learned-variance channels (``2C`` outputs, IF) contributes its first ``C``.
        """
        B = latents_noisy.shape[0]
        text = self.get_text_embeddings(list(prompts))
        uncond = self.get_text_embeddings([self.config.negative_prompt] * B)
        x = torch.cat([latents_noisy, latents_noisy], dim=0).to(self.device, self.dtype)
        tt = torch.cat([t, t], dim=0).to(self.device)
        out = self.unet(x, tt, encoder_hidden_states=torch.cat([text, uncond], dim=0)).sample[:, : self.latent_channels]
        eps = to_epsilon(out, torch.cat([latents_noisy, latents_noisy], dim=0), self.alphas_cumprod, tt, self.prediction_type)
        eps_text, eps_uncond = eps.chunk(2, dim=0)
        return eps_uncond, eps_text

    # ----- SDS ------------------------------------------------------------------------------

    def _prompt_list(self, prompts: str | Sequence[str], batch_size: int) -> list[str]:
        if isinstance(prompts, str):
            return [prompts] * batch_size
        prompts = list(prompts)
        if len(prompts) == 1:
            return prompts * batch_size
        if len(prompts) != batch_size:
            raise ValueError(f"got {len(prompts)} prompts for a batch of {batch_size} images")
        return prompts

    def guidance_from_latents(
        self,
        latents: torch.Tensor,
        prompts: str | Sequence[str],
        step: int | None = None,
        generator: torch.Generator | None = None,
        *,
        t: torch.Tensor | int | None = None,
        noise: torch.Tensor | None = None,
    ) -> GuidanceOutput:
        """SDS on given latents ``[B, C, h, w]`` (see :meth:`__call__`).

        ``t`` (an int or ``[B]`` tensor) and ``noise`` (``[B, C, h, w]``) override the random
        draws, e.g. to evaluate several noise draws at one ``t`` for reward-weighted SDS.
        """
        B = latents.shape[0]
        prompts = self._prompt_list(prompts, B)
        if t is None:
            t = self.sample_timesteps(step, B, generator)
        else:
            t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(B).clone()
        if noise is None:
            from diffusers.utils.torch_utils import randn_tensor  # drawn on the generator's device, then moved

            noise = randn_tensor(tuple(latents.shape), generator=generator, device=self.device, dtype=torch.float32)
        else:
            noise = noise.to(self.device, torch.float32)
        with torch.no_grad():
            latents_noisy = self.scheduler.add_noise(latents.detach().float(), noise, t)
            eps_uncond, eps_text = self.predict_noise(latents_noisy, t, prompts)
            eps_hat = classifier_free_guidance(eps_uncond, eps_text, self.config.guidance_scale)
            grad = sds_gradient(
                eps_uncond, eps_text, noise, self.alphas_cumprod, t,
                self.config.guidance_scale, self.config.grad_clip, self.config.weighting,
            )
            pred_x0 = predict_x0(latents_noisy, eps_hat, self.alphas_cumprod, t)
        return GuidanceOutput(
            loss_sds=sds_loss(latents, grad),
            grad=grad,
            t=t,
            w=sds_weight(self.alphas_cumprod, t, self.config.weighting),
            noise=noise,
            noise_pred=eps_hat,
            noise_pred_text=eps_text,
            noise_pred_uncond=eps_uncond,
            latents=latents,
            latents_noisy=latents_noisy,
            pred_x0=pred_x0,
        )

    def __call__(
        self,
        rgb: torch.Tensor,
        prompts: str | Sequence[str],
        step: int | None = None,
        generator: torch.Generator | None = None,
        *,
        t: torch.Tensor | int | None = None,
        noise: torch.Tensor | None = None,
    ) -> GuidanceOutput:
        """SDS loss of renders.

        Args:
            rgb: ``[B, 3, H, W]`` in ``[0, 1]``, typically attached to the 3D parameters' graph.
            prompts: One prompt for all views, or ``B`` prompts (e.g. view-dependent ones).
            step: Optimisation step, for the annealed t range; ``None`` = no annealing.
            generator: Source of ``t`` and the noise, for reproducible runs.
            t, noise: Optional overrides (see :meth:`guidance_from_latents`).
        Returns:
            :class:`GuidanceOutput`; call ``out.loss_sds.backward()`` to push the SDS gradient
            into ``rgb``.
        """
        return self.guidance_from_latents(self.encode_images(rgb), prompts, step, generator, t=t, noise=noise)
