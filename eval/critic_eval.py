"""``coherendream eval critic``: a critic's accuracy, AUC and calibration on a dataset split.

Scores every row of a split written by ``coherendream data build`` (its ``views`` and ``caption``),
then reports overall and per-negative-type metrics (:func:`coherendream.eval.metrics.critic_report`),
the worst mistakes as image grids, a reliability diagram and score histograms, as
``metrics.json``, ``scores.{json,csv}``, ``errors.jsonl`` and a self-contained ``report.html``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coherendream.eval.protocol import batch_size_field, check_common, output_field, output_folder, overwrite_field, progress_field
from coherendream.io import write_json, write_jsonl


@dataclass
class CriticEvalConfig:
    """What ``eval critic`` measures and where it writes; each field is also a command-line option."""

    dataset_dir: Path = field(metadata={"help": "a `data build` folder", "flags": ("--dataset",)})
    output_dir: Path = output_field("metrics.json, scores, report.html")
    split: str = field(default="test", metadata={"help": "split to evaluate"})
    batch_size: int = batch_size_field()
    threshold: float = field(default=0.5, metadata={"help": "P(yes) at or above which a row counts as a yes"})
    num_examples: int = field(default=8, metadata={"help": "largest mistakes shown in the report"})
    progress: bool = progress_field()
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        check_common(self)
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


def evaluate_critic(critic: Any, config: CriticEvalConfig) -> dict:
    """Score ``config.split`` of a built dataset with ``critic`` and write the evaluation.

    Returns:
        The metrics dict (also in ``metrics.json``): ``critic_report``'s fields plus
        ``scored``, ``errors`` and ``split``.
    """
    from coherendream.critic.batch import items_from_dataset, score_items, split_results
    from coherendream.eval.metrics import critic_report
    from coherendream.io import write_results

    dataset_dir, split, out = config.dataset_dir, config.split, config.output_dir
    items = items_from_dataset(dataset_dir, split)  # a missing dataset or split is refused before anything is written
    output_folder(config, "critic", getattr(critic, "source", None)).take()
    results = score_items(critic, items, batch_size=config.batch_size, progress=config.progress)
    scored, errors = split_results(results)
    write_jsonl(out / "errors.jsonl", errors)
    if not scored:
        raise ValueError(f"{dataset_dir} split {split!r}: no row could be scored ({len(errors)} errors, see {out / 'errors.jsonl'})")
    metrics = critic_report(scored, threshold=config.threshold)
    positives = [r["prob_yes"] >= config.threshold for r in scored if r["label"] == 1]
    metrics.update({"split": split, "dataset": str(dataset_dir), "scored": len(scored), "errors": len(errors),
                    "positives": {"n": len(positives), "accuracy": sum(positives) / len(positives) if positives else None}})  # fmt: skip
    write_results(scored, out / "scores", columns=["id", "pair_id", "negative_type", "label", "prob_yes", "margin", "prompt"])
    write_json(out / "metrics.json", metrics)
    _write_report(metrics, scored, dataset_dir, split, out / "report.html", config.num_examples)
    return metrics


# What each figure of the table and the report means, in one sentence each.
METRICS_EXPLAINED = (
    "Accuracy: share of rows answered right, a row counting as yes when P(yes) is at or above the threshold "
    "(on positives: the true caption accepted; on a negative type: the edited caption refused). "
    "ROC-AUC: the chance that a random positive gets a higher P(yes) than a random negative (0.5 is chance, 1 perfect), "
    "threshold-free. ECE (expected calibration error): the mean gap, over bins of P(yes), between the predicted P(yes) "
    "and the share of those rows that are positives (0 means calibrated). Brier: the mean squared error of P(yes) "
    "against the label. Pairwise accuracy: over pairs of the same views with the true caption and an edited one, the "
    "share in which the true caption gets the higher P(yes), the ranking TCSD's gradient relies on."
)


def per_type_table(metrics: dict) -> list[dict]:
    """One row for the positives, then one per negative type, for tables and the README."""
    pos = metrics.get("positives") or {}
    rows = [{"negative type": "(positives)", "n": pos.get("n"), "accuracy": pos.get("accuracy"), "pairwise accuracy": None, "ROC-AUC vs positives": None}]
    for name, m in sorted(metrics["per_negative_type"].items()):
        rows.append({"negative type": name, "n": m["n"], "accuracy": m["accuracy"], "pairwise accuracy": m["pairwise_accuracy"], "ROC-AUC vs positives": m["roc_auc"]})
    return rows


def _write_report(metrics: dict, scored: list[dict], dataset_dir, split: str, path: Path, num_examples: int) -> None:
    from coherendream.eval.report import Report, reliability_diagram, score_histogram

    overall = metrics["overall"]
    report = Report(f"Critic evaluation: {Path(str(dataset_dir)).name} / {split}")
    report.add_text(f"{metrics['scored']} rows scored ({metrics['n_pos']} positives, {metrics['n_neg']} negatives), {metrics['errors']} could not be scored; threshold {metrics['threshold']}.")
    report.add_text(METRICS_EXPLAINED)
    report.add_heading("Overall")
    report.add_table([{k: overall[k] for k in ("accuracy", "roc_auc", "ece", "brier", "pairwise_accuracy", "n_pairs")}])
    report.add_heading("Per negative type")
    report.add_table(per_type_table(metrics))
    report.add_image(reliability_diagram(overall["calibration"]), caption="Reliability of P(yes)")
    groups: dict[str, list[float]] = {}
    for r in scored:
        groups.setdefault("positive" if r["label"] == 1 else r["negative_type"], []).append(r["prob_yes"])
    report.add_image(score_histogram(groups, value_range=(0.0, 1.0)), caption="P(yes) by row type")
    mistakes = sorted(scored, key=lambda r: abs(r["label"] - r["prob_yes"]), reverse=True)[:num_examples]
    if mistakes:
        report.add_heading("Largest mistakes")
        grids, captions = _grids(dataset_dir, split, [m["id"] for m in mistakes])
        for m in mistakes:
            if m["id"] in grids:
                kind = "positive" if m["label"] == 1 else f"negative ({m['negative_type']})"
                report.add_image(grids[m["id"]], caption=f"{captions[m['id']]!r} -- {kind}, P(yes) = {m['prob_yes']:.3f}", width=256)
    report.write(path)


def _grids(dataset_dir, split: str, ids: list[str]) -> tuple[dict, dict]:
    from coherendream.data.build import load_built_dataset

    wanted = set(ids)
    ds = load_built_dataset(dataset_dir)[split]
    index = [i for i, row_id in enumerate(ds["id"]) if row_id in wanted]
    rows = ds.select(index)
    return {r["id"]: r["images"][0] for r in rows}, {r["id"]: r["caption"] for r in rows}
