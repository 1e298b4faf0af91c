"""Watching a generation run like a training run: per-step scalars and view grids to TensorBoard or W&B.

``metrics.jsonl`` is always written by the runner; a :class:`RunLogger` adds what threestudio
users watch while a run goes: the losses, the critic's P(yes), the critic weight lambda and the
gradient norms at every step, and the step's rendered views as one grid every ``image_every``
steps.

- ``tensorboard``: event files in ``<output_dir>/tensorboard`` (``tensorboard --logdir outputs``);
- ``wandb``: a run in ``<output_dir>/wandb``, offline unless ``WANDB_MODE`` says otherwise (runs
  on a cluster without network sync later with ``wandb sync``); needs ``pip install wandb``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["REPORT_TO", "RunLogger", "SCALARS"]

REPORT_TO = ("none", "tensorboard", "wandb")
#: ``metrics.jsonl`` keys logged as scalars, and the name each gets in the dashboard.
SCALARS = {
    "loss": "loss/total",
    "loss_sds": "loss/sds",
    "loss_critic": "loss/critic",
    "prob_yes": "critic/prob_yes",
    "margin": "critic/margin",
    "lam": "critic/lambda",
    "grad_norm_sds": "grad_norm/sds",
    "grad_norm_critic": "grad_norm/critic",
    "grad_norm": "grad_norm/total",
    "t": "sds/t",
}


class RunLogger:
    """Scalars and view grids of one generation run.

    Args:
        report_to: ``"none"``, ``"tensorboard"`` or ``"wandb"``.
        output_dir: the run's folder (the logger's files go in a sub-folder).
        config: the resolved config, recorded with the run (a plain dict).
        image_every: log the step's views every this many steps (0: never).
    """

    @staticmethod
    def check(report_to: str) -> None:
        """Raise ``ValueError`` now, before a run starts, if ``report_to`` cannot be served here."""
        import importlib.util

        if report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
        if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ValueError("report_to=wandb needs the wandb package: pip install 'coherendream[wandb]'")

    def __init__(self, report_to: Literal["none", "tensorboard", "wandb"], output_dir: str | Path, config: dict[str, Any], image_every: int = 50) -> None:
        self.check(report_to)
        self.report_to, self.image_every = report_to, image_every
        self._tb = self._wandb = None
        out = Path(output_dir)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
            self._tb.add_text("config", "```\n" + _yaml(config) + "\n```")
        elif report_to == "wandb":
            import wandb

            (out / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "coherendream"), dir=str(out), config=config,
                                     mode=os.environ.get("WANDB_MODE", "offline"), name=out.name, resume="allow")  # fmt: skip

    def log_step(self, step: int, record: dict[str, Any], views: torch.Tensor | None = None) -> None:
        """Log one step's scalars (from its ``metrics.jsonl`` record) and, every ``image_every``
        steps, ``views`` ``[V, 3, H, W]`` in [0, 1] as one row of images."""
        if self.report_to == "none":
            return
        scalars = {name: float(record[key]) for key, name in SCALARS.items() if record.get(key) is not None}
        grid = None
        if views is not None and self.image_every > 0 and step % self.image_every == 0:
            grid = torch.cat(list(views.detach().float().clamp(0, 1).cpu()), dim=-1)  # [3, H, V*W]
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
            if grid is not None:
                self._tb.add_image("views", grid, step)
        if self._wandb is not None:
            import wandb

            payload: dict[str, Any] = dict(scalars)
            if grid is not None:
                payload["views"] = wandb.Image((grid.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
            self._wandb.log(payload, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
