"""The critic: P("Yes") of a multimodal LLM asked whether V views of a 3D object match a caption.

One batched forward pass, no ``generate``: the question is rendered with the processor's chat
template and its generation prompt, and the score is read at the first answer position (the last
prompt token), restricted to the Yes/No token ids (with their case/space variants):

    margin   = logsumexp(z[yes ids]) - logsumexp(z[no ids])
    prob_yes = sigmoid(margin)          (softmax over the Yes and No ids)

Images take a torch-only path (tile or keep the views, pad to square, resize with
``F.interpolate``, normalise with the processor's mean/std), so the score is differentiable with
respect to the views, which score distillation (TCSD) needs. PIL images and files are converted to
tensors and take the same path, so both kinds of input give the same score.

Works with any ``AutoModelForImageTextToText`` whose processor has a chat template and a fixed
crop size (LLaVA-1.5 style: one ``<image>`` placeholder per image, expanded by the processor).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from coherendream.cameras import OrbitSpec, ring_azimuths
from coherendream.grid import GridLayout, tile
from coherendream.io import check_safetensors
from coherendream.library_warnings import library_deprecations_hidden
from coherendream.prompts import QUESTION_TEMPLATE, check_question_template, format_question, prompt_messages, unreadable_text

DEFAULT_BASE_MODEL = "llava-hf/llava-1.5-7b-hf"
CRITIC_CONFIG_NAME = "critic_config.json"
# The small critic trained on procedural scenes that ships with the package (critic/embedded/README.md).
EMBEDDED_CRITIC = Path(__file__).resolve().parent / "embedded"


def default_critic_path() -> Path:
    """The embedded procedural critic: the default wherever no model is given."""
    if not (EMBEDDED_CRITIC / "config.json").is_file():
        raise FileNotFoundError(f"the embedded critic is missing at {EMBEDDED_CRITIC}; give a model path or hub id")
    return EMBEDDED_CRITIC
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


@dataclass
class CriticConfig:
    """How the critic asks its question and presents the views.

    Attributes:
        question_template: filled by :func:`coherendream.prompts.format_question` with
            ``num_views`` and the caption; the images go where it says ``<image>``
            (:data:`~coherendream.prompts.IMAGE_MARKER`, at most once), else before the question.
        num_views: views per sample that :meth:`Critic.score` expects.
        image_mode: ``"grid"`` tiles the views into one image (row-major, view 0 top-left);
            ``"views"`` passes each view as its own image, for models that accept several.
        grid_rows, grid_cols: grid layout; ``None`` picks :meth:`GridLayout.for_views`' default
            (2x2 for 4 views).
        pad_to_square: pad a non-square image with the processor's mean colour before resizing
            (as LLaVA-1.5 does), so the grid is not distorted; otherwise resize directly.
        resize_mode: ``F.interpolate`` mode for resizing to the processor's crop size
            (``"bicubic"`` matches CLIP's resampling; antialiased when downsampling).
        yes_variants, no_variants: answer spellings; those that encode to exactly one known token
            give the Yes / No token ids.
        add_special_tokens: whether the tokenizer adds its special tokens (BOS) to the rendered
            question; ``None``: only if the chat template did not already write the BOS token (as
            transformers' ``apply_chat_template`` does). Note that TRL's collators always tokenize
            with ``False``: for a template without BOS (llava-1.5-hf's), set ``False`` here to score
            exactly the sequences such a critic was fine-tuned on.
        view_elevation, view_distance, view_fov_y: the orbit camera its training views were taken
            from (degrees, world units with the asset in the unit cube), recorded by ``critic
            train`` from the dataset's build config; :meth:`orbit` gives the cameras that views
            made to be scored by it should use. ``None``: :class:`~coherendream.cameras.OrbitSpec`'s
            default (elevation 15, distance 2.5, FoV 40).
    """

    question_template: str = QUESTION_TEMPLATE
    num_views: int = 4
    image_mode: Literal["grid", "views"] = "grid"
    grid_rows: int | None = None
    grid_cols: int | None = None
    pad_to_square: bool = True
    resize_mode: str = "bicubic"
    yes_variants: tuple[str, ...] = ("Yes", "yes", "YES", " Yes", " yes")
    no_variants: tuple[str, ...] = ("No", "no", "NO", " No", " no")
    add_special_tokens: bool | None = None
    view_elevation: float | None = None
    view_distance: float | None = None
    view_fov_y: float | None = None

    def __post_init__(self) -> None:
        if self.image_mode not in ("grid", "views"):
            raise ValueError(f"critic.image_mode must be 'grid' or 'views', got {self.image_mode!r}")
        if self.num_views < 1:
            raise ValueError(f"critic.num_views must be >= 1, got {self.num_views}")
        check_question_template(self.question_template, "critic.question_template")
        self.yes_variants = tuple(self.yes_variants)
        self.no_variants = tuple(self.no_variants)
        if self.image_mode == "grid":
            self.layout()  # fail now, not at the first score, on a layout that cannot hold the views
        # written "not 0 < x" so that NaN is rejected too
        if self.view_distance is not None and not 0 < self.view_distance:
            raise ValueError(f"critic.view_distance must be positive, got {self.view_distance}")
        if self.view_fov_y is not None and not 0 < self.view_fov_y < 180:
            raise ValueError(f"critic.view_fov_y must be positive and below 180, got {self.view_fov_y}")

    def orbit(self) -> OrbitSpec:
        """Cameras for views this critic scores: ``num_views`` azimuths evenly spaced from 0
        (the first view the front), at the elevation, distance and FoV it was trained on."""
        default = OrbitSpec()
        return OrbitSpec(
            azimuths=ring_azimuths(self.num_views),
            elevation=default.elevation if self.view_elevation is None else float(self.view_elevation),
            distance=default.distance if self.view_distance is None else float(self.view_distance),
            fov_y=default.fov_y if self.view_fov_y is None else float(self.view_fov_y),
        )

    def layout(self) -> GridLayout:
        """Grid layout of ``num_views`` views (used in ``"grid"`` mode)."""
        return GridLayout.for_views(self.num_views, self.grid_rows, self.grid_cols)

    @property
    def images_per_sample(self) -> int:
        """Number of images (and ``<image>`` placeholders) per sample."""
        return 1 if self.image_mode == "grid" else self.num_views

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CriticConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"critic config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CRITIC_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> CriticConfig | None:
        """The config saved in ``directory``, or ``None`` if there is none."""
        path = Path(directory) / CRITIC_CONFIG_NAME
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a valid critic config ({err})") from err


@dataclass
class CriticOutput:
    """Scores of a batch of B (views, caption) pairs.

    Attributes:
        prob_yes: ``[B]`` in (0, 1), P(Yes) among the Yes/No answers.
        margin: ``[B]`` real, ``logsumexp(yes logits) - logsumexp(no logits)``;
            ``prob_yes == sigmoid(margin)``.
    """

    prob_yes: torch.Tensor
    margin: torch.Tensor


def resolve_answer_token_ids(tokenizer: Any, variants: Sequence[str]) -> list[int]:
    """Ids of the ``variants`` that encode to exactly one token other than ``<unk>``, deduplicated.

    Raises:
        ValueError: if no variant is a single known token.
    """
    ids: list[int] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for variant in variants:
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] != unk and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    if not ids:
        raise ValueError(
            f"none of the answer variants {list(variants)} is a single token of this tokenizer; "
            "the critic reads P(answer) from one position, so it needs a one-token answer"
        )
    return ids


def _target_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) of the images the processor produces."""
    crop = getattr(image_processor, "crop_size", None)
    size = getattr(image_processor, "size", None)
    for candidate in ((crop if getattr(image_processor, "do_center_crop", False) else None), size, crop):
        if candidate is None:
            continue
        get = candidate.get if isinstance(candidate, dict) else (lambda k, c=candidate: getattr(c, k, None))
        if get("height") and get("width"):
            return int(get("height")), int(get("width"))
        if get("shortest_edge"):
            return int(get("shortest_edge")), int(get("shortest_edge"))
    raise ValueError(f"cannot tell the image size of {type(image_processor).__name__}: no crop_size or size")


def load_image_text_model(name_or_path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """``AutoModelForImageTextToText.from_pretrained`` from safetensors, with an error that names
    the model when it cannot be found (transformers' own message names neither the model nor
    whether it looked for a folder or a hub id)."""
    from transformers import AutoModelForImageTextToText

    name = str(name_or_path)
    check_safetensors(name, "model")
    try:
        return AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    except OSError as err:
        where = "" if Path(name).exists() else "no such folder here, and "
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"model {name!r}: {where}it could not be loaded ({reason})") from err


def load_processor(name_or_path: str | Path, trust_remote_code: bool = False):
    """``AutoProcessor.from_pretrained``, with the PIL image backend where torchvision is not
    installed: the processor transformers would fall back to anyway, without its warning on
    every load."""
    import importlib.util

    from transformers import AutoProcessor

    backend = {} if importlib.util.find_spec("torchvision") else {"backend": "pil"}
    return AutoProcessor.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, **backend)


class Critic:
    """A multimodal LLM scoring whether multiview renders match a caption.

    Build with :meth:`from_pretrained`, or wrap an already loaded model (for example a PEFT model
    under training) with ``Critic(model, processor, config)``.
    """

    def __init__(self, model: Any, processor: Any, config: CriticConfig | None = None) -> None:
        self.model = model
        self.processor = processor
        self.config = config or CriticConfig()
        self.source: dict | None = None  # set by from_pretrained: the folder or hub id and adapter it loaded
        self._unreadable: dict[str, str | None] = {}  # unreadable_text by prompt
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.yes_ids = resolve_answer_token_ids(self.tokenizer, self.config.yes_variants)
        self.no_ids = resolve_answer_token_ids(self.tokenizer, self.config.no_variants)
        shared = set(self.yes_ids) & set(self.no_ids)
        if shared:
            raise ValueError(f"yes and no answer variants share token ids {sorted(shared)}")
        self.image_size = _target_size(self.image_processor)
        self._mean = tuple(float(m) for m in self.image_processor.image_mean)
        self._std = tuple(float(s) for s in self.image_processor.image_std)
        self._normalize = bool(getattr(self.image_processor, "do_normalize", True))
        # image tokens per <image> placeholder, learnt on the first encode_prompts call (0: no shortcut)
        self._tokens_per_image: int | None = None

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | Path = DEFAULT_BASE_MODEL,
        adapter: str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        trust_remote_code: bool = False,
        config: CriticConfig | None = None,
    ) -> Critic:
        """Load a critic: base model + processor, optionally a PEFT adapter on top.

        Args:
            model_name_or_path: hub id or local directory of an ``AutoModelForImageTextToText``
                checkpoint; or a directory written by :meth:`save_pretrained` from an adapter
                critic (it holds ``adapter_config.json``, whose base model is then loaded).
            adapter: directory (or hub id) of a PEFT adapter to apply to the base.
            dtype: default bfloat16 on CUDA, float32 on CPU.
            device: default ``"cuda"`` when available, else ``"cpu"``.
            config: default the ``critic_config.json`` saved with the adapter or the model, else
                :class:`CriticConfig` defaults.

        Weights load from safetensors only. The model is put in eval mode with its parameters
        frozen: the critic is a scorer (gradients flow to the views, not the weights).
        """
        # what a run's output folder records as its critic (coherendream.output_folder)
        source = {"critic": str(model_name_or_path), "adapter": None if adapter is None else str(adapter)}
        base = str(model_name_or_path)
        base_dir = Path(base)
        # A hub id is "name" or "namespace/name"; anything else is a local path and must exist
        # (transformers would otherwise report it as a malformed repo id).
        looks_local = base_dir.is_absolute() or base.startswith((".", "~")) or base.count("/") > 1
        if looks_local and not base_dir.exists():
            raise FileNotFoundError(f"critic {base}: no such folder")
        if adapter is None and (base_dir / "adapter_config.json").is_file() and not (base_dir / "config.json").is_file():
            adapter = base_dir
            base = json.loads((base_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{base_dir / 'adapter_config.json'}: no base_model_name_or_path to load the adapter onto")
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r} (known: {sorted(_DTYPES)})")
            dtype = _DTYPES[dtype]

        model = load_image_text_model(base, dtype, trust_remote_code)
        # The processor saved next to an adapter wins: it is the one the adapter was trained with.
        adapter_dir = Path(adapter) if adapter is not None else None
        processor_source = base
        if adapter_dir is not None and (adapter_dir / "processor_config.json").is_file():
            processor_source = str(adapter_dir)
        processor = load_processor(processor_source, trust_remote_code)
        if adapter is not None:
            from peft import PeftModel

            check_safetensors(adapter, "adapter")
            with library_deprecations_hidden():
                model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        model.to(device)
        model.eval()
        model.requires_grad_(False)

        if config is None:
            for directory in ([adapter_dir] if adapter_dir else []) + [base_dir]:
                config = CriticConfig.load(directory) if directory.is_dir() else None
                if config is not None:
                    break
        critic = cls(model, processor, config)
        critic.source = source
        return critic

    def save_pretrained(self, save_dir: str | Path) -> Path:
        """Save model (full weights, or only the adapter of a PEFT model), processor and config.

        :meth:`from_pretrained` reads the directory back: ``Critic.from_pretrained(save_dir)``.
        """
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(save_dir, safe_serialization=True)
        self.processor.save_pretrained(save_dir)
        self.config.save(save_dir)
        return save_dir

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's floating-point weights (pixel values are cast to it)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    # ------------------------------------------------------------------ images
    def pixel_values(self, views: torch.Tensor | Sequence[Sequence[Any]]) -> torch.Tensor:
        """Model-ready pixel values of a batch of views, differentiable for tensor input.

        Args:
            views: float tensor ``[B, V, 3, H, W]`` in [0, 1] (uint8 in [0, 255] is also taken),
                or a list of B lists of V PIL images or image paths.

        Returns:
            ``[B * I, 3, S_h, S_w]`` in the model's dtype and on its device, where I is 1 in grid
            mode and V in views mode and ``(S_h, S_w)`` is the processor's crop size; normalised
            with the processor's image mean and std.
        """
        if isinstance(views, torch.Tensor):
            return self._preprocess(self._check_tensor_views(views))
        samples = self._load_views(views)
        if len({tuple(s.shape) for s in samples}) == 1:
            # one resize for the whole batch: per-sample calls dominated scoring time on CPU
            return self._preprocess(torch.cat(samples, dim=0))
        return torch.cat([self._preprocess(sample) for sample in samples], dim=0)

    def _check_tensor_views(self, views: torch.Tensor) -> torch.Tensor:
        if views.ndim != 5:
            raise ValueError(
                f"views must be a [B, V, 3, H, W] tensor, got shape {tuple(views.shape)}"
                + (" (a single sample? add a batch dimension with views.unsqueeze(0))" if views.ndim == 4 else "")
            )
        if views.shape[2] != 3:
            raise ValueError(f"views must have 3 (RGB) channels at dim 2, got shape {tuple(views.shape)}")
        if views.shape[1] != self.config.num_views:
            raise ValueError(f"got {views.shape[1]} views per sample, the critic is configured for {self.config.num_views}")
        if views.shape[0] == 0:
            raise ValueError("empty batch of views")
        return views  # uint8 stays uint8 until after tiling (see _preprocess)

    def _load_views(self, views: Sequence[Sequence[Any]]) -> list[torch.Tensor]:
        """PIL images / paths -> one uint8 ``[1, V, 3, H, W]`` tensor per sample."""
        from PIL import Image

        if isinstance(views, (str, Path)) or not isinstance(views, Sequence) or len(views) == 0:
            raise ValueError("views must be a [B, V, 3, H, W] tensor or a non-empty list of lists of images/paths")
        samples = []
        for b, sample in enumerate(views):
            if isinstance(sample, (str, Path, Image.Image)) or not isinstance(sample, Sequence):
                raise ValueError(f"views[{b}] must be a list of {self.config.num_views} images or paths, got {type(sample).__name__}")
            if len(sample) != self.config.num_views:
                raise ValueError(f"views[{b}] has {len(sample)} views, the critic is configured for {self.config.num_views}")
            tensors = []
            for v, item in enumerate(sample):
                if isinstance(item, (str, Path)):
                    try:
                        with Image.open(item) as im:
                            image = im.convert("RGB")
                    except (OSError, ValueError) as err:
                        raise ValueError(f"views[{b}][{v}]: cannot read image file {item}: {err}") from err
                elif isinstance(item, Image.Image):
                    image = item.convert("RGB")
                else:
                    raise ValueError(f"views[{b}][{v}]: expected a PIL image or a path, got {type(item).__name__}")
                tensors.append(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
            sizes = {tuple(t.shape) for t in tensors}
            if len(sizes) != 1:
                raise ValueError(f"views[{b}]: all views of a sample must have the same size, got {sorted(sizes)}")
            samples.append(torch.stack(tensors)[None])
        return samples

    def _preprocess(self, views: torch.Tensor) -> torch.Tensor:
        """``[N, V, 3, H, W]`` (float in [0, 1], or uint8) -> ``[N * I, 3, S_h, S_w]`` normalised, all in torch."""
        views = views.to(self.device)
        if self.config.image_mode == "grid":
            images = tile(views, self.config.layout(), channels_last=False)  # [N, 3, rows*H, cols*W]
        else:
            images = views.flatten(0, 1)  # [N*V, 3, H, W], sample-major like the <image> tokens
        # One contiguous copy before the resize (interpolating the permuted tiling is ~1.5x slower),
        # made while uint8 input is still 1 byte a value: the PIL/path path was dominated by these copies.
        images = images.contiguous()
        # Work in at least float32 (interpolation in half precision is poor or unsupported on CPU),
        # and in float64 when the caller gives float64 (finite-difference checks).
        if images.is_floating_point():
            work = torch.promote_types(images.dtype, torch.float32)
            images = images.to(work)
        else:
            work = torch.float32
            images = images.to(work) / 255.0  # uint8 images; not differentiable anyway
        mean = torch.tensor(self._mean, dtype=work, device=views.device).view(1, 3, 1, 1)
        std = torch.tensor(self._std, dtype=work, device=views.device).view(1, 3, 1, 1)

        height, width = images.shape[-2:]
        if self.config.pad_to_square and height != width:
            # Pad with the mean colour (a zero after normalisation), centred like LLaVA's expand2square.
            side = max(height, width)
            top, left = (side - height) // 2, (side - width) // 2
            images = F.pad(images - mean, (left, side - width - left, top, side - height - top)) + mean
        if tuple(images.shape[-2:]) != self.image_size:
            smooth = self.config.resize_mode in ("bilinear", "bicubic")
            images = F.interpolate(
                images,
                size=self.image_size,
                mode=self.config.resize_mode,
                antialias=smooth,
                **({"align_corners": False} if smooth else {}),
            )
        if self._normalize:
            images = (images - mean) / std
        return images.to(self.dtype)

    # ------------------------------------------------------------------ text
    def unreadable_text(self, prompt: str) -> str | None:
        """What of ``prompt`` this critic cannot read (words outside its vocabulary, a question
        longer than its context), as one sentence, or None. Such a prompt still gets a score,
        but the score does not judge those words: callers warn and mark the row."""
        cache = self._unreadable
        if prompt not in cache:
            config = getattr(self.model.config, "text_config", self.model.config)
            limits = [n for n in (getattr(config, "max_position_embeddings", None), getattr(self.tokenizer, "model_max_length", None))
                      if isinstance(n, int) and n < 1_000_000]  # fmt: skip
            budget = None
            if limits:
                # the question around the prompt and the image tokens take their share of the context
                frame = len(self.tokenizer(self.questions(["x"])[0], add_special_tokens=False)["input_ids"]) - 1
                images = int(getattr(self.model.config, "image_seq_length", 0) or 0) * self.config.images_per_sample
                budget = max(1, min(limits) - frame - images)
            cache[prompt] = unreadable_text(self.tokenizer, prompt, budget, "the critic")
        return cache[prompt]

    def questions(self, prompts: Sequence[str]) -> list[str]:
        """The question asked for each caption."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of captions (str), not a single string")
        out = []
        for i, text in enumerate(prompts):
            if not isinstance(text, str):
                raise ValueError(f"prompts[{i}] must be a str, got {type(text).__name__}")
            if not text.strip():
                raise ValueError(f"prompts[{i}] is empty: the description to check must contain text")
            out.append(format_question(text, self.config.num_views, self.config.question_template))
        return out

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Chat-template token ids of the questions, up to and including the generation prompt.

        The processor expands each ``<image>`` placeholder into as many image tokens as the model
        produces features per image, a count it computes from images. The first call therefore
        runs the processor on blank images of the crop size (the real pixel values come from
        :meth:`pixel_values`) and learns the count; later calls expand the placeholder themselves
        and only tokenise, which skips preprocessing B x I blank images per call (scoring the
        embedded critic at batch 8 ran 1.08x faster, docs/benchmarks.md). The shortcut is taken
        only if it reproduced the processor's ids exactly on that first call; otherwise every call
        goes through the processor.

        Returns:
            ``input_ids`` and ``attention_mask``, ``[B, L]``, right-padded.
        """
        questions = self.questions(prompts)
        n_images = self.config.images_per_sample
        texts = [
            self.processor.apply_chat_template(prompt_messages(q, n_images), add_generation_prompt=True, tokenize=False)
            for q in questions
        ]
        add_special = self.config.add_special_tokens
        if add_special is None:
            # A template that writes the BOS token itself must not get a second one from the tokenizer.
            bos = getattr(self.tokenizer, "bos_token", None)
            add_special = not (bos and all(t.startswith(bos) for t in texts))
        text_kwargs = dict(padding=True, padding_side="right", truncation=False, add_special_tokens=add_special, return_tensors="pt")
        if self._tokens_per_image:
            encoded = self.tokenizer(self._expand_image_tokens(texts, self._tokens_per_image), **text_kwargs)
        else:
            blank = np.zeros((*self.image_size, 3), dtype=np.uint8)
            encoded = self.processor(text=texts, images=[[blank] * n_images for _ in texts], **text_kwargs)
            if self._tokens_per_image is None:
                self._tokens_per_image = self._learn_image_expansion(
                    texts[0], encoded["input_ids"][0], encoded["attention_mask"][0], text_kwargs
                )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _expand_image_tokens(self, texts: list[str], count: int) -> list[str]:
        token = self.processor.image_token
        return [t.replace(token, token * count) for t in texts]

    def _learn_image_expansion(self, text: str, ids: torch.Tensor, mask: torch.Tensor, text_kwargs: dict[str, Any]) -> int:
        """Image tokens per ``<image>`` placeholder if expanding the text reproduces ``ids``, else 0 (no shortcut)."""
        token = getattr(self.processor, "image_token", None)
        token_id = getattr(self.processor, "image_token_id", None)
        n_placeholders = text.count(token) if isinstance(token, str) and token else 0
        if token_id is None or n_placeholders == 0:
            return 0
        ids = ids[mask.bool()]
        count, rest = divmod(int((ids == token_id).sum()), n_placeholders)
        if count == 0 or rest:
            return 0
        mine = self.tokenizer(self._expand_image_tokens([text], count), **text_kwargs)["input_ids"][0]
        return count if torch.equal(mine, ids) else 0

    # ------------------------------------------------------------------ scoring
    def score(self, views: torch.Tensor | Sequence[Sequence[Any]], prompts: Sequence[str]) -> CriticOutput:
        """Score B (views, caption) pairs in one forward pass.

        Args:
            views: float tensor ``[B, V, 3, H, W]`` in [0, 1], differentiable; or a list of B lists
                of V PIL images or image paths (same result as the tensor of their pixels / 255).
            prompts: B captions; each becomes the configured question.

        Returns:
            :class:`CriticOutput` with ``prob_yes`` and ``margin`` of shape ``[B]``, in float32 (or
            float64 for a float64 model). Runs with autograd on: wrap in ``torch.no_grad()`` when
            no gradient is wanted.
        """
        pixel_values = self.pixel_values(views)
        batch = pixel_values.shape[0] // self.config.images_per_sample
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of captions (str), not a single string")
        if len(prompts) != batch:
            raise ValueError(f"got {batch} samples of views but {len(prompts)} prompts")
        encoded = self.encode_prompts(prompts)
        input_ids = encoded["input_ids"].to(self.device)
        attention_mask = encoded["attention_mask"].to(self.device)

        # Right padding: the first answer position (the last prompt token) of row b is at
        # len_b - 1; the causal mask keeps the pads after it from affecting it, and positions
        # before it are those of an unpadded single call.
        last = attention_mask.sum(dim=1) - 1  # [B]
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            logits_to_keep=last[:, None],  # [B, 1]: only the answer position reaches the LM head
        )
        logits = out.logits
        if logits.shape[1] != 1:  # a model that ignores logits_to_keep returns every position
            logits = logits[torch.arange(batch, device=logits.device), last][:, None]
        logits = logits[:, -1]  # [B, vocab]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        margin = yes - no
        return CriticOutput(prob_yes=torch.sigmoid(margin), margin=margin)

    __call__ = score
