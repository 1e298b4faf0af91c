"""What the evaluation protocols' configs share: the fields every ``eval`` command has, declared
once with their help text, and their checks.

Each protocol (``critic_eval``, ``assets``, ``t3bench``, ``tifa``, ``judge``, ``procedural``) has one
config dataclass, TRL-style; its fields are the command's options
(``coherendream.cli_options.options_from``), so flags, config and docs cannot drift.
"""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Any

from coherendream.output_folder import OutputFolder
from coherendream.shards import NUM_SHARDS_HELP, SHARD_INDEX_HELP


def output_field(contents: str) -> Any:
    """The required output folder, ``--output``/``-o`` on the command line."""
    return field(metadata={"help": f"output folder ({contents})", "flags": ("--output", "-o")})


def overwrite_field() -> Any:
    """``--overwrite``: replace what this command wrote into its output folder with other settings."""
    return field(default=False, metadata={"help": "replace an earlier run of this command with other settings in the output folder"})


def batch_size_field() -> Any:
    return field(default=8, metadata={"help": "samples per forward pass"})


def resolution_field() -> Any:
    return field(default=256, metadata={"help": "render size of each view in pixels"})


def progress_field() -> Any:
    return field(default=True, metadata={"help": "show a progress bar"})


def num_shards_field() -> Any:
    return field(default=None, metadata={"help": NUM_SHARDS_HELP})


def shard_index_field() -> Any:
    return field(default=None, metadata={"help": SHARD_INDEX_HELP})


# How a run is carried out, not what it computes: a resumed, re-batched or sharded run is the same run.
RUN_ONLY_FIELDS = frozenset({"output_dir", "overwrite", "progress", "num_shards", "shard_index", "batch_size"})


def output_folder(config: Any, command: str, critic_source: dict | None = None) -> OutputFolder:
    """The check (and, with ``.take()``, the claim) of an eval command's output folder: its settings
    are the config's fields less :data:`RUN_ONLY_FIELDS`, plus the critic it scores with."""
    from coherendream.config import to_dict

    settings = {k: v for k, v in to_dict(config).items() if k not in RUN_ONLY_FIELDS}
    if critic_source is not None:
        settings["critic"] = critic_source
    # Only the first shard replaces an earlier run; the others join the run it starts.
    overwrite = getattr(config, "overwrite", False) and not getattr(config, "shard_index", None)
    return OutputFolder(config.output_dir, f"eval {command}", settings, overwrite=overwrite)


def check_common(config: Any) -> None:
    """Paths as ``Path``; ``batch_size`` and ``resolution`` (where the config has them) positive."""
    for name in ("output_dir", "generations_dir", "dataset_dir", "manifest", "root"):
        value = getattr(config, name, None)
        if value is not None:
            setattr(config, name, Path(value))
    for name in ("batch_size", "resolution"):
        value = getattr(config, name, None)
        if value is not None and not value >= 1:
            raise ValueError(f"{name} must be a positive number, got {value}")
