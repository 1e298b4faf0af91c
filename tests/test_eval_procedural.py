"""`eval procedural`: generate, judge against real renders, merge; sharded over processes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from coherendream.eval.procedural import ProceduralEvalConfig, run_procedural_eval, summarise
from coherendream.eval.procedural_prompts import default_prompt_set_path

FAST = ["steps=2", "num_gaussians=300", "checkpoint_every=1", "device=cpu", "backend=torch"]
METHODS = {"sds": ["mode=sds"], "tcsd": ["mode=tcsd"]}


@pytest.fixture(scope="module")
def two_prompts(tmp_path_factory):
    rows = [json.loads(line) for line in default_prompt_set_path().read_text().splitlines()]
    pick = [next(r for r in rows if r["category"] == "single"), next(r for r in rows if r["category"] == "relation")]
    path = tmp_path_factory.mktemp("prompts") / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pick))
    return path


def _comparable(path: Path) -> list[dict]:
    rows = json.loads((path / "results.json").read_text())
    return [{k: v for k, v in r.items() if k not in ("seconds", "output_dir")} for r in rows]


def test_a_small_run_generates_judges_and_merges(tmp_path, two_prompts):
    cfg = ProceduralEvalConfig(output_dir=str(tmp_path / "one"), prompts=str(two_prompts), methods=METHODS, seeds=[0], overrides=FAST, bootstrap=50)
    status = run_procedural_eval(cfg)
    assert status == {**status, "jobs": 4, "done": 4, "skipped": 0, "merged": True}
    rows = json.loads((tmp_path / "one" / "results.json").read_text())
    assert {(r["method"], r["category"]) for r in rows} == {("sds", "single"), ("sds", "relation"), ("tcsd", "single"), ("tcsd", "relation")}
    for r in rows:
        assert r["object_color"] in (0.0, 0.5, 1.0) and r["color_present"] in (0.0, 0.5, 1.0)
        assert 0 < r["critic_prob_yes"] < 1 and r["steps"] == 2
        assert (Path(r["output_dir"]) / "views" / "grid.png").is_file()
        if r["category"] == "relation":  # "to the left of": decidable from the front
            assert len(r["colors_present"]) == 2 and len(r["object_colors"]) == 2
    for name in ("results.csv", "categories.csv", "summary.json", "report.html"):
        assert (tmp_path / "one" / name).is_file(), name
    table = json.loads((tmp_path / "one" / "summary.json").read_text())["table"]
    tcsd_all = next(e for e in table if e["method"] == "tcsd" and e["category"] == "all")
    assert tcsd_all["jobs"] == 2 and "object_color_minus_sds" in tcsd_all
    # A second call finds every job done and runs nothing.
    again = run_procedural_eval(cfg)
    assert again["done"] == 0 and again["skipped"] == 4 and again["merged"]
    # Other steps are another run: refused, never answered with these results.
    with pytest.raises(ValueError, match=r"other settings \(overrides"):
        run_procedural_eval(dataclasses.replace(cfg, overrides=[*FAST, "steps=3"]))
    page = (tmp_path / "one" / "report.html").read_text()
    assert "What produced this report" in page and "coherendream eval procedural" in page and "2 optimisation steps" in page
    assert "sds: prior the embedded prior" in page


def test_two_processes_give_the_results_of_one(tmp_path, two_prompts):
    one = ProceduralEvalConfig(output_dir=str(tmp_path / "one"), prompts=str(two_prompts), methods=METHODS, seeds=[0], overrides=FAST, bootstrap=50)
    run_procedural_eval(one)
    args = [sys.executable, "-m", "coherendream.cli", "eval", "procedural", "-o", str(tmp_path / "two"), "--prompts", str(two_prompts),
            "--method", "sds:mode=sds", "--method", "tcsd:mode=tcsd", "--seed", "0", "--num-shards", "2", *FAST]  # fmt: skip
    procs = [subprocess.Popen([*args, "--shard-index", str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("2 jobs run" in o for o in outs) == 2
    assert _comparable(tmp_path / "two") == _comparable(tmp_path / "one")


def test_summary_intervals_and_paired_difference():
    rows = []
    for seed in (0, 1):
        for k in range(6):
            rows.append({"method": "sds", "prompt_id": f"p{k}", "category": "relation", "seed": seed, "object_color": 0.5, "critic_prob_yes": 0.2})
            rows.append({"method": "tcsd", "prompt_id": f"p{k}", "category": "relation", "seed": seed, "object_color": 1.0 if k % 2 else 0.5, "critic_prob_yes": 0.6})
    table = summarise(rows, n_boot=200)["table"]
    e = next(x for x in table if x["method"] == "tcsd" and x["category"] == "relation")
    assert e["object_color"] == pytest.approx(0.75) and e["object_color_minus_sds"] == pytest.approx(0.25)
    lo, hi = e["object_color_minus_sds_ci"]
    assert 0.0 < lo <= 0.25 <= hi <= 0.5
    assert next(x for x in table if x["method"] == "sds" and x["category"] == "relation")["object_color_ci"] == [0.5, 0.5]
