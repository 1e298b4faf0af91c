"""T3Bench-style evaluation: prompt files in, (generate,) render on an icosphere, score, one table per set.

Protocol (what :func:`run_t3bench` does for each prompt of each prompt file):

1. **Asset.** Either generate it (a :class:`~coherendream.generation.runner.GenerateConfig`
   template with ``prompt`` and ``output_dir`` filled per prompt: ``<output_dir>/<set>/generations/<slug>``)
   or take an existing output from ``generations_dir``: ``<generations_dir>/<set>/<slug>`` or
   ``<generations_dir>/<slug>`` (each also under ``generations/``, as a run of this protocol writes
   them); inside, ``gaussians.ply`` (a 3DGS PLY, what ``generate`` writes), else a
   ``views/`` folder of images, else the folder's own images (see :func:`resolve_output`). A missing
   or broken asset is a per-prompt error (``errors.jsonl``), never the end of the run.
2. **Cameras.** The vertices of a subdivided icosahedron (``trimesh.creation.icosphere``, the same
   construction as T3Bench's 162 vertices at radius 2.2 for ``level=2``): level 0 = 12, 1 = 42,
   2 = 162, 3 = 642 views, every camera looking at the origin (:func:`icosphere_cameras`). A folder of
   views cannot be re-rendered: its images are used as they are (``grid.*`` tiles are skipped).
3. **Grouping** (:func:`group_cameras`). A critic sees V views per question (4 as a 2x2 grid by
   default), trained on V views *spread in azimuth at one elevation*. The icosphere views are cut into
   ``ceil(N / V)`` groups in elevation bands: going from the highest remaining camera down, each group
   takes its first camera and then, among the ``2V - 1`` next-highest remaining cameras, greedily the
   one farthest in azimuth from those already taken (farthest-point sampling on the azimuth circle),
   until it holds V; a group is ordered by azimuth. When ``N`` is not a multiple of V, the last group
   is completed with already used cameras (nearest in elevation first), so every camera is scored at
   least once and a few twice. For a folder of N images in name order, group g holds images
   ``g, g + G, g + 2G, ...`` with ``G = max(1, N // V)`` (evenly spaced along the orbit).
4. **Alignment.** ``alignment_critic`` = mean over groups of the critic's P(yes) (its own question);
   ``alignment_critic_min`` the worst group (a view-dependent failure such as a Janus face shows
   there). With ``vqa_scorer`` (any LLaVA-family model wrapped by :func:`make_vqa_scorer`, question
   ``Does this figure show "{text}"? Please answer yes or no.``, VQAScore's), ``alignment_vqa`` the same
   with that model; its groups follow its own ``num_views``.
5. **Quality proxy** (:func:`quality_proxy`, no model): computed from the foreground masks of all
   views (pixels that differ from the white background by more than ``fg_threshold``):
   ``coverage_mean`` (mean foreground fraction), ``coverage_cv`` (coefficient of variation of the
   foreground fraction across views: a flat card or a floater cloud seen edge-on varies a lot),
   ``empty_view_fraction`` (views with < 0.5 % foreground: the object vanished), ``clipped_view_fraction``
   (views whose foreground touches the image border: the object leaves the frame), ``sharpness``
   (mean variance of the 4-neighbour Laplacian of the grey image inside the foreground, grey in
   [0, 1]), and ``quality_proxy = (1 - empty_view_fraction) * (1 - clipped_view_fraction) / (1 +
   coverage_cv)`` in [0, 1]. It is a sanity proxy for degenerate geometry, *not* a perceptual
   quality score like T3Bench's ImageReward: it says nothing about texture or realism.
6. **Outputs** per prompt set ``<set>`` (the prompt file's stem): ``<output_dir>/<set>/results.json``
   and ``results.csv`` (one row per scored prompt), ``errors.jsonl``, ``report.html`` (table, score
   histogram, the first ``report_grids`` prompts' grids); and ``<output_dir>/summary.json`` with the
   means per set.

Slugs (:func:`prompt_slugs`): the prompt lower-cased, every run of characters other than ``a-z0-9``
replaced by ``_``, trimmed to ``max_len`` (80) characters (``prompt`` if nothing is left); a slug
already taken in the same file gets ``_2``, ``_3``, ... in file order. So ``generations_dir`` folders
for a prompt file are predictable, filesystem-safe and unique.

CLI: ``coherendream eval t3bench PROMPT_FILE... -o DIR (--generations DIR | --generate-config YAML)``;
its options are :class:`T3BenchConfig`'s fields, plus ``--critic``/``--adapter``/``--dtype``/``--device``
for the critic and ``--vqa-model`` (``coherendream eval t3bench --help``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coherendream.cameras import Camera
from coherendream.eval.protocol import batch_size_field, check_common, num_shards_field, output_field, output_folder, overwrite_field, resolution_field, shard_index_field
from coherendream.io import errors_by_reason, write_json, write_jsonl

logger = logging.getLogger(__name__)

VQASCORE_TEMPLATE = 'Does this figure show "{text}"? Please answer yes or no.'
RESULTS_STEM = "results"
ERRORS_JSONL = "errors.jsonl"
REPORT_HTML = "report.html"
SUMMARY_JSON = "summary.json"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

__all__ = [
    "VQASCORE_TEMPLATE",
    "group_cameras",
    "group_images",
    "icosphere_cameras",
    "load_asset_views",
    "make_vqa_scorer",
    "prompt_slugs",
    "quality_proxy",
    "read_prompt_file",
    "read_prompts",
    "render_cameras",
    "resolve_output",
    "run_t3bench",
    "score_groups",
    "slugify",
]


class EvalItemError(Exception):
    """A prompt that cannot be evaluated; ``reason`` is a short code, ``str(err)`` names input and cause."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# =========================================================================== prompts


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file, one per non-blank line (whitespace collapsed), in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no prompt (empty or only blank lines), naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path}: not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path}: not UTF-8 text ({err})") from err
    prompts = [" ".join(line.split()) for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path}: holds no prompts (empty or blank lines only); expected one prompt per line")
    return prompts


def read_prompts(prompts: Sequence[str] | str | Path) -> tuple[list[str], str | None]:
    """``(prompts, set_name)`` from a prompt file (set name: its stem) or a list (set name None).

    Whitespace is collapsed. Raises ValueError when the list is empty or holds an empty prompt
    (a file is checked by :func:`read_prompt_file`).
    """
    if isinstance(prompts, (str, Path)):
        return read_prompt_file(prompts), Path(prompts).stem
    prompts = [" ".join(str(p).split()) for p in prompts]
    if not prompts or not all(prompts):
        raise ValueError("prompts must be a non-empty list of non-empty prompts")
    return prompts, None


def slugify(text: str, max_len: int = 80) -> str:
    """Filesystem-safe name of a prompt: lower-case ``[a-z0-9_]``, at most ``max_len`` characters."""
    slug = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")[:max_len].strip("_")
    return slug or "prompt"


def prompt_slugs(prompts: Sequence[str], max_len: int = 80) -> list[str]:
    """One unique slug per prompt, in order; repeats get ``_2``, ``_3``... (see the module docstring)."""
    seen: set[str] = set()
    out = []
    for p in prompts:
        base = slugify(p, max_len)
        slug, k = base, 2
        while slug in seen:
            slug = f"{base}_{k}"
            k += 1
        seen.add(slug)
        out.append(slug)
    return out


# =========================================================================== cameras


def icosphere_cameras(level: int = 1, radius: float = 2.2, fov_y: float = 40.0, resolution: int = 256) -> list[Camera]:
    """Cameras at the vertices of a ``level``-times subdivided icosahedron, all looking at the origin.

    ``10 * 4**level + 2`` cameras (12, 42, 162, 642) at distance ``radius``, each an OpenCV
    :class:`Camera` with its azimuth/elevation (degrees, the project's convention) recorded.
    Vertices come from ``trimesh.creation.icosphere`` with trimesh's x, y, z taken as world x, y
    (up), z; a camera straight above or below (none in trimesh's orientation) would still be valid.
    """
    if not 0 <= int(level) <= 4:
        raise ValueError(f"icosphere level must be 0..4 (12..2562 views), got {level}")
    if not radius > 0:
        raise ValueError(f"icosphere radius must be > 0, got {radius}")
    import trimesh

    verts = np.asarray(trimesh.creation.icosphere(subdivisions=int(level), radius=1.0).vertices, dtype=np.float64)
    verts = verts / np.linalg.norm(verts, axis=1, keepdims=True)
    cams = []
    for x, y, z in verts:
        elevation = math.degrees(math.asin(max(-1.0, min(1.0, y))))
        azimuth = math.degrees(math.atan2(x, z)) % 360.0
        cams.append(Camera.orbit(azimuth, elevation, float(radius), float(fov_y), int(resolution)))
    return cams


def _azimuth_gap(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def group_cameras(cameras: Sequence[Camera], num_views: int) -> list[list[int]]:
    """Indices of ``ceil(N / V)`` groups of V cameras, elevation bands spread in azimuth.

    See step 3 of the module docstring. Deterministic; each group is sorted by azimuth.
    """
    n, v = len(cameras), int(num_views)
    if v < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if n < v:
        raise ValueError(f"{n} cameras cannot fill a group of {v} views")
    elev = np.array([c.elevation for c in cameras], dtype=np.float64)
    azim = np.array([c.azimuth for c in cameras], dtype=np.float64)
    # Highest first; ties by azimuth so the order does not depend on the vertex order.
    order = sorted(range(n), key=lambda i: (-round(elev[i], 6), round(azim[i], 6)))
    remaining = list(order)
    groups: list[list[int]] = []
    while remaining:
        first = remaining.pop(0)
        group = [first]
        window = remaining[: 2 * v - 1]
        if len(window) < v - 1:
            # Too few cameras left: take them all, then complete the group with used cameras
            # nearest in elevation (those are scored twice), still spreading in azimuth.
            group += window
            remaining = [i for i in remaining if i not in window]
            rank = {i: r for r, i in enumerate(order)}
            used = sorted((i for i in order if i not in group), key=lambda i: (abs(elev[i] - elev[first]), rank[i]))
            window = used[: 2 * v - 1]
        while len(group) < v:
            best = max(window, key=lambda i: (min(_azimuth_gap(azim[i], azim[j]) for j in group), -window.index(i)))
            group.append(best)
            window.remove(best)
            if best in remaining:
                remaining.remove(best)
        groups.append(sorted(group, key=lambda i: (azim[i], elev[i])))
    return groups


def group_images(count: int, num_views: int) -> list[list[int]]:
    """Groups of a folder's ``count`` images in orbit order: group g = ``g, g+G, ...``, G = count // V."""
    if count < num_views:
        raise ValueError(f"{count} images cannot fill a group of {num_views} views")
    g = max(1, count // num_views)
    return [[k + g * j for j in range(num_views)] for k in range(g)]


# =========================================================================== assets


def resolve_output(folder: str | Path, slug: str, set_name: str | None = None) -> Path:
    """The asset of one prompt in a folder of outputs: a 3DGS PLY path or a folder of views.

    Looks in ``<folder>/<set_name>/<slug>`` and ``<folder>/<set_name>/generations/<slug>`` (what
    ``eval t3bench --generate-config`` writes) when ``set_name`` is given, then ``<folder>/<slug>``
    and ``<folder>/generations/<slug>``; inside the first that exists ``gaussians.ply``, else
    ``views/`` (when it holds images), else the folder itself (when it holds images).

    Raises:
        EvalItemError: ``missing_output`` (no folder) or ``no_asset`` (a folder without PLY or views).
    """
    folder = Path(folder)
    bases = ([folder / set_name] if set_name else []) + [folder]
    candidates = [c for base in bases for c in (base / slug, base / "generations" / slug)]
    base = next((c for c in candidates if c.is_dir()), None)
    if base is None:
        raise EvalItemError("missing_output", f"{slug}: no output folder ({' or '.join(str(c) for c in candidates)})")
    if (base / "gaussians.ply").is_file():
        return base / "gaussians.ply"
    for views in (base / "views", base):
        if views.is_dir() and _view_files(views):
            return views
    raise EvalItemError("no_asset", f"{base}: neither gaussians.ply nor view images found")


def _view_files(folder: Path) -> list[Path]:
    """Images of a view folder in name order; ``grid.*`` (the generator's 2x2 tile) is not a view."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES and p.stem.lower() != "grid")


def render_cameras(path: Path, cameras: Sequence[Camera], resolution: int, renderer: Any = None) -> list:
    """Render a 3DGS PLY or a mesh at ``cameras``: RGB PIL images over white, ``resolution`` square.

    Raises:
        EvalItemError: ``missing_file``, ``corrupt``, ``non_finite``, ``unsupported_format``.
    """
    from coherendream.data.assets import AssetError
    from coherendream.eval.assets import render_asset

    try:
        return render_asset(path, list(cameras), resolution, renderer)
    except AssetError as err:
        raise EvalItemError(err.reason, str(err)) from err


def load_asset_views(asset: Path, cameras: Sequence[Camera], resolution: int) -> tuple[list, bool]:
    """``(views, rendered)``: renders at ``cameras`` for a PLY/mesh, or a folder's images as they are.

    Folder images are composited over white (alpha dropped) and must share one size.

    Raises:
        EvalItemError: with the reason; names the file.
    """
    from PIL import Image

    asset = Path(asset)
    if not asset.is_dir():
        return render_cameras(asset, cameras, resolution), True
    images = []
    for f in _view_files(asset):
        try:
            with Image.open(f) as im:
                im.load()
                rgba = im.convert("RGBA")
        except Exception as err:  # PIL raises many types for a corrupt file
            raise EvalItemError("unreadable_image", f"{f}: cannot be read as an image ({type(err).__name__}: {err})") from err
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        images.append(Image.alpha_composite(white, rgba).convert("RGB"))
    if not images:
        raise EvalItemError("no_views", f"{asset}: no view images")
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise EvalItemError("view_size_mismatch", f"{asset}: views have different sizes {sorted(sizes)}")
    return images, False


# =========================================================================== quality proxy


def quality_proxy(views: Sequence[Any], fg_threshold: float = 0.05, empty_fraction: float = 0.005) -> dict[str, float]:
    """Model-free sanity measures of a set of renders over a white background (module docstring, step 5).

    Args:
        views: N >= 1 RGB images (PIL or ``[H, W, 3]`` uint8 arrays).
        fg_threshold: a pixel is foreground when some channel is below ``1 - fg_threshold`` (in [0, 1]).
        empty_fraction: a view with less foreground than this fraction counts as empty.

    Returns:
        ``coverage_mean``, ``coverage_cv``, ``empty_view_fraction``, ``clipped_view_fraction``,
        ``sharpness``, ``quality_proxy`` (floats; ``quality_proxy`` in [0, 1]).
    """
    if len(views) == 0:
        raise ValueError("quality_proxy needs at least one view")
    cover, clipped, sharp = [], [], []
    for im in views:
        raw = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        a = raw / 255.0 if raw.dtype == np.uint8 else raw.astype(np.float64)  # float input: already in [0, 1]
        fg = (1.0 - a.min(axis=2)) > fg_threshold  # [H, W]
        cover.append(float(fg.mean()))
        border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
        clipped.append(bool(border.any()))
        grey = a.mean(axis=2)
        lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
        inner = fg[1:-1, 1:-1]
        sharp.append(float(lap[inner].var()) if inner.sum() > 1 else 0.0)
    cover_arr = np.array(cover)
    mean = float(cover_arr.mean())
    cv = float(cover_arr.std() / mean) if mean > 0 else 0.0
    empty = float(np.mean(cover_arr < empty_fraction))
    clip = float(np.mean(clipped))
    proxy = (1.0 - empty) * (1.0 - clip) / (1.0 + cv)
    if mean == 0:
        proxy = 0.0  # every view empty: nothing to judge
    return {
        "coverage_mean": mean,
        "coverage_cv": cv,
        "empty_view_fraction": empty,
        "clipped_view_fraction": clip,
        "sharpness": float(np.mean(sharp)),
        "quality_proxy": float(proxy),
    }


# =========================================================================== scoring


def make_vqa_scorer(model_name_or_path: str | Path, num_views: int = 4, adapter: str | Path | None = None,
                    dtype: Any = None, device: Any = None, template: str = VQASCORE_TEMPLATE, **config: Any) -> Any:
    """A VQAScore-style scorer: any LLaVA-family model as a :class:`Critic` asking ``template``.

    ``num_views`` views are tiled into one grid (VQAScore scored 2x2 or 3x3 grids of 3D renders);
    extra ``config`` keys go to :class:`CriticConfig` (e.g. ``grid_rows``).
    """
    from coherendream.critic.model import Critic, CriticConfig

    cfg = CriticConfig(question_template=template, num_views=int(num_views), image_mode="grid", **config)
    return Critic.from_pretrained(model_name_or_path, adapter=adapter, dtype=dtype, device=device, config=cfg)


def score_groups(scorer: Any, jobs: Sequence[tuple[str, list, list[list[int]], str]], batch_size: int = 8) -> dict[str, dict]:
    """Score every group of every job with ``scorer`` in batches.

    Args:
        scorer: anything with ``score(views, prompts) -> .prob_yes`` and ``config.num_views`` (a Critic).
        jobs: ``(key, views, groups, prompt)``: all views of an asset, index groups of V, its prompt.

    Returns:
        ``{key: {"mean", "min", "max", "groups_scored", "groups_failed", "probs", "errors"}}``;
        ``mean`` is None when no group scored.
    """
    from coherendream.critic.batch import score_items

    items = []
    for key, views, groups, prompt in jobs:
        for g, idx in enumerate(groups):
            items.append({"id": f"{key}#g{g}", "views": [views[i] for i in idx], "prompt": prompt, "_key": key})
    results = score_items(scorer, items, batch_size=batch_size, progress=False)
    out: dict[str, dict] = {key: {"probs": [], "errors": []} for key, *_ in jobs}
    for r in results:
        slot = out[r["_key"]]
        if r.get("error"):
            slot["errors"].append(r["error"])
        else:
            slot["probs"].append(float(r["prob_yes"]))
    for slot in out.values():
        p = slot["probs"]
        slot.update(mean=float(np.mean(p)) if p else None, min=float(np.min(p)) if p else None,
                    max=float(np.max(p)) if p else None, groups_scored=len(p), groups_failed=len(slot["errors"]))
    return out


# =========================================================================== the run


def _generate(prompt: str, slug: str, out_set: Path, generate_config: Any, generate_fn: Callable) -> Path:
    """Generate the prompt's asset under ``out_set/generations/<slug>`` (resuming a started one); its PLY."""
    config = dataclasses.replace(generate_config, prompt=prompt, output_dir=str(out_set / "generations" / slug))
    try:
        result = generate_fn(config)
    except Exception as err:  # one failed generation is that prompt's error, not the run's
        raise EvalItemError("generation_failed", f"{slug}: generation failed ({type(err).__name__}: {err})") from err
    ply = Path(result.paths.get("ply") or Path(result.output_dir) / "gaussians.ply")
    if not ply.is_file():
        raise EvalItemError("generation_failed", f"{slug}: generation wrote no PLY (finished={getattr(result, 'finished', None)})")
    return ply


def _generate_shard(sets: list[tuple[Path, list[str]]], out: Path, generate_config: Any, generate_fn: Callable | None,
                    num_shards: int | None, shard_index: int | None) -> dict[tuple[str, str], dict] | None:
    """This process's share of the generations (``coherendream.shards``); every prompt's record
    (``{"ply"}`` or ``{"reason", "error"}``) once all are done, else None."""
    from coherendream.shards import run_jobs

    if generate_fn is None:
        from coherendream.generation.runner import generate, load_parts

        parts: dict[str, Any] = {}  # the prior and critic load once per process, not once per prompt

        def generate_fn(cfg: Any) -> Any:
            return generate(cfg, **load_parts(cfg, critic=cfg.uses_critic, cache=parts))

    jobs = [(f.stem, prompt, slug) for f, prompts in sets for prompt, slug in zip(prompts, prompt_slugs(prompts))]

    def job_id(job: tuple[str, str, str]) -> str:
        return f"{slugify(job[0])}__{job[2]}"

    def generate_one(job: tuple[str, str, str]) -> dict:
        set_name, prompt, slug = job
        try:
            return {"ply": str(_generate(prompt, slug, out / set_name, generate_config, generate_fn))}
        except EvalItemError as err:
            return {"reason": err.reason, "error": str(err)}

    run = run_jobs(jobs, job_id, generate_one, out / "generation_jobs", num_shards, shard_index)
    return None if run.records is None else {(job[0], job[2]): run.records[job_id(job)] for job in jobs}


@dataclass
class T3BenchConfig:
    """What ``eval t3bench`` scores and how; each field is also a command-line option."""

    prompt_files: list[Path] = field(metadata={"help": "T3Bench-style prompt files, one prompt a line (e.g. ../shared/bench/t3bench/prompt_multi.txt)", "argument": True})
    output_dir: Path = output_field("<set>/results.{json,csv}, <set>/errors.jsonl, <set>/report.html, summary.json")
    generations_dir: Path | None = field(default=None, metadata={"help": "existing generations: <dir>/<slug>/ or <dir>/<prompt file stem>/<slug>/ with gaussians.ply or views (an `eval t3bench` output folder works)", "flags": ("--generations",), "deprecated_flags": ("--outputs-dir",)})
    generate_config: Path | None = field(default=None, metadata={"help": "generate each prompt with this `generate` YAML instead"})
    level: int = field(default=1, metadata={"help": "icosphere subdivision of the camera set (1: 42 views, 2: 162 as T3Bench)"})
    radius: float = field(default=2.2, metadata={"help": "distance of the icosphere cameras (T3Bench: 2.2)"})
    fov_y: float = field(default=40.0, metadata={"help": "vertical field of view of the cameras, degrees"})
    resolution: int = resolution_field()
    batch_size: int = batch_size_field()
    report_grids: int = field(default=4, metadata={"help": "prompts per set whose first view group the HTML page shows"})
    num_shards: int | None = num_shards_field()
    shard_index: int | None = shard_index_field()
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        check_common(self)
        self.prompt_files = [Path(f) for f in self.prompt_files]
        if self.generate_config is not None:
            self.generate_config = Path(self.generate_config)
        if (self.generations_dir is None) == (self.generate_config is None):
            raise ValueError("give exactly one of generations_dir (existing outputs) and generate_config (generate them)")
        if not self.prompt_files:
            raise ValueError("no prompt files given")


def run_t3bench(config: T3BenchConfig, critic: Any, vqa_scorer: Any = None, generate_fn: Callable | None = None) -> dict[str, Any]:
    """Run the T3Bench-style protocol (module docstring) on one or more prompt files.

    Args:
        config: the prompt files (all read first: an empty or missing file fails before any work),
            the output folder, and exactly one of ``generations_dir`` (existing outputs) and
            ``generate_config`` (a ``generate`` YAML used as the template of every prompt's run).
            When generating, this process makes every ``num_shards``-th asset
            (``coherendream.shards``: else torchrun's ``RANK``/``WORLD_SIZE`` or a SLURM array);
            finished generations are marked under ``output_dir/generation_jobs`` and skipped on a
            re-run, and the process that finds them all done scores and writes.
        critic: the alignment scorer (a :class:`Critic`; ``score(views, prompts)`` and ``config.num_views``).
        vqa_scorer: optional second scorer (:func:`make_vqa_scorer`), reported as ``alignment_vqa``.
        generate_fn: replaces ``generation.runner.generate`` (tests, or a custom generator); takes a
            config, returns an object with ``paths`` (``"ply"``) and ``output_dir``.

    Returns:
        The summary written to ``summary.json``: per set ``prompts``, ``scored``, ``errors``, the
        mean of each score column, and the files; ``merged`` is False (nothing scored yet) while
        other shards still generate.
    """
    generations_dir, level, radius, fov_y, resolution, batch_size = config.generations_dir, config.level, config.radius, config.fov_y, config.resolution, config.batch_size
    if generations_dir is not None and not generations_dir.is_dir():
        raise FileNotFoundError(f"generations folder {generations_dir}: not a folder")
    generate_config = None
    if config.generate_config is not None:
        from coherendream.config import load_config
        from coherendream.generation.runner import GenerateConfig

        generate_config = load_config(GenerateConfig, config.generate_config)
    sets = [(f, read_prompt_file(f)) for f in config.prompt_files]
    names = [f.stem for f, _ in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"prompt files share the set name(s) {dup} (the file stem); rename one")

    from coherendream.eval.report import Report, image_grid_png, score_histogram
    from coherendream.io import write_results

    out = output_folder(config, "t3bench", getattr(critic, "source", None)).take()
    generated = None
    if generate_config is not None:
        generated = _generate_shard(sets, out, generate_config, generate_fn, config.num_shards, config.shard_index)
        if generated is None:
            return {"merged": False}
    cameras = icosphere_cameras(level, radius, fov_y, resolution)
    summary: dict[str, Any] = {"merged": True, "settings": {"level": level, "views": len(cameras), "radius": radius, "fov_y": fov_y,
                                            "resolution": resolution, "critic_views": int(critic.config.num_views),
                                            "vqa_views": int(vqa_scorer.config.num_views) if vqa_scorer is not None else None,
                                            "source": "outputs" if generations_dir is not None else "generate"},
                               "sets": {}}
    t0 = time.perf_counter()
    for prompt_file, prompts in sets:
        set_name = prompt_file.stem
        out_set = out / set_name
        out_set.mkdir(parents=True, exist_ok=True)
        slugs = prompt_slugs(prompts)
        rows: list[dict] = []
        errors: list[dict] = []
        views_of: dict[str, list] = {}
        jobs_c, jobs_v = [], []
        for prompt, slug in zip(prompts, slugs):
            base = {"set": set_name, "slug": slug, "prompt": prompt}
            try:
                if generated is None:
                    asset = resolve_output(generations_dir, slug, set_name)
                elif "error" in generated[(set_name, slug)]:
                    raise EvalItemError(generated[(set_name, slug)]["reason"], generated[(set_name, slug)]["error"])
                else:
                    asset = Path(generated[(set_name, slug)]["ply"])
                views, rendered = load_asset_views(asset, cameras, resolution)
                cgroups = (group_cameras if rendered else lambda c, v: group_images(len(c), v))(
                    cameras if rendered else views, int(critic.config.num_views))
                vgroups = None
                if vqa_scorer is not None:
                    vgroups = (group_cameras(cameras, int(vqa_scorer.config.num_views)) if rendered
                               else group_images(len(views), int(vqa_scorer.config.num_views)))
            except EvalItemError as err:
                errors.append({**base, "reason": err.reason, "error": str(err)})
                continue
            except ValueError as err:  # too few views for a group, and the like
                errors.append({**base, "reason": "invalid_views", "error": f"{slug}: {err}"})
                continue
            views_of[slug] = [views[i] for i in cgroups[0]]
            rows.append({**base, "asset": str(asset), "views": len(views), "groups": len(cgroups), **quality_proxy(views)})
            jobs_c.append((slug, views, cgroups, prompt))
            if vgroups is not None:
                jobs_v.append((slug, views, vgroups, prompt))
        crit = score_groups(critic, jobs_c, batch_size) if jobs_c else {}
        vqa = score_groups(vqa_scorer, jobs_v, batch_size) if jobs_v else {}
        kept = []
        for row in rows:
            c = crit[row["slug"]]
            if c["mean"] is None:
                errors.append({k: row[k] for k in ("set", "slug", "prompt")} | {
                    "reason": "score_failed", "error": f"{row['slug']}: no group could be scored ({c['errors'][0] if c['errors'] else '?'})"})
                continue
            row.update(alignment_critic=c["mean"], alignment_critic_min=c["min"], critic_groups_failed=c["groups_failed"])
            if vqa_scorer is not None:
                v = vqa.get(row["slug"], {})
                row.update(alignment_vqa=v.get("mean"), vqa_groups_failed=v.get("groups_failed"))
            kept.append(row)
        columns = ["set", "slug", "prompt", "alignment_critic", "alignment_critic_min"] + (
            ["alignment_vqa"] if vqa_scorer is not None else []) + [
            "quality_proxy", "coverage_mean", "coverage_cv", "empty_view_fraction", "clipped_view_fraction",
            "sharpness", "views", "groups", "critic_groups_failed"] + (["vqa_groups_failed"] if vqa_scorer is not None else []) + ["asset"]
        json_path, csv_path = write_results(kept, out_set / RESULTS_STEM, columns=columns)
        write_jsonl(out_set / ERRORS_JSONL, errors)
        means = {}
        for key in ("alignment_critic", "alignment_vqa", "quality_proxy", "coverage_cv", "empty_view_fraction"):
            vals = [r[key] for r in kept if r.get(key) is not None]
            means[key] = float(np.mean(vals)) if vals else None

        report = Report(f"T3Bench-style evaluation: {set_name}")
        report.add_text(f"{len(kept)} of {len(prompts)} prompts scored from {prompt_file}; {len(errors)} not "
                        f"(errors.jsonl). {len(cameras)} icosphere views (level {level}, radius {radius}) per asset, "
                        f"grouped into grids of {critic.config.num_views}. quality_proxy is a model-free sanity proxy "
                        "(foreground coverage consistency, empty and clipped views), not a perceptual score.")
        report.add_table([{"metric": k, "mean": v} for k, v in means.items() if v is not None])
        report.add_table(kept, columns[:-1])
        if kept:
            report.add_image(score_histogram({"critic": [r["alignment_critic"] for r in kept]}, title="critic alignment P(yes)"),
                             caption="critic alignment over prompts")
        for row in kept[: max(0, config.report_grids)]:
            g = views_of[row["slug"]]
            report.add_image(image_grid_png(g, cols=math.ceil(math.sqrt(len(g)))),
                             caption=f"{row['slug']}: {row['prompt']!r} -- alignment {row['alignment_critic']:.3f}")
        if errors:
            report.add_heading("Not scored")
            report.add_table([{k: e.get(k) for k in ("slug", "reason", "error")} for e in errors])
        report.write(out_set / REPORT_HTML)
        summary["sets"][set_name] = {"prompt_file": str(prompt_file), "prompts": len(prompts), "scored": len(kept),
                                     "errors": len(errors), "errors_by_reason": errors_by_reason(errors), "means": means,
                                     "files": {"json": str(json_path), "csv": str(csv_path),
                                               "errors": str(out_set / ERRORS_JSONL), "report": str(out_set / REPORT_HTML)}}
        if errors:
            logger.warning("%s: %d of %d prompts not scored; see %s", set_name, len(errors), len(prompts), out_set / ERRORS_JSONL)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(out / SUMMARY_JSON, summary)
    return summary
