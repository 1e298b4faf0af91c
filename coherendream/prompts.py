"""The critic's question and its chat-message form, shared by dataset building and scoring.

Rows of the dataset and the critic's scoring must ask exactly the same question, so both take it
from here. Messages follow TRL's conversational prompt-completion format for vision-language
models: ``content`` is a list of ``{"type": "image"}`` and ``{"type": "text", "text": ...}`` parts,
one image part per image in the row's ``images`` column.
"""

from __future__ import annotations

QUESTION_TEMPLATE = 'Does this 3D object, shown from {num_views} views, match the description "{text}"? Please answer yes or no.'
# The auxiliary description task (``CriticTrainConfig.caption_rows``): LLaVA's feature-alignment
# task, "describe the image" answered by its caption, asked about the same views.
DESCRIBE_TEMPLATE = "Describe this 3D object, shown from {num_views} views, in one sentence."
ANSWER_YES = "Yes"
ANSWER_NO = "No"


def format_question(text: str, num_views: int, template: str = QUESTION_TEMPLATE) -> str:
    """Fill the question template; ``text`` is stripped and must not be empty."""
    text = " ".join(str(text).split())
    if not text:
        raise ValueError("empty prompt: the description to check must contain text")
    return template.format(num_views=num_views, text=text)


def format_describe(num_views: int, template: str = DESCRIBE_TEMPLATE) -> str:
    """The description question about ``num_views`` views."""
    return template.format(num_views=num_views)


def prompt_messages(question: str, num_images: int = 1) -> list[dict]:
    """User turn with ``num_images`` image placeholders followed by the question."""
    content = [{"type": "image", "text": None} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def completion_messages(answer: str) -> list[dict]:
    """Assistant turn holding the answer (``"Yes"`` or ``"No"``, or a caption)."""
    return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
