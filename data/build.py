"""``coherendream data build``: assets -> multiview yes/no rows -> a Hugging Face dataset.

How a build runs, and why it survives kills and splits across machines:

1. **Plan.** The config fixes the ordered list of assets (procedural seeds, manifest rows,
   folders), each asset's split (a hash of its uid, so no asset is in two splits) and the chunks
   (``chunk_size`` consecutive assets). Nothing in the plan depends on workers or shards.
2. **Chunks.** Each chunk is rendered and turned into rows independently; its rows go to
   ``.build/chunks/NNNNN.parquet`` and its rejections to ``NNNNN.rejected.jsonl``, then a marker
   ``NNNNN.done.json`` is written last -- each file atomically. A chunk with a marker is done; a
   re-run skips it. Randomness is seeded per asset from (seed, uid), so a chunk's bytes are the
   same whenever and wherever it is built. ``--num-shards/--shard-index`` (or torchrun's
   RANK/WORLD_SIZE, or a SLURM array) take every n-th chunk; ``--num-workers`` builds chunks in
   parallel processes.
3. **Finalise.** When every chunk is done, the chunks are streamed in order into
   ``data/<split>-NNNNN-of-NNNNN.parquet``, with ``rejected.jsonl``, a dataset card
   (``README.md``) and ``build_info.json``. Whichever process finishes last does it; writes are
   atomic and the content is fixed by the chunks, so doing it twice is harmless.

Rows are TRL prompt/completion pairs (see ``dataset_features``): ``images`` is what the model sees
(the tiled grid, or the V views in ``image_mode: views``), ``prompt``/``completion`` are chat
messages with the question of ``coherendream.prompts``.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from coherendream.cameras import OrbitSpec
from coherendream.config import dump_yaml, to_dict
from coherendream.devices import threads_for_shards
from coherendream.data.assets import AssetError, load_mesh
from coherendream.data.manifest import AssetRef, Rejection, evenly_spaced, list_view_images, read_manifest, scan_mesh_dir, scan_render_dir
from coherendream.data.negatives import NEGATIVE_TYPES, Negative, NegativeConfig, procedural_negative, text_negative
from coherendream.data.procedural import ProceduralConfig, Scene, caption_holds, sample_scene
from coherendream.vocabulary import parse_caption
from coherendream.shards import shard_items
from coherendream.grid import GridLayout, tile
from coherendream.output_folder import OutputFolder
from coherendream.io import atomic_path, errors_by_reason, read_jsonl, write_json, write_jsonl, write_results, write_text
from coherendream.prompts import (
    ANSWER_NO,
    ANSWER_YES,
    QUESTION_TEMPLATE,
    check_question_template,
    completion_messages,
    format_question,
    prompt_messages,
)

# --------------------------------------------------------------------------- configuration


@dataclass
class SourceConfig:
    """Where assets come from.

    ``procedural``: ``num_scenes`` scenes drawn from ``procedural``; ``manifest``: CSV/JSONL at
    ``path`` (``root`` defaults to its folder; ``path_pattern`` for Cap3D's ``uid,caption``);
    ``mesh_dir``: mesh files under ``path`` with ``<name>.txt`` captions; ``render_dir``:
    sub-folders ``<uid>/`` of ``path`` holding views and ``caption.txt``.
    """

    kind: Literal["procedural", "manifest", "mesh_dir", "render_dir"] = "procedural"
    path: str | None = None
    root: str | None = None
    path_pattern: str | None = None
    num_scenes: int = 100
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)


@dataclass
class RenderConfig:
    resolution: int = 256
    orbit: OrbitSpec = field(default_factory=OrbitSpec)
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    samples: int = 4  # MSAA samples
    depth: bool = False  # add a `depth` column (16-bit PNG, millimetres of the unit-cube frame; 0 = background)
    normals: bool = False  # add a `normals` column (RGBA PNG, world normal * 0.5 + 0.5; alpha = coverage)
    # An asset with fewer views showing anything is rejected (a flat mesh seen edge-on is invisible
    # from two of four views); each row records its count in `visible_views`.
    min_visible_views: int = 1

    def __post_init__(self) -> None:
        if not self.resolution >= 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {self.resolution}")
        if not 1 <= self.min_visible_views <= self.orbit.num_views:
            raise ValueError(f"min_visible_views must be between 1 and the orbit's {self.orbit.num_views} views, got {self.min_visible_views}")
        if self.samples < 0:
            raise ValueError(f"samples (MSAA) must be >= 0, got {self.samples}")


@dataclass
class BuildConfig:
    output_dir: str = "outputs/dataset"
    source: SourceConfig = field(default_factory=SourceConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    negatives: NegativeConfig = field(default_factory=NegativeConfig)
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.9, "validation": 0.05, "test": 0.05})
    image_mode: Literal["grid", "views"] = "grid"
    grid_rows: int | None = None
    grid_cols: int | None = None
    question_template: str = QUESTION_TEMPLATE
    seed: int = 0
    chunk_size: int = 16
    rows_per_file: int = 5000
    png_compress_level: int = 1  # zlib level for PNGs: 1 is several times faster than 6 for ~20% more bytes
    # How the work is run; not part of the dataset's identity (a resumed build may change them).
    num_workers: int = 1
    num_shards: int = 1
    shard_index: int = 0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.splits or any(v < 0 for v in self.splits.values()) or sum(self.splits.values()) <= 0:
            raise ValueError(f"splits: need non-negative fractions with a positive sum, got {self.splits}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} is not in [0, num_shards={self.num_shards})")
        if self.chunk_size < 1 or self.rows_per_file < 1 or self.num_workers < 1:
            raise ValueError("chunk_size, rows_per_file and num_workers must be >= 1")
        GridLayout.for_views(self.render.orbit.num_views, self.grid_rows, self.grid_cols)
        check_question_template(self.question_template)

    @property
    def grid_layout(self) -> GridLayout:
        return GridLayout.for_views(self.render.orbit.num_views, self.grid_rows, self.grid_cols)

    def identity(self) -> dict:
        """The settings that decide the dataset's content (what a resumed build must share)."""
        d = to_dict(self)
        for key in ("output_dir", "num_workers", "num_shards", "shard_index", "overwrite", "progress"):
            d.pop(key)
        return d


@dataclass
class BuildResult:
    output_dir: Path
    finalized: bool
    chunks_done: int
    chunks_total: int
    rows: dict[str, int]
    rejected: int
    seconds: float
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    inputs: int = 0  # assets planned plus inputs the manifest or folder scan rejected


# --------------------------------------------------------------------------- dataset schema


def dataset_features(config: BuildConfig, with_split: bool = False):
    """``datasets.Features`` of the rows. ``label``: 1 = "Yes" (caption matches), 0 = "No"."""
    from datasets import ClassLabel, Features, Image, List, Value

    messages = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
    view_meta = {
        "asset_id": Value("string"),
        "azimuth": Value("float32"),
        "elevation": Value("float32"),
        "distance": Value("float32"),
        "fov_y": Value("float32"),
        "c2w": List(Value("float32")),
    }
    features = {
        "id": Value("string"),
        "pair_id": Value("string"),
        "asset_id": Value("string"),
        "images": List(Image()),
        "views": List(Image()),
        "prompt": messages,
        "completion": messages,
        "label": ClassLabel(names=["no", "yes"]),
        "negative_type": Value("string"),
        "negative_detail": Value("string"),
        "caption": Value("string"),
        "true_caption": Value("string"),
        "source": Value("string"),
        "views_meta": List(view_meta),
        "layout": Value("string"),
        "visible_views": Value("int32"),
    }
    if config.render.depth:
        features["depth"] = List(Image())
    if config.render.normals:
        features["normals"] = List(Image())
    if with_split:
        features["split"] = Value("string")
    return Features(features)


# --------------------------------------------------------------------------- plan


def plan_assets(config: BuildConfig) -> tuple[list[AssetRef], list[Rejection]]:
    """The ordered assets of the build and the inputs rejected before any loading."""
    src = config.source
    if src.kind == "procedural":
        if src.num_scenes < 1:
            raise ValueError(f"source.num_scenes (--procedural) must be >= 1, got {src.num_scenes}")
        refs = []
        for i in range(src.num_scenes):
            seed = int(np.random.SeedSequence([config.seed, i]).generate_state(1)[0])
            scene = sample_scene(seed, src.procedural)
            refs.append(AssetRef(uid=f"scene-{i:06d}", kind="procedural", caption=scene.text, seed=seed))
        return refs, []
    if src.path is None:
        raise ValueError(f"source.path is required for source.kind={src.kind!r}")
    if src.kind == "manifest":
        refs, rejected = read_manifest(src.path, src.root, src.path_pattern)
    elif src.kind == "mesh_dir":
        refs, rejected = scan_mesh_dir(src.path)
    else:
        refs, rejected = scan_render_dir(src.path)
    if not refs and not rejected:  # refused here, before the output folder is made
        expected = {"manifest": "rows (uid, path, caption)", "mesh_dir": "mesh files with <name>.txt captions",
                    "render_dir": "<uid>/ folders of views"}[src.kind]  # fmt: skip
        raise ValueError(f"source {src.path}: no {expected}")
    return refs, rejected


def assign_split(ref: AssetRef, splits: dict[str, float], seed: int) -> str:
    u = (ref.stable_hash(salt=seed) % 1_000_000) / 1_000_000
    total = sum(splits.values())
    acc = 0.0
    for name, frac in splits.items():
        acc += frac / total
        if u < acc:
            return name
    return list(splits)[-1]


# --------------------------------------------------------------------------- one chunk


@dataclass
class _Views:
    ref: AssetRef
    split: str
    rgba: np.ndarray  # [V, H, W, 4] uint8
    meta: list[dict]
    pngs: list[bytes]
    depth_pngs: list[bytes] | None = None
    normal_pngs: list[bytes] | None = None
    layout: str = ""
    scene: Scene | None = None  # procedural scenes: the ground truth that negatives are checked against

    @property
    def visible_views(self) -> int:
        """Views in which anything covers a pixel."""
        return int(np.any(self.rgba[..., 3] > 0, axis=(1, 2)).sum())


class ChunkBuilder:
    """Turns the assets of one chunk into rows. One per process: it owns an OpenGL context."""

    def __init__(self, config: BuildConfig, caption_pools: dict[str, list[tuple[str, str]]]):
        self.config = config
        self.caption_pools = caption_pools  # split -> [(uid, caption)] for caption swaps
        self._renderer = None

    @property
    def renderer(self):
        if self._renderer is None:
            from coherendream.data.render import MeshRenderer

            r = self.config.render
            self._renderer = MeshRenderer(r.resolution, r.background, r.samples)
        return self._renderer

    def build(self, refs: list[AssetRef], splits: list[str]) -> tuple[list[dict], list[Rejection]]:
        rendered, rejected = [], []
        for ref, split in zip(refs, splits):
            try:
                rendered.append(self._views(ref, split))
            except AssetError as err:
                rejected.append(Rejection(ref.uid, ref.path, err.stage, err.reason, str(err)))
            except Exception as err:  # noqa: BLE001 - one asset must never stop the build
                rejected.append(Rejection(ref.uid, ref.path, "render", "internal_error", f"{type(err).__name__}: {err}"))
        rows = []
        for item in rendered:
            try:
                rows.extend(self._rows(item, rendered))
            except _NoNegative as err:
                rejected.append(Rejection(item.ref.uid, item.ref.path, "negatives", "no_negative", str(err)))
        return rows, rejected

    # -- views --------------------------------------------------------------------------
    def _rng(self, ref: AssetRef, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, ref.stable_hash(), purpose])

    def _views(self, ref: AssetRef, split: str) -> _Views:
        cfg = self.config.render
        layout, scene = "", None
        if ref.kind == "views":
            rgba, meta = self._read_views(ref)
            return _Views(ref, split, rgba, meta, [self._png(v) for v in rgba])
        if ref.kind == "procedural":
            scene = sample_scene(ref.seed, self.config.source.procedural)
            asset = scene.to_asset(ref.uid)
            layout = json.dumps(scene.to_layout())
        else:
            asset = load_mesh(ref.path, uid=ref.uid, caption=ref.caption)
        cameras = cfg.orbit.cameras(cfg.resolution, rng=self._rng(ref, 0))
        out = self.renderer.render(asset, cameras, depth=cfg.depth, normals=cfg.normals)
        visible = int(np.any(out.rgba[..., 3] > 0, axis=(1, 2)).sum())
        if visible == 0:
            raise AssetError("empty_render", f"{ref.path or ref.uid}: nothing visible in any view", stage="render")
        if visible < cfg.min_visible_views:
            raise AssetError("too_few_visible_views", f"{ref.path or ref.uid}: {visible} of {len(cameras)} views show anything, "
                             f"render.min_visible_views is {cfg.min_visible_views} (a flat mesh seen edge-on?)", stage="render")  # fmt: skip
        meta = [{"asset_id": ref.uid, **cam.to_meta()} for cam in cameras]
        views = _Views(ref, split, out.rgba, meta, [self._png(v) for v in out.rgba], layout=layout, scene=scene)
        if out.depth is not None:
            mm = np.where(np.isfinite(out.depth), np.clip(out.depth * 1000.0, 1, 65535), 0).astype(np.uint16)
            views.depth_pngs = [self._png(d) for d in mm]
        if out.normals is not None:
            alpha = out.rgba[..., 3:4]
            enc = np.clip(np.rint((out.normals * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)
            views.normal_pngs = [self._png(np.concatenate([n, a], axis=-1)) for n, a in zip(enc, alpha)]
        return views

    def _read_views(self, ref: AssetRef) -> tuple[np.ndarray, list[dict]]:
        from PIL import Image, UnidentifiedImageError

        num = self.config.render.orbit.num_views
        files = list_view_images(ref.path)
        if len(files) < num:
            raise AssetError("too_few_views", f"{ref.path}: {len(files)} image(s), {num} views needed")
        # more images than views: take evenly spaced ones (renders are usually stored in orbit order)
        picks = evenly_spaced(files, num)
        res, bg = self.config.render.resolution, np.asarray(self.config.render.background)
        views = []
        for f in picks:
            try:
                with Image.open(f) as im:
                    im.load()
                    img = im.convert("RGBA")
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise AssetError("unreadable_image", f"{f}: cannot be read as an image ({err})") from err
            if img.width < 8 or img.height < 8:
                raise AssetError("image_too_small", f"{f}: {img.width}x{img.height} is too small")
            side = max(img.size)  # pad to square with transparent border, keep the aspect ratio
            square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
            square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
            arr = np.asarray(square.resize((res, res), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
            a = arr[..., 3:4]
            rgb = arr[..., :3] * a + bg * (1 - a)
            views.append(np.concatenate([np.rint(rgb * 255), np.rint(a * 255)], axis=-1).astype(np.uint8))
        nan = float("nan")
        meta = [{"asset_id": ref.uid, "azimuth": nan, "elevation": nan, "distance": nan, "fov_y": nan, "c2w": []} for _ in picks]
        return np.stack(views), meta

    def _png(self, array: np.ndarray) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", compress_level=self.config.png_compress_level)
        return buf.getvalue()

    # -- rows ---------------------------------------------------------------------------
    def _model_images(self, rgba: np.ndarray) -> list[bytes] | None:
        if self.config.image_mode == "views":
            return None
        return [self._png(tile(rgba[..., :3], self.config.grid_layout))]

    def _rows(self, item: _Views, chunk: list[_Views]) -> list[dict]:
        rng = self._rng(item.ref, 1)
        ratios = self.config.negatives.ratios
        grid = self._model_images(item.rgba)
        rows = []
        for pair in range(self.config.negatives.pairs_per_asset):
            pair_id = f"{item.ref.uid}/{pair}"
            negative, mixed = None, None
            types = [t for t in NEGATIVE_TYPES if ratios.get(t, 0) > 0]
            while types and negative is None:
                w = np.array([ratios[t] for t in types])
                kind = types[int(rng.choice(len(types), p=w / w.sum()))]
                types.remove(kind)
                if kind == "multiview_mix":
                    mixed = self._mix(item, chunk, rng)
                    if mixed is not None:
                        negative = Negative("multiview_mix", item.ref.caption, {"views_from": mixed[2]})
                else:
                    negative = self._caption_negative(item, kind, rng)
            if negative is None:
                raise _NoNegative(f"{item.ref.uid}: no negative type applies (enabled: {sorted(t for t in ratios if ratios[t] > 0)})")
            rows.append(self._row(item, pair_id, "pos", item.ref.caption, None, grid, item.pngs, item.meta))
            if mixed is not None:
                rgba, meta, _ = mixed
                pngs = [self._png(v) for v in rgba]
                rows.append(self._row(item, pair_id, "neg", negative.text, negative, self._model_images(rgba), pngs, meta))
            else:
                rows.append(self._row(item, pair_id, "neg", negative.text, negative, grid, item.pngs, item.meta))
        return rows

    def _caption_negative(self, item: _Views, kind: str, rng: np.random.Generator) -> Negative | None:
        ref, scene = item.ref, item.scene
        if kind == "caption_swap":
            pool = self.caption_pools.get(item.split, [])
            for i in rng.permutation(len(pool))[:64]:
                uid, text = pool[int(i)]
                if uid == ref.uid or text == ref.caption:
                    continue
                if scene is not None:
                    parsed = parse_caption(text)
                    if parsed is not None and caption_holds(scene, parsed):
                        continue  # another way of saying the truth, not a negative
                return Negative("caption_swap", text, {"from_asset": uid})
            return None
        if scene is not None:
            p = self.config.source.procedural
            return procedural_negative(scene, kind, rng, p.colors, p.shapes)
        return text_negative(ref.caption, kind, rng)

    def _mix(self, item: _Views, chunk: list[_Views], rng: np.random.Generator):
        """Half the views from ``item``, the other half from another asset of the same split."""
        partners = [o for o in chunk if o.ref.uid != item.ref.uid and o.split == item.split and o.rgba.shape == item.rgba.shape]
        if not partners:
            return None
        other = partners[int(rng.integers(len(partners)))]
        v = len(item.rgba)
        take = np.zeros(v, dtype=bool)
        take[rng.permutation(v)[: v // 2]] = True  # these views come from the other asset
        rgba = np.where(take[:, None, None, None], other.rgba, item.rgba)
        meta = [other.meta[i] if take[i] else item.meta[i] for i in range(v)]
        return rgba, meta, other.ref.uid

    def _row(self, item, pair_id, polarity, text, negative, grid, view_pngs, meta) -> dict:
        cfg = self.config
        images = grid if grid is not None else view_pngs
        question = format_question(text, len(view_pngs), cfg.question_template)
        row = {
            "id": f"{pair_id}/{polarity}",
            "pair_id": pair_id,
            "asset_id": item.ref.uid,
            "images": [{"bytes": b, "path": None} for b in images],
            "views": [{"bytes": b, "path": None} for b in view_pngs],
            "prompt": prompt_messages(question, len(images)),
            "completion": completion_messages(ANSWER_NO if negative else ANSWER_YES),
            "label": 0 if negative else 1,
            "negative_type": negative.type if negative else "none",
            "negative_detail": json.dumps(negative.detail) if negative else "",
            "caption": text,
            "true_caption": item.ref.caption,
            "source": item.ref.kind,
            "views_meta": meta,
            "layout": item.layout,
            "visible_views": item.visible_views,
            "split": item.split,
        }
        if cfg.render.depth:
            row["depth"] = [{"bytes": b, "path": None} for b in (item.depth_pngs or [])]
        if cfg.render.normals:
            row["normals"] = [{"bytes": b, "path": None} for b in (item.normal_pngs or [])]
        return row


class _NoNegative(Exception):
    pass


# --------------------------------------------------------------------------- driver

_WORKER: ChunkBuilder | None = None


def _init_worker(config: BuildConfig, pools) -> None:
    global _WORKER  # one builder (and one GL context) per worker process
    from coherendream.data.render import configure_llvmpipe_threads

    # the workers already use every core: llvmpipe's own rasteriser threads, or torch's, would only contend
    configure_llvmpipe_threads(1)
    threads_for_shards(config.num_workers)
    _WORKER = ChunkBuilder(config, pools)


def _run_chunk(job) -> dict:
    index, refs, splits, state_dir = job
    return _build_chunk(_WORKER, index, refs, splits, Path(state_dir))


def _build_chunk(builder: ChunkBuilder, index: int, refs, splits, state_dir: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.time()
    rows, rejected = builder.build(refs, splits)
    features = dataset_features(builder.config, with_split=True)
    table = pa.Table.from_pylist(rows, schema=features.arrow_schema)
    chunks = state_dir / "chunks"
    with atomic_path(chunks / f"{index:05d}.parquet") as tmp:
        pq.write_table(table, tmp)
    write_jsonl(chunks / f"{index:05d}.rejected.jsonl", [r.to_dict() for r in rejected])
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["split"], Counter())[r["negative_type"]] += 1
    marker = {"chunk": index, "assets": len(refs), "rows": len(rows), "rejected": len(rejected), "counts": {k: dict(v) for k, v in counts.items()}, "seconds": round(time.time() - start, 3)}
    write_json(chunks / f"{index:05d}.done.json", marker)  # last: its presence means the chunk is complete
    return marker


def build_dataset(config: BuildConfig) -> BuildResult:
    """Build (or resume) the dataset described by ``config``; see the module docstring."""
    start = time.time()
    out = Path(config.output_dir)
    state = out / ".build"
    # The inputs are checked before anything is written or removed: a command that fails here
    # leaves the output folder as it was.
    overwrite = config.overwrite and config.shard_index == 0  # shard 0 clears; the others join its build
    folder = OutputFolder(out, "data build", config.identity(), overwrite=overwrite)
    refs, manifest_rejected = plan_assets(config)
    if overwrite and folder.resuming:  # the same settings, started over
        for sub in (state, out / "data"):
            shutil.rmtree(sub, ignore_errors=True)
    folder.take()

    threads_for_shards(config.num_shards)  # shards started by hand share this machine's cores
    splits = [assign_split(r, config.splits, config.seed) for r in refs]
    pools: dict[str, list[tuple[str, str]]] = {}
    for ref, split in zip(refs, splits):
        pools.setdefault(split, []).append((ref.uid, ref.caption))
    n_chunks = max(1, math.ceil(len(refs) / config.chunk_size))
    chunks_dir = state / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    mine = shard_items(range(n_chunks), config.num_shards, config.shard_index)
    pending = [i for i in mine if not (chunks_dir / f"{i:05d}.done.json").exists()]
    for i in pending:
        # Temporary files of an atomic write that a killed run left behind. Only this shard writes
        # its own pending chunks, so these cannot belong to a shard running beside it.
        for stale in chunks_dir.glob(f".{i:05d}.*.tmp"):
            stale.unlink(missing_ok=True)
    jobs = [(i, refs[i * config.chunk_size : (i + 1) * config.chunk_size], splits[i * config.chunk_size : (i + 1) * config.chunk_size], str(state)) for i in pending]

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(j[1]) for j in jobs), unit="asset", desc=f"build shard {config.shard_index}/{config.num_shards}", disable=not config.progress)
    log_path = state / f"log-shard{config.shard_index:04d}.jsonl"
    with open(log_path, "a", encoding="utf-8") as log:
        if config.num_workers > 1 and len(jobs) > 1:
            ctx = mp.get_context("spawn")  # a fresh process per worker: GL contexts do not survive fork
            with ctx.Pool(min(config.num_workers, len(jobs)), initializer=_init_worker, initargs=(config, pools)) as pool:
                for marker in pool.imap_unordered(_run_chunk, jobs):
                    log.write(json.dumps(marker) + "\n")
                    log.flush()
                    bar.update(marker["assets"])
        else:
            builder = ChunkBuilder(config, pools)
            for index, chunk_refs, chunk_splits, _ in jobs:
                marker = _build_chunk(builder, index, chunk_refs, chunk_splits, state)
                log.write(json.dumps(marker) + "\n")
                log.flush()
                bar.update(marker["assets"])
    bar.close()

    done = [i for i in range(n_chunks) if (chunks_dir / f"{i:05d}.done.json").exists()]
    result = BuildResult(out, False, len(done), n_chunks, {}, 0, 0.0)
    if len(done) == n_chunks:
        result = finalize(config, refs, manifest_rejected, n_chunks)
        result.chunks_done = len(done)
    result.seconds = round(time.time() - start, 3)
    return result


# --------------------------------------------------------------------------- finalise


def finalize(config: BuildConfig, refs: list[AssetRef], manifest_rejected: list[Rejection], n_chunks: int) -> BuildResult:
    import pyarrow.parquet as pq

    out = Path(config.output_dir)
    chunks_dir = out / ".build" / "chunks"
    markers = [json.loads((chunks_dir / f"{i:05d}.done.json").read_text()) for i in range(n_chunks)]
    counts: dict[str, Counter] = {}
    for m in markers:
        for split, c in m["counts"].items():
            counts.setdefault(split, Counter()).update(c)
    rows_per_split = {s: sum(c.values()) for s, c in counts.items()}
    data_dir = out / "data"
    expected = set()
    schema = dataset_features(config).arrow_schema
    for split in config.splits:
        total = rows_per_split.get(split, 0)
        if total == 0:
            continue
        n_files = math.ceil(total / config.rows_per_file)
        names = [data_dir / f"{split}-{k:05d}-of-{n_files:05d}.parquet" for k in range(n_files)]
        expected.update(p.name for p in names)
        _stream_split(split, [chunks_dir / f"{i:05d}.parquet" for i in range(n_chunks)], names, config.rows_per_file, schema, pq)
    for stale in data_dir.glob("*.parquet") if data_dir.exists() else []:
        if stale.name not in expected:
            stale.unlink()

    rejected = [r.to_dict() for r in manifest_rejected]
    for i in range(n_chunks):
        rejected.extend(read_jsonl(chunks_dir / f"{i:05d}.rejected.jsonl"))
    write_results(rejected, out / "rejected", formats=("jsonl",))
    info = {
        "assets_planned": len(refs),
        "assets_rejected": len(rejected),
        "rows": rows_per_split,
        "counts": {s: dict(sorted(c.items())) for s, c in counts.items()},
        "rejected_by_reason": errors_by_reason(rejected),
        "config": config.identity(),
    }
    write_json(out / "build_info.json", info)
    write_text(out / "README.md", dataset_card(config, info))
    return BuildResult(out, True, n_chunks, n_chunks, rows_per_split, len(rejected), 0.0, info["rejected_by_reason"],
                       len(refs) + len(manifest_rejected))


def _stream_split(split: str, chunk_files: list[Path], names: list[Path], rows_per_file: int, schema, pq) -> None:
    """Copy this split's rows from the chunks, in chunk order, into files of ``rows_per_file``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def tables():
        for f in chunk_files:
            t = pq.read_table(f)
            t = t.filter(pc.equal(t["split"], split)).drop_columns(["split"])
            if t.num_rows:
                yield t

    pending: list = []
    pending_rows = 0
    file_iter = iter(names)

    def flush(tabs):
        table = pa.concat_tables(tabs).cast(schema)
        with atomic_path(next(file_iter)) as tmp:
            pq.write_table(table, tmp)

    for t in tables():
        while t.num_rows:
            take = min(rows_per_file - pending_rows, t.num_rows)
            pending.append(t.slice(0, take))
            pending_rows += take
            t = t.slice(take)
            if pending_rows == rows_per_file:
                flush(pending)
                pending, pending_rows = [], 0
    if pending_rows:
        flush(pending)


def dataset_card(config: BuildConfig, info: dict) -> str:
    splits = [s for s in config.splits if info["rows"].get(s)]
    yaml_files = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in splits)
    types = ["none", *NEGATIVE_TYPES]
    header = "| split | rows | " + " | ".join(types) + " |"
    sep = "|" + "---|" * (len(types) + 2)
    lines = [f"| {s} | {info['rows'][s]} | " + " | ".join(str(info["counts"][s].get(t, 0)) for t in types) + " |" for s in splits]
    rejected = "\n".join(f"| {reason} | {n} |" for reason, n in info["rejected_by_reason"].items()) or "| (none) | 0 |"
    return f"""---
configs:
- config_name: default
  data_files:
{yaml_files}
tags:
- 3d
- multiview
- text-to-3d
- alignment
- coherendream
---

# Multiview text-alignment dataset (CoherenDream)

Yes/no rows asking whether {config.render.orbit.num_views} views of a 3D asset match a caption, built by
`coherendream data build` from `{config.source.kind}` assets. Each (positive, negative) pair shares a
`pair_id`; `label` is 1 for "Yes". Rows are TRL prompt/completion pairs: `images` holds
{"one tiled grid" if config.image_mode == "grid" else "the views"} per row, `prompt`/`completion` are chat messages.

```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder")  # DatasetDict with the splits below
```

## Rows per split and negative type ("none" = positive)

{header}
{sep}
{chr(10).join(lines)}

## Rejected inputs ({info['assets_rejected']}, details in `rejected.jsonl`)

| reason | count |
|---|---|
{rejected}

## Build settings

```yaml
{dump_yaml(info['config'])}```
"""


def load_built_dataset(output_dir: str | Path):
    """The built dataset as a ``datasets.DatasetDict`` (one entry per non-empty split)."""
    from datasets import load_dataset

    data = Path(output_dir) / "data"
    files = {}
    for f in sorted(data.glob("*.parquet")):
        files.setdefault(f.name.split("-")[0], []).append(str(f))
    if not files:
        raise FileNotFoundError(f"{output_dir}: no finished dataset (data/*.parquet); run or resume `coherendream data build`")
    return load_dataset("parquet", data_files=files)
