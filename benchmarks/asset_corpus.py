"""How many real third-party 3D files the toolkit renders: Debian's assimp-testmodels corpus.

    python benchmarks/asset_corpus.py [--root /usr/share/assimp/models] [--out corpus.json]

Every file below ``--root`` whose extension is a 3D format assimp or trimesh reads (animations,
cameras, levels and generic XML left out) is loaded with ``load_mesh`` and rendered from the
design's four orbit views at 64 px. Separately, assimp alone is asked for its triangle meshes (in a
child process, as ``load_mesh`` does), which gives the denominator of the target: of the files
assimp reads with faces, the share that render with something visible. The baseline, in the same
run, is ``load_mesh`` with trimesh alone (assimp hidden). Prints a summary and the rejection
reasons; writes every file's outcome to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from coherendream.cameras import OrbitSpec
from coherendream.data import assets
from coherendream.data.assets import AssetError, _assimp_meshes, load_mesh, mesh_extensions
from coherendream.data.render import MeshRenderer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/usr/share/assimp/models"))
    parser.add_argument("--out", type=Path, default=Path("corpus.json"))
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()

    extensions = set(mesh_extensions())
    files = sorted(p for p in args.root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    renderer = MeshRenderer(args.resolution)
    cameras = OrbitSpec().cameras(args.resolution)
    rows, t0 = [], time.perf_counter()
    for path in files:
        row = {"file": str(path.relative_to(args.root)), "format": path.suffix.lower()}
        try:
            meshes = _assimp_meshes(path)
            row["assimp_faces"] = int(sum(len(m.faces) for m in meshes))
        except AssetError as err:
            row["assimp_faces"], row["assimp_error"] = 0, str(err)
        try:
            asset = load_mesh(path)
            alpha = renderer.render(asset, cameras).rgba[..., 3]
            row["visible_views"] = int(np.any(alpha > 0, axis=(1, 2)).sum())
            if row["visible_views"] == 0:
                row["reason"] = "empty_render"
        except AssetError as err:
            row["visible_views"], row["reason"], row["error"] = 0, err.reason, str(err)
        rows.append(row)
    seconds = time.perf_counter() - t0
    # baseline: the same files through trimesh alone
    with_assimp = assets.assimp_extensions
    assets.assimp_extensions = lambda: ()
    try:
        for row in rows:
            try:
                alpha = renderer.render(load_mesh(args.root / row["file"]), cameras).rgba[..., 3]
                row["trimesh_only_visible_views"] = int(np.any(alpha > 0, axis=(1, 2)).sum())
            except AssetError:
                row["trimesh_only_visible_views"] = 0
    finally:
        assets.assimp_extensions = with_assimp
    renderer.release()

    rendered = [r for r in rows if r["visible_views"] > 0]
    assimp_reads = [r for r in rows if r["assimp_faces"] > 0]
    of_assimp = [r for r in assimp_reads if r["visible_views"] > 0]
    summary = {
        "files": len(rows),
        "rendered": len(rendered),
        "rendered_trimesh_only": sum(r["trimesh_only_visible_views"] > 0 for r in rows),
        "all_views_visible": sum(r["visible_views"] == len(cameras) for r in rows),
        "assimp_reads_with_faces": len(assimp_reads),
        "rendered_of_assimp_reads": len(of_assimp),
        "share_of_assimp_reads_rendered": round(len(of_assimp) / max(len(assimp_reads), 1), 3),
        "rejected_by_reason": dict(Counter(r["reason"] for r in rows if "reason" in r).most_common()),
        "empty_error_messages": sum(1 for r in rows if "reason" in r and not r.get("error", "x").split(": ", 1)[-1].strip()),
        "formats": len({r["format"] for r in rows}),
        "formats_rendered": len({r["format"] for r in rendered}),
        "seconds": round(seconds, 1),
    }
    args.out.write_text(json.dumps({"summary": summary, "files": rows}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
