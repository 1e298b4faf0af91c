"""TIFA-style evaluation: yes/no questions per prompt, answered by an MLLM on the renders.

Questions (:class:`Question`: ``question``, expected ``answer`` "yes"/"no", ``element``,
``element_type`` in :data:`ELEMENT_TYPES`, ``exact``, ``source``) come from a generator:

* :class:`RuleQuestionGenerator` (offline, deterministic):

  - a **procedural** prompt (``coherendream.vocabulary.parse_caption`` parses it, e.g. "a red
    cube to the left of a blue sphere") gets exact questions: per group its object ("Is there a
    cube?"), colour ("Is the cube red?"; "Is there a red cube?" when both groups share a shape),
    count ("Is there exactly one cube?" / "Are there two cubes?", counting every group of that
    shape) and the relation ("Is the red cube to the left of the blue sphere?"), all expected "yes";
    plus **contrast** questions expected "no" that are exact for these scenes, which hold only the
    caption's objects: a shape absent from the scene, a palette colour no group of that shape has,
    the count plus one, and the opposite relation (left/right, in front/behind, on top of/under;
    none for "next to", which has no exact opposite);
  - **free text** gets questions from the project's word lists (``coherendream.data.negatives``):
    object nouns ("Is there a dog?" / "Are there dogs?"), colour words bound to the next known noun
    within three words ("Is the car red?", else "Is something red?"), numbers before a noun ("Are
    there three apples?") and relation phrases between two known nouns ("Is the cat on top of the
    table?"), all expected "yes" and marked ``exact=False`` (a word list is not a parser); no
    contrast questions, since a "no" is not certain for free text. A prompt where nothing is found
    gets one question about the whole prompt (type ``other``).

* :class:`OpenAIQuestionGenerator` (OpenAI-compatible endpoint via the ``openai`` client,
  ``base_url`` for a local vLLM server) and :class:`TransformersQuestionGenerator` (a local chat
  model) ask for JSON ``{"questions": [{"question", "answer", "element", "element_type"}]}``. The
  answer is untrusted: :func:`parse_llm_questions` rejects non-JSON, a wrong schema, no or more than
  ``max_questions`` questions, empty or over-long text, answers other than yes/no; the request is
  retried with the error fed back up to ``max_attempts`` times, then the rules answer (recorded in
  :class:`QuestionSet` as ``source="fallback"`` with the errors) -- the same pattern as
  ``coherendream.generation.layout_llm``.

Answering: each question is asked of an MLLM on the prompt's V views with the question itself as
the template (:func:`question_scorer`: a :class:`Critic` with ``question_template="{text}"``); the
answer is "yes" when P(yes) >= ``threshold`` (0.5). Scores (:func:`tifa_scores`): per prompt the
accuracy (correct answers / questions), the mean over prompts (TIFA's score), and per element type
the accuracy over all questions of that type (micro average) with its count.

CLI: ``coherendream eval tifa PROMPT_FILE --generations DIR -o DIR``; its options are
:class:`TifaConfig`'s fields, plus ``--critic``/``--adapter``/``--dtype``/``--device`` for the answering critic
(``coherendream eval tifa --help``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coherendream.cameras import OrbitSpec, scorer_orbit
from coherendream.eval.protocol import batch_size_field, check_common, output_field, output_folder, overwrite_field, resolution_field
from coherendream.io import write_json, write_jsonl
from coherendream.llm import OpenAIChat, TransformersChat, ask_until_valid, extract_json

logger = logging.getLogger(__name__)

ELEMENT_TYPES = ("object", "colour", "count", "attribute", "spatial", "other")
_TYPE_ALIASES = {"color": "colour", "colors": "colour", "colours": "colour", "counting": "count", "number": "count",
                 "quantity": "count", "relation": "spatial", "spatial relation": "spatial", "location": "spatial",
                 "objects": "object", "entity": "object", "material": "attribute", "shape": "attribute", "size": "attribute",
                 "attributes": "attribute", "property": "attribute"}
MAX_QUESTION_CHARS = 300
DEFAULT_MAX_QUESTIONS = 12

__all__ = [
    "ELEMENT_TYPES",
    "OpenAIQuestionGenerator",
    "Question",
    "QuestionError",
    "QuestionSet",
    "RuleQuestionGenerator",
    "TransformersQuestionGenerator",
    "answer_questions",
    "parse_llm_questions",
    "question_scorer",
    "rule_questions",
    "run_tifa",
    "tifa_scores",
]


class QuestionError(ValueError):
    """An LLM answer that is not a valid question list; the message says why."""


@dataclass
class Question:
    """One yes/no question about a prompt. ``answer`` is the expected answer, "yes" or "no"."""

    question: str
    answer: str
    element: str
    element_type: str
    exact: bool = True
    source: str = "rules"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class QuestionSet:
    """Questions of one prompt and how they were obtained (``source``: rules | llm | fallback)."""

    prompt: str
    questions: list[Question]
    source: str
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    raw_answers: list[str] = field(default_factory=list)


# =========================================================================== rules


_NUMBER_WORD = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
_WORD_NUMBER = {w: n for n, w in _NUMBER_WORD.items()}
# Exact opposites of the procedural relations (phrase of the opposite); "next to" has none.
_OPPOSITE = {"left_of": "to the right of", "right_of": "to the left of", "in_front_of": "behind",
             "behind": "in front of", "on_top_of": "under"}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _procedural_questions(cap: Any, contrast: bool) -> list[Question]:
    from coherendream.vocabulary import PALETTE, RELATIONS, SHAPES

    groups = list(cap.groups)
    qs: list[Question] = []
    shapes_in = [g.shape for g in groups]
    shared = len(set(shapes_in)) < len(shapes_in)
    # Objects: one question per distinct shape.
    for shape in dict.fromkeys(shapes_in):
        qs.append(Question(f"Is there {_article(shape)} {shape}?", "yes", shape, "object"))
    # Colours: per group; with two groups of one shape "the cube" is ambiguous, so ask existence.
    def colour_question(g, color: str, answer: str) -> Question:
        noun = g.shape if g.count == 1 else SHAPES[g.shape]
        if shared:
            q = f"Is there {_article(color)} {color} {g.shape}?" if g.count == 1 else f"Are there {color} {noun}?"
        else:
            q = f"Is the {noun} {color}?" if g.count == 1 else f"Are the {noun} {color}?"
        return Question(q, answer, f"{color} {noun}", "colour")

    for g in groups:
        qs.append(colour_question(g, g.color, "yes"))
    # Counts: total of each shape over the groups (two groups of one shape add up).
    totals: dict[str, int] = {}
    for g in groups:
        totals[g.shape] = totals.get(g.shape, 0) + g.count
    for shape, n in totals.items():
        q = f"Is there exactly one {shape}?" if n == 1 else f"Are there {_NUMBER_WORD[n]} {SHAPES[shape]}?"
        qs.append(Question(q, "yes", f"{n} {shape}", "count"))
    subj = obj = None
    if cap.relation is not None:
        a, b = groups
        subj = f"the {a.color} {a.shape if a.count == 1 else SHAPES[a.shape]}"
        obj = f"the {b.color} {b.shape if b.count == 1 else SHAPES[b.shape]}"
        verb = "Is" if a.count == 1 else "Are"
        qs.append(Question(f"{verb} {subj} {RELATIONS[cap.relation]} {obj}?", "yes", cap.relation, "spatial"))
    if not contrast:
        return qs
    # Contrast questions, exact because a procedural scene holds only the caption's objects.
    absent = [s for s in SHAPES if s not in totals]
    if absent:
        s = absent[0]
        qs.append(Question(f"Is there {_article(s)} {s}?", "no", s, "object"))
    asked: set[tuple[str, str]] = set()  # (shape, wrong colour) already asked: no duplicate question
    for g in groups:
        taken = {h.color for h in groups if h.shape == g.shape} | {c for s, c in asked if s == g.shape}
        palette = list(PALETTE)
        start = palette.index(g.color) if g.color in palette else 0
        wrong = next((c for c in palette[start + 1:] + palette[:start] if c not in taken), None)
        if wrong is None:
            continue
        asked.add((g.shape, wrong))
        qs.append(colour_question(g, wrong, "no"))
    for shape, n in totals.items():
        qs.append(Question(f"Are there {_NUMBER_WORD[n + 1]} {SHAPES[shape]}?", "no", f"{n + 1} {shape}", "count"))
    if cap.relation in _OPPOSITE:
        verb = "Is" if groups[0].count == 1 else "Are"
        qs.append(Question(f"{verb} {subj} {_OPPOSITE[cap.relation]} {obj}?", "no", f"not {cap.relation}", "spatial"))
    return qs


def _free_text_questions(prompt: str) -> list[Question]:
    """Questions from the rule-based layout planner's reading of a free prompt (the one parser of
    object phrases the toolkit has): per object group, whether it is there, how many, its colour and
    other attributes; per relation, whether it holds. A prompt it finds no object in gets the one
    question whether the views show the prompt."""
    from coherendream.generation.layout_rules import RuleBasedPlanner, noun_and_attributes
    from coherendream.vocabulary import COLOR_WORDS, RELATIONS

    layout = RuleBasedPlanner().plan_layout(prompt)
    whole = " ".join(prompt.lower().split()).rstrip(".")
    # "tree 1", "tree 2" are one group of two trees
    groups: dict[str, dict] = {}
    index_group: list[str | None] = []
    for o in layout.objects:
        name = re.sub(r" \d+$", "", o.name)
        if name.split()[-1] in _FUNCTION_WORDS or len(name.split()[-1]) < 2:
            index_group.append(None)
            continue  # not an object: the planner's box for a word it could not place
        g = groups.setdefault(name, {"count": 0, "prompt": o.prompt})
        g["count"] += 1
        index_group.append(name)
    qs: list[Question] = []
    seen: set[str] = set()

    def add(question: str, element: str, kind: str) -> None:
        if question.lower() not in seen:
            seen.add(question.lower())
            qs.append(Question(question, "yes", element, kind, exact=False))

    if not groups or any(len(o.prompt.split()) > 12 for o in layout.objects):
        # no object phrase found (the planner's one box is the prompt itself): one question about the whole
        return [Question(f'Does this show "{" ".join(prompt.split())}"?', "yes", prompt, "other", exact=False)]
    prompt_words = set(re.findall(r"[a-z]+|\d+", whole))
    for name, g in groups.items():
        noun, attributes = noun_and_attributes(g["prompt"], name.split()[-1])
        many = g["count"] > 1
        the = g["the"] = f"the {_plural(noun)}" if many else f"the {noun}"
        add(f"Are there {_plural(noun)}?" if many else f"Is there {_article(noun)} {noun}?", noun, "object")
        number = _NUMBER_WORD.get(g["count"], str(g["count"]))
        if many and (number in prompt_words or str(g["count"]) in prompt_words):  # a count the prompt states
            add(f"Are there {number} {_plural(noun)}?", f"{g['count']} {noun}", "count")
        for w in attributes:
            add(f"{'Are' if many else 'Is'} {the} {w}?", f"{w} {noun}", "colour" if w in COLOR_WORDS else "attribute")
    phrases = {**RELATIONS, "above": "above", "below": "below", "inside": "in", "with": "with"}
    for r in layout.relations:
        a, b = index_group[r.subject], index_group[r.object]
        if a is None or b is None or a == b:
            continue
        sa, sb = groups[a]["the"], groups[b]["the"]
        if r.relation == "with":  # "a man with a beard": the beard is with (held, worn by) the man
            add(f"{'Do' if groups[b]['count'] > 1 else 'Does'} {sb} have {sa}?", r.relation, "spatial")
        else:
            add(f"{'Are' if groups[a]['count'] > 1 else 'Is'} {sa} {phrases[r.relation]} {sb}?", r.relation, "spatial")
    return qs


# Words that are never an object: a planner box named by one of them is a word it could not place.
_FUNCTION_WORDS = frozenset("a an the of and with one two three four five six seven eight nine ten some in on at to for from by "
                            "above below under over it this that these those his her their its".split())  # fmt: skip


def _plural(name: str) -> str:
    from coherendream.data.negatives import plural

    words = name.split()
    return " ".join([*words[:-1], plural(words[-1])])


def rule_questions(prompt: str, contrast: bool = True, max_questions: int | None = None) -> list[Question]:
    """Rule-based questions of one prompt (module docstring); exact for procedural prompts.

    Args:
        prompt: the text prompt.
        contrast: add the expected-"no" contrast questions (procedural prompts only).
        max_questions: keep at most this many (the "yes" questions come first).
    """
    from coherendream.vocabulary import parse_caption

    text = " ".join(str(prompt).split())
    if not text:
        raise ValueError("empty prompt: no questions can be asked about it")
    cap = parse_caption(text)
    qs = _procedural_questions(cap, contrast) if cap is not None else _free_text_questions(text)
    return qs[:max_questions] if max_questions else qs


class RuleQuestionGenerator:
    """Offline generator: :func:`rule_questions`."""

    def __init__(self, contrast: bool = True, max_questions: int | None = None) -> None:
        self.contrast = contrast
        self.max_questions = max_questions

    def generate(self, prompt: str) -> QuestionSet:
        return QuestionSet(prompt, rule_questions(prompt, self.contrast, self.max_questions), "rules")


# =========================================================================== LLM backends

SYSTEM_PROMPT = """You write yes/no questions that check whether an image matches a text prompt (TIFA style).
Answer with ONE JSON object and nothing else:
{"questions": [{"question": str, "answer": "yes" | "no", "element": str, "element_type": str}]}
Rules:
- One question per fact of the prompt: each object, its colour or other attributes, counts, spatial relations.
- "answer" is the answer that an image exactly matching the prompt gives.
- You may add a few questions whose answer is "no" when the prompt makes the answer certain
  (e.g. a colour the prompt's object does not have).
- element_type is one of: object, colour, count, attribute, spatial, other.
- At most {max_questions} questions; each question is one short sentence ending with "?".

Example. Prompt: two green apples on a wooden table
Answer: {"questions": [{"question": "Are there apples?", "answer": "yes", "element": "apple", "element_type": "object"},
{"question": "Are the apples green?", "answer": "yes", "element": "green apple", "element_type": "colour"},
{"question": "Are there two apples?", "answer": "yes", "element": "2 apple", "element_type": "count"},
{"question": "Are the apples on the table?", "answer": "yes", "element": "on", "element_type": "spatial"},
{"question": "Are the apples red?", "answer": "no", "element": "red apple", "element_type": "colour"}]}"""


def parse_llm_questions(text: str, max_questions: int = DEFAULT_MAX_QUESTIONS) -> list[Question]:
    """Validate an LLM's question list; raises :class:`QuestionError` saying what is wrong.

    Accepted: an object with ``questions`` (or a bare list), 1..``max_questions`` entries, each with
    a non-empty ``question`` of at most 300 characters and ``answer`` "yes"/"no" (any case);
    ``element`` optional (defaults to the question), ``element_type`` mapped to :data:`ELEMENT_TYPES`
    (common synonyms such as "color", "relation" understood; anything else becomes "other").
    Duplicate questions are an error (a model looping on one question).
    """
    data = extract_json(text, QuestionError, key="questions", lists=True)
    if isinstance(data, Mapping):
        if "questions" not in data:
            raise QuestionError(f'the JSON object has no "questions" key (keys: {sorted(data)[:10]})')
        data = data["questions"]
    if not isinstance(data, list):
        raise QuestionError(f'"questions" must be a list, got {type(data).__name__}')
    if not data:
        raise QuestionError("the question list is empty")
    if len(data) > max_questions:
        raise QuestionError(f"{len(data)} questions, more than the maximum {max_questions}")
    out: list[Question] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise QuestionError(f"questions[{i}] must be an object, got {type(item).__name__}")
        q = item.get("question")
        if not isinstance(q, str) or not q.strip():
            raise QuestionError(f"questions[{i}]: question text is missing or empty")
        q = " ".join(q.split())
        if len(q) > MAX_QUESTION_CHARS:
            raise QuestionError(f"questions[{i}]: question is {len(q)} characters, more than {MAX_QUESTION_CHARS}")
        if q.lower() in seen:
            raise QuestionError(f"questions[{i}]: repeats the question {q!r}")
        seen.add(q.lower())
        ans = item.get("answer")
        ans = ans.strip().lower().rstrip(".") if isinstance(ans, str) else ans
        if ans not in ("yes", "no"):
            raise QuestionError(f"questions[{i}]: answer must be \"yes\" or \"no\", got {item.get('answer')!r}")
        etype = str(item.get("element_type") or "other").strip().lower()
        etype = _TYPE_ALIASES.get(etype, etype)
        if etype not in ELEMENT_TYPES:
            etype = "other"
        element = item.get("element")
        element = " ".join(str(element).split()) if element not in (None, "") else q
        out.append(Question(q, ans, element[:MAX_QUESTION_CHARS], etype, exact=False, source="llm"))
    return out


def build_messages(prompt: str, max_questions: int) -> list[dict[str, str]]:
    """System instructions, then the prompt as the user turn."""
    prompt = " ".join(str(prompt).split())
    if not prompt:
        raise ValueError("empty prompt: no questions can be asked about it")
    return [
        {"role": "system", "content": SYSTEM_PROMPT.replace("{max_questions}", str(max_questions))},
        {"role": "user", "content": f"Prompt: {prompt}\nAnswer with the JSON object only."},
    ]


class _RetryingGenerator:
    """Ask, validate, retry with the error fed back, then fall back; subclasses implement ``_complete``."""

    def __init__(self, *, max_questions: int = DEFAULT_MAX_QUESTIONS, max_attempts: int = 2, fallback: Any = None) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if max_questions < 1:
            raise ValueError(f"max_questions must be >= 1, got {max_questions}")
        self.max_questions = max_questions
        self.max_attempts = max_attempts
        self.fallback = fallback if fallback is not None else RuleQuestionGenerator(max_questions=max_questions)

    def _complete(self, messages: list[dict[str, str]]) -> str:
        raise NotImplementedError

    def generate(self, prompt: str) -> QuestionSet:
        asked = ask_until_valid(self._complete, build_messages(prompt, self.max_questions),
                                lambda answer: parse_llm_questions(answer, self.max_questions), QuestionError, self.max_attempts)
        if asked.value is not None:
            return QuestionSet(prompt, asked.value, "llm", asked.attempt, asked.errors, asked.answers)
        logger.warning("question generation for %r fell back to the rules: %s", prompt[:80], asked.errors[-1] if asked.errors else "?")
        result = self.fallback.generate(prompt)
        return QuestionSet(prompt, result.questions, "fallback", self.max_attempts, asked.errors, asked.answers)


class OpenAIQuestionGenerator(_RetryingGenerator):
    """Questions from an OpenAI-compatible chat endpoint (OpenAI, or a local vLLM server via ``base_url``).

    Endpoint arguments are :class:`coherendream.llm.OpenAIChat`'s; ``max_attempts`` counts invalid answers.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, max_retries: int = 2,
                 temperature: float = 0.0, max_tokens: int = 1024, json_mode: bool = False, client: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chat = OpenAIChat(model, base_url=base_url, api_key=api_key, api_key_env=api_key_env, timeout=timeout,
                               max_retries=max_retries, temperature=temperature, max_tokens=max_tokens, json_mode=json_mode, client=client)

    def _complete(self, messages: list[dict[str, str]]) -> str:
        return self.chat(messages)


class TransformersQuestionGenerator(_RetryingGenerator):
    """Questions from a local ``transformers`` chat model, decoded greedily (see :class:`coherendream.llm.TransformersChat`)."""

    def __init__(self, model_name_or_path: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 device: str = "cpu", torch_dtype: Any = "auto", trust_remote_code: bool = False,
                 max_new_tokens: int = 768, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chat = TransformersChat(model_name_or_path, model=model, tokenizer=tokenizer, device=device, torch_dtype=torch_dtype,
                                     trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens)

    def _complete(self, messages: list[dict[str, str]]) -> str:
        return self.chat(messages)


# =========================================================================== answering and scoring


def question_scorer(critic: Any) -> Any:
    """A :class:`Critic` on the same model that asks each question as it is (template ``"{text}"``).

    The model and processor are shared, not copied.
    """
    from coherendream.critic.model import Critic

    scorer = Critic(critic.model, critic.processor, dataclasses.replace(critic.config, question_template="{text}"))
    scorer.source = getattr(critic, "source", None)
    return scorer


def answer_questions(scorer: Any, items: Sequence[Mapping[str, Any]], batch_size: int = 8, threshold: float = 0.5) -> list[dict]:
    """Ask every question of every item; one row per question.

    Args:
        scorer: ``score(views, prompts) -> .prob_yes`` with ``config.num_views``; the "prompt" it is
            given is the question itself (:func:`question_scorer`).
        items: ``{"id", "prompt", "views": V images, "questions": [Question]}``.
        threshold: "yes" when P(yes) >= threshold.

    Returns:
        Rows ``{"id", "prompt", "question", "expected", "element", "element_type", "exact", "source",
        "prob_yes", "predicted", "correct"}``, or with ``"error"``/``"reason"`` for a question that
        could not be scored.
    """
    from coherendream.critic.batch import score_items

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    flat = []
    for item in items:
        for k, q in enumerate(item["questions"]):
            flat.append({"id": f"{item['id']}#q{k}", "views": item["views"], "prompt": q.question,
                         "_item": item["id"], "_prompt": item["prompt"], "_q": q})
    results = score_items(scorer, flat, batch_size=batch_size, progress=False)
    rows = []
    for r in results:
        q: Question = r["_q"]
        row = {"id": r["_item"], "prompt": r["_prompt"], "question": q.question, "expected": q.answer,
               "element": q.element, "element_type": q.element_type, "exact": q.exact, "source": q.source}
        if r.get("error"):
            row.update(reason=r.get("reason"), error=r["error"])
        else:
            p = float(r["prob_yes"])
            predicted = "yes" if p >= threshold else "no"
            row.update(prob_yes=p, predicted=predicted, correct=predicted == q.answer)
        rows.append(row)
    return rows


def tifa_scores(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy per prompt, its mean over prompts (the TIFA score) and per element type.

    Rows without ``correct`` (errors) are left out. Returns ``{"tifa", "prompts": [{"id", "prompt",
    "questions", "correct", "accuracy"}], "by_type": {type: {"questions", "accuracy"}}, "questions",
    "accuracy_yes", "accuracy_no"}`` (``accuracy_no`` over the expected-"no" questions: how well the
    answers reject contrast facts; None when there are none).
    """
    per: dict[str, dict] = {}
    by_type: dict[str, list[bool]] = {}
    by_answer: dict[str, list[bool]] = {"yes": [], "no": []}
    for r in rows:
        if "correct" not in r:
            continue
        p = per.setdefault(r["id"], {"id": r["id"], "prompt": r.get("prompt"), "questions": 0, "correct": 0})
        p["questions"] += 1
        p["correct"] += int(bool(r["correct"]))
        by_type.setdefault(r["element_type"], []).append(bool(r["correct"]))
        by_answer.setdefault(r["expected"], []).append(bool(r["correct"]))
    prompts = []
    for p in per.values():
        prompts.append({**p, "accuracy": p["correct"] / p["questions"]})
    return {
        "tifa": float(np.mean([p["accuracy"] for p in prompts])) if prompts else None,
        "questions": sum(p["questions"] for p in prompts),
        "prompts": prompts,
        "by_type": {t: {"questions": len(v), "accuracy": float(np.mean(v))} for t, v in sorted(by_type.items())},
        "accuracy_yes": float(np.mean(by_answer["yes"])) if by_answer["yes"] else None,
        "accuracy_no": float(np.mean(by_answer["no"])) if by_answer["no"] else None,
    }


@dataclass
class TifaConfig:
    """What ``eval tifa`` asks and where it writes; each field is also a command-line option."""

    prompt_file: Path = field(metadata={"help": "prompts, one a line", "argument": True})
    generations_dir: Path = field(metadata={"help": "existing generations: <dir>/<slug>/ or <dir>/<prompt file stem>/<slug>/ with gaussians.ply or views (an `eval t3bench` output folder works)", "flags": ("--generations",), "deprecated_flags": ("--outputs-dir",)})
    output_dir: Path = output_field("questions.jsonl, answers.jsonl, scores.{json,csv}, summary.json, errors.jsonl, report.html")
    questions: str = field(default="rules", metadata={"help": "question generator: rules, openai (any OpenAI-compatible endpoint) or transformers"})
    llm_model: str | None = field(default=None, metadata={"help": "LLM for openai/transformers question generation"})
    base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible endpoint, e.g. a local vLLM server"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the endpoint's API key"})
    max_questions: int | None = field(default=None, metadata={"help": f"most questions per prompt (default: all the rules make, {DEFAULT_MAX_QUESTIONS} from an LLM)"})
    max_attempts: int = field(default=2, metadata={"help": "LLM answers tried per prompt before the rules take over"})
    threshold: float = field(default=0.5, metadata={"help": "P(yes) at or above which an answer is yes"})
    resolution: int = resolution_field()
    batch_size: int = batch_size_field()
    orbit: OrbitSpec | None = field(default=None, metadata={"cli": False, "help": "cameras for PLYs (default: the scorer's own orbit)"})
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        check_common(self)
        self.prompt_file = Path(self.prompt_file)
        if self.questions not in ("rules", "openai", "transformers"):
            raise ValueError(f"questions must be rules, openai or transformers, got {self.questions!r}")
        if self.questions != "rules" and not self.llm_model:
            raise ValueError(f"questions={self.questions} needs llm_model")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")

    def question_generator(self) -> Any:
        """The generator ``questions`` names, with this config's limits."""
        if self.questions == "rules":
            return RuleQuestionGenerator(max_questions=self.max_questions)
        limits = {"max_questions": self.max_questions or DEFAULT_MAX_QUESTIONS, "max_attempts": self.max_attempts}
        if self.questions == "openai":
            return OpenAIQuestionGenerator(self.llm_model, base_url=self.base_url, api_key_env=self.api_key_env, **limits)
        return TransformersQuestionGenerator(self.llm_model, **limits)


def run_tifa(config: TifaConfig, scorer: Any, generator: Any = None) -> dict[str, Any]:
    """TIFA on existing outputs: questions, answers on the V views, scores, files.

    Args:
        config: the prompts (slugs as in :func:`coherendream.eval.t3bench.prompt_slugs`), where the
            generations are (``<slug>/gaussians.ply`` or views, see ``t3bench.resolve_output``;
            ``<generations_dir>/<file stem>/<slug>`` is tried first), the output folder, the question
            generator and the threshold of a "yes". PLYs are rendered from ``config.orbit``, by
            default the scorer's own orbit (``coherendream.cameras.scorer_orbit``: the cameras its
            critic was trained on); a view folder is used as it is.
        scorer: a question scorer (:func:`question_scorer` of a Critic, or anything alike).
        generator: ``generate(prompt) -> QuestionSet``; default ``config.question_generator()``.
    """
    from coherendream.io import errors_by_reason, write_results
    from coherendream.eval.t3bench import (
        EvalItemError,
        group_images,
        load_asset_views,
        prompt_slugs,
        read_prompts,
        resolve_output,
    )

    prompts, set_name = read_prompts(config.prompt_file)
    generator = generator or config.question_generator()
    generations_dir, threshold, resolution, batch_size = config.generations_dir, config.threshold, config.resolution, config.batch_size
    v = int(scorer.config.num_views)
    cams = dataclasses.replace(config.orbit or scorer_orbit(scorer), random_views=0).cameras(resolution)
    out = output_folder(config, "tifa", getattr(scorer, "source", None)).take()
    t0 = time.perf_counter()
    items, errors, qsets = [], [], []
    for prompt, slug in zip(prompts, prompt_slugs(prompts)):
        qset = generator.generate(prompt)
        qsets.append({"id": slug, "prompt": prompt, "source": qset.source, "attempts": qset.attempts,
                      "errors": qset.errors, "questions": [q.to_dict() for q in qset.questions]})
        try:
            views, rendered = load_asset_views(resolve_output(generations_dir, slug, set_name), cams, resolution)
            if not rendered:
                views = [views[i] for i in group_images(len(views), v)[0]]
        except EvalItemError as err:
            errors.append({"id": slug, "prompt": prompt, "reason": err.reason, "error": str(err)})
            continue
        except ValueError as err:
            errors.append({"id": slug, "prompt": prompt, "reason": "invalid_views", "error": f"{slug}: {err}"})
            continue
        items.append({"id": slug, "prompt": prompt, "views": views, "questions": qset.questions})
    rows = answer_questions(scorer, items, batch_size=batch_size, threshold=threshold) if items else []
    errors += [{"id": r["id"], "prompt": r["prompt"], "question": r["question"], "reason": r["reason"], "error": r["error"]}
               for r in rows if "error" in r]
    scores = tifa_scores(rows)
    write_jsonl(out / "questions.jsonl", qsets)
    write_jsonl(out / "answers.jsonl", rows)
    write_jsonl(out / "errors.jsonl", errors)
    write_results(scores["prompts"], out / "scores", columns=["id", "prompt", "questions", "correct", "accuracy"])
    summary = {"prompts": len(prompts), "scored": len(scores["prompts"]), "errors": len(errors),
               "errors_by_reason": errors_by_reason(errors), "tifa": scores["tifa"],
               "questions": scores["questions"], "by_type": scores["by_type"], "accuracy_yes": scores["accuracy_yes"],
               "accuracy_no": scores["accuracy_no"], "threshold": threshold,
               "question_sources": {s: sum(q["source"] == s for q in qsets) for s in ("rules", "llm", "fallback")},
               "seconds": round(time.perf_counter() - t0, 3)}
    write_json(out / "summary.json", summary)
    _write_report(summary, scores, out / "report.html", config.prompt_file)
    return summary


def _write_report(summary: dict, scores: dict, path: Path, prompt_file: Path) -> None:
    from coherendream.eval.report import Report

    report = Report(f"TIFA-style evaluation: {Path(prompt_file).name}")
    report.add_text(
        "Each prompt becomes yes/no questions about its objects, counts, colours and relations; the model answers each "
        "on the generation's views (yes when P(yes) is at or above the threshold). TIFA: the mean over prompts of the "
        "share of a prompt's questions answered as expected. Accuracy on expected-yes questions: facts the prompt states, "
        "confirmed. Accuracy on expected-no questions: contrast facts (another colour, another count) that should be "
        "denied; a model that says yes to everything scores 1 on the first and 0 on the second."
    )  # fmt: skip
    report.add_table([{k: summary[k] for k in ("prompts", "scored", "errors", "questions", "tifa", "accuracy_yes", "accuracy_no", "threshold")}])
    report.add_heading("By question type")
    report.add_table([{"type": t, **v} for t, v in scores["by_type"].items()])
    report.add_heading("By prompt")
    report.add_table(scores["prompts"], ["id", "prompt", "questions", "correct", "accuracy"])
    report.write(path)
