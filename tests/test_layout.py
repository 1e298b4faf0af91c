"""Layout schema, validation, repair, rule-based planning, LLM planners (stub server, tiny model), seeding."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from coherendream.generation.layout import (
    MAX_OBJECTS,
    Layout,
    LayoutError,
    LayoutPlanner,
    colors_from_prompts,
    extract_json,
    parse_layout_text,
    repair_layout,
    sample_points_in_layout,
    validate_layout,
)
from coherendream.generation.layout_llm import _EXAMPLE_LAYOUT, OpenAIPlanner, TransformersPlanner, build_messages
from coherendream.generation.layout_rules import RuleBasedPlanner
from coherendream.vocabulary import normalise_relation

def _prompts(bench: Path, name: str) -> list[str]:
    return [line.strip() for line in (bench / f"prompt_{name}.txt").read_text().splitlines() if line.strip()]


def _obj(name, center, size, prompt=None):
    return {"name": name, "prompt": prompt or f"a {name}", "center": list(center), "size": list(size)}


GOOD = {
    "objects": [_obj("cube", (-0.2, 0, 0), (0.2, 0.2, 0.2)), _obj("sphere", (0.2, 0, 0), (0.2, 0.2, 0.2))],
    "relations": [{"subject": 0, "relation": "left_of", "object": "sphere"}],
}


# -- schema and validation ----------------------------------------------------------------------

def test_valid_layout_resolves_names_and_synonyms():
    lay = validate_layout({**GOOD, "relations": [{"subject": "cube", "relation": "to the left of", "object": 1}]})
    assert lay.relations[0].subject == 0 and lay.relations[0].object == 1
    assert lay.relations[0].relation == "left_of"
    assert lay.relation_violations() == []


def test_example_in_system_prompt_is_valid():
    lay = validate_layout(_EXAMPLE_LAYOUT)
    assert lay.relation_violations() == []


@pytest.mark.parametrize(
    "text, why",
    [
        ("I cannot help with that.", "no JSON"),
        ("{not json at all", "not valid JSON"),
        ('{"objects": [{"name": "a", "prompt": "a", "center": [NaN, 0, 0], "size": [0.1, 0.1, 0.1]}]}', "NaN"),
        ('{"objects": [{"name": "a", "prompt": "a", "center": [0, 0, 0], "size": [Infinity, 0.1, 0.1]}]}', "Infinity"),
        ('{"objects": [{"name": "a", "prompt": "a", "center": [0, 0, 0], "size": [1e999, 0.1, 0.1]}]}', "not finite"),
        ("[1, 2, 3]", "no JSON"),
    ],
)
def test_rejects_non_json_and_non_finite(text, why):
    with pytest.raises(LayoutError, match=why):
        parse_layout_text(text)


def test_rejects_box_outside_cube_negative_size_unknown_relation():
    far = {"objects": [_obj("a", (0.45, 0, 0), (0.4, 0.1, 0.1))]}
    with pytest.raises(LayoutError, match="outside the unit cube"):
        validate_layout(far)
    with pytest.raises(LayoutError, match="outside the unit cube"):
        repair_layout(far)  # 0.15 out: too far to move safely
    with pytest.raises(LayoutError, match="size must be >"):
        validate_layout({"objects": [_obj("a", (0, 0, 0), (-0.1, 0.1, 0.1))]})
    with pytest.raises(LayoutError, match="unknown relation"):
        validate_layout({**GOOD, "relations": [{"subject": 0, "relation": "orbits", "object": 1}]})
    with pytest.raises(LayoutError, match="names no object"):
        validate_layout({**GOOD, "relations": [{"subject": 0, "relation": "left_of", "object": "moon"}]})
    with pytest.raises(LayoutError, match="not an object index"):
        validate_layout({**GOOD, "relations": [{"subject": 0, "relation": "left_of", "object": 7}]})
    with pytest.raises(LayoutError, match="numbers"):
        validate_layout({"objects": [_obj("a", (0, "0", 0), (0.1, 0.1, 0.1))]})
    with pytest.raises(ValueError):
        normalise_relation("teleports")


def test_rejects_overlap_but_not_touching_or_declared_containment():
    overlapping = {"objects": [_obj("a", (0, 0, 0), (0.3, 0.3, 0.3)), _obj("b", (0.05, 0, 0), (0.3, 0.3, 0.3))]}
    with pytest.raises(LayoutError, match="overlap"):
        validate_layout(overlapping)
    stacked = {
        "objects": [_obj("a", (0, -0.15, 0), (0.3, 0.3, 0.3)), _obj("b", (0, 0.15, 0), (0.3, 0.3, 0.3))],
        "relations": [{"subject": 1, "relation": "on top of", "object": 0}],
    }
    assert validate_layout(stacked).relation_violations() == []
    contained = {
        "objects": [_obj("vase", (0, 0, 0), (0.3, 0.3, 0.3)), _obj("rose", (0, 0.1, 0), (0.1, 0.4, 0.1))],
        "relations": [{"subject": "rose", "relation": "in", "object": "vase"}],
    }
    validate_layout(contained)


def test_huge_inputs_are_rejected_cheaply():
    one = json.dumps(_obj("a", (0, 0, 0), (0.01, 0.01, 0.01)))
    t0 = time.perf_counter()
    with pytest.raises(LayoutError, match="characters long"):
        parse_layout_text('{"objects": [' + ",".join([one] * 10**6) + "]}")
    small_objs = '{"objects": [' + ",".join(["{}"] * 10**4) + "]}"  # short text, too many objects
    with pytest.raises(LayoutError, match="at most 16"):
        parse_layout_text(small_objs)
    with pytest.raises(LayoutError):
        parse_layout_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(LayoutError):
        parse_layout_text("{" * 90_000)
    assert time.perf_counter() - t0 < 5.0
    too_many = {"objects": [_obj(f"o{i}", (0, 0, 0), (0.01, 0.01, 0.01)) for i in range(MAX_OBJECTS + 1)]}
    with pytest.raises(LayoutError, match="at most"):
        validate_layout(too_many)
    with pytest.raises(LayoutError, match="at most"):
        validate_layout({"objects": [_obj("a" * 500, (0, 0, 0), (0.1, 0.1, 0.1))]})


def test_a_prompt_naming_more_objects_than_a_layout_holds_keeps_the_first(rules):
    # relations between groups past MAX_OBJECTS once pointed at boxes that were dropped
    text = " and ".join(f"a {c} cube on a {c} sphere" for c in ("red", "blue", "green", "yellow", "pink", "purple", "brown", "orange", "white", "black"))
    lay = rules.plan_layout(text)
    assert len(lay.objects) == MAX_OBJECTS and all(r.subject < MAX_OBJECTS and r.object < MAX_OBJECTS for r in lay.relations)
    assert len(rules.plan_layout(" ".join(["a red cube on a blue sphere"] * 50)).objects) == MAX_OBJECTS


def test_extract_json_from_fences_and_prose():
    payload = json.dumps(GOOD)
    assert extract_json(f"Sure! Here is the layout:\n```json\n{payload}\n```\nHope it helps.")["objects"]
    assert extract_json(f"The layout is {payload} as requested.")["relations"]
    lay, repairs = parse_layout_text(f"```\n{payload}\n```")
    assert len(lay.objects) == 2 and repairs == []


def test_repair_moves_slightly_outside_boxes_and_shrinks_overlaps():
    data = {
        "objects": [
            _obj("a", (0.42, 0, 0), (0.2, 0.2, 0.2)),  # 0.02 out along x
            _obj("b", (-0.2, 0, 0), (0.3, 0.3, 0.3)),
            _obj("c", (-0.05, 0, 0), (0.2, 0.2, 0.2)),  # overlaps b
        ]
    }
    with pytest.raises(LayoutError):
        validate_layout(data)
    lay, repairs = repair_layout(data)
    assert any("moved object 0" in r for r in repairs)
    assert any("shrank object" in r and "overlap" in r for r in repairs)
    assert (lay.objects[0].hi <= 0.5 + 1e-6).all()
    # coincident boxes cannot be separated by shrinking: refused, not guessed at
    with pytest.raises(LayoutError, match="overlap"):
        repair_layout({"objects": [_obj("a", (0, 0, 0), (0.3, 0.3, 0.3)), _obj("b", (0, 0, 0), (0.3, 0.3, 0.3))]})


# -- rule-based planner -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rules() -> RuleBasedPlanner:
    return RuleBasedPlanner()


@pytest.mark.parametrize("name", ["single", "surr", "multi"])
def test_every_t3bench_prompt_gives_a_valid_layout(rules, name, t3bench_dir):
    prompts = _prompts(t3bench_dir, name)
    multi = 0
    for p in prompts:
        result = rules.plan(p)
        assert result.source == "rules"
        lay = validate_layout(result.layout)  # round-trips through full validation
        assert len(lay.objects) >= 1, p
        assert lay.relation_violations() == [], p
        multi += len(lay.objects) > 1
    frac = multi / len(prompts)
    # measured: multi 100/100, surr 93/100 (the rest are "... in the sky" / "on a rainy day")
    if name == "multi":
        assert frac >= 0.95, frac
    if name == "surr":
        assert frac >= 0.85, frac


def test_rule_planner_is_deterministic(rules):
    p = "A wine bottle and two empty glasses glisten under a chandelier"
    assert rules.plan_layout(p).to_json() == rules.plan_layout(p).to_json()


def _by_prompt(lay: Layout, word: str):
    hits = [o for o in lay.objects if word in o.prompt]
    assert hits, (word, [o.prompt for o in lay.objects])
    return hits


@pytest.mark.parametrize(
    "text, left, right",
    [
        ("a red cube to the left of a blue sphere", "red cube", "blue sphere"),
        ("a green cone to the right of a yellow torus", "yellow torus", "green cone"),
        ("two red cubes to the left of a blue sphere", "red cube", "blue sphere"),
    ],
)
def test_left_right_order(rules, text, left, right):
    lay = rules.plan_layout(text)
    lefts, rights = _by_prompt(lay, left), _by_prompt(lay, right)
    assert max(o.center[0] for o in lefts) < min(o.center[0] for o in rights)
    assert max(o.hi[0] for o in lefts) <= min(o.lo[0] for o in rights) + 1e-6
    if text.startswith("two"):
        assert len(lefts) == 2


def test_stacking_and_depth(rules):
    lay = rules.plan_layout("a green cone on top of a yellow cube")
    cone, cube = _by_prompt(lay, "cone")[0], _by_prompt(lay, "cube")[0]
    assert abs(cone.lo[1] - cube.hi[1]) < 1e-4
    assert cone.lo[0] < cube.hi[0] and cube.lo[0] < cone.hi[0]
    assert any(r.relation == "on_top_of" for r in lay.relations)
    lay = rules.plan_layout("a purple sphere in front of a cyan cylinder")
    assert _by_prompt(lay, "sphere")[0].center[2] > _by_prompt(lay, "cylinder")[0].center[2]
    lay = rules.plan_layout("a black cube behind a pink cone")
    assert _by_prompt(lay, "cube")[0].center[2] < _by_prompt(lay, "cone")[0].center[2]


def test_counts_surfaces_and_containers(rules):
    lay = rules.plan_layout("A pair of hiking boots on a trail")
    assert len(_by_prompt(lay, "boot")) == 2
    trail = _by_prompt(lay, "trail")[0]
    assert trail.size[1] < 0.2 * trail.size[0]  # a large flat box
    assert len(rules.plan_layout("A pair of glasses on an open notebook").objects) == 2  # glasses: one thing
    lay = rules.plan_layout("A vintage clock hanging on a brick wall")
    wall, clock = _by_prompt(lay, "wall")[0], _by_prompt(lay, "clock")[0]
    assert clock.center[2] > wall.center[2] and wall.size[2] < wall.size[0]
    lay = rules.plan_layout("A red rose in a crystal vase")
    assert any(r.relation == "inside" for r in lay.relations)
    lay = rules.plan_layout("A scientist is examining a specimen under a microscope")
    assert _by_prompt(lay, "microscope")[0].lo[1] >= _by_prompt(lay, "specimen")[0].hi[1] - 1e-6
    assert len(rules.plan_layout("three blue cylinders").objects) == 3
    assert len(rules.plan_layout("?!").objects) == 1  # nothing recognisable: one box
    # "full of" says what "filled with" says, and what follows is said of the container
    for text in ("a box full of toys on a table", "a box filled with toys on a table"):
        lay = rules.plan_layout(text)
        names = [o.name for o in lay.objects]
        box, table = names.index("box"), names.index("table")
        toys = [i for i, n in enumerate(names) if n.startswith("toy")]
        triples = {(r.subject, r.relation, r.object) for r in lay.relations}
        assert len(toys) == 3 and all((t, "inside", box) in triples for t in toys), text
        assert (box, "on_top_of", table) in triples and not any(r.object == table and r.subject in toys for r in lay.relations), text


def test_planners_share_the_interface(rules):
    assert isinstance(rules, LayoutPlanner)
    assert isinstance(OpenAIPlanner("m", base_url="http://127.0.0.1:9/v1"), LayoutPlanner)


# -- seeding ------------------------------------------------------------------------------------

def test_sample_points_inside_boxes_with_minimum_per_object(rules):
    lay = rules.plan_layout("A white seashell on a sandy beach")
    g = torch.Generator().manual_seed(0)
    pts, ids = sample_points_in_layout(lay, 2000, g, min_per_object=100)
    assert pts.shape == (2000, 3) and ids.shape == (2000,) and pts.dtype == torch.float32 and ids.dtype == torch.long
    for k, o in enumerate(lay.objects):
        sel = pts[ids == k]
        assert len(sel) >= 100
        assert (sel >= torch.tensor(o.lo, dtype=torch.float32) - 1e-5).all()
        assert (sel <= torch.tensor(o.hi, dtype=torch.float32) + 1e-5).all()
    biggest = max(range(len(lay.objects)), key=lambda k: lay.objects[k].volume)
    assert (ids == biggest).sum() > 1000  # the biggest box gets most points
    pts2, _ = sample_points_in_layout(lay, 2000, torch.Generator().manual_seed(0), min_per_object=100)
    assert torch.equal(pts, pts2)
    box_pts, _ = sample_points_in_layout(lay, 300, torch.Generator().manual_seed(1), shape="box")
    assert box_pts.shape == (300, 3)
    with pytest.raises(ValueError):
        sample_points_in_layout(lay, 1)


def test_colors_from_prompts(rules):
    from coherendream.vocabulary import COLOR_WORDS, PALETTE

    assert set(PALETTE) <= COLOR_WORDS  # the parser's colour words cover the procedural palette
    lay = rules.plan_layout("a red cube to the left of a blue sphere next to a wooden table")
    cols = colors_from_prompts(lay)
    assert cols.shape == (len(lay.objects), 3)
    by = {o.prompt: cols[k] for k, o in enumerate(lay.objects)}
    assert torch.allclose(by["a red cube"], torch.tensor(PALETTE["red"]))
    assert torch.allclose(by["a blue sphere"], torch.tensor(PALETTE["blue"]))
    assert torch.allclose(by["a wooden table"], torch.tensor([0.5, 0.5, 0.5]))


# -- OpenAI-compatible planner against a stub server ----------------------------------------------

class _Stub:
    """A bounded OpenAI-compatible server on 127.0.0.1 answering /v1/chat/completions from a list."""

    def __init__(self, answers: list[str], lifetime_s: float = 30.0) -> None:
        self.answers = list(answers)
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                stub.requests.append(body)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                content = stub.answers.pop(0) if stub.answers else "no more answers"
                payload = json.dumps({
                    "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body.get("model", "stub"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        # Stops itself even if a test forgets to: the server never outlives lifetime_s.
        self.timer = threading.Timer(lifetime_s, self.server.shutdown)
        self.timer.daemon = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "_Stub":
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _planner(stub: _Stub, **kw) -> OpenAIPlanner:
    return OpenAIPlanner("stub-model", base_url=stub.base_url, api_key="test", timeout=5.0, max_retries=0, **kw)


def test_openai_planner_valid_answer():
    with _Stub([f"Here you go:\n```json\n{json.dumps(GOOD)}\n```"]) as stub:
        res = _planner(stub).plan("a cube to the left of a sphere")
    assert res.source == "llm" and res.attempts == 1 and res.errors == []
    assert [o.name for o in res.layout.objects] == ["cube", "sphere"]
    req = stub.requests[0]
    assert req["model"] == "stub-model" and req["messages"][0]["role"] == "system"
    assert "a cube to the left of a sphere" in req["messages"][-1]["content"]


def test_openai_planner_falls_back_after_malformed_answers():
    bad = ["not json", '{"objects": [{"name": "x", "prompt": "x", "center": [NaN, 0, 0], "size": [1, 1, 1]}]}', "{}"]
    with _Stub(bad) as stub:
        res = _planner(stub, max_attempts=3).plan("a red cube to the left of a blue sphere")
    assert res.source == "fallback" and res.attempts == 3 and len(res.errors) == 3
    assert "no JSON" in res.errors[0] and "NaN" in res.errors[1]
    assert len(res.layout.objects) == 2  # the rule-based layout
    # each retry showed the model its previous answer and the reason
    assert stub.requests[1]["messages"][-1]["role"] == "user" and "invalid" in stub.requests[1]["messages"][-1]["content"]


def test_openai_planner_retries_until_valid():
    with _Stub(["```json\n{\"objects\": 5}\n```", json.dumps(GOOD)]) as stub:
        res = _planner(stub, max_attempts=3).plan("a cube to the left of a sphere")
    assert res.source == "llm" and res.attempts == 2 and len(res.errors) == 1
    assert len(stub.requests) == 2


def test_openai_planner_unreachable_endpoint_falls_back():
    res = OpenAIPlanner("m", base_url="http://127.0.0.1:9/v1", api_key="x", timeout=1.0, max_retries=0, max_attempts=2).plan("a cube")
    assert res.source == "fallback" and all("request failed" in e for e in res.errors)


def test_openai_planner_needs_a_key_for_the_default_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="API key"):
        OpenAIPlanner("gpt-x")


# -- transformers planner with a tiny random model (plumbing only) --------------------------------

def _tiny_chat_model():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"] + sorted(
        set(" ".join(m["content"] for m in build_messages("a red cube")).split())
    )[:400]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )
    return LlamaForCausalLM(cfg).eval(), tok


def test_transformers_planner_garbage_falls_back_to_rules():
    model, tok = _tiny_chat_model()
    planner = TransformersPlanner(model=model, tokenizer=tok, max_new_tokens=12, max_attempts=2)
    res = planner.plan("a green cone on top of a yellow cube")
    assert res.source == "fallback" and res.attempts == 2 and len(res.errors) == 2
    assert len(res.raw_answers) == 2  # the model did generate text; it just is not a layout
    assert len(res.layout.objects) == 2
    with pytest.raises(ValueError):
        TransformersPlanner()


def test_whole_prompt_planner_is_one_central_box():
    from coherendream.generation.layout_rules import WholePromptPlanner

    result = WholePromptPlanner().plan("  two red cubes to the left of a blue cone ")
    assert result.source == "none" and len(result.layout.objects) == 1 and not result.layout.relations
    box = result.layout.objects[0]
    assert box.prompt == "two red cubes to the left of a blue cone" and box.center == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        WholePromptPlanner().plan("  ")


@pytest.mark.parametrize(
    "text, names",
    [
        # "a softly worn out children's book": the adverb and participle were a box of their own
        ("A teddy bear cuddles against a softly worn out children's book", ["teddy bear", "book"]),
        # an adjective before an -ing word modifies the noun after it ...
        ("a cozy reading nook", ["nook"]),
        ("a luxurious sleeping bag on a bed", ["bed", "bag"]),
        # ... where a noun before it is the one doing something
        ("a robot playing guitar", ["robot", "guitar"]),
        ("a cute dragon breathing fire", ["dragon", "fire"]),
        # after a person, any -ing word is what they do
        ("a chef chopping vegetables on a board", ["board", "chef", "vegetable 1", "vegetable 2", "vegetable 3"]),
    ],
)
def test_a_phrase_of_modifiers_alone_is_no_object(rules, text, names):
    assert [o.name for o in rules.plan_layout(text).objects] == names

