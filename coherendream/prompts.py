"""The critic's question and its chat-message form, shared by dataset building and scoring.

Rows of the dataset and the critic's scoring must ask exactly the same question, so both take it
from here. Messages follow TRL's conversational prompt-completion format for vision-language
models: ``content`` is a list of ``{"type": "image"}`` and ``{"type": "text", "text": ...}`` parts,
one image part per image in the row's ``images`` column.

By default the images come before the question, as in LLaVA-1.5's prompts. A question template
may place them elsewhere with the marker :data:`IMAGE_MARKER` (``"<image>"``, where a LLaVA user
writes it in a raw prompt): ``'Description: "{text}"\n<image>Does it match?'`` puts the
description first, so that in a causal model the image tokens can attend to it.
"""

from __future__ import annotations

QUESTION_TEMPLATE = 'Does this 3D object, shown from {num_views} views, match the description "{text}"? Please answer yes or no.'
# The auxiliary description task (``CriticTrainConfig.caption_rows``): LLaVA's feature-alignment
# task, "describe the image" answered by its caption, asked about the same views.
DESCRIBE_TEMPLATE = "Describe this 3D object, shown from {num_views} views, in one sentence."
IMAGE_MARKER = "<image>"
ANSWER_YES = "Yes"
ANSWER_NO = "No"


def check_question_template(template: str, name: str = "question_template") -> None:
    """Raise ``ValueError`` unless ``template`` has ``{text}`` and at most one image marker."""
    if "{text}" not in template:
        raise ValueError(f"{name} must contain '{{text}}', got {template!r}")
    if template.count(IMAGE_MARKER) > 1:
        raise ValueError(f"{name} may place the images ({IMAGE_MARKER!r}) once, got {template!r}")


def format_question(text: str, num_views: int, template: str = QUESTION_TEMPLATE) -> str:
    """Fill the question template; ``text`` is stripped and must not be empty."""
    text = " ".join(str(text).split())
    if not text:
        raise ValueError("empty prompt: the description to check must contain text")
    if IMAGE_MARKER in text:
        # it would become an image placeholder (here and in LLaVA's processor alike)
        raise ValueError(f"prompt {text!r} contains the image marker {IMAGE_MARKER!r}")
    return template.format(num_views=num_views, text=text)


def format_describe(num_views: int, template: str = DESCRIBE_TEMPLATE) -> str:
    """The description question about ``num_views`` views."""
    return template.format(num_views=num_views)


def prompt_messages(question: str, num_images: int = 1) -> list[dict]:
    """User turn with ``num_images`` image placeholders and the question: the images where the
    question has :data:`IMAGE_MARKER` (at most once), else before it."""
    before, marker, after = question.partition(IMAGE_MARKER)
    if IMAGE_MARKER in after:
        raise ValueError(f"question {question!r}: the image marker {IMAGE_MARKER!r} may appear once")
    if not marker:
        before, after = "", question
    content = [{"type": "text", "text": before}] if before else []
    content += [{"type": "image", "text": None} for _ in range(num_images)]
    if after:
        content.append({"type": "text", "text": after})
    return [{"role": "user", "content": content}]


def completion_messages(answer: str) -> list[dict]:
    """Assistant turn holding the answer (``"Yes"`` or ``"No"``, or a caption)."""
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def unreadable_text(tokenizer: object, text: str, max_tokens: int | None, model: str) -> str | None:
    """What of ``text`` ``model`` cannot read, as one sentence, or None: the words its tokenizer
    maps to the unknown token (a word-level vocabulary such as the embedded models' knows only
    its training words) and a length past ``max_tokens`` (the rest is cut off or out of range).

    The tokenizer's own "indexing errors" warning for long texts is silenced: this says it instead.
    """
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = encoded["input_ids"], encoded["offset_mapping"]
    problems = []
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        words = list(dict.fromkeys(text[a:b] or "?" for i, (a, b) in zip(ids, spans) if i == unk))
        if words:
            shown = ", ".join(repr(w) for w in words[:8]) + (f" and {len(words) - 8} more" if len(words) > 8 else "")
            problems.append(f"words outside its vocabulary ({shown})")
    if max_tokens is not None and len(ids) > max_tokens:
        problems.append(f"{len(ids)} tokens, more than the {max_tokens} it reads")
    if not problems:
        return None
    return f"{model} cannot read all of this text: {'; '.join(problems)}"
