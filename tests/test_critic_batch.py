"""Batch scoring (``coherendream.critic.batch``): inputs, robustness to bad items, output files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coherendream.config import from_dict
from coherendream.critic import Critic, build_tiny_critic
from coherendream.critic.batch import (
    ItemError,
    detect_input_kind,
    items_from_dataset,
    items_from_input,
    items_from_manifest,
    items_from_render_dir,
    read_scores_csv,
    score_items,
    score_to_files,
    select_views,
)
from coherendream.data.build import BuildConfig, build_dataset
from coherendream.io import read_jsonl

ATOL = 1e-5


@pytest.fixture(scope="module")
def critic(tmp_path_factory):
    # Wider init than 0.02 so scores differ visibly between items (a swapped result would show).
    path = build_tiny_critic(tmp_path_factory.mktemp("tiny") / "critic", image_size=32, patch_size=8, initializer_range=0.2)
    return Critic.from_pretrained(path, device="cpu")


def write_views(folder: Path, count: int, seed: int, size: int = 24) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for v in range(count):
        path = folder / f"view_{v:02d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def single_score(critic, views, prompt) -> tuple[float, float]:
    with torch.no_grad():
        out = critic.score([list(views)], [prompt])
    return out.prob_yes.item(), out.margin.item()


def assert_matches_single(critic, result, views, prompt):
    assert "error" not in result, result
    prob, margin = single_score(critic, views, prompt)
    assert result["prob_yes"] == pytest.approx(prob, abs=ATOL)
    assert result["margin"] == pytest.approx(margin, abs=ATOL)


@pytest.fixture(scope="module")
def render_dir(tmp_path_factory):
    """Good and bad assets: ``<uid>/`` sub-folders of PNGs with a caption.txt."""
    root = tmp_path_factory.mktemp("renders") / "renders"
    specs = {
        "a_good": (4, "a red cube on top of a yellow cylinder"),
        "b_six_views": (6, "two blue spheres"),
        "c_corrupt": (4, "one torus"),
        "d_two_views": (2, "a green cone"),
        "e_empty_caption": (4, "   \n"),
        "f_good": (4, "one torus"),
        "g_other_size": (4, "a black cube"),
    }
    for i, (uid, (count, caption)) in enumerate(specs.items()):
        write_views(root / uid, count, seed=i, size=40 if uid == "g_other_size" else 24)
        (root / uid / "caption.txt").write_text(caption + "\n")
    (root / "c_corrupt" / "view_02.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "h_no_caption").mkdir()
    write_views(root / "h_no_caption", 4, seed=99)
    return root


def test_select_views_takes_evenly_spaced_images_in_name_order(render_dir):
    picked = select_views(render_dir / "b_six_views", 4)
    assert [p.name for p in picked] == ["view_00.png", "view_01.png", "view_03.png", "view_04.png"]
    with pytest.raises(ItemError, match="2 image") as err:
        select_views(render_dir / "d_two_views", 4)
    assert err.value.reason == "too_few_views"
    with pytest.raises(ItemError, match="not found"):
        select_views(render_dir / "nope", 4)


def test_render_dir_batched_equals_one_at_a_time_and_bad_items_are_reported(critic, render_dir):
    calls = []
    original = critic.score

    def counting_score(views, prompts):
        calls.append(len(prompts))
        return original(views, prompts)

    critic.score = counting_score  # instance attribute: counts the forward passes of this test only
    try:
        results = score_items(critic, items_from_render_dir(render_dir), batch_size=2, progress=False)
    finally:
        del critic.score
    by_id = {r["id"]: r for r in results}
    assert [r["id"] for r in results] == sorted(by_id)  # input (folder name) order, errors in place

    # Good items: the same numbers as one critic.score call each, despite batching with padding.
    assert_matches_single(critic, by_id["a_good"], select_views(render_dir / "a_good", 4), "a red cube on top of a yellow cylinder")
    assert_matches_single(critic, by_id["b_six_views"], select_views(render_dir / "b_six_views", 4), "two blue spheres")
    assert_matches_single(critic, by_id["f_good"], select_views(render_dir / "f_good", 4), "one torus")
    assert_matches_single(critic, by_id["g_other_size"], select_views(render_dir / "g_other_size", 4), "a black cube")
    assert by_id["a_good"]["path"].endswith("a_good")

    # Bad items: reported with a reason and a message naming the file, never scored.
    assert by_id["c_corrupt"]["reason"] == "unreadable_image"
    assert "view_02.png" in by_id["c_corrupt"]["error"] and "cannot be read" in by_id["c_corrupt"]["error"]
    assert by_id["d_two_views"]["reason"] == "too_few_views" and "d_two_views" in by_id["d_two_views"]["error"]
    assert by_id["e_empty_caption"]["reason"] == "empty_prompt" and "e_empty_caption" in by_id["e_empty_caption"]["error"]
    assert by_id["h_no_caption"]["reason"] == "missing_prompt" and "caption.txt" in by_id["h_no_caption"]["error"]
    for bad in ("c_corrupt", "d_two_views", "e_empty_caption", "h_no_caption"):
        assert "prob_yes" not in by_id[bad]

    # One forward pass per batch of valid items only: 4 good items in batches of 2.
    assert calls == [2, 2]


def test_prompts_file_overrides_captions_and_reports_unknown_uids(critic, render_dir, tmp_path):
    prompts = tmp_path / "prompts.csv"
    with prompts.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uid", "prompt"])
        writer.writerows([["a_good", "a purple torus"], ["h_no_caption", "two red cubes"], ["zz_missing", "a cube"],
                          ["a_good", "again"], ["../escape", "a cube"]])
    items = list(items_from_render_dir(render_dir, num_views=4, prompts_file=prompts))
    by_id = {i["id"]: i for i in items}
    assert by_id["a_good"]["prompt"] == "a purple torus"
    assert by_id["h_no_caption"]["prompt"] == "two red cubes"
    assert by_id["f_good"]["prompt"] == "one torus"  # not in the file: caption.txt
    assert len(by_id["a_good"]["views"]) == 4  # num_views given: paths are picked by the reader
    assert by_id["zz_missing"]["reason"] == "missing_folder"
    assert by_id["<prompts.csv:5>"]["reason"] == "duplicate_id"
    assert by_id["../escape"]["reason"] == "outside_root"

    results = {r["id"]: r for r in score_items(critic, items, batch_size=8, progress=False)}
    assert_matches_single(critic, results["a_good"], select_views(render_dir / "a_good", 4), "a purple torus")
    assert_matches_single(critic, results["h_no_caption"], select_views(render_dir / "h_no_caption", 4), "two red cubes")
    assert results["d_two_views"]["reason"] == "too_few_views"  # found by the reader this time
    assert results["zz_missing"]["reason"] == "missing_folder"


def test_manifest_input_keeps_paths_under_the_root(critic, tmp_path):
    root = tmp_path / "root"
    write_views(root / "assets" / "one", 4, seed=1)
    write_views(root / "assets" / "two", 5, seed=2)
    write_views(tmp_path / "outside", 4, seed=3)
    (root / "assets" / "link").symlink_to(tmp_path / "outside")
    rows = [
        {"id": "one", "path": "assets/one", "prompt": "a red cube", "group": "g1"},
        {"id": "two", "path": "assets/two", "prompt": "two blue spheres", "group": "g2"},
        {"id": "escape", "path": "../outside", "prompt": "a red cube"},
        {"id": "absolute", "path": str(tmp_path / "outside"), "prompt": "a red cube"},
        {"id": "symlink", "path": "assets/link", "prompt": "a red cube"},
        {"id": "missing", "path": "assets/none", "prompt": "a red cube"},
        {"id": "noprompt", "path": "assets/one", "prompt": ""},
        {"id": "one", "path": "assets/two", "prompt": "a duplicate id"},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")

    results = score_items(critic, items_from_manifest(manifest), batch_size=4, progress=False)
    by_id = {r["id"]: r for r in results}
    assert_matches_single(critic, by_id["one"], select_views(root / "assets" / "one", 4), "a red cube")
    assert_matches_single(critic, by_id["two"], select_views(root / "assets" / "two", 4), "two blue spheres")
    assert by_id["one"]["group"] == "g1"  # other manifest columns are kept
    for uid in ("escape", "absolute", "symlink"):
        assert by_id[uid]["reason"] == "outside_root", by_id[uid]
        assert "outside the manifest root" in by_id[uid]["error"]
    assert by_id["missing"]["reason"] == "missing_folder" and "assets/none" in by_id["missing"]["error"]
    assert by_id["noprompt"]["reason"] == "empty_prompt"
    assert by_id["<manifest.jsonl:8>"]["reason"] == "duplicate_id"
    assert by_id["<manifest.jsonl:9>"]["reason"] == "invalid_row"
    assert len(results) == 9

    # The same manifest as CSV (uid/caption column names of `data build` manifests are accepted).
    csv_manifest = root / "manifest.csv"
    with csv_manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uid", "path", "caption"])
        writer.writerow(["one", "assets/one", "a red cube"])
        writer.writerow(["escape", "../outside", "a red cube"])
    csv_results = {r["id"]: r for r in score_items(critic, items_from_manifest(csv_manifest), progress=False)}
    assert csv_results["one"]["prob_yes"] == pytest.approx(by_id["one"]["prob_yes"], abs=ATOL)
    assert csv_results["escape"]["reason"] == "outside_root"


def test_input_level_problems_raise_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list(items_from_render_dir(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        list(items_from_manifest(tmp_path / "missing.csv"))
    bad = tmp_path / "noheader.csv"
    bad.write_text("a,b,c\n")
    with pytest.raises(ValueError, match="id column"):
        list(items_from_manifest(bad))


def test_a_failing_batch_is_retried_item_by_item(critic, render_dir):
    original = critic.score

    def flaky_score(views, prompts):
        if "one torus" in prompts:  # e.g. an error no validation foresaw
            raise RuntimeError("boom")
        return original(views, prompts)

    critic.score = flaky_score
    try:
        results = {r["id"]: r for r in score_items(critic, items_from_render_dir(render_dir), batch_size=8, progress=False)}
    finally:
        del critic.score
    assert results["f_good"]["reason"] == "score_failed" and "boom" in results["f_good"]["error"]
    assert_matches_single(critic, results["a_good"], select_views(render_dir / "a_good", 4), "a red cube on top of a yellow cylinder")


def test_explicit_items_validate_view_count_and_types(critic, render_dir):
    views = select_views(render_dir / "a_good", 4)
    pil = [Image.open(p) for p in views]
    items = [
        {"id": "paths", "views": views, "prompt": "a red cube"},
        {"id": "pil", "views": pil, "prompt": "a red cube"},
        {"id": "bytes", "views": [p.read_bytes() for p in views], "prompt": "a red cube"},
        {"id": "three", "views": views[:3], "prompt": "a red cube"},
        {"id": "notext", "views": views, "prompt": None},
        {"id": "missing_file", "views": [*views[:3], render_dir / "a_good" / "gone.png"], "prompt": "a red cube"},
        {"id": "paths", "views": views, "prompt": "duplicate"},
    ]
    results = score_items(critic, items, batch_size=3, progress=False)
    assert [r["id"] for r in results] == [i["id"] for i in items]
    expected = single_score(critic, views, "a red cube")
    for r in results[:3]:
        assert (r["prob_yes"], r["margin"]) == pytest.approx(expected, abs=ATOL)
    assert [r.get("reason") for r in results[3:]] == ["wrong_view_count", "missing_prompt", "missing_image", "duplicate_id"]
    assert "gone.png" in results[5]["error"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset") / "ds"
    config = from_dict(BuildConfig, {"output_dir": str(out), "source": {"kind": "procedural", "num_scenes": 6},
                                     "render": {"resolution": 32}, "progress": False, "splits": {"train": 1.0}})
    build_dataset(config)
    return out


def test_dataset_input_keeps_labels_and_matches_single_scores(critic, dataset_dir):
    from coherendream.data.build import load_built_dataset

    rows = load_built_dataset(dataset_dir)["train"]
    results = score_items(critic, items_from_dataset(dataset_dir, "train"), batch_size=4, progress=False)
    assert len(results) == len(rows) > 0
    assert {r["label"] for r in results} == {0, 1}
    for result, row in zip(results, rows):
        assert result["id"] == row["id"] and result["prompt"] == row["caption"]
        assert (result["label"], result["negative_type"], result["pair_id"], result["asset_id"]) == (
            row["label"], row["negative_type"], row["pair_id"], row["asset_id"])
        assert_matches_single(critic, result, row["views"], row["caption"])
    with pytest.raises(ValueError, match="no split 'test'"):
        list(items_from_dataset(dataset_dir, "test"))


def test_score_to_files_writes_csv_jsonl_errors_and_summary(critic, render_dir, dataset_dir, tmp_path):
    out = tmp_path / "out"
    summary = score_to_files(critic, items_from_render_dir(render_dir), out, batch_size=3, progress=False,
                             metadata={"model": "tiny"})
    assert (summary["items"], summary["scored"], summary["errors"]) == (8, 4, 4)
    assert summary["errors_by_reason"] == {"unreadable_image": 1, "too_few_views": 1, "empty_prompt": 1, "missing_prompt": 1}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["metadata"] == {"model": "tiny"}

    jsonl = read_jsonl(out / "scores.jsonl")
    table = read_scores_csv(out / "scores.csv")
    assert [r["id"] for r in jsonl] == [r["id"] for r in table] == ["a_good", "b_six_views", "f_good", "g_other_size"]
    for a, b in zip(jsonl, table):
        assert a["prob_yes"] == b["prob_yes"] and a["margin"] == b["margin"]  # full precision in both
        assert 0 < a["prob_yes"] < 1 and a["prompt"] == b["prompt"]
    assert list(table[0])[:4] == ["id", "prompt", "prob_yes", "margin"]
    errors = read_jsonl(out / "errors.jsonl")
    assert [e["id"] for e in errors] == ["c_corrupt", "d_two_views", "e_empty_caption", "h_no_caption"]
    assert all(e["reason"] and e["error"] for e in errors)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries

    # Dataset input: labels survive into both files; an error-free run still writes errors.jsonl.
    out2 = tmp_path / "out2"
    summary2 = score_to_files(critic, items_from_dataset(dataset_dir, "train"), out2, batch_size=8, progress=False)
    assert summary2["errors"] == 0 and (out2 / "errors.jsonl").read_text() == ""
    table2 = read_scores_csv(out2 / "scores.csv")
    assert {r["label"] for r in table2} == {0, 1}
    assert [r["negative_type"] for r in table2] == [r["negative_type"] for r in read_jsonl(out2 / "scores.jsonl")]
    with pytest.raises(ValueError, match="unknown output format"):
        score_to_files(critic, [], tmp_path / "out3", formats=("parquet",))


def test_input_kind_is_detected_from_the_path(render_dir, dataset_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path,prompt\n")
    assert detect_input_kind(render_dir) == "render_dir"
    assert detect_input_kind(dataset_dir) == "dataset"
    assert detect_input_kind(manifest) == "manifest"
    assert [i["id"] for i in items_from_input(dataset_dir, split="train")] == [
        i["id"] for i in items_from_dataset(dataset_dir, "train")]
    with pytest.raises(ValueError, match="no rows"):  # a header-only manifest is refused up front
        items_from_input(manifest)
    with pytest.raises(ValueError, match="do not apply"):
        items_from_input(dataset_dir, prompts_file=manifest)
    with pytest.raises(FileNotFoundError, match="not found"):
        detect_input_kind(tmp_path / "nothing")


def _scores(folder: Path) -> tuple[list, list]:
    return read_jsonl(folder / "scores.jsonl"), read_jsonl(folder / "errors.jsonl")


def test_score_to_files_split_over_shards_and_resumed_gives_the_single_run(critic, render_dir, tmp_path):
    one = score_to_files(critic, items_from_render_dir(render_dir), tmp_path / "one", batch_size=3, progress=False, metadata={"m": 1})
    assert one["merged"] and one["items"] == 8
    # Chunks of 3 items over 2 shards: the first shard leaves the merge to the second.
    first = score_to_files(critic, items_from_render_dir(render_dir), tmp_path / "two", batch_size=3, progress=False,
                           metadata={"m": 1}, num_shards=2, shard_index=0, chunk_size=3)  # fmt: skip
    assert first == {"merged": False, "chunks": 3, "chunks_done": 2, "chunks_skipped": 0}
    assert not (tmp_path / "two" / "scores.jsonl").exists()
    second = score_to_files(critic, items_from_render_dir(render_dir), tmp_path / "two", batch_size=3, progress=False,
                            metadata={"m": 1}, num_shards=2, shard_index=1, chunk_size=3)  # fmt: skip
    assert second["merged"] and (second["items"], second["scored"], second["errors"]) == (8, 4, 4)
    scores_two, errors_two = _scores(tmp_path / "two")
    scores_one, errors_one = _scores(tmp_path / "one")
    assert errors_two == errors_one
    assert [r["id"] for r in scores_two] == [r["id"] for r in scores_one]
    for a, b in zip(scores_two, scores_one):
        assert a["prob_yes"] == pytest.approx(b["prob_yes"], abs=1e-5)  # other batch companions: float rounding only
    # A re-run finds every chunk done and scores nothing again.
    again = score_to_files(critic, items_from_render_dir(render_dir), tmp_path / "two", batch_size=3, progress=False, metadata={"m": 1}, chunk_size=3)
    assert again["merged"] and _scores(tmp_path / "two") == (scores_two, errors_two)
    # Chunks of another run (another model or input) are never mixed in.
    with pytest.raises(ValueError, match="another run"):
        score_to_files(critic, items_from_render_dir(render_dir), tmp_path / "two", progress=False, metadata={"m": 2}, chunk_size=3)


def test_a_critic_that_is_not_there_is_named_in_one_line(tmp_path, render_dir, monkeypatch):
    from typer.testing import CliRunner

    from coherendream.cli import app

    monkeypatch.chdir(tmp_path)  # "mycritic" is neither a folder here nor in the offline hub cache
    for name in ("nobody/nonexistent", "mycritic"):
        with pytest.raises(FileNotFoundError, match=f"model '{name}': no such folder here"):
            Critic.from_pretrained(name, device="cpu")
        res = CliRunner().invoke(app, ["critic", "score", "--critic", name, "--input", str(render_dir), "-o", str(tmp_path / "out")])
        assert res.exit_code == 2 and name in res.output and "Traceback" not in res.output
        assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("text, why", [("", "no rows"), ("id,path,prompt\n", "no rows"),
                                       ("id,file,text\na,a,a cube\n", "no 'path' column; its columns are file, id, text")])
def test_critic_score_refuses_a_manifest_it_cannot_use_before_loading_the_critic(tmp_path, text, why):
    from typer.testing import CliRunner

    from coherendream.cli import app

    (tmp_path / "m.csv").write_text(text)
    # the critic named does not exist: the manifest is refused before anything tries to load it
    res = CliRunner().invoke(app, ["critic", "score", "--critic", str(tmp_path / "none"), "--input", str(tmp_path / "m.csv"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and why in res.output and not (tmp_path / "out").exists()


def test_critic_score_refuses_a_batch_size_below_one_before_writing(tmp_path, critic, render_dir):
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0"):
        score_to_files(critic, items_from_render_dir(render_dir), tmp_path / "out", batch_size=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_manifest_of_meshes_points_to_eval_assets(tmp_path):
    (tmp_path / "box.glb").write_bytes(b"glTF")
    (tmp_path / "m.csv").write_text("id,path,prompt\nbox,box.glb,a cube\n")
    (item,) = list(items_from_manifest(tmp_path / "m.csv", num_views=4))
    assert item["reason"] == "not_a_folder" and "eval assets" in item["error"]


def test_critic_score_ends_with_the_reasons_for_rejects_and_their_remedy(tmp_path, critic):
    from typer.testing import CliRunner

    from coherendream.cli import app

    write_views(tmp_path / "m" / "a", 4, seed=0)
    write_views(tmp_path / "outside", 4, seed=1)
    (tmp_path / "m" / "list.csv").write_text("id,path,prompt\na,a,a red cube\nb,../outside,a blue cone\n")
    critic_dir = critic.save_pretrained(tmp_path / "critic")
    res = CliRunner().invoke(app, ["critic", "score", "--critic", str(critic_dir), "--input", str(tmp_path / "m" / "list.csv"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "scored 1 of 2" in res.output and "1 of 2 rejected: outside_root" in res.output and "pass --root" in res.output


def test_two_critic_score_processes_give_the_results_of_one(critic, render_dir, tmp_path):
    import subprocess
    import sys

    critic_dir = critic.save_pretrained(tmp_path / "critic")
    args = [sys.executable, "-m", "coherendream.cli", "critic", "score", "--critic", str(critic_dir), "--input", str(render_dir), "--chunk-size", "2"]
    subprocess.run([*args, "-o", str(tmp_path / "one")], check=True, capture_output=True)
    procs = [subprocess.Popen([*args, "-o", str(tmp_path / "two"), "--num-shards", "2", "--shard-index", str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]  # fmt: skip
    outputs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    one, two = _scores(tmp_path / "one"), _scores(tmp_path / "two")
    assert two[1] == one[1] and [r["id"] for r in two[0]] == [r["id"] for r in one[0]]
    assert [r["prob_yes"] for r in two[0]] == pytest.approx([r["prob_yes"] for r in one[0]], abs=1e-6)
