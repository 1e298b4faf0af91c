"""Deprecation warnings that third-party libraries raise about their own calls.

Each is raised on every run, by code the user does not control, and names no setting of theirs:
shown, it teaches users to ignore warnings. Only these exact messages are hidden, and only around
the calls that raise them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

HIDDEN = (
    # PEFT's model wrapper and TRL's DPO trainer read transformers 5's deprecated alias
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
    # diffusers' config loader passes an argument huggingface_hub no longer uses
    (UserWarning, "The `local_dir_use_symlinks` argument is deprecated"),
)


@contextlib.contextmanager
def library_deprecations_hidden() -> Iterator[None]:
    with warnings.catch_warnings():
        for category, message in HIDDEN:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
