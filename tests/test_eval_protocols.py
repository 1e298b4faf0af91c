"""T3Bench-style, TIFA-style and pairwise-Elo evaluation protocols (eval/t3bench.py, tifa.py, judge.py)."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from coherendream.critic.model import Critic, CriticConfig, CriticOutput
from coherendream.critic.tiny import build_tiny_critic
from coherendream.eval import judge as judge_mod
from coherendream.eval import t3bench, tifa
from coherendream.generation.gaussians import GaussianModel, write_ply_vertices
from PIL import Image

PROCEDURAL = "a red cube to the left of a blue sphere"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_critic(tmp_path_factory.mktemp("tiny") / "critic", image_size=64, patch_size=8)


@pytest.fixture(scope="module")
def tiny_critic(tiny_dir):
    return Critic.from_pretrained(tiny_dir, device="cpu")


class StubScorer:
    """A scorer whose P(yes) is ``fn(views, prompt)``; records every prompt it was asked."""

    def __init__(self, fn, num_views: int = 4):
        self.fn = fn
        self.config = CriticConfig(num_views=num_views)
        self.asked: list[str] = []

    def score(self, views, prompts):
        self.asked += list(prompts)
        p = torch.tensor([float(self.fn(v, q)) for v, q in zip(views, prompts)], dtype=torch.float32)
        return CriticOutput(prob_yes=p, margin=torch.logit(p.clamp(1e-6, 1 - 1e-6)))


def _gaussians(seed: int, color=(0.9, 0.1, 0.1)) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(150, 3, generator=g) * 0.6 - 0.3
    return GaussianModel.from_points(pts, torch.tensor([color]).repeat(150, 1), scale=0.05, opacity=0.8)


def _nan_ply(path: Path) -> None:
    cols = _gaussians(9).ply_fields()
    cols["x"] = cols["x"].copy()
    cols["x"][0] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ply_vertices(path, cols)


def _view_folder(folder: Path, value: int, n: int = 4, size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (value, value, value)).save(folder / f"az{i:03d}.png")


# --------------------------------------------------------------------------- T3Bench


def test_prompt_files_and_slugs(tmp_path):
    empty = tmp_path / "prompt_empty.txt"
    empty.write_text("\n   \n")
    with pytest.raises(ValueError, match="prompt_empty.txt.*no prompts"):
        t3bench.read_prompt_file(empty)
    with pytest.raises(ValueError, match="prompt_empty.txt"):
        t3bench.run_t3bench(t3bench.T3BenchConfig([empty], tmp_path / "out", generations_dir=tmp_path), StubScorer(lambda v, q: 0.5))
    slugs = t3bench.prompt_slugs(["A red cube!", "a red cube", "../../etc/passwd", "", "x" * 200])
    assert slugs[:2] == ["a_red_cube", "a_red_cube_2"]
    assert len(set(slugs)) == len(slugs)
    assert all(s and len(s) <= 80 and all(c.isalnum() or c == "_" for c in s) for s in slugs)



def test_slugs_of_the_real_t3bench_prompts_are_distinct(t3bench_dir):
    real = t3bench.read_prompt_file(t3bench_dir / "prompt_multi.txt")
    assert len(real) == 100 and len(set(t3bench.prompt_slugs(real))) == 100


def test_icosphere_cameras_and_groups():
    cams = t3bench.icosphere_cameras(level=1, radius=2.2, fov_y=40.0, resolution=32)
    assert len(cams) == 42
    pos = np.stack([c.position for c in cams])
    np.testing.assert_allclose(np.linalg.norm(pos, axis=1), 2.2, atol=1e-9)
    assert len(np.unique(np.round(pos, 6), axis=0)) == 42
    # every camera looks at the origin: its forward axis (OpenCV +z) points from it to the centre
    fwd = np.stack([c.c2w[:3, 2] for c in cams])
    np.testing.assert_allclose(fwd, -pos / 2.2, atol=1e-9)
    assert len(t3bench.icosphere_cameras(level=2, radius=1.0)) == 162
    groups = t3bench.group_cameras(cams, 4)
    assert len(groups) == 11 and all(len(g) == 4 and len(set(g)) == 4 for g in groups)
    assert {i for g in groups for i in g} == set(range(42))
    # spread in azimuth within a group: no two views of a group closer than 30 degrees on average
    gaps = [min(min(abs(cams[i].azimuth - cams[j].azimuth) % 360, 360 - abs(cams[i].azimuth - cams[j].azimuth) % 360)
                for i in g for j in g if i != j) for g in groups]
    assert np.mean(gaps) > 30


def test_quality_proxy_flags_empty_and_clipped_views():
    white = np.full((32, 32, 3), 255, np.uint8)
    obj = white.copy()
    obj[8:24, 8:24] = (200, 0, 0)
    clipped = white.copy()
    clipped[0:20, 0:20] = (0, 0, 200)
    good = t3bench.quality_proxy([obj] * 4)
    assert good["empty_view_fraction"] == 0 and good["clipped_view_fraction"] == 0
    assert good["coverage_mean"] == pytest.approx(0.25) and good["quality_proxy"] == pytest.approx(1.0)
    bad = t3bench.quality_proxy([obj, white, clipped, obj])
    assert bad["empty_view_fraction"] == 0.25 and bad["clipped_view_fraction"] == 0.25
    assert bad["coverage_cv"] > 0 and bad["quality_proxy"] < 0.5
    assert t3bench.quality_proxy([white, white])["quality_proxy"] == 0.0


def test_t3bench_on_existing_outputs(tmp_path, tiny_critic):
    prompts = ["a red cube", "a blue sphere", "a green cone", "a missing torus", "a broken cylinder"]
    pfile = tmp_path / "prompt_tiny.txt"
    pfile.write_text("\n".join(prompts) + "\n\n")
    outputs = tmp_path / "outputs"
    slugs = t3bench.prompt_slugs(prompts)
    for k, slug in enumerate(slugs[:3]):
        (outputs / slug).mkdir(parents=True)
        _gaussians(k).export_ply(outputs / slug / "gaussians.ply")
    _nan_ply(outputs / slugs[4] / "gaussians.ply")

    vqa = StubScorer(lambda v, q: 0.25, num_views=9)
    summary = t3bench.run_t3bench(t3bench.T3BenchConfig([pfile], tmp_path / "out", generations_dir=outputs, level=1, resolution=32, batch_size=16,
                                                        report_grids=2), tiny_critic, vqa_scorer=vqa)  # fmt: skip
    s = summary["sets"]["prompt_tiny"]
    assert (s["prompts"], s["scored"], s["errors"]) == (5, 3, 2)
    errors = {e["slug"]: e for e in map(json.loads, (tmp_path / "out/prompt_tiny/errors.jsonl").read_text().splitlines())}
    assert errors[slugs[3]]["reason"] == "missing_output" and slugs[3] in errors[slugs[3]]["error"]
    assert errors[slugs[4]]["reason"] == "non_finite" and "NaN" in errors[slugs[4]]["error"]
    rows = json.loads((tmp_path / "out/prompt_tiny/results.json").read_text())
    assert [r["slug"] for r in rows] == slugs[:3]
    for r in rows:
        assert 0 < r["alignment_critic_min"] <= r["alignment_critic"] < 1
        assert r["alignment_vqa"] == pytest.approx(0.25)
        assert r["views"] == 42 and r["groups"] == 11 and r["critic_groups_failed"] == 0
        assert r["empty_view_fraction"] == 0 and r["coverage_mean"] > 0.01
    # the VQA scorer grouped by its own 9 views: ceil(42 / 9) = 5 groups per prompt, the prompt as asked
    assert len(vqa.asked) == 15 and set(vqa.asked) == set(prompts[:3])
    csv_lines = (tmp_path / "out/prompt_tiny/results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("set,slug,prompt,alignment_critic")
    html = (tmp_path / "out/prompt_tiny/report.html").read_text()
    assert html.count("<img") == 3 and "missing_output" in html  # histogram + 2 grids; errors listed
    assert json.loads((tmp_path / "out/summary.json").read_text())["settings"]["views"] == 42


def test_t3bench_generates_with_template(tmp_path):

    pfile = tmp_path / "prompt_gen.txt"
    pfile.write_text("a red cube\na blue sphere\n")
    seen = []

    class Result:
        def __init__(self, out):
            self.output_dir, self.paths = Path(out), {"ply": Path(out) / "gaussians.ply"}

    def fake_generate(config):
        seen.append((config.prompt, config.output_dir, config.steps))
        if "sphere" in config.prompt:
            raise RuntimeError("out of memory")
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        _gaussians(1).export_ply(Path(config.output_dir) / "gaussians.ply")
        return Result(config.output_dir)

    template = tmp_path / "generate.yaml"
    template.write_text("steps: 7\n")
    summary = t3bench.run_t3bench(t3bench.T3BenchConfig([pfile], tmp_path / "out", generate_config=template, level=0, resolution=24),
                                  StubScorer(lambda v, q: 0.7), generate_fn=fake_generate)  # fmt: skip
    assert [p for p, _, _ in seen] == ["a red cube", "a blue sphere"] and {n for _, _, n in seen} == {7}
    assert seen[0][1] == str(tmp_path / "out/prompt_gen/generations/a_red_cube")
    assert summary["sets"]["prompt_gen"]["scored"] == 1 and summary["sets"]["prompt_gen"]["means"]["alignment_critic"] == pytest.approx(0.7)
    err = json.loads((tmp_path / "out/prompt_gen/errors.jsonl").read_text())
    assert err["reason"] == "generation_failed" and "out of memory" in err["error"]
    with pytest.raises(ValueError, match="exactly one"):
        t3bench.T3BenchConfig([pfile], tmp_path / "x")

    # Two shards: each generates its half; the second to finish scores both, as one process did.
    seen.clear()
    run = lambda i: t3bench.run_t3bench(t3bench.T3BenchConfig([pfile], tmp_path / "split", generate_config=template, level=0, resolution=24,  # noqa: E731
                                                              num_shards=2, shard_index=i), StubScorer(lambda v, q: 0.7), generate_fn=fake_generate)  # fmt: skip
    assert run(1) == {"merged": False} and [p for p, _, _ in seen] == ["a blue sphere"]
    split = run(0)
    assert [p for p, _, _ in seen] == ["a blue sphere", "a red cube"]
    assert split["merged"] and split["sets"]["prompt_gen"]["scored"] == 1 and split["sets"]["prompt_gen"]["errors"] == 1
    assert (tmp_path / "split/prompt_gen/results.csv").read_text().replace("split", "out") == (tmp_path / "out/prompt_gen/results.csv").read_text()
    # A re-run generates nothing again.
    seen.clear()
    assert run(0)["merged"] and seen == []


# --------------------------------------------------------------------------- TIFA questions


def test_rule_questions_procedural_are_exact():
    qs = tifa.rule_questions(PROCEDURAL)
    got = {(q.question, q.answer, q.element_type) for q in qs}
    for expected in [
        ("Is there a cube?", "yes", "object"),
        ("Is there a sphere?", "yes", "object"),
        ("Is the cube red?", "yes", "colour"),
        ("Is the sphere blue?", "yes", "colour"),
        ("Is there exactly one cube?", "yes", "count"),
        ("Is the red cube to the left of the blue sphere?", "yes", "spatial"),
        ("Is the red cube to the right of the blue sphere?", "no", "spatial"),
    ]:
        assert expected in got
    assert all(q.exact for q in qs)
    no = [q for q in qs if q.answer == "no"]
    assert {q.element_type for q in no} == {"object", "colour", "count", "spatial"}
    # contrast colours are wrong for their object, contrast shapes absent from the scene
    for q in no:
        if q.element_type == "colour":
            assert ("cube" in q.question and "red" not in q.question) or ("sphere" in q.question and "blue" not in q.question)
        if q.element_type == "object":
            assert "cube" not in q.question and "sphere" not in q.question
    # two groups of one shape: colour questions ask existence, counts add up, no duplicate questions
    qs2 = tifa.rule_questions("two red cubes on top of a green cube")
    texts = [q.question for q in qs2]
    assert "Are there three cubes?" in texts and "Is there a green cube?" in texts and "Are there four cubes?" in texts
    assert "Are the red cubes under the green cube?" in texts and len(set(texts)) == len(texts)
    assert all(q.answer == "yes" for q in tifa.rule_questions(PROCEDURAL, contrast=False))
    # "next to" has no exact opposite: no spatial contrast
    assert not [q for q in tifa.rule_questions("a red cube next to a blue cube") if q.answer == "no" and q.element_type == "spatial"]


def test_rule_questions_free_text_are_sensible():
    qs = tifa.rule_questions("A small red car parked next to two green trees")
    texts = {q.question: q for q in qs}
    assert "Is there a car?" in texts and "Are there trees?" in texts
    assert "Is the car red?" in texts and "Are the trees green?" in texts
    assert texts["Are there two trees?"].element_type == "count"
    assert "Is the car next to the trees?" in texts
    assert all(q.answer == "yes" and not q.exact for q in qs)
    zebroid = {q.question: q.element_type for q in tifa.rule_questions("A colorful zebroid")}  # a noun no list knows
    assert zebroid == {"Is there a zebroid?": "object", "Is the zebroid colorful?": "attribute"}
    # a question for each object, attribute and relation the prompt names, the count only when it says one
    student = [q.question for q in tifa.rule_questions("A student is typing on his laptop")]
    assert student[:2] == ["Is there a student?", "Is there a laptop?"] and len(student) == 3
    questions = {q.question: q.element_type for q in tifa.rule_questions("An old man with a long white beard sits on a wooden bench")}
    assert {"Is there a man?", "Is the man old?", "Is the beard white?", "Does the man have the beard?",
            "Is the man on top of the bench?", "Is the bench wooden?"} <= set(questions)  # fmt: skip
    sewing = {q.question for q in tifa.rule_questions("Colorful beads are scattered around a small, yellow sewing box")}
    assert "Is there a sewing box?" in sewing and "Is the sewing box yellow?" in sewing
    assert not any(q.startswith("Are there three") for q in sewing)  # the planner's three beads are not the prompt's
    fallback = tifa.rule_questions("Of the above.")
    assert len(fallback) == 1 and fallback[0].element_type == "other"
    with pytest.raises(ValueError, match="empty"):
        tifa.rule_questions("   ")


# --------------------------------------------------------------------------- TIFA LLM backend


@contextlib.contextmanager
def stub_openai_server(answers: list[str], limit_s: float = 30.0):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 answering ``answers`` in turn; records requests."""
    requests: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            content = answers[min(len(requests), len(answers)) - 1]
            data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopper = threading.Timer(limit_s, server.shutdown)  # never outlives a hung test
    stopper.daemon = True
    stopper.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _generator(url, **kw):
    return tifa.OpenAIQuestionGenerator("stub-model", base_url=url, timeout=10.0, max_retries=0, **kw)


VALID = json.dumps({"questions": [
    {"question": "Is there a cube?", "answer": "yes", "element": "cube", "element_type": "object"},
    {"question": "Is the cube red?", "answer": "Yes", "element": "red cube", "element_type": "color"},
    {"question": "Is the cube green?", "answer": "no", "element": "green cube", "element_type": "colour"},
]})


def test_llm_questions_valid_json_accepted():
    with stub_openai_server(["```json\n" + VALID + "\n```"]) as (url, requests):
        qset = _generator(url, max_questions=5).generate(PROCEDURAL)
    assert qset.source == "llm" and qset.attempts == 1 and len(requests) == 1
    assert [(q.question, q.answer, q.element_type, q.source) for q in qset.questions] == [
        ("Is there a cube?", "yes", "object", "llm"), ("Is the cube red?", "yes", "colour", "llm"),
        ("Is the cube green?", "no", "colour", "llm")]
    assert requests[0]["model"] == "stub-model" and PROCEDURAL in requests[0]["messages"][-1]["content"]


@pytest.mark.parametrize("bad, why", [
    ('{"questions": [{"question": "Is there a cube?", "answer": "yes"', "JSON"),
    (json.dumps({"questions": [{"question": f"Q{i}?", "answer": "yes"} for i in range(6)]}), "more than the maximum 5"),
    (json.dumps({"questions": [{"question": "Is there a cube?", "answer": "maybe"}]}), "yes\" or \"no"),
    (json.dumps({"questions": [{"question": "  ", "answer": "yes"}]}), "empty"),
    (json.dumps({"items": []}), "no \"questions\" key"),
])
def test_llm_questions_invalid_fall_back_to_rules(bad, why):
    with stub_openai_server([bad]) as (url, requests):
        qset = _generator(url, max_questions=5, max_attempts=2).generate(PROCEDURAL)
    assert qset.source == "fallback" and len(requests) == 2
    assert all(why in e for e in qset.errors) and len(qset.errors) == 2
    # the retry showed the model its answer and the error
    assert requests[1]["messages"][-2]["content"] == bad[:4000] and "invalid" in requests[1]["messages"][-1]["content"]
    rules = tifa.rule_questions(PROCEDURAL, max_questions=5)
    assert [q.question for q in qset.questions] == [q.question for q in rules] and all(q.source == "rules" for q in qset.questions)


def test_llm_questions_retry_then_valid():
    with stub_openai_server(["not json at all", VALID]) as (url, requests):
        qset = _generator(url, max_questions=5, max_attempts=3).generate(PROCEDURAL)
    assert qset.source == "llm" and qset.attempts == 2 and len(requests) == 2 and len(qset.errors) == 1


def test_llm_request_failure_falls_back():
    # nothing listens on this port once the server has closed
    with stub_openai_server([VALID]) as (url, _):
        pass
    qset = _generator(url, max_attempts=1).generate(PROCEDURAL)
    assert qset.source == "fallback" and "request failed" in qset.errors[0]


# --------------------------------------------------------------------------- TIFA scoring


def tifa_run(prompts: list[str], outputs: Path, out: Path, scorer, **options):
    """``run_tifa`` through its config, from a list of prompts."""
    prompt_file = Path(out).parent / f"{Path(out).name}-prompts.txt"
    prompt_file.write_text("".join(p + "\n" for p in prompts))
    return tifa.run_tifa(tifa.TifaConfig(prompt_file, outputs, out, **options), scorer)


def test_tifa_accuracy_with_stub_scorer(tmp_path):
    outputs = tmp_path / "outputs"
    slug = t3bench.prompt_slugs([PROCEDURAL])[0]
    _view_folder(outputs / slug, 128)
    qs = tifa.rule_questions(PROCEDURAL)
    n_yes = sum(q.answer == "yes" for q in qs)

    always_yes = StubScorer(lambda v, q: 0.5)  # exactly the threshold counts as "yes"
    summary = tifa_run([PROCEDURAL, "a missing cube"], outputs, tmp_path / "a", always_yes)
    assert summary["tifa"] == pytest.approx(n_yes / len(qs))
    assert summary["accuracy_yes"] == 1.0 and summary["accuracy_no"] == 0.0
    assert summary["by_type"]["object"] == {"questions": 3, "accuracy": pytest.approx(2 / 3)}
    assert summary["by_type"]["spatial"] == {"questions": 2, "accuracy": 0.5}
    assert summary["errors"] == 1 and summary["scored"] == 1
    assert set(always_yes.asked) == {q.question for q in qs}  # the question itself is asked

    truth = {q.question: q.answer for q in qs}
    wrong_on_colour = StubScorer(lambda v, q: (0.9 if truth[q] == "yes" else 0.1) if "red" not in q else 0.2)
    summary = tifa_run([PROCEDURAL], outputs, tmp_path / "b", wrong_on_colour)
    red_yes = [q for q in qs if "red" in q.question and q.answer == "yes"]
    assert summary["tifa"] == pytest.approx(1 - len(red_yes) / len(qs))
    rows = [json.loads(x) for x in (tmp_path / "b/answers.jsonl").read_text().splitlines()]
    assert len(rows) == len(qs) and all(r["correct"] == ("red" not in r["question"] or r["expected"] == "no") for r in rows)
    scores = tifa.tifa_scores([{"id": "p", "element_type": "count", "expected": "yes", "correct": True},
                               {"id": "p", "element_type": "count", "expected": "no", "correct": False},
                               {"id": "q", "element_type": "object", "expected": "yes", "correct": True},
                               {"id": "q", "error": "x"}])
    assert scores["tifa"] == pytest.approx((0.5 + 1.0) / 2) and scores["questions"] == 3


def test_question_scorer_with_tiny_critic(tiny_critic):
    scorer = tifa.question_scorer(tiny_critic)
    assert scorer.model is tiny_critic.model and scorer.questions(["Is the cube red?"]) == ["Is the cube red?"]
    views = [[Image.new("RGB", (32, 32), (200, 20, 20))] * 4]
    rows = tifa.answer_questions(scorer, [{"id": "x", "prompt": PROCEDURAL, "views": views[0],
                                           "questions": tifa.rule_questions(PROCEDURAL)[:3]}])
    assert len(rows) == 3 and all(0 < r["prob_yes"] < 1 and r["predicted"] in ("yes", "no") for r in rows)


# --------------------------------------------------------------------------- judging


def judge(methods: dict, prompts: list[str], out: Path, scorer, **options):
    """``judge_methods`` through its config, from ``{name: folder}`` and a list of prompts."""
    prompt_file = Path(out).parent / f"{Path(out).name}-prompts.txt"
    prompt_file.write_text("".join(p + "\n" for p in prompts))
    return judge_mod.judge_methods(judge_mod.JudgeConfig(prompt_file, [f"{k}={v}" for k, v in methods.items()], out, **options), scorer)


def _methods(tmp_path, prompts):
    slugs = t3bench.prompt_slugs(prompts)
    for name, value in (("good", 220), ("bad", 40), ("twin", 220)):
        for slug in slugs:
            _view_folder(tmp_path / name / slug, value)
    return {"bad": tmp_path / "bad", "good": tmp_path / "good", "twin": tmp_path / "twin"}


def test_judge_single_pass_elo(tmp_path):
    prompts = ["a red cube", "a blue sphere", "a green cone", "a pink torus", "a black cylinder"]
    methods = _methods(tmp_path, prompts)
    brightness = StubScorer(lambda views, q: float(np.mean([np.asarray(v) for v in views])) / 255.0)
    summary = judge(methods, prompts, tmp_path / "out", brightness, tie_margin=0.02,
                                      anchor="bad", n_bootstrap=50, seed=1)
    ratings = {r["method"]: r for r in summary["ratings"]}
    assert ratings["bad"]["elo"] == 1000.0 and ratings["good"]["elo"] > 1100 and ratings["twin"]["elo"] > 1100
    assert ratings["good"]["elo"] == pytest.approx(ratings["twin"]["elo"], abs=1e-3)
    assert ratings["good"]["ties"] == 5 and ratings["good"]["wins"] == 5 and ratings["bad"]["losses"] == 10
    assert ratings["good"]["ci_low"] <= ratings["good"]["elo"] <= ratings["good"]["ci_high"] and summary["note"] is None
    comps = [json.loads(x) for x in (tmp_path / "out/comparisons.jsonl").read_text().splitlines()]
    assert len(comps) == 15 and summary["ties"] == 5
    # Three prompts give each method 6 games: no interval, and the summary says why.
    few = judge(_methods(tmp_path / "few", prompts[:3]), prompts[:3], tmp_path / "few_out", brightness,
                                  anchor="bad", n_bootstrap=50, seed=1)  # fmt: skip
    assert "too few games" in few["note"] and all(r.get("ci_low") is None for r in few["ratings"] if r["method"] != "bad")
    assert {c["outcome"] for c in comps if {c["method_a"], c["method_b"]} == {"good", "twin"}} == {"tie"}
    assert all(c["outcome"] == "b" for c in comps if (c["method_a"], c["method_b"]) == ("bad", "good"))
    saved = json.loads((tmp_path / "out/ratings.json").read_text())
    assert saved["anchor"] == "bad" and saved["ratings"]["bad"] == 1000.0
    assert (tmp_path / "out/ratings.csv").read_text().splitlines()[1].split(",")[1] in ("good", "twin")
    assert "<img" in (tmp_path / "out/report.html").read_text()
    # a larger tie margin turns the good-vs-bad difference (about 0.7) into ties as well
    wide = judge(methods, prompts, tmp_path / "wide", brightness, tie_margin=0.9, n_bootstrap=0)
    assert wide["ties"] == 15 and all(abs(r["elo"] - 1000.0) < 1e-3 for r in wide["ratings"])


def test_judge_missing_renders_are_errors(tmp_path):
    prompts = ["a red cube", "a blue sphere"]
    methods = _methods(tmp_path, prompts)
    import shutil

    shutil.rmtree(tmp_path / "good" / "a_blue_sphere")
    summary = judge(methods, prompts, tmp_path / "out", StubScorer(lambda v, q: 0.5), n_bootstrap=0)
    assert summary["comparisons"] == 3 + 1 and summary["errors"] == 1
    err = json.loads((tmp_path / "out/errors.jsonl").read_text())
    assert err["method"] == "good" and err["reason"] == "missing_output"
    with pytest.raises(ValueError, match="at least two"):
        judge({"good": methods["good"]}, prompts, tmp_path / "x", StubScorer(lambda v, q: 0.5))


def test_judge_side_by_side_plumbing_and_refusal(tmp_path, tiny_critic):
    prompts = ["a red cube", "a blue sphere"]
    methods = _methods(tmp_path, prompts)
    # The default tiny tokenizer has no "A"/"B" tokens: refused before any work, with the reason.
    with pytest.raises(ValueError, match=r"single token.*'A'|'A'.*single token"):
        judge(methods, prompts, tmp_path / "refused", tiny_critic, mode="side_by_side")
    assert not (tmp_path / "refused" / "comparisons.jsonl").exists()

    ab_dir = build_tiny_critic(tmp_path / "ab_critic", vocab_words=["A", "B", "Which", "better", "matches", "Answer", "or",
                                                                   "left", "right"], image_size=64, patch_size=8)
    critic = Critic.from_pretrained(ab_dir, device="cpu")
    sbs = judge_mod.side_by_side_scorer(critic)
    assert sbs.yes_ids == [critic.tokenizer.convert_tokens_to_ids("A")] and sbs.config.num_views == 1
    summary = judge({"good": methods["good"], "bad": methods["bad"]}, prompts, tmp_path / "out", critic,
                                      mode="side_by_side", n_bootstrap=0, tie_margin=0.0)
    comps = [json.loads(x) for x in (tmp_path / "out/comparisons.jsonl").read_text().splitlines()]
    assert len(comps) == 2 and all(c["orders"] == 2 and 0 < c["p_a"] < 1 for c in comps)
    assert all(abs(c["p_a"] + c["p_b"] - 1) < 1e-6 and c["outcome"] in ("a", "b") for c in comps)
    assert {r["method"] for r in summary["ratings"]} == {"good", "bad"}

    img = judge_mod.side_by_side_image([Image.new("RGB", (16, 16), (255, 0, 0))] * 4, [Image.new("RGB", (16, 16), (0, 0, 255))] * 4)
    arr = np.asarray(img)
    assert img.size[0] == 32 + 8 + 32 and arr[-1, 0, 0] == 255 and arr[-1, -1, 2] == 255 and arr[-1, -1, 0] == 0


def test_transformers_question_backend_with_fake_model():
    class FakeTokenizer:
        chat_template = "fake"
        pad_token_id = 0
        eos_token_id = 1

        def __init__(self, answers):
            self.answers, self.calls = list(answers), 0

        def apply_chat_template(self, messages, **kw):
            self.messages = messages
            return {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}

        def decode(self, ids, skip_special_tokens=True):
            assert ids.tolist() == [9]  # only the new tokens are decoded
            self.calls += 1
            return self.answers[min(self.calls, len(self.answers)) - 1]

    class FakeModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
            assert do_sample is False  # greedy
            return torch.cat([input_ids, torch.tensor([[9]])], dim=1)

    tok = FakeTokenizer([VALID])
    qset = tifa.TransformersQuestionGenerator(model=FakeModel(), tokenizer=tok, max_questions=5).generate(PROCEDURAL)
    assert qset.source == "llm" and len(qset.questions) == 3 and tok.messages[0]["role"] == "system"
    tok = FakeTokenizer(['{"questions": "nope"}'])
    qset = tifa.TransformersQuestionGenerator(model=FakeModel(), tokenizer=tok, max_attempts=2).generate(PROCEDURAL)
    assert qset.source == "fallback" and tok.calls == 2 and "must be a list" in qset.errors[0]


@pytest.mark.parametrize("protocol", ["tifa", "judge"])
def test_plys_are_rendered_from_the_scorers_own_orbit(tmp_path, protocol):
    # A critic trained on views from distance 6 sees the object at (2.5/6)^2 of the area it covers
    # from the default distance: the protocol must render with the scorer's orbit, not a fixed one.
    slug = t3bench.prompt_slugs([PROCEDURAL])[0]
    for name in ("a", "b"):
        (tmp_path / name / slug).mkdir(parents=True)
        _gaussians(1).export_ply(tmp_path / name / slug / "gaussians.ply")
    coverage = {}
    for distance in (2.5, 6.0):
        seen = []

        def foreground(views, question):
            seen.append(np.mean([(np.asarray(v).min(axis=-1) < 240).mean() for v in views]))
            return 0.5

        scorer = StubScorer(foreground)
        scorer.config = CriticConfig(view_distance=distance)
        if protocol == "tifa":
            tifa_run([PROCEDURAL], tmp_path / "a", tmp_path / f"tifa{distance}", scorer, resolution=48)
        else:
            judge({"a": tmp_path / "a", "b": tmp_path / "b"}, [PROCEDURAL], tmp_path / f"judge{distance}",
                                    scorer, n_bootstrap=0, resolution=48)  # fmt: skip
        coverage[distance] = float(np.mean(seen))
    assert 0 < coverage[6.0] < 0.4 * coverage[2.5]
