"""Fine-tuning a multiview critic: TRL's ``SFTTrainer`` (or ``DPOTrainer``) with PEFT LoRA.

Read top to bottom: load the model and processor, wrap the language model's linear layers with
LoRA (the vision tower stays frozen, the projector trains in full with its own learning rate),
load the dataset written by ``coherendream data build``, train, save the adapter and processor.

Arguments keep their upstream names: ``training`` is passed as it is to ``trl.SFTConfig`` /
``trl.DPOConfig`` (so every ``TrainingArguments`` key works, and TRL validates them), ``lora`` to
``peft.LoraConfig``. Defaults are LLaVA-1.5's LoRA recipe (scripts/v1_5/finetune_lora.sh).

Launch on one GPU with ``coherendream critic train -c configs/critic/llava15_lora.yaml``, or on
several with ``accelerate launch``/``torchrun``/``deepspeed`` in front of the same module:
``torchrun --nproc_per_node 8 -m coherendream.cli critic train -c ... training.deepspeed=zero3``.

Pairwise mode (``mode: dpo``): every (positive, negative) caption pair of an asset gives two
preference examples over the answers -- the question about the true caption prefers "Yes" to
"No", the question about the negative caption prefers "No" to "Yes". With DPO's sigmoid loss this
is ``-log sigma(beta * (m - m_ref))`` on the critic's own yes/no log-probability margin ``m``, so
the trained model is scored exactly as an SFT critic is (``Critic.score``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from coherendream.config import ConfigError, dump_yaml, to_dict
from coherendream.io import write_text
from coherendream.library_warnings import library_deprecations_hidden
from coherendream.output_folder import OutputFolder
from coherendream.prompts import ANSWER_NO, ANSWER_YES, completion_messages, format_describe, format_question, prompt_messages

# LoRA on the language model only: this regex does not match the CLIP tower's q/k/v_proj.
LANGUAGE_MODEL_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_NAME = "multi_modal_projector"
VISION_TOWER_NAME = "vision_tower"

LLAVA15_TRAINING = {
    "learning_rate": 2e-4,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float below 1 is a ratio of the total steps (transformers 5)
    "weight_decay": 0.0,
    "activation_checkpointing": True,
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 42,
    "max_length": None,  # never truncate: image tokens must survive
    "remove_unused_columns": False,  # the VLM collator needs the images column
}


@dataclass
class LoraSettings:
    """``peft.LoraConfig`` fields (names unchanged)."""

    r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    target_modules: str | list[str] = LANGUAGE_MODEL_LINEAR
    modules_to_save: list[str] = field(default_factory=lambda: [PROJECTOR_NAME])


@dataclass
class GuidanceTraining:
    """Training a critic whose image gradient is meant to guide generation (TCSD), not only to
    classify. A classifier trained on clean views alone answers well but has a gradient that is
    not a direction a person would call "more red"; the field's remedies, each on a share of the
    rows of every batch (the rest stay clean):

    - adversarial views (``adversarial_share``): projected gradient ascent on the row's loss
      within an L2 or l-inf ball of radius ``adversarial_eps`` in [0, 1] pixel units (L2: over all
      pixels of the row's image), ``adversarial_steps`` steps of ``adversarial_step_size`` (default
      2.5 eps / steps); models trained so have "perceptually aligned gradients" (Santurkar et al.
      2019; Kawar et al. 2022 train guidance classifiers with L2 PGD, eps 0.5, 7 steps);
    - noised views (``noise_share``): Gaussian noise of ``noise_std``, and blurred views
      (``blur_share``): a Gaussian blur of ``blur_sigma`` pixels, like the renders and denoised
      estimates the critic meets during generation (guidance classifiers are trained on noised
      inputs, Dhariwal and Nichol 2021).

    Binding negatives (two groups' colours or shapes swapped) are a dataset matter:
    ``negatives.ratios.color_swap`` / ``shape_swap`` in ``data build``. SFT only: a DPO batch holds
    pairs, not one answer per image.
    """

    adversarial_share: float = 0.0
    adversarial_norm: Literal["l2", "linf"] = "l2"
    adversarial_eps: float = 0.5
    adversarial_steps: int = 3
    adversarial_step_size: float | None = None
    noise_share: float = 0.0
    noise_std: float = 0.1
    blur_share: float = 0.0
    blur_sigma: float = 1.0

    @property
    def active(self) -> bool:
        return self.adversarial_share > 0 or self.noise_share > 0 or self.blur_share > 0

    def check(self) -> None:
        for name in ("adversarial_share", "noise_share", "blur_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"guidance.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.adversarial_norm not in ("l2", "linf"):
            raise ConfigError(f"guidance.adversarial_norm must be l2 or linf, got {self.adversarial_norm!r}")
        for name in ("adversarial_eps", "noise_std", "blur_sigma"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"guidance.{name} must be > 0, got {getattr(self, name)}")
        if self.adversarial_steps < 1:
            raise ConfigError(f"guidance.adversarial_steps must be >= 1, got {self.adversarial_steps}")


@dataclass
class CriticTrainConfig:
    model_name_or_path: str = "llava-hf/llava-1.5-7b-hf"
    dataset: str = "outputs/procedural"  # a `data build` folder, or any dataset id/path with the same columns
    train_split: str = "train"
    eval_split: str | None = "validation"
    max_train_samples: int | None = None
    max_eval_samples: int | None = 512
    mode: Literal["sft", "dpo"] = "sft"
    use_lora: bool = True
    lora: LoraSettings = field(default_factory=LoraSettings)
    # LLaVA keeps its pretrained CLIP frozen; a critic trained from a random tower must train it
    freeze_vision_tower: bool = True
    # add one description row per asset ("Describe this 3D object..." -> its true caption): LLaVA's
    # feature-alignment task as an auxiliary loss, a token-level signal for colours, shapes, counts
    # and relations that a one-token yes/no answer gives only one bit of
    caption_rows: bool = False
    # answer negatives "No, <true caption>" instead of "No" (not multiview_mix rows, which mix two
    # assets): the model has to name what is really there, so the loss says which words of the
    # caption were wrong; P(yes) is still read at the first answer token
    correction_answers: bool = False
    # add this many attribute-presence rows per asset (procedural builds, which have a layout): the
    # asset's views asked about one colour or shape word ("red", "cube"), answered Yes iff an object
    # of the scene has it (coherendream.data.presence) -- the word-against-views check that a
    # caption of two groups needs for each of its words, trained one word at a time
    presence_rows: int = 0
    projector_lr: float | None = 2e-5  # LLaVA's mm_projector_lr; None: the projector uses learning_rate
    # an unfrozen vision tower's own learning rate (LLaVA-NeXT/OneVision's mm_vision_tower_lr, which
    # keeps a pretrained tower's rate below the language model's); None: the tower uses learning_rate
    vision_tower_lr: float | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    trust_remote_code: bool = False
    # adversarial, noised and blurred views on a share of each batch: a critic trained for guidance
    guidance: GuidanceTraining = field(default_factory=GuidanceTraining)
    resume_from_checkpoint: str | None = "auto"  # "auto": the last complete checkpoint in output_dir, if any
    output_dir: str = "outputs/critic"
    training: dict[str, Any] = field(default_factory=dict)  # SFTConfig / DPOConfig arguments


def deepspeed_config_path(name: str) -> str:
    """Path of a DeepSpeed JSON shipped with the package: ``zero2``, ``zero3`` or ``zero3_offload``."""
    path = resources.files("coherendream.critic") / "deepspeed" / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"no shipped DeepSpeed config {name!r} (have zero2, zero3, zero3_offload)")
    return str(path)


def _dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


_RENAMED_TRAINING_KEYS = {"gradient_checkpointing": "activation_checkpointing", "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def training_arguments(config: CriticTrainConfig):
    """The TRL config: LLaVA-1.5 defaults, then the user's ``training`` keys."""
    import torch
    from trl import DPOConfig, SFTConfig

    # transformers 5's names for the 4.x ones a config may still use; translated here so that an old
    # name in the config overrides the default instead of being ignored behind it
    user = {_RENAMED_TRAINING_KEYS.get(k, k): v for k, v in config.training.items()}
    args = {**LLAVA15_TRAINING, **user, "output_dir": config.output_dir}
    ds = args.get("deepspeed")
    if isinstance(ds, str) and not ds.endswith(".json"):
        args["deepspeed"] = deepspeed_config_path(ds)
    # Precision and device follow the machine unless the config says otherwise: bf16 (and TF32
    # matmuls) on a CUDA GPU that has bf16, float32 on the CPU.
    dtype = _dtype(config.dtype)
    cuda = torch.cuda.is_available()
    args.setdefault("bf16", dtype == torch.bfloat16)
    args.setdefault("fp16", dtype == torch.float16)
    if cuda and torch.cuda.is_bf16_supported():
        args.setdefault("tf32", True)
    if not cuda:
        args.setdefault("use_cpu", True)
    if config.mode == "dpo":
        args.pop("max_length", None)
    cls = DPOConfig if config.mode == "dpo" else SFTConfig
    _numbers_as_numbers(cls, args)
    try:
        built = cls(**args)
    except TypeError as err:  # a key TRL does not know: name it as the config spells it
        raise ConfigError(f"training: {err} (the training keys go to TRL's {cls.__name__} unchanged)") from err
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(built, key) < 1:  # otherwise a DataLoader error once the model has loaded
            raise ConfigError(f"training.{key} must be >= 1, got {getattr(built, key)}")
    if not built.learning_rate > 0:  # otherwise the optimiser's error once the model has loaded
        raise ConfigError(f"training.learning_rate must be > 0, got {built.learning_rate}")
    return built


def load_model_and_processor(config: CriticTrainConfig):
    from coherendream.critic.model import load_image_text_model, load_processor

    model = load_image_text_model(config.model_name_or_path, _dtype(config.dtype), config.trust_remote_code)
    processor = load_processor(config.model_name_or_path, config.trust_remote_code)
    if getattr(processor, "tokenizer", None) is not None and processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    if config.freeze_vision_tower and not config.use_lora:
        # LoRA freezes everything outside its targets anyway; full fine-tuning needs it said
        for name, p in model.named_parameters():
            if "vision_tower" in name:
                p.requires_grad_(False)
    return model, processor


def peft_config(config: CriticTrainConfig):
    from peft import LoraConfig

    if not config.use_lora:
        return None
    lora = config.lora
    if lora.r < 1:
        raise ConfigError(f"lora.r must be >= 1, got {lora.r}")
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        # an unfrozen vision tower trains in full next to the adapter
        modules_to_save=(list(lora.modules_to_save or []) + ([] if config.freeze_vision_tower else ["vision_tower"])) or None,
        task_type="CAUSAL_LM",
    )


def _numbers_as_numbers(cls: type, args: dict) -> None:
    """Read the numeric training keys given as text ("2e-4": YAML 1.1 reads it as a string) as
    numbers, in place; text that is no number is a :class:`ConfigError` naming the key, not a
    TypeError deep in TRL once the model has loaded."""
    import dataclasses

    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in args.items():
        kind = {int: int, "int": int, float: float, "float": float}.get(kinds.get(key))
        if kind is None or not isinstance(value, str):
            continue
        try:
            args[key] = kind(value)
        except ValueError:
            raise ConfigError(f"training.{key} must be a number, got {value!r}") from None


def load_rows(config: CriticTrainConfig):
    """(train, eval) datasets with TRL's columns; a built folder is read from its Parquet files."""
    from datasets import load_dataset

    path = Path(config.dataset)
    if (path / "data").is_dir():
        from coherendream.data.build import load_built_dataset

        dsd = load_built_dataset(path)
    else:
        try:
            dsd = load_dataset(config.dataset)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"dataset {config.dataset}: {err}") from err
    if config.train_split not in dsd:
        raise ConfigError(f"dataset {config.dataset}: no split {config.train_split!r} (have {sorted(dsd)})")
    train = dsd[config.train_split]
    missing = {"images", "prompt", "completion"} - set(train.column_names)
    if missing:
        raise ConfigError(f"dataset {config.dataset}: not a critic dataset (no {', '.join(sorted(missing))} column; it has "
                          f"{', '.join(train.column_names)}): give a `coherendream data build` folder")  # fmt: skip
    evaluation = dsd[config.eval_split] if config.eval_split and config.eval_split in dsd else None
    if config.max_train_samples is not None:
        train = train.select(range(min(config.max_train_samples, len(train))))
    if evaluation is not None and config.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(config.max_eval_samples, len(evaluation))))
    if config.mode == "dpo":
        for flag in ("caption_rows", "correction_answers", "presence_rows"):
            if getattr(config, flag):
                raise ConfigError(f"{flag} is an SFT auxiliary task; it has no preference form (use mode=sft)")
        return to_preference_rows(train), (to_preference_rows(evaluation) if evaluation is not None else None)
    if config.presence_rows < 0:
        raise ConfigError(f"presence_rows must be >= 0, got {config.presence_rows}")
    if config.correction_answers:
        train = with_correction_answers(train)
    # auxiliary rows are made from the builder's columns, so before only TRL's columns are kept
    auxiliary = []
    if config.caption_rows:
        auxiliary.append(caption_rows(train))
    if config.presence_rows:
        seed = int({**LLAVA15_TRAINING, **config.training}["seed"])  # the trainer's seed, default included
        auxiliary.append(presence_rows(train, config.presence_rows, critic_config_for(config), seed=seed))
    keep = ["images", "prompt", "completion"]
    train = train.select_columns(keep)
    if auxiliary:
        from datasets import concatenate_datasets

        train = concatenate_datasets([train, *(rows.cast(train.features) for rows in auxiliary)])
    return train, (evaluation.select_columns(keep) if evaluation is not None else None)


def _first_positive_rows(ds, task: str) -> list[int]:
    """Index of each asset's first positive row (the builder's ``label`` and ``asset_id`` columns)."""
    missing = {"label", "asset_id"} - set(ds.column_names)
    if missing:
        raise ConfigError(f"{task} needs the dataset columns {sorted(missing)} (written by `coherendream data build`)")
    seen: set[str] = set()
    first = []
    for i, (label, asset) in enumerate(zip(ds["label"], ds["asset_id"])):
        if label == 1 and asset not in seen:
            seen.add(asset)
            first.append(i)
    return first


def caption_rows(ds):
    """One description row per asset, built from its first positive row: the same images, the
    question :data:`~coherendream.prompts.DESCRIBE_TEMPLATE`, the true caption as the answer.
    Needs the builder's ``label``, ``asset_id`` and ``true_caption`` columns."""
    from datasets import Image, Sequence

    if "true_caption" not in ds.column_names:
        raise ConfigError("caption_rows needs the dataset column 'true_caption' (written by `coherendream data build`)")
    picked = ds.select(_first_positive_rows(ds, "caption_rows"))
    # columns built without a map over the rows: a map would decode every image
    counts = picked.cast_column("views", Sequence(Image(decode=False))) if "views" in ds.column_names else picked
    counts = counts.cast_column("images", Sequence(Image(decode=False)))
    prompts, completions = [], []
    for row in counts.select_columns([c for c in ("images", "views", "true_caption") if c in ds.column_names]):
        num_views = len(row.get("views") or row["images"])
        prompts.append(prompt_messages(format_describe(num_views), len(row["images"])))
        completions.append(completion_messages(row["true_caption"]))
    return picked.select_columns(["images"]).add_column("prompt", prompts).add_column("completion", completions)


def presence_rows(ds, per_asset: int, critic_config, seed: int = 0):
    """``per_asset`` attribute-presence rows per asset (:func:`coherendream.data.presence.presence_questions`):
    its first positive row's images, the critic's question (``critic_config``, a
    :class:`~coherendream.critic.model.CriticConfig`) about one colour or shape word, answered Yes
    iff an object of the scene has it. Needs the ``layout`` column of a procedural build, where the
    truth comes from; an asset without a layout (a mesh, a render folder) raises."""
    import numpy as np

    from coherendream.data.presence import presence_questions

    if "layout" not in ds.column_names:
        raise ConfigError("presence_rows needs the dataset column 'layout' (written by `coherendream data build` for procedural scenes)")
    first = _first_positive_rows(ds, "presence_rows")
    rng = np.random.default_rng(seed)
    rows, prompts, completions = [], [], []
    for i, meta in zip(first, ds.select(first).select_columns(["asset_id", "layout"])):
        if not meta["layout"]:
            raise ConfigError(f"presence_rows: asset {meta['asset_id']} has no layout (only procedural scenes have one)")
        objects = [(o["color"], o["shape"]) for o in json.loads(meta["layout"])["objects"]]
        for word, present in presence_questions(objects, per_asset, rng):
            rows.append(i)
            question = format_question(word, critic_config.num_views, critic_config.question_template)
            prompts.append(prompt_messages(question, critic_config.images_per_sample))
            completions.append(completion_messages(ANSWER_YES if present else ANSWER_NO))
    return ds.select(rows).select_columns(["images"]).add_column("prompt", prompts).add_column("completion", completions)


def with_correction_answers(ds):
    """``ds`` with every negative row (except ``multiview_mix``) answered ``"No, <true caption>"``.

    Needs the builder's ``label``, ``negative_type`` and ``true_caption`` columns; positives keep
    their answer. The completion column is rebuilt from those columns alone (no image is decoded).
    """
    missing = {"label", "negative_type", "true_caption"} - set(ds.column_names)
    if missing:
        raise ConfigError(f"correction_answers needs the dataset columns {sorted(missing)} (written by `coherendream data build`)")
    columns = ds.select_columns(["label", "negative_type", "true_caption", "completion"])
    completions = []
    for row in columns:
        if row["label"] == 0 and row["negative_type"] != "multiview_mix" and row["true_caption"]:
            completions.append(completion_messages(f"{ANSWER_NO}, {row['true_caption']}"))
        else:
            completions.append(row["completion"])
    feature = ds.features["completion"]
    return ds.remove_columns("completion").add_column("completion", completions, feature=feature)


def to_preference_rows(ds):
    """Yes/no rows -> DPO rows: chosen = the right answer, rejected = the wrong one."""

    def convert(row):
        right, wrong = (ANSWER_YES, ANSWER_NO) if row["label"] == 1 else (ANSWER_NO, ANSWER_YES)
        return {"chosen": completion_messages(right), "rejected": completion_messages(wrong)}

    out = ds.map(convert, remove_columns=[c for c in ds.column_names if c not in ("images", "prompt")])
    return out


def make_trainer(config: CriticTrainConfig, model=None, processor=None):
    """Build the TRL trainer (exposed for tests and custom loops). The settings and the dataset
    are checked before the model loads: a wrong key fails in a second, not after minutes."""
    config.guidance.check()
    if config.guidance.active and config.mode == "dpo":
        raise ConfigError("guidance: adversarial, noised and blurred views are for mode=sft (a DPO batch holds pairs)")
    args = training_arguments(config)
    peft = peft_config(config)
    train, evaluation = load_rows(config)
    if model is None or processor is None:
        model, processor = load_model_and_processor(config)
    if args.eval_strategy == "no" or str(args.eval_strategy).endswith("NO"):
        evaluation = None
    kwargs = dict(model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=processor, peft_config=peft)
    if config.mode == "dpo":
        from trl import DPOTrainer

        trainer_cls = _with_module_lrs(DPOTrainer)
    else:
        from trl import SFTTrainer

        trainer_cls = _with_module_lrs(SFTTrainer)
    with library_deprecations_hidden():
        trainer = trainer_cls(**kwargs)
    trainer.module_lrs = {name: lr for name, lr in ((PROJECTOR_NAME, config.projector_lr), (VISION_TOWER_NAME, config.vision_tower_lr)) if lr is not None}
    trainer.guidance = config.guidance
    trainer.pixel_stats = _pixel_stats(processor)
    return trainer


def _pixel_stats(processor) -> tuple[list[float], list[float]]:
    """``(mean, std)`` that map [0, 1] pixels to the model's ``pixel_values`` (identity when the
    processor does not normalise)."""
    ip = processor.image_processor
    if not getattr(ip, "do_normalize", True):
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return [float(m) for m in ip.image_mean], [float(v) for v in ip.image_std]


def _gaussian_blur(x, sigma: float):
    """Separable Gaussian blur of ``[N, C, H, W]`` (reflect padding); written here because torch has
    no blur of its own and torchvision is not a dependency."""
    import torch
    import torch.nn.functional as F

    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.transpose(2, 3), groups=x.shape[1])


def perturb_pixels(model, inputs: dict, guidance: GuidanceTraining, pixel_stats, generator=None) -> dict:
    """``inputs`` with the ``pixel_values`` of a share of its images noised, blurred or replaced by
    an adversarial version (see :class:`GuidanceTraining`); labels and text untouched."""
    import torch

    pv = inputs["pixel_values"]
    mean = torch.tensor(pixel_stats[0], dtype=pv.dtype, device=pv.device).view(1, -1, 1, 1)
    std = torch.tensor(pixel_stats[1], dtype=pv.dtype, device=pv.device).view(1, -1, 1, 1)
    x = (pv.detach() * std + mean).clamp(0, 1)  # [N, 3, H, W] in [0, 1]
    n = x.shape[0]

    def pick(share: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator, device="cpu") < share).to(pv.device)

    noisy, blurred = pick(guidance.noise_share), pick(guidance.blur_share)
    if noisy.any():
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(x) * guidance.noise_std
        x = torch.where(noisy.view(-1, 1, 1, 1), (x + noise).clamp(0, 1), x)
    if blurred.any():
        x = torch.where(blurred.view(-1, 1, 1, 1), _gaussian_blur(x, guidance.blur_sigma), x)
    attacked = pick(guidance.adversarial_share)
    if attacked.any():
        eps, steps = guidance.adversarial_eps, guidance.adversarial_steps
        step = guidance.adversarial_step_size or 2.5 * eps / steps
        mask = attacked.view(-1, 1, 1, 1).to(x.dtype)
        delta = torch.zeros_like(x, requires_grad=True)
        for _ in range(steps):
            loss = model(**{**inputs, "pixel_values": (((x + delta * mask).clamp(0, 1) - mean) / std).to(pv.dtype)}).loss
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                if guidance.adversarial_norm == "linf":
                    delta += step * grad.sign()
                    delta.clamp_(-eps, eps)
                else:
                    delta += step * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    delta *= (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).view(-1, 1, 1, 1)
        x = (x + delta.detach() * mask).clamp(0, 1)
    return {**inputs, "pixel_values": ((x - mean) / std).to(pv.dtype)}


def _with_module_lrs(base):
    class CriticTrainer(base):
        """Gives the parameters whose names contain a key of ``module_lrs`` that learning rate (the
        multimodal projector's, as LLaVA's trainer does; a trained vision tower's)."""

        module_lrs: dict[str, float] = {}
        guidance: GuidanceTraining | None = None
        pixel_stats: tuple[list[float], list[float]] = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.guidance is not None and self.guidance.active and model.training and "pixel_values" in inputs:
                inputs = perturb_pixels(model, inputs, self.guidance, self.pixel_stats)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
            opt_model = self.model if model is None else model
            for name, lr in self.module_lrs.items():
                ids = {id(p) for n, p in opt_model.named_parameters() if name in n and p.requires_grad}
                for group in list(optimizer.param_groups):
                    moved = [p for p in group["params"] if id(p) in ids]
                    if moved:
                        group["params"] = [p for p in group["params"] if id(p) not in ids]
                        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved, "lr": lr})
            return optimizer

    CriticTrainer.__name__ = f"Critic{base.__name__}"
    return CriticTrainer


def critic_config_for(config: CriticTrainConfig):
    """The scoring settings that match training: the dataset's views, grid and question, and no
    BOS added at scoring time -- TRL's collators tokenize the rendered chat with
    ``add_special_tokens=False``, so the critic must score exactly those token sequences."""
    from coherendream.critic.model import CriticConfig

    info_path = Path(config.dataset) / "build_info.json"
    if info_path.is_file():
        built = json.loads(info_path.read_text())["config"]
        orbit = built["render"]["orbit"]
        return CriticConfig(
            question_template=built["question_template"],
            num_views=orbit["random_views"] or len(orbit["azimuths"]),
            image_mode=built["image_mode"],
            grid_rows=built["grid_rows"],
            grid_cols=built["grid_cols"],
            add_special_tokens=False,
            # random views have no one elevation; distance and FoV still set the objects' size
            view_elevation=None if orbit["random_views"] else orbit["elevation"],
            view_distance=orbit["distance"],
            view_fov_y=orbit["fov_y"],
        )
    from datasets import load_dataset

    row = load_dataset(config.dataset, split=config.train_split)[0]
    images = len(row["images"])
    views = len(row["views"]) if "views" in row else images
    return CriticConfig(num_views=views, image_mode="grid" if images == 1 else "views", add_special_tokens=False)


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose ``trainer_state.json`` parses, or None.

    ``transformers.trainer_utils.get_last_checkpoint`` returns the newest folder whatever is in it;
    the Trainer writes ``trainer_state.json`` last, so a run killed while saving leaves a newer
    folder without that file, or with it cut short, and resuming from it would fail.
    """
    complete = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match is None or not path.is_dir():
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        complete.append((int(match.group(1)), path))
    return str(max(complete)[1]) if complete else None


# Training keys a resumed run may change: how long it runs and how it logs and saves, not what a
# step computes (``critic train`` resumes from the last checkpoint with more steps, say).
_RESUMABLE_TRAINING_KEYS = frozenset({"max_steps", "num_train_epochs", "save_steps", "save_total_limit", "logging_steps",
                                      "report_to", "run_name", "logging_dir", "dataloader_num_workers", "eval_steps"})  # fmt: skip


def train_critic(config: CriticTrainConfig) -> Path:
    """Train, save the adapter (or full model) and processor in ``output_dir``; returns it."""
    out = Path(config.output_dir)
    settings = {k: v for k, v in to_dict(config).items() if k not in ("output_dir", "resume_from_checkpoint")}
    settings["training"] = {k: v for k, v in config.training.items() if k not in _RESUMABLE_TRAINING_KEYS}
    folder = OutputFolder(out, "critic train", settings)  # before loading: a folder this run may not write is refused now
    trainer = make_trainer(config)  # first: a model or dataset that cannot load leaves no folder behind
    if trainer.is_world_process_zero():
        folder.take()
    else:
        out.mkdir(parents=True, exist_ok=True)
    write_text(out / "coherendream_train_config.yaml", dump_yaml(config))
    resume = config.resume_from_checkpoint
    if resume == "auto":
        resume = last_complete_checkpoint(out)
    with library_deprecations_hidden():
        trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out))  # collective under DeepSpeed ZeRO-3: every process takes part
    if trainer.is_world_process_zero():  # under torchrun, one process writes the rest
        trainer.processing_class.save_pretrained(str(out))
        critic_config_for(config).save(out)
        write_text(out / "log_history.json", json.dumps(trainer.state.log_history, indent=1))
    return out


def merge_adapter(base: str, adapter: str, output_dir: str, dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save a plain safetensors checkpoint + processor."""
    from peft import PeftModel

    from coherendream.critic.model import load_image_text_model, load_processor

    folder = OutputFolder(output_dir, "critic merge", {"base": base, "adapter": str(adapter), "dtype": dtype})
    model = load_image_text_model(base, _dtype(dtype), trust_remote_code)
    with library_deprecations_hidden():
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out = folder.take()
    merged.save_pretrained(str(out), safe_serialization=True)
    # the processor saved with the adapter (same tokenizer and chat template) wins over the base's
    source = adapter if (Path(adapter) / "preprocessor_config.json").exists() or (Path(adapter) / "processor_config.json").exists() else base
    load_processor(source, trust_remote_code).save_pretrained(str(out))
    from coherendream.critic.model import CriticConfig

    critic_config = CriticConfig.load(adapter)
    if critic_config is not None:
        critic_config.save(out)
    return out
