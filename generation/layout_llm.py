"""LLM layout planners: a local ``transformers`` chat model and an OpenAI-compatible endpoint.

Both ask for the layout JSON of ``coherendream.generation.layout`` with the same system prompt (schema,
frame, rules and a worked example), treat the answer as untrusted input (:func:`parse_layout_text`),
retry with the validation error fed back up to ``max_attempts`` times, and then fall back to the
rule-based planner, recording why in the :class:`LayoutResult`.
"""

from __future__ import annotations

import json
from typing import Any

from coherendream.generation.layout import (
    DEFAULT_MAX_OVERLAP,
    MAX_OBJECTS,
    LayoutError,
    LayoutPlanner,
    LayoutResult,
    parse_layout_text,
)
from coherendream.generation.layout_rules import RuleBasedPlanner

from coherendream.llm import OpenAIChat, TransformersChat, ask_until_valid
from coherendream.vocabulary import RELATION_KEYS

_EXAMPLE_PROMPT = "a red cube to the left of a blue sphere on a wooden table"
_EXAMPLE_LAYOUT = {
    "objects": [
        {"name": "table", "prompt": "a wooden table", "center": [0.0, -0.3, 0.0], "size": [0.9, 0.3, 0.6]},
        {"name": "cube", "prompt": "a red cube", "center": [-0.2, -0.0, 0.0], "size": [0.3, 0.3, 0.3]},
        {"name": "sphere", "prompt": "a blue sphere", "center": [0.2, -0.0, 0.0], "size": [0.3, 0.3, 0.3]},
    ],
    "relations": [
        {"subject": 1, "relation": "left_of", "object": 2},
        {"subject": 1, "relation": "on_top_of", "object": 0},
        {"subject": 2, "relation": "on_top_of", "object": 0},
    ],
}

SYSTEM_PROMPT = f"""You plan 3D scene layouts for a text-to-3D generator.
Given a description, answer with ONE JSON object and nothing else:
{{"objects": [{{"name": str, "prompt": str, "center": [x, y, z], "size": [w, h, d]}}],
 "relations": [{{"subject": int, "relation": str, "object": int}}]}}

Frame: +Y is up, +Z points towards the viewer in front, +X is to the viewer's right. The whole scene
fits in the cube [-0.5, 0.5] on every axis: for every object, center - size/2 >= -0.5 and
center + size/2 <= 0.5. Sizes are full extents and must be > 0.
Rules:
- One object per physical thing; several identical things ("two cups") are separate objects.
- At most {MAX_OBJECTS} objects. "prompt" describes that object alone with its colour and material.
- Boxes must not overlap, except an object inside another or attached to it; stacked objects touch:
  "A on top of B" means A's bottom y equals B's top y.
- "A to the left of B" means A's x < B's x; "A in front of B" means A's z > B's z.
- Surfaces such as tables, floors and beaches are wide, flat boxes under the objects on them.
- "subject" and "object" are 0-based indices into "objects".
- relation is one of: {", ".join(RELATION_KEYS)}.

Example. Description: {_EXAMPLE_PROMPT}
Answer: {json.dumps(_EXAMPLE_LAYOUT)}"""


def build_messages(prompt: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The chat for one description: system instructions, then the description as the user turn."""
    prompt = " ".join(str(prompt).split())
    if not prompt:
        raise ValueError("empty prompt: the scene description must contain text")
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": f"Description: {prompt}\nAnswer with the JSON object only."},
    ]


class _RetryingPlanner:
    """Shared retry/fallback loop; subclasses implement :meth:`_complete`."""

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        fallback: LayoutPlanner | None = None,
        repair: bool = True,
        max_overlap: float = DEFAULT_MAX_OVERLAP,
        system_prompt: str = SYSTEM_PROMPT,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self.fallback = fallback if fallback is not None else RuleBasedPlanner()
        self.repair = repair
        self.max_overlap = max_overlap
        self.system_prompt = system_prompt

    def _complete(self, messages: list[dict[str, str]]) -> str:
        raise NotImplementedError

    def plan(self, prompt: str) -> LayoutResult:
        asked = ask_until_valid(self._complete, build_messages(prompt, self.system_prompt),
                                lambda answer: parse_layout_text(answer, repair=self.repair, max_overlap=self.max_overlap),
                                LayoutError, self.max_attempts)
        if asked.value is not None:
            layout, repairs = asked.value
            return LayoutResult(layout=layout, source="llm", attempts=asked.attempt, errors=asked.errors, repairs=repairs,
                                raw_answers=asked.answers)
        result = self.fallback.plan(prompt)
        return LayoutResult(
            layout=result.layout, source="fallback", attempts=self.max_attempts, errors=asked.errors,
            repairs=result.repairs, raw_answers=asked.answers,
        )


class OpenAIPlanner(_RetryingPlanner):
    """Layouts from an OpenAI-compatible chat endpoint (OpenAI, or a local vLLM server via ``base_url``).

    Endpoint arguments are :class:`coherendream.llm.OpenAIChat`'s; ``max_attempts`` counts answers
    that fail validation.
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 2, temperature: float = 0.0, max_tokens: int = 1024,
                 json_mode: bool = False, client: Any = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.chat = OpenAIChat(model, base_url=base_url, api_key=api_key, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                               temperature=temperature, max_tokens=max_tokens, json_mode=json_mode, client=client)  # fmt: skip

    def _complete(self, messages: list[dict[str, str]]) -> str:
        return self.chat(messages)


class TransformersPlanner(_RetryingPlanner):
    """Layouts from a local ``transformers`` chat model, decoded greedily (see :class:`coherendream.llm.TransformersChat`)."""

    def __init__(self, model_name_or_path: str | None = None, *, model: Any = None, tokenizer: Any = None, device: str = "cpu",
                 torch_dtype: Any = "auto", trust_remote_code: bool = False, max_new_tokens: int = 768, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.chat = TransformersChat(model_name_or_path, model=model, tokenizer=tokenizer, device=device, torch_dtype=torch_dtype,
                                     trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens)  # fmt: skip

    def _complete(self, messages: list[dict[str, str]]) -> str:
        return self.chat(messages)
