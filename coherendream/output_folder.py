"""Output folders belong to the command that wrote them, with the settings it was run with.

Every command that writes a folder records in it, in ``coherendream_run.json``, what wrote it: the
command, the settings that decide its results, the toolkit's version and the date. Before it
writes anything, a command checks the folder it was given (:class:`OutputFolder`):

- a new or empty folder is taken;
- the same command with the same settings resumes (or redoes) its own work;
- the same command with other settings is refused, unless asked to ``overwrite``, which empties
  the folder first: everything in it was written by that command;
- another command's folder, a folder of files no command recorded (a shipped model, a dataset, a
  folder of the user's), or a file is refused, ``overwrite`` or not.

So a wrong ``-o`` never replaces another command's work, and a re-run never mixes results made
with other settings into its own. Reports written into the folder state what produced them from
the same record (:func:`read_record`).
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any, Literal

__all__ = ["RECORD_NAME", "OutputFolder", "check_writable", "read_record", "toolkit_version", "FolderTaken"]

RECORD_NAME = "coherendream_run.json"


class FolderTaken(ValueError):
    """An output folder that this command may not write (the message names the folder, who wrote it and the remedy)."""


def toolkit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coherendream")
    except PackageNotFoundError:
        from coherendream import __version__

        return __version__


def read_record(folder: str | Path) -> dict | None:
    """The record of the command that wrote ``folder``, or None where there is none (or it is unreadable)."""
    path = Path(folder) / RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("command"), str) else None


def _normalised(settings: dict[str, Any]) -> dict[str, Any]:
    """JSON's view of the settings (paths and tuples become strings and lists), so a record read back compares equal."""
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two settings dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted({*old, *new}):
            out += _changed(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "settings"]


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class OutputFolder:
    """The check and the claim of one command's output folder.

    Construct it before any work (it only reads, and raises :class:`FolderTaken` where the folder
    is not this run's to write); call :meth:`take` once the work is about to write (it creates the
    folder, empties it if ``overwrite`` replaces another run of the command, and writes the record).

    Args:
        path: The output folder.
        command: The command as a user types it after ``coherendream`` (``"eval critic"``).
        settings: What decides the results (JSON-ready); how the work is run (shards, workers,
            progress bars, the output path itself) stays out, so that a resumed or sharded run
            is the same run.
        overwrite: Replace a run of the same command with other settings.
        overwrite_flag: How the user asks for ``overwrite`` (named in the remedy).

    Attributes:
        state: ``"new"`` (nothing of this command there), ``"same"`` (a run with these settings:
            resume) or ``"replace"`` (a run with other settings, to be removed by :meth:`take`).
    """

    def __init__(self, path: str | Path, command: str, settings: dict[str, Any], *, overwrite: bool = False,
                 overwrite_flag: str = "--overwrite") -> None:  # fmt: skip
        self.path = Path(path)
        self.command = command
        self.settings = _normalised(settings)
        self.state: Literal["new", "same", "replace"] = self._check(overwrite, overwrite_flag)

    def _check(self, overwrite: bool, overwrite_flag: str) -> Literal["new", "same", "replace"]:
        path = self.path
        if path.exists() and not path.is_dir():
            raise FolderTaken(f"output {path} is a file, not a folder: give a folder's path (-o)")
        if not path.exists() or not any(path.iterdir()):
            check_writable(path)
            return "new"
        record = read_record(path)
        if record is None:
            names = sorted(p.name for p in path.iterdir())
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise FolderTaken(f"output {path} holds files that no coherendream command recorded writing ({shown}): "
                              f"`coherendream {self.command}` writes only into a new or empty folder or its own: give another -o")  # fmt: skip
        if record["command"] != self.command:
            raise FolderTaken(f"output {path} was written by `coherendream {record['command']}`, not `coherendream {self.command}`: "
                              "give another -o (a command never writes into another command's folder)")  # fmt: skip
        changed = _changed(record.get("settings", {}), self.settings)
        if not changed:
            if not _writable(path):
                raise FolderTaken(f"output {path}: cannot write in it (permission denied)")
            return "same"
        shown = ", ".join(f"{k} {_show(_get(record.get('settings', {}), k))} -> {_show(_get(self.settings, k))}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        if not overwrite:
            raise FolderTaken(f"output {path} holds a `coherendream {self.command}` run with other settings ({shown}{more}): "
                              f"run it with the same settings to resume, give another -o, or pass {overwrite_flag} to replace it")  # fmt: skip
        return "replace"

    @property
    def resuming(self) -> bool:
        return self.state == "same"

    def take(self) -> Path:
        """Create the folder (emptied first when replacing) and write the record; returns the path."""
        from coherendream.io import write_json

        if self.state == "replace":
            for entry in self.path.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        old = read_record(self.path) if self.state == "same" else None
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json(self.path / RECORD_NAME, {
            "command": self.command, "settings": self.settings, "toolkit_version": toolkit_version(),
            "created": (old or {}).get("created", now), "updated": now,
        })  # fmt: skip
        self.state = "same"
        return self.path


def _get(settings: dict, dotted: str) -> Any:
    value: Any = settings
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def check_writable(path: str | Path) -> None:
    """Refuse an output ``path`` (a folder or a file, existing or not) whose nearest existing folder
    no file can be made in, naming that folder."""
    path = Path(path)
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not _writable(parent):
        raise FolderTaken(f"output {path}: cannot write in {parent} (permission denied): give a place you can write (-o)")


def _writable(folder: Path) -> bool:
    """Whether a file can be made in ``folder``: tried, since permission bits do not tell (root, read-only mounts)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
