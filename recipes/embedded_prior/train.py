"""Train the embedded prior from scratch: a 32 px text-to-image diffusion model of procedural scenes.

    python recipes/embedded_prior/train.py --output-dir outputs/embedded_prior
    python recipes/embedded_prior/train.py --output-dir outputs/embedded_prior train_steps=200   # a smoke run

It reads top to bottom, like diffusers' ``train_text_to_image.py``:

1. build the training images with the project's own ``data build`` (``data.yaml`` beside this
   file: procedural scenes, four 32 px views each from random orbit cameras, on white);
2. keep the true captions, minus the held-out single-object prompts (``holdout_captions``), and
   append the view's direction to most of them ("a red cube, front view"), the text that SDS's
   view-dependent prompting sends;
3. build a random IF-layout pipeline (``coherendream.generation.pixel_prior``) and train its UNet
   and T5 text encoder together on the epsilon objective, with caption dropout for
   classifier-free guidance, min-SNR loss weighting, AdamW with warm-up and cosine decay, an EMA of
   the weights, and bf16 autocast where the CPU has it;
4. save the EMA weights as a diffusers folder (``save_pretrained``, safetensors) with the list of
   training captions and held-out prompts beside them, the loss curve (``loss.csv``, ``loss.png``)
   and the resolved settings.

A run resumes from ``<output-dir>/checkpoint.pt`` when it is re-run with the same settings.
Evaluate the result with ``coherendream eval prior --prior <output-dir>/pipeline -o <folder>``;
copy that folder to ``generation/embedded/`` to make it the toolkit's default prior.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coherendream.config import dump_yaml, load_config, read_yaml, to_dict
from coherendream.devices import cpu_has_fast_bf16
from coherendream.generation.camera_sampler import view_prompt
from coherendream.generation.pixel_prior import TEXT_MAX_LENGTH, PixelPriorShapes, build_pixel_prior
from coherendream.io import atomic_path, write_json, write_text

HERE = Path(__file__).resolve().parent


@dataclass
class TrainPriorConfig:
    """Settings of the recipe (``train.yaml``); any key can be overridden as ``key=value``."""

    data_config: str = "data.yaml"  # relative paths are read from the training config's folder
    data_overrides: list[str] = field(default_factory=list)  # key=value settings of the data build
    holdout_captions: list[str] = field(default_factory=list)
    view_prompt_prob: float = 0.8
    caption_dropout: float = 0.1
    shapes: PixelPriorShapes = field(default_factory=PixelPriorShapes)
    train_steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 3.0e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    snr_gamma: float | None = 5.0
    ema_decay: float = 0.999
    mixed_precision: str = "auto"  # "auto" (bf16 autocast where the CPU has bf16 units, else none) | "bf16" | "no"
    seed: int = 0
    num_threads: int = 2
    checkpoint_every: int = 500
    log_every: int = 25


def load_training_images(data_dir: Path, holdout: set[str], view_prob: float, seed: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """Positive rows' views as ``uint8 [N, 3, 32, 32]`` on white, with plain and view-dependent captions."""
    from coherendream.data.build import load_built_dataset

    ds = load_built_dataset(data_dir)["train"]
    ds = ds.filter(lambda label, caption: label == 1 and caption not in holdout, input_columns=["label", "caption"])
    rng = random.Random(seed)
    images, plain, with_view = [], [], []
    for row in ds:
        for view, meta in zip(row["views"], row["views_meta"]):
            rgba = np.asarray(view.convert("RGBA"), dtype=np.float32) / 255.0
            rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])  # over white, as the generator renders
            images.append(np.round(rgb * 255.0).astype(np.uint8).transpose(2, 0, 1))
            plain.append(row["caption"])
            use_view = rng.random() < view_prob
            with_view.append(view_prompt(row["caption"], meta["azimuth"], meta["elevation"]) if use_view else row["caption"])
    return torch.from_numpy(np.stack(images)), plain, with_view


def lr_at(step: int, cfg: TrainPriorConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def plot_loss(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss (mean over the logging window)")
    k = max(1, len(loss) // 20)
    if len(loss) > k:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"moving mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE (min-SNR weighted)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    """Run the recipe; returns the saved pipeline folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default=str(HERE / "train.yaml"))
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. train_steps=200")
    args = parser.parse_args(argv)
    cfg = load_config(TrainPriorConfig, args.config, args.overrides)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()

    # ---- 1. data (resumable: `data build` continues a partial build)
    from coherendream.data.build import BuildConfig, build_dataset

    data_dir = out / "data"
    data_config = Path(cfg.data_config)
    if not data_config.is_absolute():
        data_config = Path(args.config).resolve().parent / data_config
    if not (data_dir / "build_info.json").is_file():
        build_cfg = load_config(BuildConfig, data_config, [*cfg.data_overrides, f"output_dir={data_dir}"])
        build_dataset(build_cfg)
    t_data = time.perf_counter() - t_start

    # ---- 2. images and captions
    images, plain, captions = load_training_images(data_dir, set(cfg.holdout_captions), cfg.view_prompt_prob, cfg.seed)
    n = len(images)
    print(f"{n} training images from {data_dir} ({len(set(plain))} distinct captions, {len(cfg.holdout_captions)} held out)")

    # ---- 3. model, optimiser, EMA
    from diffusers.training_utils import EMAModel, compute_snr

    pipe = build_pixel_prior(cfg.shapes, seed=cfg.seed)
    unet, text_encoder, tokenizer, scheduler = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    unet.train()
    text_encoder.train()
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ema = EMAModel(params, decay=cfg.ema_decay)
    print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M parameters")

    # Every caption is tokenized once, padded to the length the pipeline and SDS use.
    vocab = sorted(set(captions) | {""})
    index = {c: i for i, c in enumerate(vocab)}
    tokens = tokenizer(vocab, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt")
    caption_ids = torch.tensor([index[c] for c in captions])
    empty_id = index[""]

    generator = torch.Generator().manual_seed(cfg.seed)
    ckpt_path, log_rows, start = out / "checkpoint.pt", [], 0
    resolved = to_dict(cfg)
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["config"] != resolved:
            raise SystemExit(f"{ckpt_path} is from a run with other settings; use another --output-dir or delete it")
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        start, log_rows = state["step"], state["log"]
        print(f"resumed from step {start}")
    write_text(out / "train_config.yaml", dump_yaml(cfg))

    # ---- 4. the loop
    from tqdm.auto import tqdm

    if cfg.mixed_precision not in ("auto", "bf16", "no"):
        raise SystemExit(f"mixed_precision must be auto, bf16 or no, got {cfg.mixed_precision!r}")
    autocast = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and cpu_has_fast_bf16())
    print(f"autocast {'bf16' if autocast else 'off (float32)'}, {torch.get_num_threads()} torch threads"
          + ("" if autocast or cpu_has_fast_bf16() else " (this CPU has no bf16 units: emulated bf16 is 10-20x slower)"))
    window: list[float] = []
    bar = tqdm(range(start, cfg.train_steps), initial=start, total=cfg.train_steps, desc="train prior", dynamic_ncols=True)
    t_loop = time.perf_counter()
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=generator)
        x0 = images[idx].float() / 127.5 - 1.0  # [B, 3, 32, 32] in [-1, 1]
        cap = caption_ids[idx]
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        cap = torch.where(drop, torch.full_like(cap, empty_id), cap)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = text_encoder(tokens.input_ids[cap], attention_mask=tokens.attention_mask[cap]).last_hidden_state
            pred = unet(x_t, t, encoder_hidden_states=hidden).sample
        mse = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma is not None:
            # min-SNR weighting (Hang et al. 2023), as in diffusers' training scripts
            snr = compute_snr(scheduler, t)
            mse = mse * torch.minimum(snr, torch.full_like(snr, cfg.snr_gamma)) / snr
        loss = mse.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        ema.step(params)
        window.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.train_steps:
            log_rows.append({"step": done, "loss": float(np.mean(window)), "lr": lr_at(step, cfg), "seconds": time.perf_counter() - t_loop})
            bar.set_postfix(loss=f"{np.mean(window):.4f}")
            window = []
        if done % cfg.checkpoint_every == 0 and done < cfg.train_steps:
            state = {"step": done, "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "optimizer": optimizer.state_dict(),
                     "ema": ema.state_dict(), "generator": generator.get_state(), "log": log_rows, "config": resolved}  # fmt: skip
            with atomic_path(ckpt_path) as tmp:
                torch.save(state, tmp)
    bar.close()
    t_train = time.perf_counter() - t_loop

    # ---- 5. save the EMA weights as a diffusers folder, and the loss curve
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    write_text(out / "loss.csv", "step,loss,lr,seconds\n" + "".join(f"{r['step']},{r['loss']:.6f},{r['lr']:.3e},{r['seconds']:.1f}\n" for r in log_rows))
    plot_loss(log_rows, out / "loss.png")
    info = {
        "training_images": n, "distinct_captions": len(set(plain)), "holdout_captions": cfg.holdout_captions,
        "seconds_data": round(t_data, 1), "seconds_train_this_call": round(t_train, 1), "steps": cfg.train_steps, "resumed_from": start or None,
        "data_config": read_yaml(data_config), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "autocast_bf16": autocast,
    }  # fmt: skip
    write_json(out / "train_info.json", info)
    # What the model card and `eval prior` need to know of the training data, kept with the weights.
    write_json(out / "pipeline" / "training.json", {k: info[k] for k in ("training_images", "distinct_captions", "holdout_captions", "steps", "data_config")})
    write_text(out / "pipeline" / "training_captions.txt", "".join(f"{c}\n" for c in sorted(set(plain))))
    if ckpt_path.is_file():
        ckpt_path.unlink()
    print(json.dumps({k: info[k] for k in ("training_images", "seconds_data", "seconds_train_this_call")}))
    print(f"saved {out / 'pipeline'}")
    return out / "pipeline"


if __name__ == "__main__":
    main()
