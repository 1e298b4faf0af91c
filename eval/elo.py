"""Elo ratings from pairwise judgements, fitted by maximum likelihood (GPTEval3D style).

Model (Bradley-Terry with the chess Elo scale)::

    P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / 400))

Each comparison ``(method_a, method_b, outcome)`` contributes the log-likelihood of ``a``'s
score ``s`` (1 = a wins, 0 = b wins, 0.5 = tie): ``s log P(a beats b) + (1 - s) log P(b beats a)``.
A tie therefore counts as half a win for each side, as GPTEval3D does.

Ratings are only defined up to a common shift, so one *anchor* method is fixed at
``anchor_rating`` (1000 by default) and the others are free. Without help, a method that never
lost (or never won) drifts to +/- infinity, so a tiny Gaussian prior centred on the anchor's
rating is added: ``l2 / 2 * sum_i x_i ** 2`` with ``x_i = (R_i - R_anchor) * ln(10) / 400`` (the
rating difference in natural log-odds units). The default ``l2 = 1e-4`` is a prior standard
deviation of ``400 / ln(10) / sqrt(1e-4) ~= 17,400`` Elo points: it moves well-determined
ratings by far less than a point but keeps an undefeated method finite (about 1,000-2,000
points above the field for tens of games). Set ``l2=0`` for the plain MLE, which exists only when
every method has both won and lost (strictly: the comparison graph is strongly connected).

The negative log-likelihood is convex (strictly so with ``l2 > 0``) and is minimised with
L-BFGS-B using its analytic gradient. Confidence intervals come from a seeded nonparametric
bootstrap over comparisons.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

__all__ = ["A_WINS", "B_WINS", "TIE", "EloResult", "expected_score", "fit_elo", "parse_comparisons"]

A_WINS = "a"
B_WINS = "b"
TIE = "tie"

_OUTCOME_SCORE = {
    A_WINS: 1.0,
    "a_wins": 1.0,
    "win_a": 1.0,
    B_WINS: 0.0,
    "b_wins": 0.0,
    "win_b": 0.0,
    TIE: 0.5,
    "draw": 0.5,
}

_SCALE = math.log(10.0) / 400.0  # Elo points -> natural log-odds


def expected_score(r_a: float, r_b: float) -> float:
    """``P(a beats b)`` in ``(0, 1)`` under the Elo model with scale 400."""
    return float(1.0 / (1.0 + 10.0 ** ((r_b - r_a) / 400.0)))


def _score_of(outcome: Any, i: int) -> float:
    if isinstance(outcome, str):
        key = outcome.strip().lower()
        if key in _OUTCOME_SCORE:
            return _OUTCOME_SCORE[key]
    elif isinstance(outcome, (int, float, np.integer, np.floating)) and not isinstance(outcome, bool):
        if float(outcome) in (0.0, 0.5, 1.0):  # a's score
            return float(outcome)
    raise ValueError(
        f"comparisons[{i}]: outcome must be 'a' (a wins), 'b' (b wins) or 'tie' "
        f"(or a's score 1 / 0 / 0.5), got {outcome!r}"
    )


def parse_comparisons(comparisons: Iterable[Any]) -> tuple[list[str], list[str], np.ndarray]:
    """Normalise comparisons to ``(method_a list, method_b list, a's scores [M])``.

    Each comparison is a tuple ``(method_a, method_b, outcome)`` or a mapping with keys
    ``method_a``, ``method_b``, ``outcome``. ``outcome`` is ``"a"`` / ``"b"`` / ``"tie"`` (aliases
    ``"a_wins"``, ``"b_wins"``, ``"draw"``) or ``a``'s score ``1`` / ``0`` / ``0.5``.
    """
    a_list: list[str] = []
    b_list: list[str] = []
    scores: list[float] = []
    for i, comp in enumerate(comparisons):
        if isinstance(comp, Mapping):
            try:
                a, b, outcome = comp["method_a"], comp["method_b"], comp["outcome"]
            except KeyError as exc:
                raise ValueError(f"comparisons[{i}] lacks key {exc.args[0]!r}") from None
        else:
            try:
                a, b, outcome = comp
            except (TypeError, ValueError):
                raise ValueError(f"comparisons[{i}] must be (method_a, method_b, outcome), got {comp!r}") from None
        a, b = str(a), str(b)
        if a == b:
            raise ValueError(f"comparisons[{i}] compares {a!r} with itself")
        a_list.append(a)
        b_list.append(b)
        scores.append(_score_of(outcome, i))
    if not scores:
        raise ValueError("comparisons is empty")
    return a_list, b_list, np.asarray(scores, dtype=np.float64)


@dataclass
class EloResult:
    """Fitted ratings.

    Attributes:
        ratings: ``{method: Elo}``; the anchor's is exactly ``anchor_rating``.
        anchor: the anchored method.
        anchor_rating: its fixed rating.
        games: ``{method: number of comparisons it took part in}``.
        wins, losses, ties: ``{method: count}``.
        ci: ``{method: (low, high)}`` percentile bootstrap interval, ``None`` without bootstrap.
            The anchor's interval is ``(anchor_rating, anchor_rating)``: intervals are relative to it.
        n_bootstrap, ci_level, seed, l2: the settings used.
    """

    ratings: dict[str, float]
    anchor: str
    anchor_rating: float
    games: dict[str, int]
    wins: dict[str, int]
    losses: dict[str, int]
    ties: dict[str, int]
    l2: float
    ci: dict[str, tuple[float, float]] | None = None
    n_bootstrap: int = 0
    ci_level: float = 0.95
    seed: int | None = None
    bootstrap_samples: np.ndarray | None = field(default=None, repr=False)

    def ranking(self) -> list[str]:
        """Methods from best to worst rating."""
        return sorted(self.ratings, key=lambda m: (-self.ratings[m], m))

    def to_rows(self) -> list[dict[str, Any]]:
        """One JSON/CSV-friendly dict per method, best first (``rank`` from 1)."""
        rows = []
        for rank, m in enumerate(self.ranking(), start=1):
            row: dict[str, Any] = {
                "rank": rank,
                "method": m,
                "elo": self.ratings[m],
                "games": self.games[m],
                "wins": self.wins[m],
                "losses": self.losses[m],
                "ties": self.ties[m],
            }
            if self.ci is not None:
                row["ci_low"], row["ci_high"] = self.ci[m]
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (bootstrap samples left out)."""
        return {
            "anchor": self.anchor,
            "anchor_rating": self.anchor_rating,
            "l2": self.l2,
            "n_bootstrap": self.n_bootstrap,
            "ci_level": self.ci_level,
            "seed": self.seed,
            "ratings": dict(self.ratings),
            "ci": None if self.ci is None else {m: list(v) for m, v in self.ci.items()},
            "table": self.to_rows(),
        }


def _nll_and_grad(
    x_free: np.ndarray, ia: np.ndarray, ib: np.ndarray, s: np.ndarray, w: np.ndarray, anchor: int, n: int, l2: float
) -> tuple[float, np.ndarray]:
    """Negative log-likelihood (+ L2 prior) and its gradient in natural units.

    ``x`` is ``[n]`` with ``x[anchor] = 0``. Rows ``(ia, ib, s)`` are distinct comparisons and
    ``w`` their multiplicities: how often each occurred for the fit, the multinomial counts for a
    bootstrap resample (so a resample copies no comparisons).
    """
    x = np.insert(x_free, anchor, 0.0)
    d = x[ia] - x[ib]
    # -[s log sigmoid(d) + (1-s) log sigmoid(-d)], written with logaddexp for stability:
    # log sigmoid(d) = -logaddexp(0, -d).
    nll = np.sum(w * (s * np.logaddexp(0.0, -d) + (1.0 - s) * np.logaddexp(0.0, d)))
    g_d = w * (expit(d) - s)  # d nll / d d
    grad = np.bincount(ia, weights=g_d, minlength=n) - np.bincount(ib, weights=g_d, minlength=n)
    nll += 0.5 * l2 * float(x @ x)
    grad += l2 * x
    return float(nll), np.delete(grad, anchor)


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS/OpenMP to one thread while fitting, when ``threadpoolctl`` is installed.

    The problems here have a handful of variables, yet scipy's L-BFGS-B calls LAPACK routines
    that a threaded OpenBLAS may spread over all cores: on a busy machine the threads' hand-offs
    made each bootstrap fit ~10-20x slower (measured: 200 resamples, 19 s vs 1 s). Without
    ``threadpoolctl`` (it comes with scikit-learn) results are identical, only slower.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - depends on the environment
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _solve(
    ia: np.ndarray, ib: np.ndarray, s: np.ndarray, w: np.ndarray, anchor: int, n: int, l2: float, x0: np.ndarray
) -> np.ndarray:
    res = minimize(
        _nll_and_grad,
        x0,
        args=(ia, ib, s, w, anchor, n, l2),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 2000, "gtol": 1e-8, "ftol": 1e-14},
    )
    # L-BFGS-B sometimes stops with "ABNORMAL_TERMINATION_IN_LNSRCH" at the optimum to machine
    # precision; accept that when the gradient is small, reject anything else.
    if not res.success and np.max(np.abs(res.jac), initial=0.0) > 1e-4 * max(1.0, float(w.sum())) ** 0.5:
        raise RuntimeError(f"Elo fit did not converge: {res.message}")
    return np.insert(res.x, anchor, 0.0)


def _components(ia: np.ndarray, ib: np.ndarray, n: int) -> np.ndarray:
    """Connected-component label ``[n]`` of the (undirected) comparison graph."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(ia)), (np.asarray(ia), np.asarray(ib))), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def fit_elo(
    comparisons: Iterable[Any],
    anchor: str,
    anchor_rating: float = 1000.0,
    players: Sequence[str] | None = None,
    l2: float = 1e-4,
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int | None = 0,
) -> EloResult:
    """Fit Elo ratings by maximum likelihood, optionally with bootstrap confidence intervals.

    Args:
        comparisons: ``(method_a, method_b, outcome)`` tuples or dicts, see
            :func:`parse_comparisons`. ``M >= 1`` of them.
        anchor: the method fixed at ``anchor_rating``; must appear in the comparisons.
        anchor_rating: its rating (1000 as in GPTEval3D).
        players: optional full list of methods expected; a listed method without any comparison
            is an error (its rating would be set by the prior alone). Default: every method seen.
        l2: strength of the Gaussian prior towards the anchor in natural units (see the module
            docstring); ``>= 0``.
        n_bootstrap: number of bootstrap resamples of the comparisons (0 = no intervals).
        ci: central interval mass for the percentile intervals, in ``(0, 1)``.
        seed: seed of the bootstrap's ``numpy.random.default_rng``.

    Returns:
        :class:`EloResult`.

    Raises:
        ValueError: empty input, malformed comparison/outcome, unknown anchor, a listed player
            with no games, or methods not connected to the anchor by any chain of comparisons.
    """
    a_list, b_list, s = parse_comparisons(comparisons)
    seen = list(dict.fromkeys(a_list + b_list))
    if players is None:
        names = sorted(seen)
    else:
        names = list(dict.fromkeys(str(p) for p in players))
        idle = [p for p in names if p not in set(seen)]
        if idle:
            raise ValueError(f"player(s) with no games: {idle}")
        extra = [p for p in seen if p not in set(names)]
        if extra:
            raise ValueError(f"comparisons name method(s) missing from players: {extra}")
    if anchor not in names:
        raise ValueError(f"unknown anchor {anchor!r}: not among the compared methods {names}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")

    index = {m: i for i, m in enumerate(names)}
    n = len(names)
    ia = np.array([index[a] for a in a_list], dtype=np.int64)
    ib = np.array([index[b] for b in b_list], dtype=np.int64)
    k = index[anchor]

    # Identical comparisons (same ordered pair, same outcome) are merged into one weighted row:
    # at most 3 * n * (n - 1) rows whatever the number of games, which makes each fit cheap and
    # lets a bootstrap resample be drawn as multinomial counts over these rows (the same law as
    # resampling the M games with replacement).
    keys, counts = np.unique(np.stack([ia, ib, s * 2]), axis=1, return_counts=True)
    u_ia, u_ib, u_s = keys[0].astype(np.int64), keys[1].astype(np.int64), keys[2] / 2.0
    u_w = counts.astype(np.float64)

    comp = _components(u_ia, u_ib, n)
    cut_off = [names[i] for i in range(n) if comp[i] != comp[k]]
    if cut_off:
        raise ValueError(f"method(s) {cut_off} are not linked to the anchor {anchor!r} by any comparisons")

    with _one_blas_thread():
        x = _solve(u_ia, u_ib, u_s, u_w, k, n, l2, np.zeros(n - 1))
    ratings_arr = anchor_rating + x / _SCALE
    ratings = {m: float(ratings_arr[i]) for i, m in enumerate(names)}
    ratings[anchor] = float(anchor_rating)  # exactly, not 1000 + 0.0 / scale round-off

    games = {m: 0 for m in names}
    wins, losses, ties = dict(games), dict(games), dict(games)
    for a, b, sc in zip(a_list, b_list, s.tolist()):
        games[a] += 1
        games[b] += 1
        if sc == 1.0:
            wins[a] += 1
            losses[b] += 1
        elif sc == 0.0:
            wins[b] += 1
            losses[a] += 1
        else:
            ties[a] += 1
            ties[b] += 1

    result = EloResult(
        ratings=ratings,
        anchor=anchor,
        anchor_rating=float(anchor_rating),
        games=games,
        wins=wins,
        losses=losses,
        ties=ties,
        l2=float(l2),
        n_bootstrap=int(n_bootstrap),
        ci_level=float(ci),
        seed=seed,
    )
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        m = len(s)
        # Draw every resample first, so the random stream does not depend on the solver.
        weights = rng.multinomial(m, u_w / m, size=n_bootstrap).astype(np.float64)
        samples = np.full((n_bootstrap, n), np.nan)
        with _one_blas_thread():
            for r, w in enumerate(weights):
                xr = _solve(u_ia, u_ib, u_s, w, k, n, l2, x[np.arange(n) != k])
                used = w > 0
                # A method that lost all its games (or its link to the anchor) in this resample
                # is placed by the prior alone; mark it missing rather than let it bias the interval.
                comp_r = _components(u_ia[used], u_ib[used], n)
                present = np.zeros(n, dtype=bool)
                present[u_ia[used]] = True
                present[u_ib[used]] = True
                ok = present & (comp_r == comp_r[k])
                samples[r, ok] = anchor_rating + xr[ok] / _SCALE
        samples[:, k] = anchor_rating
        lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
        result.ci = {}
        for i, mth in enumerate(names):
            col = samples[:, i]
            col = col[~np.isnan(col)]
            if col.size:
                result.ci[mth] = (float(np.percentile(col, lo_q)), float(np.percentile(col, hi_q)))
            else:  # pragma: no cover - needs a method absent from every resample
                result.ci[mth] = (float("nan"), float("nan"))
        result.bootstrap_samples = samples
    return result
