"""One manifest reader: `data build`, `critic score` and `eval assets` read the same rows alike."""

import json

from coherendream.critic.batch import items_from_manifest, items_from_render_dir
from coherendream.data.manifest import read_manifest, scan_render_dir
from coherendream.eval.assets import asset_rows


def test_three_commands_accept_and_reject_the_same_rows_for_the_same_reasons(tmp_path):
    root = tmp_path / "assets"
    (root / "views" / "a").mkdir(parents=True)
    (root / "mesh.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    rows = [
        {"id": "a", "path": "views/a", "prompt": "a red cube"},
        {"uid": "b", "path": "mesh.obj", "caption": "a blue   sphere\n"},  # data build's column names
        {"id": "a", "path": "mesh.obj", "prompt": "again"},
        {"id": "c", "path": "mesh.obj", "prompt": "  "},
        {"id": "d", "prompt": "no path"},
        {"id": "e", "path": "../outside.obj", "prompt": "escapes"},
        {"path": "mesh.obj", "prompt": "no id"},
    ]
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")

    refs, rejected = read_manifest(manifest)
    build = {**{r.uid: None for r in refs}, **{r.uid: r.reason for r in rejected}}
    score = {i["id"]: i.get("reason") for i in items_from_manifest(manifest)}
    assets = {r["id"]: r.get("reason") for r in asset_rows(manifest)}
    expected = {"a": None, "b": None, "<m.jsonl:3>": "duplicate_id", "c": "empty_prompt", "d": "missing_path",
                "e": "outside_root", "<m.jsonl:7>": "invalid_row", "<m.jsonl:8>": "invalid_row"}  # fmt: skip
    assert build == score == assets == expected
    assert [r.caption for r in refs] == ["a red cube", "a blue sphere"]
    assert [r.kind for r in refs] == ["views", "mesh"]


def test_render_folders_are_read_alike(tmp_path):
    for uid, caption in (("a", "a red cube\n"), ("b", None), ("c", "")):
        (tmp_path / uid).mkdir()
        if caption is not None:
            (tmp_path / uid / "caption.txt").write_text(caption)
    refs, rejected = scan_render_dir(tmp_path)
    items = {i["id"]: i.get("reason") for i in items_from_render_dir(tmp_path)}
    assert [r.uid for r in refs] == ["a"] and refs[0].caption == "a red cube"
    assert {r.uid: r.reason for r in rejected} == {"b": "missing_prompt", "c": "empty_prompt"}
    assert items == {"a": None, "b": "missing_prompt", "c": None}  # an empty prompt is refused when the item loads
