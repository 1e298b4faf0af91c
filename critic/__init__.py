"""Multimodal-LLM critic of text-to-3D alignment: scoring (``model``) and tiny offline checkpoints (``tiny``)."""

from coherendream.critic.model import (
    CRITIC_CONFIG_NAME,
    DEFAULT_BASE_MODEL,
    Critic,
    CriticConfig,
    CriticOutput,
    resolve_answer_token_ids,
)
from coherendream.critic.tiny import build_tiny_critic, build_tokenizer, default_vocabulary

__all__ = [
    "CRITIC_CONFIG_NAME",
    "DEFAULT_BASE_MODEL",
    "Critic",
    "CriticConfig",
    "CriticOutput",
    "build_tiny_critic",
    "build_tokenizer",
    "default_vocabulary",
    "resolve_answer_token_ids",
]
