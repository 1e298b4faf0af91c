"""The ``coherendream`` command. Each subcommand is a thin wrapper over a Python function.

Configs: ``--config file.yaml`` plus ``key.sub=value`` overrides as trailing arguments, e.g.
``coherendream data build -c configs/data/procedural.yaml source.num_scenes=500 render.resolution=128``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from coherendream.cli_options import options_from, warn_deprecated
from coherendream.config import ConfigError
from coherendream.output_folder import FolderTaken, OutputFolder, check_writable
from coherendream.eval.assets import AssetsEvalConfig
from coherendream.eval.critic_eval import CriticEvalConfig
from coherendream.eval.judge import JudgeConfig
from coherendream.eval.prior_eval import PriorEvalConfig
from coherendream.eval.procedural import DEFAULT_METHODS, ProceduralEvalConfig
from coherendream.eval.steering import SteeringEvalConfig
from coherendream.eval.t3bench import T3BenchConfig
from coherendream.eval.tifa import TifaConfig
from coherendream.shards import NUM_SHARDS_HELP, SHARD_INDEX_HELP

app = typer.Typer(help="CoherenDream: multimodal-LLM critics of text-to-3D alignment.", no_args_is_help=True, add_completion=False, rich_markup_mode=None)
data_app = typer.Typer(help="Build multiview text-alignment datasets from 3D assets.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")
critic_app = typer.Typer(help="Train, merge and apply multiview critics.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(critic_app, name="critic")
eval_app = typer.Typer(help="Evaluate critics and 3D assets.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(eval_app, name="eval")
prior_app = typer.Typer(help="Look at what a text-to-image diffusion prior knows before distilling from it.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(prior_app, name="prior")

Overrides = Annotated[Optional[list[str]], typer.Argument(help="config overrides, key.sub=value", show_default=False)]
ConfigPath = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file", exists=True, dir_okay=False)]
# One way to split a batch job over processes, for every command that has one (coherendream.shards).
NumShards = Annotated[Optional[int], typer.Option(help=NUM_SHARDS_HELP)]
# The command line's one naming scheme: --critic (with --adapter, --dtype, --device) for the critic a
# command uses, --prior for a diffusion prior, --model only for the base model `critic train`
# fine-tunes (Hugging Face's model_name_or_path), -o/--output for what a command writes,
# --generations for existing generations. Old spellings keep working for one release, with a warning.
CriticOption = Annotated[Optional[str], typer.Option("--critic", help="critic: hub id or local path (default: the embedded procedural critic)")]
AdapterOption = Annotated[Optional[Path], typer.Option(help="PEFT adapter on top of --critic")]
DtypeOption = Annotated[Optional[str], typer.Option(help="bfloat16, float16 or float32 (default: bf16 on CUDA, fp32 on CPU)")]
DeviceOption = Annotated[Optional[str], typer.Option(help="cuda or cpu (default: cuda when available)")]
OldModelOption = Annotated[Optional[str], typer.Option("--model", hidden=True, help="deprecated: use --critic")]
PriorOption = Annotated[Optional[str], typer.Option("--prior", help="prior: diffusers pipeline folder or hub id (default: the embedded prior)")]
ShardIndex = Annotated[Optional[int], typer.Option(help=SHARD_INDEX_HELP)]


class _EchoHandler(logging.Handler):
    """The toolkit's INFO lines (device, precision, threads, resuming) on stderr, through typer so
    that they go wherever the command's output goes."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


@app.callback()
def _setup() -> None:
    package = logging.getLogger("coherendream")
    if not any(isinstance(h, _EchoHandler) for h in package.handlers):
        package.addHandler(_EchoHandler())
        package.setLevel(logging.INFO)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


# What a user can do about the commonest reasons an item is rejected.
_REMEDIES = {
    "outside_root": "paths outside the manifest's folder: pass --root with a folder that holds them",
    "missing_file": "files not found: paths are relative to the manifest's folder (or --root)",
    "not_a_folder": "3D files where folders of views were expected: `coherendream eval assets` renders and scores 3D files",
    "empty_prompt": "rows without a prompt: the manifest needs a prompt (or caption) column",
    "too_few_views": "folders with fewer images than the critic's views (.png, .jpg, .jpeg or .webp files)",
    "missing_prompt": "view folders without a prompt: add caption.txt to each (critic score: or pass --prompts-file)",
    "missing_output": "no folder for these prompts under --generations: <dir>/<slug>/ or <dir>/<prompt file stem>/<slug>/, "
                      "slugs as in errors.jsonl",
}


def _end_scoring(summary: dict, kind: str, source: Path, output: Path, where: str) -> None:
    """How a sharded scoring command ends: a shard's progress, or the merged counts, one line per
    reason items were rejected (with the remedy where there is one), and a non-zero exit when
    nothing could be scored."""
    if not summary["merged"]:
        typer.echo(f"{summary['chunks_done']} chunks scored, {summary['chunks_skipped']} already done; other shards still have chunks to score")
        return
    typer.echo(f"scored {summary['scored']} of {summary[kind]} {kind} ({summary['errors']} errors, see errors.jsonl){where}")
    _echo_rejects(summary[kind], summary["errors_by_reason"])
    if summary["scored"] == 0:
        _fail(f"no {kind[:-1]} of {source} could be scored (reasons in {Path(output) / 'errors.jsonl'})")


def _critic_source(critic: Optional[str], adapter: Optional[Path], model: Optional[str] = None) -> dict:
    """The critic as an output folder records it: what `Critic.from_pretrained` is given (its ``source``)."""
    from coherendream.critic.model import default_critic_path

    return {"critic": str(critic or model or default_critic_path()), "adapter": None if adapter is None else str(adapter)}


def _check_output(config, command: str, critic_source: Optional[dict] = None, resumes: bool = False) -> None:
    """Refuse, before any model loads, an output folder the eval command may not write; say when it resumes."""
    from coherendream.eval.protocol import output_folder

    try:
        folder = output_folder(config, command, critic_source)
    except ValueError as err:
        _fail(str(err))
    if resumes and folder.resuming:
        typer.echo(f"resuming in {config.output_dir} (its earlier run had the same settings)")


def _echo_rejects(total: int, by_reason: dict[str, int]) -> None:
    """One line per reason items were rejected, with the remedy where there is one."""
    for reason, count in by_reason.items():
        remedy = _REMEDIES.get(reason)
        typer.echo(f"  {count} of {total} rejected: {reason}" + (f" ({remedy})" if remedy else ""))


@data_app.command("build")
def data_build(
    overrides: Overrides = None,
    config: ConfigPath = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output folder")] = None,
    procedural: Annotated[Optional[int], typer.Option(help="source: this many procedural scenes")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="source: CSV/JSONL manifest (uid, path, caption)")] = None,
    mesh_dir: Annotated[Optional[Path], typer.Option(help="source: folder of meshes with <name>.txt captions")] = None,
    render_dir: Annotated[Optional[Path], typer.Option(help="source: folder of <uid>/ view folders with caption.txt")] = None,
    path_pattern: Annotated[Optional[str], typer.Option(help="manifest without paths (Cap3D): e.g. '{uid}.glb'")] = None,
    root: Annotated[Optional[Path], typer.Option(help="root of manifest paths (default: the manifest's folder)")] = None,
    num_workers: Annotated[Optional[int], typer.Option(help="parallel worker processes")] = None,
    num_shards: NumShards = None,
    shard_index: ShardIndex = None,
    overwrite: Annotated[bool, typer.Option(help="discard an existing build in the output folder")] = False,
) -> None:
    """Render assets into V views and write yes/no prompt/completion rows as a Hugging Face dataset.

    Re-running the same command resumes an interrupted build.
    """
    from coherendream.config import load_config, override
    from coherendream.data.build import BuildConfig, build_dataset
    from coherendream.shards import shard_from_env

    extra = list(overrides or [])
    sources = [(k, v) for k, v in (("procedural", procedural), ("manifest", manifest), ("mesh_dir", mesh_dir), ("render_dir", render_dir)) if v is not None]
    if len(sources) > 1:
        _fail("give at most one of --procedural, --manifest, --mesh-dir, --render-dir")
    for kind, value in sources:
        extra.append(f"source.kind={kind}")
        extra.append(f"source.num_scenes={value}" if kind == "procedural" else override("source.path", str(value)))
    if path_pattern is not None:
        extra.append(override("source.path_pattern", path_pattern))
    if root is not None:
        extra.append(override("source.root", str(root)))
    if output is not None:
        extra.append(override("output_dir", str(output)))
    env_shards = shard_from_env()
    if num_shards is None and shard_index is None and env_shards is not None:
        num_shards, shard_index = env_shards
    for key, value in (("num_workers", num_workers), ("num_shards", num_shards), ("shard_index", shard_index)):
        if value is not None:
            extra.append(f"{key}={value}")
    if overwrite:
        extra.append("overwrite=true")
    try:
        cfg = load_config(BuildConfig, config, extra)
        result = build_dataset(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if not result.finalized:
        typer.echo(f"shard {cfg.shard_index}/{cfg.num_shards} done: {result.chunks_done}/{result.chunks_total} chunks complete; the last shard to finish writes the dataset")
        return
    rows = ", ".join(f"{s}: {n}" for s, n in result.rows.items()) or "none"
    if result.rows:
        typer.echo(f"dataset written to {result.output_dir.resolve()}")
    typer.echo(f"rows: {rows}; rejected inputs: {result.rejected} (see rejected.jsonl); {result.seconds:.1f} s")
    _echo_rejects(result.inputs, result.rejected_by_reason)
    if not result.rows:
        _fail(f"no input of {cfg.source.path or 'the source'} could be used (reasons in {result.output_dir / 'rejected.jsonl'})")


@data_app.command("export-llava")
def data_export_llava(
    dataset_dir: Annotated[Path, typer.Argument(help="a folder written by `data build`")],
    output_arg: Annotated[Optional[Path], typer.Argument(metavar="[OUTPUT]", help="the same as -o", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="folder for images/ and <split>.json")] = None,
    split: Annotated[str, typer.Option(help="split to export")] = "train",
) -> None:
    """Export a split as LLaVA conversation JSON with the view grids as image files."""
    from coherendream.data.export import export_llava

    output = _one_output(output, output_arg)
    try:
        path = export_llava(dataset_dir, output, split)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"wrote {path}")


def _one_output(option: Optional[Path], positional: Optional[Path]) -> Path:
    """-o, or the older positional form; never two different ones."""
    if option is not None and positional is not None and option != positional:
        _fail(f"two outputs given ({positional} and -o {option}): give one")
    if option is None and positional is None:
        _fail("missing option '--output' / '-o'")
    return option or positional


def _end_process_group() -> None:
    """Under torchrun: wait until rank 0 has written the folder, then close the process group. A
    process that exits with gloo's threads still running aborts ("terminate called without an
    active exception"), which fails the whole torchrun job after the work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@critic_app.command("train")
def critic_train(
    overrides: Overrides = None,
    config: ConfigPath = None,
    model: Annotated[Optional[str], typer.Option(help="base model: hub id or local path")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="a `data build` folder or a dataset id")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output folder (adapter, checkpoints)")] = None,
    mode: Annotated[Optional[str], typer.Option(help="sft (yes/no answers) or dpo (pairwise preference)")] = None,
) -> None:
    """Fine-tune a critic with TRL + LoRA. `training.*` keys go to TRL's SFTConfig/DPOConfig unchanged,
    e.g. `training.per_device_train_batch_size=4 training.deepspeed=zero3 training.report_to=wandb`."""
    from coherendream.config import load_config, override
    from coherendream.critic.train import CriticTrainConfig, train_critic

    extra = list(overrides or [])
    for key, value in (("model_name_or_path", model), ("dataset", dataset), ("output_dir", output), ("mode", mode)):
        if value is not None:
            extra.append(override(key, str(value)))
    try:
        cfg = load_config(CriticTrainConfig, config, extra)
    except (ConfigError, ValueError) as err:
        _fail(str(err))
    try:
        out = train_critic(cfg)
    except (FileNotFoundError, ConfigError, FolderTaken) as err:  # settings, a model, a dataset or a folder that do not fit; other errors keep their traceback
        _fail(str(err))
    _end_process_group()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes the folder, so only it says so
        typer.echo(f"critic written to {Path(out).resolve()}")


@critic_app.command("merge")
def critic_merge(
    adapter: Annotated[Path, typer.Option(help="adapter folder written by `critic train`")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for the merged model")],
    base: Annotated[Optional[str], typer.Option(help="base model (default: the one named in the adapter)")] = None,
) -> None:
    """Merge a LoRA adapter into its base and save a plain safetensors checkpoint that loads without PEFT."""
    import json as _json

    from coherendream.critic.train import merge_adapter

    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        _fail(f"{adapter}: no adapter_config.json (not a PEFT adapter folder)")
    base = base or _json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base:
        _fail(f"{cfg_file}: names no base model; pass --base")
    try:
        out = merge_adapter(base, str(adapter), str(output))
    except (FileNotFoundError, FolderTaken) as err:
        _fail(str(err))
    typer.echo(f"merged model written to {Path(out).resolve()}")


@critic_app.command("score")
def critic_score(
    input: Annotated[Path, typer.Option("--input", "-i", help="render folder (<uid>/*.png), `data build` folder, or CSV/JSONL manifest (id, path, prompt)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for scores.csv/jsonl, errors.jsonl, summary.json")],
    critic: Annotated[
        Optional[str],
        typer.Option("--critic", help="critic: hub id or local path, a merged model or an adapter folder (default: the embedded procedural critic)"),
    ] = None,
    adapter: AdapterOption = None,
    kind: Annotated[Optional[str], typer.Option(help="dataset, manifest or render_dir (default: detected)")] = None,
    split: Annotated[str, typer.Option(help="dataset split to score")] = "test",
    prompts_file: Annotated[Optional[Path], typer.Option(help="render folders: CSV/JSONL of uid, prompt (instead of caption.txt)")] = None,
    root: Annotated[Optional[Path], typer.Option(help="manifest: root of its paths (default: its folder)")] = None,
    batch_size: Annotated[int, typer.Option(help="samples per forward pass")] = 8,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    num_shards: NumShards = None,
    shard_index: ShardIndex = None,
    chunk_size: Annotated[int, typer.Option(help="items per chunk (the unit of resuming and of splitting)")] = 256,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier `critic score` run with other settings in the output folder")] = False,
    model: OldModelOption = None,
) -> None:
    """Score 3D assets' views against prompts: P("Yes") and the yes/no logit margin per item.

    Items that cannot be scored (unreadable image, wrong number of views, empty prompt, a path
    outside the manifest's root) are listed with their reason in errors.jsonl; the rest are scored.
    Finished chunks are kept under the output folder: re-running resumes, and processes given
    --num-shards/--shard-index (or started by torchrun or a SLURM array) share the work.
    """
    from coherendream.critic.batch import items_from_input, score_to_files
    from coherendream.critic.model import default_critic_path

    try:
        items = items_from_input(input, kind, split=split, prompts_file=prompts_file, root=root)
        settings = {"input": str(input), "kind": kind, "split": split, "prompts_file": prompts_file and str(prompts_file),
                    "root": root and str(root), "chunk_size": chunk_size, "critic": _critic_source(critic, adapter, model)}  # fmt: skip
        folder = OutputFolder(output, "critic score", settings, overwrite=overwrite and not shard_index)
        if folder.resuming:
            typer.echo(f"resuming in {output} (its earlier run had the same settings)")
        scorer = _load_critic(critic, adapter, dtype, device, model)
        folder.take()
        metadata = {"model": critic or model or str(default_critic_path()), "adapter": str(adapter) if adapter else None, "input": str(input)}
        summary = score_to_files(scorer, items, output, batch_size=batch_size, metadata=metadata,
                                 num_shards=num_shards, shard_index=shard_index, chunk_size=chunk_size)  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    _end_scoring(summary, "items", input, output, f" -> {Path(output).resolve()}")


@critic_app.command("build-tiny")
def critic_build_tiny(
    output_arg: Annotated[Optional[Path], typer.Argument(metavar="[OUTPUT]", help="the same as -o", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="folder for the random tiny critic")] = None,
    image_size: Annotated[int, typer.Option(help="processor crop size in pixels")] = 64,
    patch_size: Annotated[int, typer.Option(help="vision patch size; (image_size / patch_size)^2 image tokens")] = 8,
    text_hidden: Annotated[int, typer.Option(help="hidden size of the Llama text model")] = 64,
    text_layers: Annotated[int, typer.Option(help="decoder layers of the text model")] = 2,
    text_heads: Annotated[int, typer.Option(help="attention heads of the text model (and of the vision tower)")] = 4,
    vision_hidden: Annotated[int, typer.Option(help="hidden size of the CLIP vision tower")] = 32,
    vision_layers: Annotated[int, typer.Option(help="encoder layers of the vision tower")] = 2,
    vision_feature_layer: Annotated[
        Optional[int], typer.Option(help="hidden state used as image tokens (default -2, or -1 with one layer; -2 with one layer: the patch embeddings)")
    ] = None,
    initializer_range: Annotated[float, typer.Option(help="std of the random weights")] = 0.02,
    seed: Annotated[int, typer.Option(help="weight initialisation seed")] = 0,
) -> None:
    """Build a tiny random LLaVA critic offline (word-level tokenizer, CLIP processor), for tests and experiments."""
    from coherendream.critic.tiny import build_tiny_critic

    output = _one_output(output, output_arg)
    try:
        OutputFolder(output, "critic build-tiny", {}, overwrite=True).take()  # a random critic: same or new, never another's folder
        path = build_tiny_critic(
            output, image_size=image_size, patch_size=patch_size, text_hidden=text_hidden, text_layers=text_layers,
            num_heads=text_heads, vision_hidden=vision_hidden, vision_layers=vision_layers, vision_feature_layer=vision_feature_layer,
            initializer_range=initializer_range, seed=seed,
        )
    except ValueError as err:
        _fail(str(err))
    typer.echo(f"tiny critic written to {path}")


@app.command("generate")
def generate_command(
    overrides: Overrides = None,
    config: ConfigPath = None,
    prompt: Annotated[Optional[str], typer.Option(help="text prompt of the scene")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output folder (re-running it resumes)")] = None,
    critic: Annotated[Optional[str], typer.Option(help="critic: local folder or hub id (default: the embedded procedural critic)")] = None,
    adapter: AdapterOption = None,
    dtype: DtypeOption = None,
    prior: Annotated[Optional[str], typer.Option(help="diffusers prior, latent (SD) or pixel-space (IF, the embedded prior): hub id or folder, or 'none' (default: the embedded prior on CPU)")] = None,
    mode: Annotated[Optional[str], typer.Option(help="sds, tcsd or reward_weighted")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimisation steps")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda")] = None,
) -> None:
    """Generate 3D Gaussians for a prompt with TCSD (SDS prior + critic term) and write a 3DGS PLY,
    multiview PNGs, a turntable GIF, the resolved config, the layout and a metrics JSONL.

    Re-running with the same output folder resumes from its last checkpoint.
    """
    from coherendream.config import load_config, override
    from coherendream.generation.runner import GenerateConfig, generate

    extra = list(overrides or [])
    for key, value in (("prompt", prompt), ("output_dir", output), ("critic.path", critic), ("critic.adapter", adapter), ("critic.dtype", dtype), ("mode", mode)):
        if value is not None:
            extra.append(override(key, str(value)))
    if prior is not None:
        extra.append("prior=none" if prior.lower() == "none" else override("prior.pretrained_model_name_or_path", prior))
    for key, value in (("steps", steps), ("device", device)):
        if value is not None:
            extra.append(f"{key}={value}")
    try:
        cfg = load_config(GenerateConfig, config, extra)
        result = generate(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if not result.finished:
        typer.echo(f"stopped at step {result.step}/{cfg.steps}; run the same command again to resume -> {result.output_dir.resolve()}")
        return
    score = result.final_critic
    typer.echo(f"generated in {result.output_dir.resolve()} ({result.step} steps, {len(result.skipped_steps)} skipped, {result.seconds:.1f} s)")
    if score is not None:
        where = f"azimuths {'/'.join(f'{a:g}' for a in score['azimuths'])}, elevation {score['elevation']:g}"
        typer.echo(f"critic on the final Gaussians from its training orbit ({where}): P(yes) = {score['prob_yes']:.4f}, "
                   f"margin = {score['margin']:.4f} (the progress bar's P(yes) is on each step's random cameras)")
    for note in result.notes:
        typer.echo(f"note: {note}")


def _load_critic(critic: Optional[str], adapter: Optional[Path] = None, dtype: Optional[str] = None, device: Optional[str] = None,
                 model: Optional[str] = None):  # fmt: skip
    """The critic named by --critic (or the deprecated --model), else the embedded one."""
    from coherendream.critic.model import Critic, default_critic_path

    if model is not None:
        warn_deprecated("--model", "--critic")
    return Critic.from_pretrained(critic or model or default_critic_path(), adapter=adapter, dtype=dtype, device=device)


@eval_app.command("critic")
@options_from(CriticEvalConfig, _fail)
def eval_critic(config: CriticEvalConfig, critic: CriticOption = None, adapter: AdapterOption = None, dtype: DtypeOption = None,
                device: DeviceOption = None, model: OldModelOption = None) -> None:
    """Accuracy, ROC-AUC, calibration (ECE, reliability diagram) and pairwise accuracy, per negative type."""
    from coherendream.eval.critic_eval import evaluate_critic, per_type_table

    _check_output(config, "critic", _critic_source(critic, adapter, model))
    try:
        metrics = evaluate_critic(_load_critic(critic, adapter, dtype, device, model), config)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    o = metrics["overall"]
    typer.echo(f"{metrics['scored']} rows: accuracy {o['accuracy']:.3f}, ROC-AUC {o['roc_auc'] if o['roc_auc'] is None else round(o['roc_auc'], 3)}, ECE {o['ece']:.3f}")
    for row in per_type_table(metrics):
        if row["n"]:
            typer.echo(f"  {row['negative type']:>14}: accuracy {row['accuracy']:.3f} (n={row['n']})")
    typer.echo(f"report: {config.output_dir.resolve() / 'report.html'}")


@eval_app.command("assets")
@options_from(AssetsEvalConfig, _fail)
def eval_assets(config: AssetsEvalConfig, critic: CriticOption = None, adapter: AdapterOption = None, dtype: DtypeOption = None,
                device: DeviceOption = None, model: OldModelOption = None) -> None:
    """Render each asset with the toolkit's renderers and score it against its prompt.

    Finished chunks of assets are kept under the output folder: re-running resumes, and
    processes given --num-shards/--shard-index (or started by torchrun or a SLURM array) share them.
    """
    from coherendream.data.manifest import check_manifest
    from coherendream.eval.assets import evaluate_assets

    _check_output(config, "assets", _critic_source(critic, adapter, model), resumes=True)
    try:
        check_manifest(config.manifest)  # before the critic loads: a manifest no row of which can be used
        summary = evaluate_assets(_load_critic(critic, adapter, dtype, device, model), config)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    _end_scoring(summary, "assets", config.manifest, config.output_dir, f"; report: {config.output_dir.resolve() / 'report.html'}")


def _summary_line(summary: dict, output: Path) -> None:
    keys = [k for k, v in summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k != "note"][:8]
    typer.echo(", ".join(f"{k}: {summary[k]:.3f}" if isinstance(summary[k], float) else f"{k}: {summary[k]}" for k in keys))
    typer.echo(f"results in {Path(output).resolve()}")


@eval_app.command("t3bench")
@options_from(T3BenchConfig, _fail)
def eval_t3bench(
    config: T3BenchConfig,
    critic: CriticOption = None,
    adapter: AdapterOption = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    model: OldModelOption = None,
    vqa_model: Annotated[Optional[str], typer.Option(help="any LLaVA-family model for VQAScore-style P(yes) as a second alignment score")] = None,
) -> None:
    """T3Bench-style protocol: alignment (critic, optional VQAScore) and a quality proxy, one table per prompt set.

    With --generate-config, processes given --num-shards/--shard-index (or started by torchrun or a
    SLURM array) share the generations; the last to finish scores them all. Re-running resumes.
    """
    from coherendream.eval.t3bench import make_vqa_scorer, run_t3bench

    _check_output(config, "t3bench", _critic_source(critic, adapter, model), resumes=True)
    try:
        scorer = _load_critic(critic, adapter, dtype, device, model)
        vqa = make_vqa_scorer(vqa_model, num_views=scorer.config.num_views) if vqa_model else None
        summary = run_t3bench(config, scorer, vqa_scorer=vqa)
    except (ValueError, FileNotFoundError, ConfigError) as err:
        _fail(str(err))
    if not summary["merged"]:
        typer.echo("this shard's generations are done; other shards still generate, and the last to finish scores them all")
        return
    keys = [k for k in ("alignment_critic", "alignment_vqa", "quality_proxy") if any(v["means"].get(k) is not None for v in summary["sets"].values())]
    typer.echo(f"{'set':>16} {'scored':>9} " + " ".join(f"{k:>16}" for k in keys))
    for name, v in summary["sets"].items():
        means = " ".join(f"{v['means'][k]:>16.3f}" if v["means"].get(k) is not None else f"{'':>16}" for k in keys)
        typer.echo(f"{name:>16} {v['scored']:>4} of {v['prompts']:<3} {means}")
    typer.echo(f"results and reports in {config.output_dir.resolve()} (<set>/results.csv, <set>/report.html)")
    for name, v in summary["sets"].items():
        if v["errors_by_reason"]:
            typer.echo(f"{name}:")
            _echo_rejects(v["prompts"], v["errors_by_reason"])
    if not any(v["scored"] for v in summary["sets"].values()):
        _fail(f"no prompt could be scored (reasons in {config.output_dir}/<set>/errors.jsonl)")


@eval_app.command("tifa")
@options_from(TifaConfig, _fail)
def eval_tifa(config: TifaConfig, critic: CriticOption = None, adapter: AdapterOption = None, dtype: DtypeOption = None,
                device: DeviceOption = None, model: OldModelOption = None) -> None:
    """TIFA-style protocol: yes/no questions from each prompt, answered by an MLLM on the renders."""
    from coherendream.eval.tifa import question_scorer, run_tifa

    _check_output(config, "tifa", _critic_source(critic, adapter, model))
    try:
        summary = run_tifa(config, question_scorer(_load_critic(critic, adapter, dtype, device, model)))
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    _summary_line(summary, config.output_dir)
    typer.echo("(accuracy_yes: stated facts answered yes; accuracy_no: contrast facts answered no; tifa: mean share of a prompt's "
               f"questions answered as expected) report: {Path(config.output_dir).resolve() / 'report.html'}")  # fmt: skip
    _echo_rejects(summary["prompts"], summary["errors_by_reason"])
    if summary["scored"] == 0:
        _fail(f"no prompt of {config.prompt_file} could be scored (reasons in {config.output_dir / 'errors.jsonl'})")


@eval_app.command("judge")
@options_from(JudgeConfig, _fail)
def eval_judge(config: JudgeConfig, critic: CriticOption = None, adapter: AdapterOption = None, dtype: DtypeOption = None,
                device: DeviceOption = None, model: OldModelOption = None) -> None:
    """Pairwise MLLM judging of methods' renders per prompt, with maximum-likelihood Elo."""
    from coherendream.eval.judge import judge_methods

    _check_output(config, "judge", _critic_source(critic, adapter, model))
    try:
        summary = judge_methods(config, _load_critic(critic, adapter, dtype, device, model))
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    _summary_line(summary, config.output_dir)
    if summary.get("note"):
        typer.echo(f"note: {summary['note']}")


@eval_app.command("steering")
@options_from(SteeringEvalConfig, _fail)
def eval_steering(config: SteeringEvalConfig, critic: CriticOption = None, adapter: AdapterOption = None, dtype: DtypeOption = None,
                  device: DeviceOption = None) -> None:  # fmt: skip
    """Whether a critic's gradient steers: wrong colours on two-group scenes, optimised by the critic alone, judged by the ground truth."""
    from coherendream.eval.steering import run_steering_eval

    _check_output(config, "steering", _critic_source(critic, adapter))
    try:
        summary = run_steering_eval(_load_critic(critic, adapter, dtype, device), config)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    for row in summary["table"]:
        typer.echo(f"{row['start']:>8} start, {row['scenes']} scenes: own colour {row['own colour before']:.2f} -> {row['own colour after']:.2f}, "
                   f"swapped {row['swapped before']:.2f} -> {row['swapped after']:.2f}, P(yes) {row['P(yes) before']:.2f} -> "
                   f"{row['P(yes) after']:.2f}, hacked {row['hacked']:.2f}")  # fmt: skip
    typer.echo(f"{summary['seconds']:.0f} s; report: {Path(config.output_dir).resolve() / 'report.html'}")


@prior_app.command("sample")
def prior_sample(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="text prompt; repeat for several rows")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file of the grid (one row per prompt)")],
    prior: PriorOption = None,
    model: Annotated[Optional[str], typer.Option("--model", hidden=True, help="deprecated: use --prior")] = None,
    num_images: Annotated[int, typer.Option(help="samples per prompt (columns)")] = 8,
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 50,
    guidance_scale: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 5.0,
    seed: Annotated[int, typer.Option(help="seed of the sampling noise")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Sample a grid of images from a prior (pixel-space or latent), one row per prompt."""
    from coherendream.generation.pixel_prior import image_grid, load_prior_pipeline, sample_images
    from coherendream.io import atomic_path

    if num_images < 1 or steps < 1:
        _fail(f"--num-images and --steps must be >= 1, got {num_images} and {steps}")
    if output.suffix.lower() != ".png" or output.is_dir():
        _fail(f"--output {output}: give a .png file" + (" (this is a folder)" if output.is_dir() else ""))
    try:
        check_writable(output)  # before seconds of loading, not after
    except FolderTaken as err:
        _fail(str(err))
    if model is not None:
        warn_deprecated("--model", "--prior")
        prior = prior or model
    try:
        pipe = load_prior_pipeline(prior, device=device)
    except (OSError, ValueError) as err:
        _fail(str(err))
    prompts = [p for p in prompt for _ in range(num_images)]
    images = sample_images(pipe, prompts, steps, guidance_scale, seed)
    with atomic_path(output) as tmp:
        image_grid(images, rows=len(prompt), labels=list(prompt)).save(tmp, format="PNG")
    typer.echo(f"{len(prompts)} samples -> {output.resolve()}")


@eval_app.command("prior")
@options_from(PriorEvalConfig, _fail)
def eval_prior(config: PriorEvalConfig) -> None:
    """Colour and shape of a prior's samples for procedural prompts, judged against real renders."""
    from coherendream.eval.prior_eval import evaluate_prior

    try:
        m = evaluate_prior(config)
    except (OSError, ValueError) as err:
        _fail(str(err))
    s, r = m["single"], m["relation"]
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    typer.echo(f"single objects ({s['all']['samples']} samples): colour {fmt(s['all']['color'])}, shape {fmt(s['all']['shape'])}; "
               f"held-out prompts: colour {fmt(s['held_out']['color'])}, shape {fmt(s['held_out']['shape'])}")  # fmt: skip
    typer.echo(f"two groups ({r['samples']} samples): object colour present {fmt(r['object_color_present'])}, placement {fmt(r['placement_ok'])}, "
               f"colours swapped {fmt(r['swapped_given_both_present'])} of samples with both")  # fmt: skip
    j = m["judge_on_real_renders"]
    typer.echo(f"the judge on real renders: colour {fmt(j['single_color'])}, shape {fmt(j['single_shape'])}, placement {fmt(j['relation_placement'])}")
    typer.echo(f"-> {Path(config.output_dir).resolve() / 'metrics.json'}")


@eval_app.command("procedural")
@options_from(ProceduralEvalConfig, _fail)
def eval_procedural(
    config: ProceduralEvalConfig,
    method: Annotated[Optional[list[str]], typer.Option(help="NAME or NAME:key=value,key=value (repeat); default sds, tcsd, reward_weighted, tcsd_no_layout")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimisation steps of every generation (an override steps=N)")] = None,
) -> None:
    """SDS against TCSD on procedural prompts with exact answers: generate, judge against real renders, compare."""
    from coherendream.eval.procedural import run_procedural_eval

    methods: dict[str, list[str]] = {}
    for spec in method or []:
        name, _, rest = spec.partition(":")
        methods[name] = [o for o in rest.split(",") if o] if rest else list(DEFAULT_METHODS.get(name, []))
        if not rest and name not in DEFAULT_METHODS:
            _fail(f"--method {spec}: unknown method; give NAME:key=value,... or one of {', '.join(DEFAULT_METHODS)}")
    try:
        cfg = dataclasses.replace(config, methods=methods or config.methods, overrides=list(config.overrides) + ([f"steps={steps}"] if steps is not None else []))
        _check_output(cfg, "procedural", resumes=True)
        status = run_procedural_eval(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"{status['done']} jobs run, {status['skipped']} already done, {status['this_shard']} in this shard of {status['jobs']}")
    if not status["merged"]:
        typer.echo("other shards still have jobs to run; the last one to finish writes the results")
        return
    for e in status["summary"]["table"]:
        if e["category"] in ("multi_object", "all"):
            typer.echo(f"  {e['method']:>16} {e['category']:>12}: object colour {e['object_color'] if e['object_color'] is None else round(e['object_color'], 3)}"
                       + (f", order {e['placement']:.3f}" if e.get("placement") is not None else ""))  # fmt: skip
    typer.echo(f"report: {Path(cfg.output_dir).resolve() / 'report.html'}")


@app.command("demo")
def demo(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="extra `generate` overrides, key=value", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="output folder")] = Path("outputs/demo"),
    critic: Annotated[Optional[str], typer.Option(help="critic (default: the embedded procedural critic)")] = None,
    eval_scenes: Annotated[int, typer.Option(help="procedural scenes in the critic's evaluation set")] = 96,
    prompts_per_category: Annotated[int, typer.Option(help="benchmark prompts generated per category")] = 1,
    steps: Annotated[int, typer.Option(help="optimisation steps per generation")] = 200,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier demo with other settings in the output folder")] = False,
) -> None:
    """Evaluate the embedded critic, then generate a slice of the procedural benchmark with SDS and with TCSD on CPU; one HTML report."""
    from coherendream.demo import DemoConfig, run_demo

    try:
        cfg = DemoConfig(output_dir=str(output), critic=critic, eval_scenes=eval_scenes, prompts_per_category=prompts_per_category,
                         steps=steps, overrides=list(overrides or []), overwrite=overwrite)  # fmt: skip
        summary = run_demo(cfg)
    except (ValueError, FileNotFoundError, ConfigError) as err:
        _fail(str(err))
    typer.echo(f"critic accuracy on fresh procedural scenes: {summary['critic_accuracy']:.3f}")
    for r in summary["generation"]:
        order = "" if r["placement"] is None else f", colours in order {r['placement']:.2f}"
        typer.echo(f"{r['method']:>6} {r['prompt']!r}: object colour {r['object_color']:.2f}{order}, critic P(yes) {r['critic_prob_yes']:.3f}")
    typer.echo(f"report: {Path(summary['report']).resolve()}")


def _unwrap_help(*apps: typer.Typer) -> None:
    """Join the line breaks inside each paragraph of the commands' docstrings: typer keeps them
    in every paragraph after the first, so `--help` would break lines where the source does."""
    for group in apps:
        for command in group.registered_commands:
            doc = inspect.cleandoc(command.help or command.callback.__doc__ or "")
            command.help = "\n\n".join(" ".join(p.split("\n")) for p in doc.split("\n\n")) or None


_unwrap_help(app, data_app, critic_app, eval_app, prior_app)


def main() -> None:
    # DeepSpeed, imported by transformers and accelerate where it is installed, warns on every
    # command of a machine without a GPU that it fell back to the CPU; on such a machine say so
    # up front (no NVIDIA device node: a cheap check that needs no torch import).
    if "DS_ACCELERATOR" not in os.environ and not os.path.exists("/dev/nvidiactl"):
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        app()
    except SystemExit as stop:
        if stop.code == 130:  # typer's exit on Ctrl-C, which says nothing by itself
            typer.echo("\ninterrupted: finished work is kept; run the same command again to resume", err=True)
        raise


if __name__ == "__main__":
    main()
