"""Critic metrics (hand-computed and against scikit-learn) and maximum-likelihood Elo."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import check_grad
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from coherendream.eval import elo as elo_mod
from coherendream.eval.elo import expected_score, fit_elo
from coherendream.eval.metrics import (
    accuracy,
    brier_score,
    confusion_table,
    critic_report,
    expected_calibration_error,
    pairwise_accuracy,
    per_group,
    roc_auc,
)

# ----------------------------------------------------------------------------- hand-computed


def test_accuracy_hand():
    # preds (>= 0.5): 1, 0, 1, 1 against 1, 0, 1, 0 -> 3 of 4; a score equal to the threshold is "yes".
    assert accuracy([1, 0, 1, 0], [0.9, 0.4, 0.5, 0.5]) == 0.75
    assert accuracy([1, 0], [0.2, -0.1], threshold=0.0) == 1.0


def test_roc_auc_hand_with_tie():
    # (0.8>0.4) + (0.8>0.1) + (0.4==0.4 -> 0.5) + (0.4>0.1) = 3.5 of 4 pairs.
    assert roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert roc_auc([1, 0], [0.0, 1.0]) == 0.0
    assert roc_auc([1, 0, 1, 0], [3, 3, 3, 3]) == 0.5
    # Rank based: any monotone transform gives the same value.
    s = np.array([0.3, 0.1, 0.7, 0.7, 0.2])
    y = np.array([1, 0, 1, 0, 0])
    assert roc_auc(y, s) == pytest.approx(roc_auc(y, np.log(s) * 5 - 2))


def test_roc_auc_one_class_raises():
    with pytest.raises(ValueError, match="only one class"):
        roc_auc([1, 1, 1], [0.1, 0.5, 0.9])


def test_brier_hand():
    assert brier_score([1, 0], [0.8, 0.3]) == pytest.approx((0.04 + 0.09) / 2)
    assert brier_score([1, 0, 1], [0.5, 0.5, 0.5]) == pytest.approx(0.25)


def test_confusion_table_hand():
    t = confusion_table([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (t["tp"], t["fn"], t["fp"], t["tn"]) == (2, 1, 1, 1)
    assert t["precision"] == pytest.approx(2 / 3)
    assert t["recall"] == pytest.approx(2 / 3)
    assert t["f1"] == pytest.approx(2 / 3)
    assert t["accuracy"] == pytest.approx(3 / 5)
    # No predicted positives: precision and F1 are 0 by convention, not a ZeroDivisionError.
    t = confusion_table([1, 0], [0, 0])
    assert t["precision"] == 0.0 and t["f1"] == 0.0 and t["recall"] == 0.0


def test_pairwise_accuracy_with_ties():
    # win, tie (0.5), loss, tie (0.5) -> 2 / 4
    assert pairwise_accuracy([0.9, 0.5, 0.2, 0.7], [0.1, 0.5, 0.3, 0.7]) == 0.5
    assert pairwise_accuracy([1.0, 2.0, 3.0], [0.0, 2.0, 0.0]) == pytest.approx(2.5 / 3)
    assert pairwise_accuracy([0.4] * 7, [0.4] * 7) == 0.5


def test_ece_hand():
    labels = [1, 0, 0, 0, 1, 1]
    probs = [0.9, 0.9, 0.9, 0.9, 0.1, 0.1]
    ece, bins = expected_calibration_error(labels, probs, n_bins=2)
    # bin [0, .5): conf .1, frequency 1.0; bin [.5, 1]: conf .9, frequency .25
    assert ece == pytest.approx(2 / 6 * 0.9 + 4 / 6 * 0.65)
    assert [b["count"] for b in bins] == [2, 4]
    assert bins[0]["mean_confidence"] == pytest.approx(0.1) and bins[0]["accuracy"] == 1.0
    assert bins[1]["mean_confidence"] == pytest.approx(0.9) and bins[1]["accuracy"] == 0.25
    assert (bins[0]["bin_lower"], bins[0]["bin_upper"], bins[1]["bin_upper"]) == (0.0, 0.5, 1.0)
    # Top-label: every confidence is 0.9 and only the first answer is right.
    ece_top, bins_top = expected_calibration_error(labels, probs, n_bins=5, confidence="top_label")
    assert ece_top == pytest.approx(abs(0.9 - 1 / 6))
    assert sum(b["count"] for b in bins_top) == 6 and bins_top[0]["bin_lower"] == 0.5
    # Empty bins are reported with None, and probability 1.0 falls in the last bin.
    _, bins = expected_calibration_error([1, 0], [1.0, 0.0], n_bins=4)
    assert [b["count"] for b in bins] == [1, 0, 0, 1]
    assert bins[1]["accuracy"] is None and bins[1]["mean_confidence"] is None
    json.dumps(bins, allow_nan=False)


def test_ece_calibrated_vs_overconfident():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(int)  # labels drawn from the stated probabilities
    ece, bins = expected_calibration_error(y, p, n_bins=15)
    assert ece < 0.01
    assert len(bins) == 15 and sum(b["count"] for b in bins) == p.size
    ece_q, bins_q = expected_calibration_error(y, p, n_bins=10, strategy="quantile")
    assert ece_q < 0.01
    counts = [b["count"] for b in bins_q]
    assert max(counts) - min(counts) <= 2  # quantile bins hold equal mass
    # Over-confident: says 0.99 / 0.01 where the truth is p.
    p_over = np.where(p > 0.5, 0.99, 0.01)
    ece_over, _ = expected_calibration_error(y, p_over, n_bins=15)
    assert ece_over > 0.2
    ece_over_top, _ = expected_calibration_error(y, p_over, n_bins=15, confidence="top_label")
    assert ece_over_top > 0.2


def test_ece_table_matches_sklearn_calibration_curve():
    rng = np.random.default_rng(3)
    p = rng.random(500)
    y = (rng.random(500) < p**2).astype(int)
    _, bins = expected_calibration_error(y, p, n_bins=8)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=8, strategy="uniform")
    full = [b for b in bins if b["count"]]
    np.testing.assert_allclose([b["accuracy"] for b in full], prob_true)
    np.testing.assert_allclose([b["mean_confidence"] for b in full], prob_pred)


# ----------------------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize("seed", range(5))
def test_against_sklearn_random_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]  # both classes present
    probs = rng.integers(0, 11, n) / 10.0  # heavy ties, including exactly 0.5
    assert accuracy(y, probs) == pytest.approx(accuracy_score(y, probs >= 0.5))
    assert roc_auc(y, probs) == pytest.approx(roc_auc_score(y, probs))
    margins = rng.integers(-3, 4, n).astype(float)
    assert roc_auc(y, margins) == pytest.approx(roc_auc_score(y, margins))
    assert brier_score(y, probs) == pytest.approx(brier_score_loss(y, probs))
    preds = (probs >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, preds, labels=[0, 1]).ravel()
    t = confusion_table(y, preds)
    assert (t["tn"], t["fp"], t["fn"], t["tp"]) == (tn, fp, fn, tp)
    assert t["precision"] == pytest.approx(precision_score(y, preds, zero_division=0))
    assert t["recall"] == pytest.approx(recall_score(y, preds, zero_division=0))
    assert t["f1"] == pytest.approx(f1_score(y, preds, zero_division=0))


def test_bool_labels_accepted():
    assert roc_auc(np.array([True, False, True]), [0.9, 0.1, 0.4]) == 1.0


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: accuracy([], []), "labels is empty"),
        (lambda: accuracy([1, 0], [0.5]), "length mismatch"),
        (lambda: roc_auc([0, 2, 1], [0.1, 0.2, 0.3]), r"labels must be in \{0, 1\}"),
        (lambda: roc_auc([0, 1, 1], [0.1, float("nan"), 0.3]), "scores contains NaN at index 1"),
        (lambda: brier_score([0, 1], [0.1, 1.2]), r"probs must lie in \[0, 1\]"),
        (lambda: expected_calibration_error([0, 1], [0.1, float("nan")]), "probs contains NaN"),
        (lambda: expected_calibration_error([0, 1], [0.1, 0.2], n_bins=0), "n_bins"),
        (lambda: expected_calibration_error([0, 1], [0.1, 0.2], strategy="log"), "strategy"),
        (lambda: confusion_table([0, 1], [0, 3]), r"preds must be in \{0, 1\}"),
        (lambda: pairwise_accuracy([0.1, 0.2], [0.3]), "pos_scores has 2, neg_scores has 1"),
        (lambda: pairwise_accuracy([0.1], [float("nan")]), "neg_scores contains NaN"),
        (lambda: accuracy([[1, 0]], [[0.5, 0.5]]), "labels must be 1-D"),
    ],
)
def test_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- per group / report


def test_per_group():
    groups = ["a", "b", "a", "b", "c", "c"]
    labels = [1, 0, 0, 1, 1, 0]
    scores = [0.9, 0.8, 0.1, 0.2, 0.6, 0.7]
    got = per_group(accuracy, groups, labels, scores, threshold=0.5)
    assert got == {"a": 1.0, "b": 0.0, "c": 0.5}
    got = per_group(pairwise_accuracy, [1, 1, 2], [0.9, 0.1, 0.5], [0.1, 0.1, 0.6])
    assert got == {1: 0.75, 2: 0.0}
    with pytest.raises(ValueError, match="group 'x'.*only one class"):
        per_group(roc_auc, ["x", "x", "y", "y"], [1, 1, 0, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="length mismatch"):
        per_group(accuracy, ["a"], [1, 0], [0.1, 0.2])


def _hand_rows():
    rows = []

    def add(label, prob, ntype, pid):
        rows.append({"label": label, "prob_yes": prob, "negative_type": ntype, "pair_id": pid})

    add(1, 0.9, "none", "p1")
    add(0, 0.2, "color", "p1")
    add(1, 0.8, "none", "p2")
    add(0, 0.85, "color", "p2")
    add(1, 0.6, "none", "p3")
    add(0, 0.6, "count", "p3")
    add(1, 0.3, "none", "p4")
    add(0, 0.1, "count", "p4")
    add(0, 0.4, "caption_swap", "p4")
    add(0, 0.7, "relation", "orphan")  # no positive shares its pair_id
    return rows


def test_critic_report_hand():
    rows = _hand_rows()
    rep = critic_report(rows)
    json.dumps(rep, allow_nan=False)  # serialisable, strict JSON
    assert (rep["n"], rep["n_pos"], rep["n_neg"]) == (10, 4, 6)
    pt = rep["per_negative_type"]
    assert set(pt) == {"color", "count", "caption_swap", "relation"}  # positives' "none" is no type

    assert pt["color"]["n"] == 2
    assert pt["color"]["accuracy"] == 0.5
    assert pt["color"]["pairwise_accuracy"] == 0.5  # 0.9 > 0.2, 0.8 < 0.85
    assert pt["color"]["roc_auc"] == pytest.approx(5 / 8)
    assert pt["color"]["mean_prob_yes"] == pytest.approx(0.525)

    assert pt["count"]["accuracy"] == 0.5
    assert pt["count"]["pairwise_accuracy"] == 0.75  # tie 0.6 = 0.6 -> 0.5, 0.3 > 0.1 -> 1
    assert pt["count"]["roc_auc"] == pytest.approx(6.5 / 8)

    assert pt["caption_swap"]["accuracy"] == 1.0
    assert pt["caption_swap"]["pairwise_accuracy"] == 0.0
    assert pt["caption_swap"]["roc_auc"] == pytest.approx(0.75)

    assert pt["relation"]["pairwise_accuracy"] is None and pt["relation"]["n_pairs"] == 0
    assert pt["relation"]["roc_auc"] == pytest.approx(0.5)

    ov = rep["overall"]
    assert ov["n_pairs"] == 5
    assert ov["pairwise_accuracy"] == pytest.approx(2.5 / 5)
    assert ov["accuracy"] == pytest.approx(0.6)
    y = [r["label"] for r in rows]
    p = [r["prob_yes"] for r in rows]
    assert ov["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert ov["brier"] == pytest.approx(brier_score_loss(y, p))
    assert ov["confusion"]["tp"] == 3 and ov["confusion"]["tn"] == 3
    assert sum(b["count"] for b in ov["calibration"]) == 10


def test_critic_report_errors_and_one_class():
    with pytest.raises(ValueError, match="rows is empty"):
        critic_report([])
    with pytest.raises(ValueError, match=r"rows\[1\] lacks prob_yes"):
        critic_report([{"label": 1, "prob_yes": 0.5, "pair_id": "a"}, {"label": 0, "pair_id": "a"}])
    with pytest.raises(ValueError, match="prob_yes contains NaN"):
        critic_report([{"label": 1, "prob_yes": float("nan"), "pair_id": "a"}])
    with pytest.raises(ValueError, match="label must be in"):
        critic_report([{"label": 3, "prob_yes": 0.5, "pair_id": "a"}])
    rep = critic_report([{"label": 0, "prob_yes": 0.2, "pair_id": "a", "negative_type": None}])
    assert rep["overall"]["roc_auc"] is None  # undefined with one class, reported, not raised
    assert rep["per_negative_type"]["unspecified"]["roc_auc"] is None
    json.dumps(rep, allow_nan=False)


# ----------------------------------------------------------------------------- Elo


TRUE = {"anchor": 1000.0, "m_best": 1350.0, "m_good": 1200.0, "m_mid": 1100.0, "m_low": 880.0, "m_worst": 720.0}


def _simulate(n_games: int, seed: int, tie_share: float = 0.5):
    """Games from the Elo model; ties take ``tie_share * min(p, 1-p)`` of the mass from each side,
    so a's expected score stays exactly P(a beats b) and the half-win MLE is consistent."""
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    out = []
    for _ in range(n_games):
        a, b = rng.choice(names, size=2, replace=False)
        p = expected_score(TRUE[a], TRUE[b])
        tie = tie_share * min(p, 1 - p) * 2
        u = rng.random()
        if u < p - tie / 2:
            out.append((a, b, "a"))
        elif u < p + tie / 2:
            out.append((a, b, "tie"))
        else:
            out.append((a, b, "b"))
    return out


def test_expected_score():
    assert expected_score(1400, 1000) == pytest.approx(1 / (1 + 10**-1))
    assert expected_score(1000, 1000) == 0.5


def test_elo_recovers_synthetic_order_and_ci():
    games = _simulate(4000, seed=0)
    assert sum(o == "tie" for *_, o in games) > 300  # ties really are in the data
    res = fit_elo(games, anchor="anchor", n_bootstrap=200, seed=1)
    assert res.ratings["anchor"] == 1000.0  # exactly
    assert res.ranking() == sorted(TRUE, key=lambda m: -TRUE[m])
    for m, r in TRUE.items():
        assert abs(res.ratings[m] - r) < 60, (m, res.ratings[m], r)
    inside = sum(res.ci[m][0] <= TRUE[m] <= res.ci[m][1] for m in TRUE if m != "anchor")
    assert inside >= 4  # of 5 at 95 %
    assert res.ci["anchor"] == (1000.0, 1000.0)
    for m in TRUE:
        assert res.ci[m][0] < res.ratings[m] < res.ci[m][1] or m == "anchor"
        assert m == "anchor" or 20 < res.ci[m][1] - res.ci[m][0] < 200  # neither degenerate nor huge
    assert res.games["anchor"] == sum(1 for a, b, _ in games if "anchor" in (a, b))
    json.dumps(res.to_dict(), allow_nan=False)
    rows = res.to_rows()
    assert [r["method"] for r in rows] == res.ranking() and rows[0]["rank"] == 1 and "ci_low" in rows[0]
    # Seeded: same seed, same intervals; another seed, different ones.
    again = fit_elo(games, anchor="anchor", n_bootstrap=200, seed=1)
    assert again.ci == res.ci
    other = fit_elo(games, anchor="anchor", n_bootstrap=200, seed=2)
    assert other.ci != res.ci


def test_elo_tie_is_half_win_closed_form():
    # One win and one tie for a: expected score 0.75, so R_a - R_b = 400 log10(3) at the MLE.
    res = fit_elo([("a", "b", "a"), ("a", "b", "tie")], anchor="b", l2=0.0)
    assert res.ratings["a"] - 1000.0 == pytest.approx(400 * math.log10(3), abs=1e-3)
    assert (res.wins["a"], res.ties["a"], res.ties["b"], res.losses["b"]) == (1, 1, 1, 1)
    # Numeric outcomes and dict records mean the same thing.
    res2 = fit_elo(
        [{"method_a": "a", "method_b": "b", "outcome": 1}, {"method_a": "b", "method_b": "a", "outcome": 0.5}],
        anchor="b",
        l2=0.0,
    )
    assert res2.ratings["a"] == pytest.approx(res.ratings["a"], abs=1e-3)
    # Only ties: equal ratings.
    res3 = fit_elo([("x", "y", "tie")] * 5, anchor="x")
    assert res3.ratings["y"] == pytest.approx(1000.0, abs=1e-6)
    # Custom anchor rating.
    res4 = fit_elo([("a", "b", "a"), ("a", "b", "tie")], anchor="b", anchor_rating=1500.0, l2=0.0)
    assert res4.ratings["b"] == 1500.0 and res4.ratings["a"] - 1500.0 == pytest.approx(400 * math.log10(3), abs=1e-3)


def test_elo_undefeated_stays_finite_and_prior_is_tiny():
    res = fit_elo([("champ", "base", "a")] * 10, anchor="base")
    r = res.ratings["champ"]
    assert math.isfinite(r) and 1400 < r < 4000
    # On well-determined data the prior moves ratings by well under a point.
    games = _simulate(1500, seed=5)
    a = fit_elo(games, anchor="anchor").ratings
    b = fit_elo(games, anchor="anchor", l2=0.0).ratings
    assert max(abs(a[m] - b[m]) for m in a) < 1.0


def test_elo_gradient_is_correct():
    rng = np.random.default_rng(0)
    n, m, k = 5, 40, 2
    ia = rng.integers(0, n, m)
    ib = (ia + rng.integers(1, n, m)) % n
    s = rng.choice([0.0, 0.5, 1.0], m)
    w = rng.integers(0, 3, m).astype(float)

    def f(x):
        return elo_mod._nll_and_grad(x, ia, ib, s, w, k, n, 0.1)[0]

    def g(x):
        return elo_mod._nll_and_grad(x, ia, ib, s, w, k, n, 0.1)[1]

    assert check_grad(f, g, rng.normal(size=n - 1)) < 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(comparisons=[], anchor="a"), "comparisons is empty"),
        (dict(comparisons=[("a", "b", "a")], anchor="zz"), "unknown anchor 'zz'"),
        (dict(comparisons=[("a", "b", "a")], anchor="a", players=["a", "b", "c"]), r"no games: \['c'\]"),
        (dict(comparisons=[("a", "b", "win")], anchor="a"), r"comparisons\[0\]: outcome"),
        (dict(comparisons=[("a", "a", "tie")], anchor="a"), "with itself"),
        (dict(comparisons=[("a", "b", "a"), ("c", "d", "b")], anchor="a"), "not linked to the anchor"),
        (dict(comparisons=[("a", "b")], anchor="a"), "must be"),
        (dict(comparisons=[{"method_a": "a", "outcome": "a"}], anchor="a"), "lacks key 'method_b'"),
    ],
)
def test_elo_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_elo(**kwargs)
