"""Evaluation: critic metrics, Elo from pairwise judgements, and self-contained reports.

* :mod:`coherendream.eval.metrics` -- accuracy, ROC-AUC, ECE with reliability tables, Brier,
  confusion tables, pairwise accuracy, per-group metrics and :func:`critic_report` (numpy, and
  scikit-learn where it computes the same number).
* :mod:`coherendream.eval.elo` -- maximum-likelihood Elo (scale 400, anchor at 1000, ties as half
  wins) with seeded bootstrap intervals (scipy).
* :mod:`coherendream.eval.report` -- single-file HTML reports with embedded images and
  matplotlib plots, and JSON + CSV result files.

The protocols behind ``coherendream eval ...``, one module each: :mod:`~coherendream.eval.critic_eval`
(``evaluate_critic``), :mod:`~coherendream.eval.assets` (``evaluate_assets``),
:mod:`~coherendream.eval.t3bench` (``run_t3bench``), :mod:`~coherendream.eval.tifa` (``run_tifa``),
:mod:`~coherendream.eval.judge` (``judge_methods``, pairwise judging + Elo) and
:mod:`~coherendream.eval.ground_truth` (``check_generation``, per-box colour and position of a
generated procedural scene).

The names below are exported lazily (PEP 562), so importing the metrics alone does not pull in
matplotlib, scipy.optimize or the renderers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "metrics": (
        "accuracy",
        "brier_score",
        "confusion_table",
        "critic_report",
        "expected_calibration_error",
        "pairwise_accuracy",
        "per_group",
        "roc_auc",
    ),
    "elo": ("EloResult", "expected_score", "fit_elo"),
    "critic_eval": ("evaluate_critic",),
    "assets": ("evaluate_assets",),
    "t3bench": ("run_t3bench",),
    "tifa": ("run_tifa",),
    "judge": ("judge_methods",),
    "ground_truth": ("check_generation",),
    "report": (
        "Report",
        "html_table",
        "image_grid_png",
        "reliability_diagram",
        "score_histogram",
        "training_curves",
        "write_results",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value  # cache: later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
