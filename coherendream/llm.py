"""Chat completions from an LLM, two backends behind one call: ``chat(messages) -> text``.

Used wherever the toolkit asks an LLM for something it then validates (layouts, TIFA questions):

* :class:`OpenAIChat` -- any OpenAI-compatible endpoint (OpenAI, or a local vLLM server through
  ``base_url``), with the ``openai`` client;
* :class:`TransformersChat` -- a local ``transformers`` chat model, decoded greedily.

Both return the raw answer text. :func:`ask_until_valid` is the loop the callers share: parse the
answer with the caller's validator and, when it is invalid, ask again with the answer and the
reason shown; :func:`extract_json` finds the JSON in an answer, bounded and with only finite
numbers. What the parsed value is, and the rule-based fallback when every attempt fails, belong to
the caller, since LLM output is untrusted input.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

MAX_ANSWER_CHARS = 100_000  # json.loads never sees megabytes of untrusted text
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n?(.*?)```", re.S)
_MAX_BRACE_STARTS = 32  # decodes tried in prose around the JSON, so many braces cost little


class LLMError(ValueError):
    """The endpoint or model gave no usable answer (no choices, no text, no chat template)."""


def extract_json(text: str, error: type[Exception] = ValueError, key: str | None = None, lists: bool = False) -> Any:
    """The JSON object in an LLM answer: bare, in a ```json fence, or wrapped in prose.

    Args:
        text: the answer; longer than :data:`MAX_ANSWER_CHARS` is refused before any parsing.
        error: the exception raised (the caller's own, e.g. ``LayoutError``), with a message that
            says what was wrong: empty, too long, not valid JSON, NaN/Infinity or a non-finite
            number, nested too deeply, no JSON object.
        key: in prose, only an object holding this key is taken (the first few ``{`` are tried).
        lists: a bare (or fenced) JSON list is accepted too.
    """

    def reject_constant(name: str) -> float:
        raise error(f"the JSON contains {name}; only finite numbers are allowed")

    def finite_float(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):  # "1e999" parses to inf
            raise error(f"the JSON number {number[:30]} is not finite")
        return value

    if not isinstance(text, str):
        raise error(f"expected the answer as text, got {type(text).__name__}")
    if len(text) > MAX_ANSWER_CHARS:
        raise error(f"answer is {len(text)} characters long, more than the {MAX_ANSWER_CHARS} allowed")
    stripped = text.strip()
    if not stripped:
        raise error("answer is empty")
    decoder = json.JSONDecoder(parse_constant=reject_constant, parse_float=finite_float)
    first_error: Exception | None = None
    for candidate in [m.strip() for m in _FENCE.findall(stripped)] + [stripped]:
        if candidate.startswith("{") or (lists and candidate.startswith("[")):
            try:
                value = decoder.decode(candidate)
            except error as err:
                first_error = first_error or err
                continue
            except RecursionError:
                raise error("the JSON is nested too deeply") from None
            except ValueError as err:  # JSONDecodeError, or an integer with too many digits
                first_error = first_error or error(f"not valid JSON: {err}")
                continue
            if isinstance(value, dict) or (lists and isinstance(value, list)):
                return value
    for n, match in enumerate(re.finditer(r"\{", stripped)):
        if n >= _MAX_BRACE_STARTS:
            break
        try:
            value, _ = decoder.raw_decode(stripped, match.start())
        except error as err:
            first_error = first_error or err
            continue
        except RecursionError:
            raise error("the JSON is nested too deeply") from None
        except ValueError:
            continue
        if isinstance(value, dict) and (key is None or key in value):
            return value
    if first_error is not None:
        raise first_error
    raise error(f"no JSON object found in the answer (starts with {stripped[:60]!r})")


class Attempts(NamedTuple):
    """What :func:`ask_until_valid` got: ``value`` (None when no attempt was valid), the number of
    the attempt that gave it (``max_attempts`` when none did), one error line per failed attempt,
    and every raw answer received."""

    value: Any
    attempt: int
    errors: list[str]
    answers: list[str]


def feedback_turns(answer: str, error: str) -> list[dict[str, str]]:
    """Turns that show the model its invalid answer and why, so a greedy retry does not repeat it."""
    return [
        {"role": "assistant", "content": answer[:4000]},
        {"role": "user", "content": f"That answer is invalid: {error[:1000]}\nAnswer again with a corrected JSON object only."},
    ]


def ask_until_valid(
    complete: Callable[[list[dict[str, str]]], str],
    messages: list[dict[str, str]],
    parse: Callable[[str], Any],
    invalid: type[Exception] | tuple[type[Exception], ...],
    max_attempts: int,
) -> Attempts:
    """Ask up to ``max_attempts`` times until ``parse(answer)`` succeeds.

    A request that raises is a failed attempt (the run goes on); an answer for which ``parse``
    raises ``invalid`` is a failed attempt whose answer and error are shown to the model before the
    next one (:func:`feedback_turns`).
    """
    errors: list[str] = []
    answers: list[str] = []
    for attempt in range(1, max_attempts + 1):
        try:
            answer = complete(messages)
        except Exception as e:  # noqa: BLE001 -- a failed request is one failed attempt, not a crash of the run
            errors.append(f"attempt {attempt}: request failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        answers.append(answer)
        try:
            value = parse(answer)
        except invalid as e:
            errors.append(f"attempt {attempt}: {e}")
            messages = messages + feedback_turns(answer, str(e))
            continue
        return Attempts(value, attempt, errors, answers)
    return Attempts(None, max_attempts, errors, answers)


class OpenAIChat:
    """An OpenAI-compatible chat endpoint.

    ``api_key`` defaults to the environment variable ``api_key_env``; a server on a custom
    ``base_url`` that needs no key (vLLM without ``--api-key``) gets the placeholder ``"EMPTY"``.
    ``timeout`` and ``max_retries`` are the HTTP client's (network errors, 429/5xx).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 2,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        json_mode: bool = False,
        client: Any = None,
    ) -> None:
        if not model:
            raise ValueError("model must name the served model (e.g. the name vLLM was started with)")
        self.model, self.temperature, self.max_tokens, self.json_mode = model, temperature, max_tokens, json_mode
        if client is None:
            from openai import (
                OpenAI,  # imported here so that offline paths never need it
            )

            key = api_key or os.environ.get(api_key_env)
            if not key:
                if base_url is None:
                    raise ValueError(f"no API key: pass api_key or set ${api_key_env} (or point base_url at a local server)")
                key = "EMPTY"
            client = OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)
        self.client = client

    def __call__(self, messages: list[dict[str, str]]) -> str:
        extra = {"response_format": {"type": "json_object"}} if self.json_mode else {}
        resp = self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens, **extra
        )
        if not resp.choices:
            raise LLMError("the endpoint returned no choices")
        content = resp.choices[0].message.content
        if not isinstance(content, str):
            raise LLMError("the endpoint returned no text content")
        return content


class TransformersChat:
    """A local ``transformers`` chat model, decoded greedily.

    Pass ``model_name_or_path`` (loaded on first use with ``AutoModelForCausalLM`` /
    ``AutoTokenizer``; ``trust_remote_code`` stays off unless asked for), or a ready ``model`` and
    ``tokenizer``. The tokenizer must have a chat template; templates without a system role get the
    system prompt folded into the first user turn.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        device: str = "cpu",
        torch_dtype: Any = "auto",
        trust_remote_code: bool = False,
        max_new_tokens: int = 768,
    ) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither (and a model_name_or_path)")
        if model is None and not model_name_or_path:
            raise ValueError("pass model_name_or_path or a model and tokenizer")
        self.model_name_or_path = model_name_or_path
        self.model, self.tokenizer = model, tokenizer
        self.device, self.torch_dtype, self.trust_remote_code = device, torch_dtype, trust_remote_code
        self.max_new_tokens = max_new_tokens

    def _load(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path, trust_remote_code=self.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_name_or_path, dtype=self.torch_dtype, trust_remote_code=self.trust_remote_code
        ).to(self.device)
        self.model.eval()

    def _encode(self, messages: list[dict[str, str]]) -> Any:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise LLMError(
                f"tokenizer of {self.model_name_or_path or type(self.model).__name__} has no chat template; "
                "use an instruction-tuned model or set tokenizer.chat_template"
            )
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        except Exception:  # noqa: BLE001 - some templates (e.g. Gemma's) refuse a system turn
            system, rest = messages[0]["content"], messages[1:]
            folded = [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
            return tok.apply_chat_template(folded, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def __call__(self, messages: list[dict[str, str]]) -> str:
        import torch

        self._load()
        enc = self._encode(messages)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
