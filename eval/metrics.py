"""Metrics of a yes/no critic: accuracy, ROC-AUC, calibration, per negative type, pairwise.

Conventions shared by every function here:

* ``labels`` are ``[N]`` integers (or booleans) in ``{0, 1}``; ``1`` means the caption is true of
  the asset (a positive), ``0`` that it is a negative.
* ``scores`` are ``[N]`` real numbers where larger means "more likely a positive" (a margin, a
  logit or a probability); ``probs`` are ``[N]`` probabilities ``P(yes)`` in ``[0, 1]``.
* Every function is pure: it copies nothing it does not return and keeps no state.
* The numbers are scikit-learn's (ROC-AUC, Brier, the confusion matrix and its rates); what this
  module adds is the input checks below and the critic-specific measures (pairwise accuracy, ECE
  with its bin table, per-group tables).
* Bad input raises :class:`ValueError` naming the argument: empty arrays, mismatched lengths,
  labels outside ``{0, 1}``, NaN scores, probabilities outside ``[0, 1]``.

:func:`roc_auc` raises :class:`ValueError` when only one class is present (the AUC is undefined
there, and a silent NaN would propagate into averages); :func:`critic_report` checks first and
writes ``None`` for an AUC it cannot compute, so a report is always produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "brier_score",
    "confusion_table",
    "critic_report",
    "expected_calibration_error",
    "pairwise_accuracy",
    "per_group",
    "roc_auc",
]


# ----------------------------------------------------------------------------- validation helpers


def _as_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a 1-D sequence, got a scalar")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _labels(x: Any, name: str = "labels") -> np.ndarray:
    """``[N]`` int64 array of 0/1, or ValueError naming ``name``."""
    arr = _as_1d(x, name)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric 0/1 (or bool), got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        raise ValueError(f"{name} must be in {{0, 1}}; found {sorted(set(arr[bad].tolist()))[:5]}")
    return arr.astype(np.int64)


def _scores(x: Any, name: str = "scores") -> np.ndarray:
    """``[N]`` float64 array without NaN (infinite scores are allowed: they still rank)."""
    arr = _as_1d(x, name)
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN at index {int(np.flatnonzero(np.isnan(arr))[0])}")
    return arr


def _probs(x: Any, name: str = "probs") -> np.ndarray:
    """``[N]`` float64 array in ``[0, 1]``."""
    arr = _scores(x, name)
    if (arr < 0).any() or (arr > 1).any():
        raise ValueError(f"{name} must lie in [0, 1]; found min {arr.min():.4g}, max {arr.max():.4g}")
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("length mismatch: " + ", ".join(f"{k} has {v}" for k, v in lengths.items()))


# ----------------------------------------------------------------------------- scalar metrics


def accuracy(labels: Any, scores: Any, threshold: float = 0.5) -> float:
    """Fraction of items whose thresholded score matches the label.

    Args:
        labels: ``[N]`` in ``{0, 1}``.
        scores: ``[N]`` real; an item is predicted positive when ``score >= threshold``.
        threshold: decision threshold (0.5 for probabilities, 0.0 for margins/logits).

    Returns:
        Accuracy in ``[0, 1]``.
    """
    y = _labels(labels)
    s = _scores(scores)
    _same_length(labels=y, scores=s)
    return float(np.mean((s >= threshold).astype(np.int64) == y))


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score`` after the checks of this module).

    ``AUC = P(score_pos > score_neg) + 0.5 * P(score_pos == score_neg)`` over all
    (positive, negative) pairs; scores may be any monotone transform of one another without
    changing it.

    Args:
        labels: ``[N]`` in ``{0, 1}``; both classes must be present.
        scores: ``[N]`` real.

    Returns:
        AUC in ``[0, 1]`` (0.5 = chance).

    Raises:
        ValueError: if only one class is present in ``labels`` (AUC undefined).
    """
    y = _labels(labels)
    s = _scores(scores)
    _same_length(labels=y, scores=s)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"labels hold only one class ({n_pos} positives, {n_neg} negatives): ROC-AUC is undefined")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def brier_score(labels: Any, probs: Any) -> float:
    """Mean squared error between ``P(yes)`` and the 0/1 label.

    Args:
        labels: ``[N]`` in ``{0, 1}``.
        probs: ``[N]`` in ``[0, 1]``.

    Returns:
        Brier score in ``[0, 1]``; 0 is perfect, 0.25 is a constant 0.5 on any data.
    """
    from sklearn.metrics import brier_score_loss

    y = _labels(labels)
    p = _probs(probs)
    _same_length(labels=y, probs=p)
    return float(brier_score_loss(y, p, pos_label=1))


def confusion_table(labels: Any, preds: Any) -> dict[str, float | int]:
    """Counts of the 2x2 confusion matrix and the derived rates, positive class = 1.

    Args:
        labels: ``[N]`` true labels in ``{0, 1}``.
        preds: ``[N]`` predicted labels in ``{0, 1}`` (threshold scores first, e.g.
            ``probs >= 0.5``).

    Returns:
        ``{"tp", "fp", "tn", "fn"}`` (ints) and ``{"precision", "recall", "f1", "accuracy"}``
        (floats in ``[0, 1]``; a ratio with a zero denominator is reported as 0.0).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y = _labels(labels)
    p = _labels(preds, "preds")
    _same_length(labels=y, preds=p)
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(y, p, labels=[0, 1]).ravel())
    precision, recall, f1, _ = precision_recall_fscore_support(y, p, average="binary", pos_label=1, zero_division=0)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": float(precision), "recall": float(recall), "f1": float(f1),
            "accuracy": (tp + tn) / len(y)}


def pairwise_accuracy(pos_scores: Any, neg_scores: Any) -> float:
    """Fraction of (true caption, hard negative) pairs where the true caption scores higher.

    Args:
        pos_scores: ``[P]`` score of each pair's true caption.
        neg_scores: ``[P]`` score of the same pair's negative (element ``i`` pairs with
            ``pos_scores[i]``).

    Returns:
        Value in ``[0, 1]``; a tie counts 0.5, so a constant critic gets exactly 0.5.
    """
    pos = _scores(pos_scores, "pos_scores")
    neg = _scores(neg_scores, "neg_scores")
    _same_length(pos_scores=pos, neg_scores=neg)
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


# ----------------------------------------------------------------------------- calibration


def expected_calibration_error(
    labels: Any,
    probs: Any,
    n_bins: int = 15,
    strategy: str = "uniform",
    confidence: str = "positive",
) -> tuple[float, list[dict[str, Any]]]:
    """Expected calibration error and the per-bin table behind a reliability diagram.

    Computed here: scikit-learn's ``calibration_curve`` gives the per-bin means but drops empty
    bins and returns no counts, and it has no ECE or top-label reading.

    ``ECE = sum_b (n_b / N) * |mean_confidence_b - accuracy_b|`` over non-empty bins.

    Two readings of "confidence" for a binary critic (``confidence=``):

    * ``"positive"`` (default): the confidence is ``P(yes)`` itself and a bin's "accuracy" is the
      observed fraction of positives in it -- the usual reliability diagram of a probabilistic
      binary classifier (scikit-learn's ``calibration_curve``). Confidence spans ``[0, 1]``.
    * ``"top_label"``: the confidence is ``max(p, 1 - p)`` of the predicted answer and accuracy is
      whether that answer (``p >= 0.5``) is right (Guo et al. 2017). Confidence spans ``[0.5, 1]``.

    Args:
        labels: ``[N]`` in ``{0, 1}``.
        probs: ``[N]`` ``P(yes)`` in ``[0, 1]``.
        n_bins: number of bins, ``>= 1``.
        strategy: ``"uniform"`` -- equal-width bins over ``[0, 1]``, each ``[lo, hi)`` with the
            last one closed; or ``"quantile"`` -- edges at quantiles of the confidences, so bins
            hold about equally many items (duplicate edges are merged, so fewer bins may result).

    Returns:
        ``(ece, bins)``: ``ece`` in ``[0, 1]``; ``bins`` a list (one dict per bin, in order) with
        ``bin_lower``, ``bin_upper``, ``count`` (int), ``mean_confidence`` and ``accuracy`` (floats,
        ``None`` for an empty bin) and ``gap = accuracy - mean_confidence`` (``None`` if empty).
        Plain Python types, so the table is JSON-serialisable and feeds
        :func:`coherendream.eval.report.reliability_diagram` directly.
    """
    y = _labels(labels)
    p = _probs(probs)
    _same_length(labels=y, probs=p)
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if confidence == "positive":
        conf, hit = p, y.astype(np.float64)
    elif confidence == "top_label":
        pred = (p >= 0.5).astype(np.int64)
        conf, hit = np.where(pred == 1, p, 1.0 - p), (pred == y).astype(np.float64)
    else:
        raise ValueError(f"confidence must be 'positive' or 'top_label', got {confidence!r}")

    lo_range = 0.5 if confidence == "top_label" else 0.0
    if strategy == "uniform":
        edges = np.linspace(lo_range, 1.0, n_bins + 1)
    elif strategy == "quantile":
        edges = np.unique(np.quantile(conf, np.linspace(0.0, 1.0, n_bins + 1)))
        if len(edges) == 1:  # every confidence identical: one degenerate bin holds them all
            edges = np.array([edges[0], edges[0]])
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")

    n_edges = len(edges) - 1
    # searchsorted on the inner edges gives [lo, hi) bins; clipping puts conf == 1.0 (and, for
    # quantile bins, the maximum) into the last bin instead of a bin past the end.
    idx = np.clip(np.searchsorted(edges[1:-1], conf, side="right"), 0, n_edges - 1)
    counts = np.bincount(idx, minlength=n_edges)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_edges)
    hit_sum = np.bincount(idx, weights=hit, minlength=n_edges)

    table: list[dict[str, Any]] = []
    ece = 0.0
    for b in range(n_edges):
        n_b = int(counts[b])
        row: dict[str, Any] = {"bin_lower": float(edges[b]), "bin_upper": float(edges[b + 1]), "count": n_b}
        if n_b:
            mc, acc = float(conf_sum[b] / n_b), float(hit_sum[b] / n_b)
            row.update(mean_confidence=mc, accuracy=acc, gap=acc - mc)
            ece += n_b / len(y) * abs(acc - mc)
        else:
            row.update(mean_confidence=None, accuracy=None, gap=None)
        table.append(row)
    return float(ece), table


# ----------------------------------------------------------------------------- grouping


def per_group(metric_fn: Callable[..., Any], groups: Any, *arrays: Any, **kwargs: Any) -> dict[Hashable, Any]:
    """Apply ``metric_fn`` to each group's slice of ``arrays``.

    Example: ``per_group(accuracy, negative_types, labels, probs, threshold=0.5)``.

    Args:
        metric_fn: called as ``metric_fn(*[a[mask] for a in arrays], **kwargs)``.
        groups: ``[N]`` group key of each item (strings, ints, ...).
        *arrays: one or more ``[N]`` arrays, aligned with ``groups``.
        **kwargs: passed through to ``metric_fn``.

    Returns:
        ``{group: metric}`` in sorted group order (by ``str`` when keys are of mixed types).
        A group on which ``metric_fn`` raises ``ValueError`` (e.g. a one-class group for
        :func:`roc_auc`) propagates the error, with the group named.
    """
    g = _as_1d(np.asarray(groups, dtype=object), "groups")
    if not arrays:
        raise ValueError("per_group needs at least one array after groups")
    arrs = [_as_1d(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    _same_length(groups=g, **{f"arrays[{i}]": a for i, a in enumerate(arrs)})
    glist = g.tolist()
    keys = list(dict.fromkeys(glist))
    try:
        keys.sort()
    except TypeError:
        keys.sort(key=str)
    out: dict[Hashable, Any] = {}
    for key in keys:
        mask = np.array([k == key for k in glist], dtype=bool)
        try:
            out[key] = metric_fn(*[a[mask] for a in arrs], **kwargs)
        except ValueError as exc:
            raise ValueError(f"group {key!r}: {exc}") from exc
    return out


# ----------------------------------------------------------------------------- critic report


_REQUIRED = ("label", "prob_yes", "pair_id")


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def critic_report(
    rows: Iterable[Mapping[str, Any]],
    threshold: float = 0.5,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Overall and per-negative-type metrics of a critic from scored records.

    Args:
        rows: records with ``label`` (1 = true caption, 0 = negative), ``prob_yes`` in
            ``[0, 1]``, ``pair_id`` (links a negative to the positive(s) of the same asset/view
            set) and ``negative_type`` (read for negatives only; ``None``/missing becomes
            ``"unspecified"``; positives carry ``"none"`` in the datasets and it is ignored).
        threshold: ``prob_yes >= threshold`` answers "yes".
        n_bins: bins of the calibration table.

    Returns:
        A JSON-serialisable dict (no NaN: undefined values are ``None``)::

            {"n", "n_pos", "n_neg", "threshold",
             "overall": {"accuracy", "roc_auc", "ece", "brier", "pairwise_accuracy",
                         "n_pairs", "confusion": {...}, "calibration": [bin rows]},
             "per_negative_type": {type: {"n", "accuracy", "mean_prob_yes",
                                          "pairwise_accuracy", "n_pairs", "roc_auc"}}}

        Per negative type: ``accuracy`` is the fraction of that type's negatives answered "no";
        ``pairwise_accuracy`` compares each negative with every positive sharing its ``pair_id``
        (negatives without such a positive are left out, ``n_pairs`` counts the comparisons);
        ``roc_auc`` separates *all* positives from that type's negatives. The overall
        ``pairwise_accuracy`` pools the pairs of every type.
    """
    labels: list[int] = []
    probs: list[float] = []
    types: list[str] = []
    pair_ids: list[Any] = []
    for i, row in enumerate(rows):
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise ValueError(f"rows[{i}] lacks {', '.join(missing)}")
        labels.append(row["label"])
        probs.append(row["prob_yes"])
        t = row.get("negative_type")
        types.append("unspecified" if t is None or t == "" else str(t))
        pair_ids.append(row["pair_id"])
    if not labels:
        raise ValueError("rows is empty")
    try:
        y = _labels(np.asarray(labels), "label")
        p = _probs(np.asarray(probs, dtype=np.float64), "prob_yes")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rows: {exc}") from exc
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())

    # Positives' scores per pair, for the pairwise comparisons.
    pos_by_pair: dict[Any, list[float]] = {}
    for lab, prob, pid in zip(y.tolist(), p.tolist(), pair_ids):
        if lab == 1:
            pos_by_pair.setdefault(pid, []).append(prob)

    def pairs_of(neg_idx: np.ndarray) -> tuple[list[float], list[float]]:
        ps, ns = [], []
        for j in neg_idx.tolist():
            for pos_prob in pos_by_pair.get(pair_ids[j], ()):
                ps.append(pos_prob)
                ns.append(float(p[j]))
        return ps, ns

    def auc_or_none(mask: np.ndarray) -> float | None:
        yy = y[mask]
        if yy.min() == yy.max():
            return None
        return roc_auc(yy, p[mask])

    ece, bins = expected_calibration_error(y, p, n_bins=n_bins)
    all_neg = np.flatnonzero(y == 0)
    ps, ns = pairs_of(all_neg)
    overall = {
        "accuracy": accuracy(y, p, threshold),
        "roc_auc": auc_or_none(np.ones_like(y, dtype=bool)),
        "ece": ece,
        "brier": brier_score(y, p),
        "pairwise_accuracy": pairwise_accuracy(ps, ns) if ps else None,
        "n_pairs": len(ps),
        "confusion": confusion_table(y, (p >= threshold).astype(np.int64)),
        "calibration": bins,
    }

    per_type: dict[str, dict[str, Any]] = {}
    neg_types = np.array([types[j] for j in all_neg.tolist()], dtype=object)
    for t in sorted(set(neg_types.tolist())):
        idx = all_neg[neg_types == t]
        ps, ns = pairs_of(idx)
        mask = (y == 1).copy()
        mask[idx] = True
        per_type[t] = {
            "n": int(len(idx)),
            "accuracy": float(np.mean(p[idx] < threshold)),
            "mean_prob_yes": float(np.mean(p[idx])),
            "pairwise_accuracy": pairwise_accuracy(ps, ns) if ps else None,
            "n_pairs": len(ps),
            "roc_auc": auc_or_none(mask),
        }

    return {
        "n": int(len(y)),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "threshold": float(threshold),
        "overall": {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in overall.items()},
        "per_negative_type": per_type,
    }

