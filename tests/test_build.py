"""The dataset builder: rows, balance, splits, sources, faults, resume, shards, workers, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import trimesh
from PIL import Image

from coherendream.config import from_dict
from coherendream.data.build import BuildConfig, build_dataset, load_built_dataset
from coherendream.data.export import export_llava
from coherendream.data.procedural import caption_holds, sample_scene
from coherendream.vocabulary import parse_caption

BASE = {"render": {"resolution": 48}, "chunk_size": 4, "progress": False, "splits": {"train": 0.6, "validation": 0.2, "test": 0.2}}


def config(tmp_path, name, **changes) -> BuildConfig:
    data = {**BASE, "output_dir": str(tmp_path / name), **changes}
    data.setdefault("source", {"kind": "procedural", "num_scenes": 24})
    return from_dict(BuildConfig, data)


def tables(out: Path) -> dict:
    return {p.name: pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    result = build_dataset(config(tmp, "ref"))
    return result.output_dir


def test_rows_are_balanced_pairs_split_by_asset(reference):
    dsd = load_built_dataset(reference)
    assert set(dsd) == {"train", "validation", "test"}
    split_assets = {name: set(ds["asset_id"]) for name, ds in dsd.items()}
    assert not (split_assets["train"] & split_assets["validation"]) and not (split_assets["train"] & split_assets["test"])
    assert sum(len(a) for a in split_assets.values()) == 24
    for ds in dsd.values():
        labels = ds["label"]
        assert labels.count(0) == labels.count(1)
        by_pair = {}
        for row in ds.select_columns(["pair_id", "label", "caption", "true_caption", "negative_type", "prompt", "completion", "layout", "negative_detail"]):
            by_pair.setdefault(row["pair_id"], []).append(row)
            text = row["prompt"][0]["content"][-1]["text"]
            assert f'"{row["caption"]}"' in text and "4 views" in text
            assert row["completion"][0]["content"][0]["text"] == ("Yes" if row["label"] else "No")
            assert row["prompt"][0]["content"][0]["type"] == "image"
            if row["label"] == 1:
                assert row["caption"] == row["true_caption"] and row["negative_type"] == "none"
            elif row["negative_type"] != "multiview_mix":
                # procedural negatives are exact: the caption is false of the scene
                scene = sample_scene_from_layout(row)
                assert not caption_holds(scene, parse_caption(row["caption"]))
                assert row["negative_detail"]
        assert all(sorted(r["label"] for r in rows) == [0, 1] for rows in by_pair.values())


def sample_scene_from_layout(row):
    from coherendream.data.build import plan_assets

    # the row's asset is scene-<i>; rebuild its scene from the plan's seed
    cfg = from_dict(BuildConfig, {"source": {"kind": "procedural", "num_scenes": 24}})
    refs, _ = plan_assets(cfg)
    ref = next(r for r in refs if r.caption == row["true_caption"] and json.loads(row["layout"])["caption"] == r.caption)
    return sample_scene(ref.seed)


def test_images_are_the_grid_of_the_views(reference):
    row = load_built_dataset(reference)["train"][0]
    (grid,) = row["images"]
    views = [np.asarray(v.convert("RGB")) for v in row["views"]]
    assert grid.size == (96, 96) and all(v.shape == (48, 48, 3) for v in views)
    g = np.asarray(grid.convert("RGB"))
    assert np.array_equal(g[:48, 48:], views[1]) and np.array_equal(g[48:, :48], views[2])
    assert len(row["views_meta"]) == 4 and [m["azimuth"] for m in row["views_meta"]] == [0, 90, 180, 270]


def test_dataset_card_and_info(reference):
    card = (reference / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "data/train-*" in card and "| train |" in card
    info = json.loads((reference / "build_info.json").read_text())
    assert sum(info["rows"].values()) == 48


def test_workers_and_shards_give_the_same_dataset(tmp_path, reference):
    build_dataset(config(tmp_path, "w2", num_workers=2))
    assert tables(tmp_path / "w2") == tables(reference)
    first = build_dataset(config(tmp_path, "sh", num_shards=2, shard_index=0))
    assert not first.finalized and first.chunks_done == 3
    second = build_dataset(config(tmp_path, "sh", num_shards=2, shard_index=1))
    assert second.finalized
    assert tables(tmp_path / "sh") == tables(reference)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "coherendream.cli", "data", "build", "--procedural", "48", "-o", str(out), "chunk_size=2", "render.resolution=48", "progress=false"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = out / ".build" / "chunks"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(chunks.glob("*.done.json"))) < 4:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(chunks.glob("*.done.json")))
    assert 4 <= done_at_kill < 24, "the build must have been interrupted midway"
    assert not (out / "data").exists()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clean = tmp_path / "clean"
    subprocess.run([*args[:8], str(clean), *args[9:]], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed, uninterrupted = tables(out), tables(clean)
    assert resumed.keys() == uninterrupted.keys() and resumed == uninterrupted
    ids = [i for t in resumed.values() for i in t["id"].to_pylist()]
    assert len(ids) == len(set(ids)) == 96  # no duplicates, nothing missing
    assert not list(chunks.glob("*.tmp")) and not list(chunks.glob(".*.tmp"))


def test_resume_removes_a_killed_writers_temp_files_of_its_own_chunks_only(tmp_path):
    from coherendream.output_folder import OutputFolder

    cfg = config(tmp_path, "t", num_shards=2, shard_index=0)
    OutputFolder(tmp_path / "t", "data build", cfg.identity()).take()  # what the killed build claimed before its chunks
    chunks = tmp_path / "t" / ".build" / "chunks"
    chunks.mkdir(parents=True)
    mine = chunks / ".00000.parquet.k1ll3d.tmp"  # chunk 0 belongs to shard 0 of 2
    other = chunks / ".00001.parquet.wr1t1ng.tmp"  # chunk 1: shard 1 may be writing it right now
    for path in (mine, other):
        path.write_bytes(b"partial")
    build_dataset(cfg)
    assert not mine.exists() and other.exists()
    assert (chunks / "00000.done.json").exists() and not (chunks / "00001.done.json").exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    build_dataset(config(tmp_path, "x", source={"kind": "procedural", "num_scenes": 4}))
    with pytest.raises(ValueError, match="render"):
        build_dataset(config(tmp_path, "x", source={"kind": "procedural", "num_scenes": 4}, render={"resolution": 32}))
    again = build_dataset(config(tmp_path, "x", source={"kind": "procedural", "num_scenes": 4}, render={"resolution": 32}, overwrite=True))
    assert again.finalized


def write_meshes(root: Path) -> None:
    (root / "meshes").mkdir(parents=True)
    trimesh.creation.box().export(root / "meshes" / "box.glb")
    trimesh.creation.icosphere().export(root / "meshes" / "ball.obj")
    trimesh.creation.cone(0.5, 1.0).export(root / "meshes" / "cone.stl")
    trimesh.creation.cylinder(0.3, 1.0).export(root / "meshes" / "can.ply")
    trimesh.creation.box().export(root / "meshes" / "cube.off")
    (root / "meshes" / "nan.obj").write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n")
    (root / "meshes" / "garbage.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage-garbage")
    (root / "meshes" / "model.fbx").write_text("not an fbx")  # a format assimp reads, but broken
    (root / "meshes" / "model.xyz").write_text("not a 3D format")
    (root.parent / "secret.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (root / "meshes" / "link.obj").symlink_to(root.parent / "secret.obj")


def test_manifest_with_bad_rows_keeps_the_good_ones(tmp_path):
    root = tmp_path / "assets"
    write_meshes(root)
    rows = [
        ("box", "meshes/box.glb", "a white box"),
        ("ball", "meshes/ball.obj", "a round ball"),
        ("cone", "meshes/cone.stl", "a pointed cone"),
        ("can", "meshes/can.ply", "a tall can"),
        ("cube", "meshes/cube.off", "a grey cube"),
        ("nan", "meshes/nan.obj", "a broken triangle"),
        ("garbage", "meshes/garbage.glb", "garbage bytes"),
        ("fbx", "meshes/model.fbx", "an fbx model"),
        ("xyz", "meshes/model.xyz", "a point list"),
        ("missing", "meshes/nothere.obj", "a missing file"),
        ("escape", "../secret.obj", "outside the root"),
        ("link", "meshes/link.obj", "a link leading outside"),
        ("nocap", "meshes/box.glb", ""),
        ("box", "meshes/box.glb", "duplicate uid"),
    ]
    manifest = root / "manifest.csv"
    manifest.write_text("uid,path,caption\n" + "".join(f"{u},{p},{c}\n" for u, p, c in rows))
    result = build_dataset(config(tmp_path, "m", source={"kind": "manifest", "path": str(manifest)}, splits={"train": 1.0}))
    assert result.finalized
    rejected = {r["uid"]: r for r in map(json.loads, (tmp_path / "m" / "rejected.jsonl").read_text().splitlines())}
    assert {u: r["reason"] for u, r in rejected.items()} == {
        "nan": "non_finite",
        "garbage": "corrupt",
        "fbx": "corrupt",  # read by assimp, which refuses it
        "xyz": "unsupported_format",
        "missing": "missing_file",
        "escape": "outside_root",
        "link": "outside_root",
        "nocap": "empty_prompt",
        "<manifest.csv:15>": "duplicate_id",  # the second row with uid "box"
    }
    assert "secret.obj" not in json.dumps([r for r in rejected.values() if r["reason"] != "outside_root"])
    ds = load_built_dataset(tmp_path / "m")["train"]
    assert set(ds["asset_id"]) == {"box", "ball", "cone", "can", "cube"}
    assert len(ds) == 10


def test_cli_ends_with_the_reasons_and_fails_when_no_input_was_usable(tmp_path):
    from typer.testing import CliRunner

    from coherendream.cli import app

    root = tmp_path / "assets"
    write_meshes(root)
    runner = CliRunner()
    fast = ["render.resolution=32", "progress=false"]
    # a manifest without rows is refused before the output folder exists
    (root / "header.csv").write_text("uid,path,caption\n")
    res = runner.invoke(app, ["data", "build", "--manifest", str(root / "header.csv"), "-o", str(tmp_path / "h"), *fast])
    assert res.exit_code == 2 and "header.csv: no rows" in res.output and not (tmp_path / "h").exists()
    # every input rejected: the reasons with their remedy, and a non-zero exit
    (root / "bad.csv").write_text("uid,path,caption\nmissing,meshes/nothere.obj,a cube\nescape,../secret.obj,a cone\n")
    res = runner.invoke(app, ["data", "build", "--manifest", str(root / "bad.csv"), "-o", str(tmp_path / "b"), *fast])
    assert res.exit_code == 2 and "1 of 2 rejected: outside_root (paths outside the manifest's folder: pass --root" in res.output
    assert "1 of 2 rejected: missing_file" in res.output and "no input of" in res.output
    # some rejected: the dataset is written and the reasons still listed
    (root / "half.csv").write_text("uid,path,caption\nbox,meshes/box.glb,a white box\nmissing,meshes/nothere.obj,a cube\n")
    res = runner.invoke(app, ["data", "build", "--manifest", str(root / "half.csv"), "-o", str(tmp_path / "g"), *fast])
    assert res.exit_code == 0 and "dataset written to" in res.output and "1 of 2 rejected: missing_file" in res.output


def test_cap3d_layout_with_path_pattern(tmp_path):
    root = tmp_path / "assets"
    write_meshes(root)
    cap3d = root / "Cap3D_automated_Objaverse.csv"
    cap3d.write_text('box,"a box, white and square"\nball,a ball\ncone,a cone\n')
    cfg = config(tmp_path, "c", source={"kind": "manifest", "path": str(cap3d), "path_pattern": "meshes/{uid}.glb"}, splits={"train": 1.0})
    build_dataset(cfg)
    rejected = [json.loads(x) for x in (tmp_path / "c" / "rejected.jsonl").read_text().splitlines()]
    assert {r["uid"]: r["reason"] for r in rejected} == {"ball": "missing_file", "cone": "missing_file"}
    with pytest.raises(ValueError, match="path_pattern"):
        build_dataset(config(tmp_path, "c2", source={"kind": "manifest", "path": str(cap3d)}))


def test_pre_rendered_view_folders(tmp_path):
    renders = tmp_path / "renders"
    colours = {"redthing": (220, 20, 20), "bluething": (20, 20, 220), "fewviews": (0, 200, 0), "badimage": (0, 0, 0)}
    for uid, colour in colours.items():
        d = renders / uid
        d.mkdir(parents=True)
        (d / "caption.txt").write_text(f"the {uid}")
        for k in range(2 if uid == "fewviews" else 6):
            img = np.zeros((40, 60, 4), np.uint8)
            img[10:30, 20:40] = (*colour, 255)
            Image.fromarray(img).save(d / f"view_{k:02d}.png")
    (renders / "badimage" / "view_03.png").write_bytes(b"not a png")
    result = build_dataset(config(tmp_path, "r", source={"kind": "render_dir", "path": str(renders)}, splits={"train": 1.0}))
    assert result.finalized
    rejected = {r["uid"]: r["reason"] for r in map(json.loads, (tmp_path / "r" / "rejected.jsonl").read_text().splitlines())}
    assert rejected == {"fewviews": "too_few_views", "badimage": "unreadable_image"}
    ds = load_built_dataset(tmp_path / "r")["train"]
    row = next(r for r in ds if r["asset_id"] == "redthing" and r["label"] == 1)
    view = np.asarray(row["views"][0])
    assert view.shape == (48, 48, 4)
    assert tuple(view[24, 24, :3]) == (220, 20, 20) and view[24, 24, 3] == 255
    assert tuple(view[2, 2]) == (255, 255, 255, 0)  # transparent padding composited on white, alpha kept


def test_llava_export(tmp_path, reference):
    path = export_llava(reference, tmp_path / "llava", "train")
    records = json.loads(path.read_text())
    ds = load_built_dataset(reference)["train"]
    assert len(records) == len(ds)
    first = records[0]
    assert first["conversations"][0]["from"] == "human" and first["conversations"][0]["value"].startswith("<image>\nDoes this 3D object")
    assert first["conversations"][1]["value"] in ("Yes", "No")
    images = {r["image"] for r in records}
    assert all((tmp_path / "llava" / i).is_file() for i in images)
    assert len(images) < len(records)  # a positive and its caption negative share one grid file
    with pytest.raises(ValueError, match="no split"):
        export_llava(reference, tmp_path / "llava", "dev")


def test_cli_reports_bad_overrides(tmp_path):
    from typer.testing import CliRunner

    from coherendream.cli import app

    res = CliRunner().invoke(app, ["data", "build", "--procedural", "2", "-o", str(tmp_path / "o"), "render.resolutio=3"])
    assert res.exit_code == 2 and "render.resolutio" in res.output
    # Refused before anything is written, so the corrected command below is not taken for a
    # build with other settings.
    for bad, why in ((["--procedural", "-5"], "(--procedural) must be >= 1, got -5"), (["--procedural", "4", "render.resolution=0"], "resolution must be a positive")):
        res = CliRunner().invoke(app, ["data", "build", *bad, "-o", str(tmp_path / "o")])
        assert res.exit_code == 2 and why in res.output and not (tmp_path / "o").exists()
    res = CliRunner().invoke(app, ["data", "build", "--procedural", "4", "-o", str(tmp_path / "o"), "render.resolution=32", "progress=false"])
    assert res.exit_code == 0, res.output
    assert "dataset written to" in res.output


def test_random_views_depth_normals_and_view_mode(tmp_path):
    cfg = config(
        tmp_path,
        "opts",
        source={"kind": "procedural", "num_scenes": 4},
        render={"resolution": 32, "depth": True, "normals": True, "orbit": {"random_views": 3}},
        image_mode="views",
        grid_rows=1,
        splits={"train": 1.0},
    )
    build_dataset(cfg)
    ds = load_built_dataset(tmp_path / "opts")["train"]
    row = ds[0]
    assert len(row["images"]) == 3 and len(row["views"]) == 3
    assert [p["type"] for p in row["prompt"][0]["content"]] == ["image", "image", "image", "text"]
    assert "shown from 3 views" in row["prompt"][0]["content"][-1]["text"]
    azimuths = {round(m["azimuth"], 3) for r in ds for m in r["views_meta"]}
    assert len(azimuths) > 3  # random per asset, not the fixed orbit
    depth = np.asarray(row["depth"][0])
    alpha = np.asarray(row["views"][0])[..., 3]
    assert depth.dtype.kind in "iu" and depth.max() > 1000  # millimetres: the object is ~2 units away
    assert np.all(depth[alpha == 0] == 0) and np.all(depth[alpha == 255] > 0)
    normals = np.asarray(row["normals"][0])
    n = normals[alpha == 255][:, :3] / 127.5 - 1.0
    assert np.allclose(np.linalg.norm(n, axis=1), 1.0, atol=0.05)


def test_question_template_places_the_images(tmp_path):
    template = 'the description "{text}"\n<image>Does it match? Please answer yes or no.'
    cfg = config(tmp_path, "text_first", source={"kind": "procedural", "num_scenes": 2}, question_template=template, splits={"train": 1.0})
    build_dataset(cfg)
    row = load_built_dataset(tmp_path / "text_first")["train"][0]
    parts = row["prompt"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text"]
    assert parts[0]["text"] == f'the description "{row["caption"]}"\n'
    assert parts[2]["text"] == "Does it match? Please answer yes or no."
    first = json.loads(export_llava(tmp_path / "text_first", tmp_path / "llava", "train").read_text())[0]
    assert first["conversations"][0]["value"] == f'the description "{row["caption"]}"\n<image>\nDoes it match? Please answer yes or no.'
    for bad, reason in [("Does it match?", "must contain"), ("<image>{text}<image>", "once")]:
        with pytest.raises(ValueError, match=reason):
            config(tmp_path, "bad", question_template=bad)


def test_mesh_dir_source_with_sidecar_captions(tmp_path):
    root = tmp_path / "assets"
    write_meshes(root)
    (root / "meshes" / "box.txt").write_text("a plain box\n")
    (root / "meshes" / "ball.txt").write_text("a round ball")
    (root / "meshes" / "cone.txt").write_text("a cone")
    build_dataset(config(tmp_path, "md", source={"kind": "mesh_dir", "path": str(root / "meshes")}, splits={"train": 1.0}))
    ds = load_built_dataset(tmp_path / "md")["train"]
    assert set(ds["asset_id"]) == {"box", "ball", "cone"}
    rejected = {r["uid"]: r["reason"] for r in map(json.loads, (tmp_path / "md" / "rejected.jsonl").read_text().splitlines())}
    assert rejected["can"] == "missing_prompt" and rejected["nan"] == "missing_prompt"
