"""``coherendream eval assets``: score 3D assets of any kind against prompts with a critic.

A manifest (CSV with a header, or JSONL) lists ``id, path, prompt``; ``path`` is relative to the
manifest's folder (or ``root``) and must stay under it. Each asset is turned into the critic's V
orbit views with the toolkit's own renderers:

* a mesh file (glTF/GLB, OBJ, PLY, STL, OFF) -> ``coherendream.data`` mesh renderer;
* a 3D Gaussian PLY (the 3DGS layout: ``f_dc_*``, ``scale_*``, ``rot_*`` ...) -> the Gaussian
  rasteriser of ``coherendream.generation``;
* a folder of views -> the images as they are (V evenly spaced ones, in name order).

Views are composited over white, as in the datasets. Each asset that cannot be used (missing
file, corrupt mesh, a PLY with NaN, views of different sizes, an empty prompt) is reported with
its reason in ``errors.jsonl`` while the rest are scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coherendream.cameras import OrbitSpec, camera_tensors, scorer_orbit
from coherendream.eval.protocol import batch_size_field, check_common, num_shards_field, output_field, output_folder, overwrite_field, progress_field, resolution_field, shard_index_field
from coherendream.io import errors_by_reason, write_bytes, write_json, write_jsonl


def is_gaussian_ply(path: str | Path) -> bool:
    """True for a PLY whose header declares 3DGS properties (``f_dc_0`` and ``scale_0``)."""
    with open(path, "rb") as fh:
        header = fh.read(8192).split(b"end_header", 1)[0]
    return b"property float f_dc_0" in header and b"property float scale_0" in header


def render_gaussians(model, cameras: list, resolution: int, chunk: int = 8) -> list:
    """A ``GaussianModel`` rendered at ``cameras``: RGB PIL images over white, ``resolution`` square."""
    import torch
    from PIL import Image

    images = []
    with torch.no_grad():
        for i in range(0, len(cameras), chunk):  # bounded memory for large camera sets
            part = cameras[i : i + chunk]
            viewmats, Ks = camera_tensors(part)
            out = model.render(viewmats, Ks, resolution, resolution, backgrounds=torch.ones(len(part), 3))
            rgb = (out.rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            images += [Image.fromarray(v) for v in rgb]
    return images


def render_gaussian_views(model, orbit: OrbitSpec, resolution: int) -> list:
    """Orbit views of a ``GaussianModel`` as RGB PIL images over white."""
    return render_gaussians(model, orbit.cameras(resolution, rng=np.random.default_rng(0)), resolution)


def render_asset(path: str | Path, cameras: list, resolution: int, renderer=None) -> list:
    """A 3DGS PLY or a mesh file rendered at ``cameras`` (resized to ``resolution``) as RGB PIL images.

    Raises:
        AssetError: ``missing_file``, ``corrupt``, ``non_finite``, ``unsupported_format`` or a
            mesh loader's reason.
    """
    import dataclasses

    from PIL import Image

    from coherendream.data.assets import AssetError, load_mesh, mesh_extensions

    path = Path(path)
    if not path.is_file():
        raise AssetError("missing_file", f"{path}: file not found")
    cams = [dataclasses.replace(c, width=int(resolution), height=int(resolution)) for c in cameras]
    if path.suffix.lower() == ".ply" and is_gaussian_ply(path):
        import torch

        from coherendream.generation.gaussians import GaussianModel

        try:
            model = GaussianModel.from_ply(path)
        except (ValueError, OSError) as err:
            raise AssetError("corrupt", f"{path}: {err}") from err
        if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
            raise AssetError("non_finite", f"{path}: Gaussian parameters contain NaN or inf")
        return render_gaussians(model, cams, resolution)
    if path.suffix.lower() not in mesh_extensions():
        raise AssetError("unsupported_format", f"{path}: not a mesh ({', '.join(mesh_extensions())}), a 3DGS PLY or a folder of views")
    asset = load_mesh(path)
    if renderer is None:
        from coherendream.data.render import MeshRenderer

        renderer = MeshRenderer(resolution)
    return [Image.fromarray(v[..., :3]) for v in renderer.render(asset, cams).rgba]


def asset_views(path: Path, orbit: OrbitSpec, resolution: int, renderer=None) -> list:
    """The V views of one asset as RGB PIL images; raises ``AssetError`` with the reason."""
    from PIL import Image

    from coherendream.data.assets import AssetError

    if not path.is_dir():
        return render_asset(path, orbit.cameras(resolution, rng=np.random.default_rng(0)), resolution, renderer)
    from coherendream.critic.batch import select_views

    images = []
    for f in select_views(path, orbit.num_views):
        try:
            with Image.open(f) as im:
                im.load()
                rgba = im.convert("RGBA")
        except (OSError, ValueError) as err:
            raise AssetError("unreadable_image", f"{f}: cannot be read as an image ({err})") from err
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        images.append(Image.alpha_composite(white, rgba).convert("RGB"))
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise AssetError("view_size_mismatch", f"{path}: views have different sizes {sorted(sizes)}")
    return images


def asset_rows(manifest: str | Path, root: str | Path | None = None) -> Iterator[dict]:
    """The manifest's rows as ``{id, prompt, path, full}`` (``full``: the checked path under the
    root), or ``{id, prompt, path, reason, error}`` for a row that cannot be used
    (``coherendream.data.manifest.manifest_rows``); nothing is rendered yet (cheap, so every shard
    reads the whole manifest)."""
    from coherendream.data.manifest import manifest_rows

    for row in manifest_rows(manifest, root):
        yield {k: row[k] for k in ("id", "prompt", "path", "full", "reason", "error") if k in row}


def asset_items(rows: Iterable[dict], orbit: OrbitSpec | None = None, resolution: int = 256) -> Iterator[dict]:
    """Critic items ``{id, views, prompt, path}`` (or ``{id, error, reason}``) for :func:`asset_rows`' rows, rendered now."""
    from coherendream.critic.batch import ItemError
    from coherendream.data.assets import AssetError
    from coherendream.data.render import MeshRenderer

    orbit = orbit or OrbitSpec()
    renderer = None
    for row in rows:
        item = {k: v for k, v in row.items() if k != "full"}
        if "error" in row:
            yield item
            continue
        full = row["full"]
        try:
            if renderer is None and full.suffix.lower() != ".ply" and not full.is_dir():
                renderer = MeshRenderer(resolution)
            views = asset_views(full, orbit, resolution, renderer)
        except (AssetError, ItemError) as err:  # ItemError: a view folder with too few images
            yield {**item, "reason": err.reason, "error": str(err)}
            continue
        except (OSError, ValueError) as err:
            yield {**item, "reason": "unreadable", "error": f"{item['path']}: {err}"}
            continue
        yield {**item, "views": views}


@dataclass
class AssetsEvalConfig:
    """What ``eval assets`` scores and how; each field is also a command-line option."""

    manifest: Path = field(metadata={"help": "CSV/JSONL with id, path, prompt (meshes, 3DGS PLYs or folders of views)"})
    output_dir: Path = output_field("scores, errors.jsonl, report.html")
    root: Path | None = field(default=None, metadata={"help": "root of the manifest's paths (default: its folder)"})
    resolution: int = resolution_field()
    batch_size: int = batch_size_field()
    progress: bool = progress_field()
    num_shards: int | None = num_shards_field()
    shard_index: int | None = shard_index_field()
    chunk_size: int = field(default=64, metadata={"help": "assets per kept chunk of work (resume and sharding unit)"})
    orbit: OrbitSpec | None = field(default=None, metadata={"cli": False, "help": "cameras for meshes and PLYs (default: the critic's own orbit)"})
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        check_common(self)


def evaluate_assets(critic: Any, config: AssetsEvalConfig) -> dict:
    """Score every asset of ``config.manifest``; writes scores.{json,csv}, errors.jsonl, summary.json, report.html.

    Assets are rendered from ``config.orbit`` (default: the critic's own orbit) and scored in chunks of ``chunk_size`` kept
    under ``output_dir/chunks`` (with each asset's views in ``output_dir/views``): a re-run
    resumes, and processes given ``num_shards``/``shard_index`` (or started by torchrun or a SLURM
    array) share the chunks; the one that finds them all done writes the results. ``merged`` in
    the returned summary says whether this call did.
    """
    from coherendream.critic.batch import score_items, split_results
    from coherendream.data.manifest import check_manifest
    from coherendream.eval.report import Report, image_grid_png
    from coherendream.io import write_results
    from coherendream.shards import map_in_chunks

    manifest, root, resolution, out = config.manifest, config.root, config.resolution, config.output_dir
    check_manifest(manifest)  # before any rendering: a manifest no row of which can be used
    output_folder(config, "assets", getattr(critic, "source", None)).take()
    orbit = config.orbit or scorer_orbit(critic)  # the critic's own views: objects at the size it learned them
    rows = asset_rows(manifest, root=root)

    def score_chunk(chunk: list[dict], start: int) -> list[dict]:
        items = list(asset_items(chunk, orbit, resolution))
        results = score_items(critic, items, batch_size=config.batch_size, progress=config.progress)
        for index, (item, r) in enumerate(zip(items, results), start):
            r.pop("views", None)
            if "views" in item and not r.get("error"):
                r["views_png"] = f"views/{index:06d}.png"
                write_bytes(out / r["views_png"], image_grid_png(item["views"], cols=len(item["views"])))
        return results

    signature = {"manifest": str(Path(manifest).resolve()), "root": str(root), "resolution": resolution, "orbit": dataclasses.asdict(orbit)}
    run = map_in_chunks(rows, score_chunk, out / "chunks", config.chunk_size, config.num_shards, config.shard_index, signature)
    if not run.merged:
        return {"merged": False, "chunks": run.chunks, "chunks_done": run.done, "chunks_skipped": run.skipped}
    scored, errors = split_results(run.rows)
    write_results(scored, out / "scores", columns=["id", "prompt", "prob_yes", "margin", "path"])
    write_jsonl(out / "errors.jsonl", errors)
    summary = {
        "merged": True,
        "assets": len(run.rows),
        "scored": len(scored),
        "errors": len(errors),
        "mean_prob_yes": float(np.mean([r["prob_yes"] for r in scored])) if scored else None,
        "errors_by_reason": errors_by_reason(errors),
    }
    write_json(out / "summary.json", summary)
    report = Report(f"Asset scores: {Path(manifest).name}")
    report.add_text(f"{summary['scored']} of {summary['assets']} assets scored; {summary['errors']} could not be used (errors.jsonl). "
                    "prob_yes: the critic's probability that the views match the prompt; margin: its yes-minus-no logit "
                    "(the log-odds, unbounded, better for ranking close assets).")  # fmt: skip
    report.add_table([{k: r[k] for k in ("id", "prompt", "prob_yes", "margin")} for r in scored])
    for r in sorted(scored, key=lambda r: -r["prob_yes"]):
        report.add_image((out / r["views_png"]).read_bytes(), caption=f"{r['id']}: {r['prompt']!r} -- P(yes) = {r['prob_yes']:.3f}")
    if errors:
        report.add_heading("Not scored")
        report.add_table([{k: e.get(k) for k in ("id", "reason", "error")} for e in errors])
    report.write(out / "report.html")
    return summary
