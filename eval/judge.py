"""Pairwise MLLM judging of two or more methods' renders of the same prompts, with Elo (GPTEval3D style).

Inputs: ``methods = {name: folder}``; each folder holds, per prompt, ``<slug>/gaussians.ply`` or a
folder of views (``<slug>/views/`` or ``<slug>/``; slugs and lookup as in
``coherendream.eval.t3bench``). A PLY is rendered from the judge's own orbit (the V cameras its
critic was trained on, ``coherendream.cameras.scorer_orbit``) unless another is given; view
folders give V evenly spaced images. A method whose asset is
missing or broken for a prompt is recorded in ``errors.jsonl`` and skipped in that prompt's pairs.

Two judging modes:

* ``"single"`` (default, single-pass scoring): each method's V-view grid is scored once with the
  alignment question (the scorer's template: the critic's own, or VQAScore's with
  ``t3bench.make_vqa_scorer``); for each pair (a, b) the higher P(yes) wins, and it is a **tie when
  |P_a(yes) - P_b(yes)| < tie_margin** (default 0.02: differences below the scorer's noise are not
  preferences). N methods cost N forward passes per prompt, not N(N-1)/2.
* ``"side_by_side"``: both grids are tiled into one image, A left and B right, each under a label
  strip reading "A" / "B", and the model is asked ``Which object, A (left) or B (right), better
  matches "{text}"? Answer A or B.``; P(A) = softmax over the A and B answer token ids at the first
  answer position (:func:`side_by_side_scorer`: a Critic whose yes/no ids are those of "A"/"B",
  resolved as single tokens like the critic's Yes/No; a tokenizer without them is refused with a
  clear error). With ``both_orders`` (default) each pair is also asked with the sides swapped and
  ``P(a better) = (P(A | a left) + P(B | a right)) / 2``, which cancels a position bias. A tie when
  ``|P(a better) - P(b better)| < tie_margin``.

Elo: :func:`coherendream.eval.elo.fit_elo` (maximum likelihood, scale 400, ties as half wins) with
``anchor`` (default: the first method) at 1000 and seeded bootstrap intervals.

Outputs in ``output_dir``: ``comparisons.jsonl`` (one line per judged pair and prompt),
``ratings.json`` (the :class:`EloResult` as a dict) and ``ratings.csv``, ``errors.jsonl``,
``summary.json`` and ``report.html`` (ratings table, a few side-by-side grids).

CLI: ``coherendream eval judge PROMPT_FILE --method NAME=DIR --method NAME=DIR -o DIR``; its options
are :class:`JudgeConfig`'s fields, plus ``--critic``/``--adapter``/``--dtype``/``--device`` for the critic
(``coherendream eval judge --help``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coherendream.cameras import OrbitSpec, scorer_orbit
from coherendream.eval.protocol import batch_size_field, check_common, output_field, output_folder, overwrite_field, resolution_field
from coherendream.io import write_json, write_jsonl

logger = logging.getLogger(__name__)

#: Fewest games a method needs before its bootstrap Elo interval is reported.
MIN_GAMES = 10
SIDE_BY_SIDE_TEMPLATE = 'Which object, A (left) or B (right), better matches "{text}"? Answer A or B.'
A_VARIANTS = ("A", " A")
B_VARIANTS = ("B", " B")

__all__ = ["A_VARIANTS", "B_VARIANTS", "SIDE_BY_SIDE_TEMPLATE", "judge_methods", "pair_outcome",
           "side_by_side_image", "side_by_side_scorer"]


def pair_outcome(p_a: float, p_b: float, tie_margin: float) -> str:
    """``"a"``, ``"b"`` or ``"tie"`` (when ``|p_a - p_b| < tie_margin``) for scores in [0, 1]."""
    if abs(p_a - p_b) < tie_margin:
        return "tie"
    return "a" if p_a > p_b else "b"


def side_by_side_scorer(critic: Any, template: str = SIDE_BY_SIDE_TEMPLATE,
                        a_variants: Sequence[str] = A_VARIANTS, b_variants: Sequence[str] = B_VARIANTS) -> Any:
    """A Critic on ``critic``'s model (shared) that reads P("A") vs P("B") for one side-by-side image.

    Its ``prob_yes`` is ``P(A) / (P(A) + P(B))`` at the first answer position.

    Raises:
        ValueError: the tokenizer has no single-token "A" or "B" (the answer must be read at one
            position), naming the model and the variants tried.
    """
    from coherendream.critic.model import Critic, resolve_answer_token_ids

    tok = critic.processor.tokenizer
    name = getattr(tok, "name_or_path", None) or type(tok).__name__
    for label, variants in (("A", a_variants), ("B", b_variants)):
        try:
            resolve_answer_token_ids(tok, variants)
        except ValueError as err:
            raise ValueError(
                f"side-by-side judging needs the answer {label!r} as a single token, but the tokenizer of "
                f"{name} has none of {list(variants)} as one known token; use the single-pass mode "
                f"(mode='single') with this model, or a model whose tokenizer has them ({err})"
            ) from err
    config = dataclasses.replace(critic.config, question_template=template, num_views=1, image_mode="grid",
                                 grid_rows=None, grid_cols=None,
                                 yes_variants=tuple(a_variants), no_variants=tuple(b_variants))
    return Critic(critic.model, critic.processor, config)


def side_by_side_image(views_a: Sequence[Any], views_b: Sequence[Any], label_height: int | None = None, gap: int = 8) -> Any:
    """One RGB PIL image: A's views as a grid on the left, B's on the right, labelled "A" and "B".

    Each side is its views tiled row-major (the critic's layout for that many views); a white
    ``gap`` separates the sides; a label strip of ``label_height`` pixels (default 1/8 of the grid
    height, at least 12) above each side holds its letter in black.
    """
    from PIL import Image, ImageDraw, ImageFont

    from coherendream.grid import GridLayout, tile

    def grid(views: Sequence[Any]) -> np.ndarray:
        arr = np.stack([np.asarray(v.convert("RGB")) for v in views])
        return tile(arr, GridLayout.for_views(len(views)))

    ga, gb = grid(views_a), grid(views_b)
    h = max(ga.shape[0], gb.shape[0])
    lab = label_height or max(12, h // 8)
    canvas = Image.new("RGB", (ga.shape[1] + gap + gb.shape[1], h + lab), (255, 255, 255))
    canvas.paste(Image.fromarray(ga), (0, lab))
    canvas.paste(Image.fromarray(gb), (ga.shape[1] + gap, lab))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=max(10, int(lab * 0.8)))
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    for text, x0, width in (("A", 0, ga.shape[1]), ("B", ga.shape[1] + gap, gb.shape[1])):
        draw.text((x0 + width // 2, lab // 2), text, fill=(0, 0, 0), font=font, anchor="mm")
    return canvas


def _load_method_views(folder: Path, slug: str, set_name: str | None, cams: list, resolution: int, v: int) -> list:
    from coherendream.eval.t3bench import group_images, load_asset_views, resolve_output

    views, rendered = load_asset_views(resolve_output(folder, slug, set_name), cams, resolution)
    if not rendered:
        views = [views[i] for i in group_images(len(views), v)[0]]
    return views


@dataclass
class JudgeConfig:
    """What ``eval judge`` compares and how; each field is also a command-line option."""

    prompt_file: Path = field(metadata={"help": "prompts, one a line", "argument": True})
    methods: list[str] = field(metadata={"help": "NAME=DIR, once per method (<DIR>/<slug>/ with gaussians.ply or views)", "flags": ("--method",)})
    output_dir: Path = output_field("comparisons.jsonl, ratings.{json,csv}, errors.jsonl, summary.json, report.html")
    mode: str = field(default="single", metadata={"help": "single (compare P(yes) of each grid) or side_by_side (ask A or B)"})
    tie_margin: float = field(default=0.02, metadata={"help": "scores differing by less than this are a tie"})
    anchor: str | None = field(default=None, metadata={"help": "method fixed at Elo 1000 (default: the first)"})
    n_bootstrap: int = field(default=200, metadata={"help": "bootstrap resamples of the comparisons for the Elo intervals"})
    seed: int = field(default=0, metadata={"help": "seed of the bootstrap"})
    both_orders: bool = field(default=True, metadata={"help": "side by side: also ask with the sides swapped and average"})
    resolution: int = resolution_field()
    batch_size: int = batch_size_field()
    report_pairs: int = field(default=4, metadata={"help": "(prompt, pair) images shown in the HTML page"})
    orbit: OrbitSpec | None = field(default=None, metadata={"cli": False, "help": "cameras for PLYs (default: the scorer's own orbit)"})
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        check_common(self)
        self.prompt_file = Path(self.prompt_file)
        pairs = [m.split("=", 1) for m in self.methods]
        if any(len(p) != 2 or not p[0] or not p[1] for p in pairs) or len({p[0] for p in pairs}) != len(pairs) or len(pairs) < 2:
            raise ValueError(f"methods: give at least two --method NAME=DIR with distinct names, got {list(self.methods)}")
        if self.mode not in ("single", "side_by_side"):
            raise ValueError(f"mode must be 'single' or 'side_by_side', got {self.mode!r}")
        if self.tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {self.tie_margin}")
        names = [p[0] for p in pairs]
        if self.anchor is not None and self.anchor not in names:
            raise ValueError(f"anchor {self.anchor!r} is not one of the methods {names}")

    def method_dirs(self) -> dict[str, Path]:
        """``{name: folder}`` in the order given (the first is "a" in a pair, and the default anchor)."""
        return {name: Path(folder) for name, folder in (m.split("=", 1) for m in self.methods)}


def judge_methods(config: JudgeConfig, scorer: Any) -> dict[str, Any]:
    """Judge every pair of methods on every prompt and fit Elo ratings (module docstring).

    Args:
        config: the methods, prompts, mode and output folder.
        scorer: ``"single"``: a Critic-like scorer asking the alignment question (``score(views,
            prompts) -> .prob_yes``, ``config.num_views``); ``"side_by_side"``: a :class:`Critic`
            (its model is reused through :func:`side_by_side_scorer`).

    Returns:
        The summary (also ``summary.json``): ``ratings`` table rows, ``comparisons``, ``errors``,
        ``mode``, ``tie_margin``, ``anchor``, files.

    Raises:
        ValueError: no comparison possible, or (side by side) a tokenizer without single-token A/B.
        FileNotFoundError: a method's folder is missing.
    """
    from coherendream.eval.t3bench import EvalItemError, prompt_slugs, read_prompts

    methods = config.method_dirs()
    missing = [f"{k}={v}" for k, v in methods.items() if not v.is_dir()]
    if missing:
        raise FileNotFoundError(f"method folder(s) not found: {missing}")
    anchor = config.anchor or next(iter(methods))
    prompts, set_name = read_prompts(config.prompt_file)

    # The side-by-side scorer is built first: a tokenizer without A/B fails before any rendering.
    judge = side_by_side_scorer(scorer) if config.mode == "side_by_side" else scorer
    v = int(scorer.config.num_views)
    cams = dataclasses.replace(config.orbit or scorer_orbit(scorer), random_views=0).cameras(config.resolution)
    output_folder(config, "judge", getattr(scorer, "source", None)).take()
    t0 = time.perf_counter()

    errors: list[dict] = []
    views: dict[tuple[str, str], list] = {}
    slugs = prompt_slugs(prompts)
    for prompt, slug in zip(prompts, slugs):
        for name, folder in methods.items():
            try:
                views[(slug, name)] = _load_method_views(folder, slug, set_name, cams, config.resolution, v)
            except EvalItemError as err:
                errors.append({"slug": slug, "prompt": prompt, "method": name, "reason": err.reason, "error": str(err)})
            except ValueError as err:
                errors.append({"slug": slug, "prompt": prompt, "method": name, "reason": "invalid_views", "error": f"{name}/{slug}: {err}"})

    compare = _compare_single if config.mode == "single" else _compare_side_by_side
    comparisons, images_for_report = compare(judge, views, list(zip(prompts, slugs)), list(methods), config, errors)
    return _write_judgement(config, comparisons, errors, images_for_report, anchor, list(methods), len(prompts), t0)


def _compare_single(judge: Any, views: dict, prompts: list[tuple[str, str]], methods: list[str], config: JudgeConfig,
                    errors: list[dict]) -> tuple[list[dict], list[tuple[Any, str]]]:  # fmt: skip
    """Each method's grid scored once; for each pair the higher P(yes) wins (a tie within the margin)."""
    from coherendream.critic.batch import score_items

    items = [{"id": f"{slug}|{name}", "views": views[(slug, name)], "prompt": prompt, "_slug": slug, "_method": name}
             for prompt, slug in prompts for name in methods if (slug, name) in views]  # fmt: skip
    score: dict[tuple[str, str], float] = {}
    for r in score_items(judge, items, batch_size=config.batch_size, progress=False):
        if r.get("error"):
            errors.append({"slug": r["_slug"], "prompt": r.get("prompt"), "method": r["_method"], "reason": r.get("reason"), "error": r["error"]})
        else:
            score[(r["_slug"], r["_method"])] = float(r["prob_yes"])
    comparisons, images = [], []
    for prompt, slug in prompts:
        for a, b in itertools.combinations(methods, 2):
            if (slug, a) in score and (slug, b) in score:
                pa, pb = score[(slug, a)], score[(slug, b)]
                comparisons.append({"slug": slug, "prompt": prompt, "method_a": a, "method_b": b, "p_a": pa, "p_b": pb,
                                    "diff": pa - pb, "outcome": pair_outcome(pa, pb, config.tie_margin), "mode": config.mode})  # fmt: skip
                if len(images) < config.report_pairs:
                    images.append((side_by_side_image(views[(slug, a)], views[(slug, b)]),
                                   f"{slug}: A={a} ({pa:.3f}) vs B={b} ({pb:.3f}) -> {comparisons[-1]['outcome']}"))  # fmt: skip
    return comparisons, images


def _compare_side_by_side(judge: Any, views: dict, prompts: list[tuple[str, str]], methods: list[str], config: JudgeConfig,
                          errors: list[dict]) -> tuple[list[dict], list[tuple[Any, str]]]:  # fmt: skip
    """Both grids in one image, the model asked A or B (in both orders when ``both_orders``)."""
    from coherendream.critic.batch import score_items

    items, meta = [], []
    for prompt, slug in prompts:
        for a, b in itertools.combinations(methods, 2):
            if (slug, a) not in views or (slug, b) not in views:
                continue
            for left, right in [(a, b), (b, a)] if config.both_orders else [(a, b)]:
                img = side_by_side_image(views[(slug, left)], views[(slug, right)])
                items.append({"id": f"{slug}|{left}|{right}", "views": [img], "prompt": prompt})
                meta.append((prompt, slug, a, b, left == a, img))
    acc: dict[tuple[str, str, str], list[float]] = {}
    shown: dict[tuple[str, str, str], Any] = {}
    for r, (prompt, slug, a, b, a_left, img) in zip(score_items(judge, items, batch_size=config.batch_size, progress=False), meta):
        if r.get("error"):
            errors.append({"slug": slug, "prompt": prompt, "method": f"{a} vs {b}", "reason": r.get("reason"), "error": r["error"]})
            continue
        p_left = float(r["prob_yes"])  # P("A") = P(left better)
        acc.setdefault((slug, a, b), []).append(p_left if a_left else 1.0 - p_left)
        shown.setdefault((slug, a, b), img)
    comparisons, images = [], []
    for prompt, slug in prompts:
        for a, b in itertools.combinations(methods, 2):
            ps = acc.get((slug, a, b))
            if not ps:
                continue
            pa = float(np.mean(ps))
            comparisons.append({"slug": slug, "prompt": prompt, "method_a": a, "method_b": b, "p_a": pa, "p_b": 1.0 - pa,
                                "diff": 2.0 * pa - 1.0, "orders": len(ps), "outcome": pair_outcome(pa, 1.0 - pa, config.tie_margin),
                                "mode": config.mode})  # fmt: skip
            if len(images) < config.report_pairs:
                images.append((shown[(slug, a, b)], f"{slug}: A={a} vs B={b}: P({a} better) = {pa:.3f} -> {comparisons[-1]['outcome']}"))
    return comparisons, images


def _write_judgement(config: JudgeConfig, comparisons: list[dict], errors: list[dict], images_for_report: list[tuple[Any, str]],
                     anchor: str, methods: list[str], num_prompts: int, t0: float) -> dict[str, Any]:  # fmt: skip
    """Elo from the comparisons, and every output file (module docstring); returns the summary."""
    from coherendream.eval.elo import fit_elo
    from coherendream.eval.report import Report, image_grid_png
    from coherendream.io import write_results

    out, mode, tie_margin, n_bootstrap, seed = config.output_dir, config.mode, config.tie_margin, config.n_bootstrap, config.seed
    write_jsonl(out / "comparisons.jsonl", comparisons)
    write_jsonl(out / "errors.jsonl", errors)
    if not comparisons:
        raise ValueError(f"no pair of methods could be compared on any prompt ({len(errors)} errors, see {out / 'errors.jsonl'})")
    compared = {c["method_a"] for c in comparisons} | {c["method_b"] for c in comparisons}
    if anchor not in compared:
        raise ValueError(f"the anchor {anchor!r} has no comparisons (its renders are missing; see {out / 'errors.jsonl'})")
    elo = fit_elo([(c["method_a"], c["method_b"], c["outcome"]) for c in comparisons], anchor=anchor,
                  n_bootstrap=n_bootstrap, seed=seed)
    rows = elo.to_rows()
    # A bootstrap over a handful of games gives intervals of zero width (every resample holds the
    # same few outcomes), which read as certainty: below MIN_GAMES they are withheld and said so.
    few = {r["method"]: r["games"] for r in rows if r["games"] < MIN_GAMES and r["method"] != anchor}
    note = None
    if few:
        note = (f"too few games for an Elo interval (at least {MIN_GAMES} per method): "
                + ", ".join(f"{m} {n}" for m, n in few.items()) + "; judge more prompts")  # fmt: skip
        for r in rows:
            if r["method"] in few and "ci_low" in r:
                r["ci_low"] = r["ci_high"] = None
        logger.warning(note)
    # write_results also writes ratings.json (the bare table); it is then replaced by the full
    # EloResult dict, which holds that table plus the anchor, intervals and settings.
    _, csv_path = write_results(rows, out / "ratings")
    ratings = elo.to_dict()
    ratings["table"] = rows
    if ratings["ci"] is not None:
        ratings["ci"] = {m: (None if m in few else v) for m, v in ratings["ci"].items()}
    write_json(out / "ratings.json", ratings)
    summary = {"mode": mode, "tie_margin": tie_margin, "anchor": anchor, "methods": methods, "prompts": num_prompts,
               "comparisons": len(comparisons), "ties": sum(c["outcome"] == "tie" for c in comparisons),
               "errors": len(errors), "ratings": rows, "note": note, "seconds": round(time.perf_counter() - t0, 3),
               "files": {"comparisons": str(out / "comparisons.jsonl"), "ratings_json": str(out / "ratings.json"),
                         "ratings_csv": str(csv_path), "errors": str(out / "errors.jsonl"), "report": str(out / "report.html")}}
    write_json(out / "summary.json", summary)

    report = Report("Pairwise judging with Elo")
    report.add_text(f"Mode {mode}; {len(comparisons)} comparisons over {num_prompts} prompts; tie when the scores differ by "
                    f"less than {tie_margin}. Elo by maximum likelihood (scale 400), {anchor} anchored at 1000, "
                    f"{n_bootstrap} bootstrap resamples for the intervals.")
    if note:
        report.add_text(note)
    report.add_table(rows)
    for img, caption in images_for_report:
        report.add_image(image_grid_png([img], cols=1), caption=caption)
    if errors:
        report.add_heading("Not judged")
        report.add_table([{k: e.get(k) for k in ("slug", "method", "reason", "error")} for e in errors])
    report.write(out / "report.html")
    if errors:
        logger.warning("%d renders/comparisons could not be used; see %s", len(errors), out / "errors.jsonl")
    return summary
