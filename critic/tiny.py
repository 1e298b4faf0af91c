"""A tiny random LLaVA critic built offline, for tests and as the embedded default checkpoint.

It is an ordinary Hugging Face checkpoint (``LlavaForConditionalGeneration`` with a Llama text model
and a CLIP vision tower, a word-level fast tokenizer, a ``CLIPImageProcessor`` and a
``LlavaProcessor`` with a llava-1.5-style chat template), saved with ``save_pretrained`` in
safetensors, so every code path that loads a real critic (``AutoModelForImageTextToText``,
``AutoProcessor``, PEFT, TRL) loads this one the same way, with no network and no downloaded weights.

The tokenizer is word level: every word of the critic's question, of the procedural captions and of
the answers is one token, so ``"Yes"`` / ``"No"`` are single tokens right after the generation
prompt, as the critic's scoring requires.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from coherendream.vocabulary import caption_words
from coherendream.prompts import ANSWER_NO, ANSWER_YES, QUESTION_TEMPLATE

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"
# Order fixes the ids: pad 0, unk 1, bos 2, eos 3, image 4.
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

# Roles of the chat template and punctuation the pre-tokenizer isolates.
_ROLE_WORDS = ("USER", "ASSISTANT", "SYSTEM")
_PUNCTUATION = tuple('.,:;?!"\'()-/')
# Number of views as the question spells it ("shown from 4 views").
_DIGITS = tuple(str(i) for i in range(33))

# llava-1.5 conversation style: "<s>USER: <image>\n<question> ASSISTANT: <answer></s>".
# The template writes the BOS token itself because TRL tokenizes rendered chats with
# add_special_tokens=False (and transformers' apply_chat_template then skips its own BOS too), so
# training and scoring both see exactly one BOS.
# Parts are rendered in their order of appearance (image parts -> "<image>\n", text parts -> text).
# The generation prompt is exactly the start of a rendered assistant turn, so that the rendering
# of prompt + completion starts with the rendering of the prompt with add_generation_prompt=True
# (TRL splits prompt and completion on that prefix). The assistant text sits in generation tags
# so that return_assistant_tokens_mask works.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ render(message['content']) + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + render(message['content']) + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}"
    "{%- generation -%}{{ render(message['content']) + eos_token }}{%- endgeneration -%}"
    "{{ ' ' if not loop.last else '' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def default_vocabulary() -> list[str]:
    """Words (not special tokens) of the tiny tokenizer, in a fixed order, without duplicates.

    Covers the question template, the procedural captions (colours, shapes and plurals, number
    words, relation phrases, articles), the answers in both cases, the chat roles, digits 0-32 and
    punctuation.
    """
    words: list[str] = []
    words += _ROLE_WORDS
    words += _PUNCTUATION
    words += _DIGITS
    words += _split_words(QUESTION_TEMPLATE.replace("{num_views}", " ").replace("{text}", " "))
    words += [ANSWER_YES, ANSWER_NO, ANSWER_YES.lower(), ANSWER_NO.lower(), ANSWER_YES.upper(), ANSWER_NO.upper()]
    grammar = caption_words()
    # "3D" right after the grammar's 8 function words: the order fixes the token ids, and with it
    # the random start that the embedded critic's recipe reproduces.
    words += grammar[:8] + ["3D"] + grammar[8:]
    return list(dict.fromkeys(words))


def _split_words(text: str) -> list[str]:
    """Whitespace-and-punctuation split, the same rule as the tokenizer's pre-tokenizer."""
    out: list[str] = []
    for chunk in text.split():
        word = ""
        for ch in chunk:
            if ch in _PUNCTUATION:
                if word:
                    out.append(word)
                    word = ""
                out.append(ch)
            else:
                word += ch
        if word:
            out.append(word)
    return out


def build_tokenizer(vocab_words: Iterable[str] | None = None):
    """Word-level ``PreTrainedTokenizerFast`` with bos/eos/unk/pad and ``<image>`` as special tokens.

    ``vocab_words`` are added to :func:`default_vocabulary`. The tokenizer prepends ``<s>`` (like
    Llama's) and splits on whitespace and on every punctuation mark, so ``'"a red cube"?'`` becomes
    ``" a red cube " ?``. Unknown words map to ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = default_vocabulary() + [w for w in (vocab_words or ()) if w]
    words = [w for w in dict.fromkeys(words) if w not in SPECIAL_TOKENS]
    bad = [w for w in words if any(ch.isspace() for ch in w)]
    if bad:
        raise ValueError(f"tiny tokenizer: vocabulary words must not contain whitespace: {bad[:5]}")
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    # Words back to text: join with spaces, then glue punctuation to its word ("cube ?" -> "cube?").
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
    return tokenizer


# LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px, 576 image tokens; Llama-2-7B; 32064-token vocabulary)
# for build_tiny_critic(**LLAVA15_7B_SHAPES): a random model that costs what the real one costs per step.
LLAVA15_7B_SHAPES = dict(
    image_size=336, patch_size=14,
    vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
    text_hidden=4096, text_layers=32, num_heads=32, text_intermediate=11008, vocab_size=32064,
)


def tiny_critic_config(
    tokenizer,
    image_size: int = 64,
    text_hidden: int = 64,
    text_layers: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    patch_size: int = 8,
    num_heads: int = 4,
    initializer_range: float = 0.02,
    text_intermediate: int | None = None,
    vision_intermediate: int | None = None,
    vision_heads: int | None = None,
    vocab_size: int | None = None,
    vision_feature_layer: int | None = None,
):
    """The ``LlavaConfig`` of a random critic: Llama text model + CLIP vision tower + LLaVA projector.

    Images are ``image_size`` pixels square, cut into ``(image_size // patch_size) ** 2`` patches,
    each one image token in the text (the CLS token is dropped: ``vision_feature_select_strategy=
    "default"``). ``initializer_range`` is the std of the random weights: larger values give a less
    uniform random critic (useful in tests where outputs should depend visibly on the input).
    ``num_heads`` is the text model's head count and, unless ``vision_heads`` is given, the vision
    tower's. The MLP widths default to twice the hidden sizes; ``vocab_size`` pads the embedding
    and LM head past the word-level tokenizer's few hundred words. The defaults make a tiny model;
    :data:`LLAVA15_7B_SHAPES` makes one as large as LLaVA-1.5-7B. ``vision_feature_layer`` picks
    the vision tower's hidden state that becomes the image tokens: by default LLaVA's penultimate
    one, -2, or the last, -1, for a one-layer tower; with one layer, -2 is the patch embeddings
    themselves (``vision_layers + 1`` hidden states, the first being the embeddings).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    vision_heads = vision_heads or num_heads
    if text_hidden % num_heads or vision_hidden % vision_heads:
        raise ValueError(
            f"hidden sizes {text_hidden}, {vision_hidden} must be multiples of their head counts {num_heads}, {vision_heads}"
        )
    if vision_feature_layer == 0:
        # transformers 5 reads the layer index as its output_hidden_states flag, and 0 is falsy
        raise ValueError(f"vision_feature_layer 0 is not captured by transformers; use -{vision_layers + 1} for the patch embeddings")
    num_image_tokens = (image_size // patch_size) ** 2
    text_config = LlamaConfig(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max(512, 4 * num_image_tokens),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=initializer_range,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 2 * vision_hidden,
        projection_dim=vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=initializer_range,
    )
    return LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer if vision_feature_layer is not None else (-1 if vision_layers == 1 else -2),
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_critic(
    save_dir: str | Path,
    vocab_words: Iterable[str] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **shape: Any,
) -> Path:
    """Build a random LLaVA critic and save it to ``save_dir``; returns the directory.

    ``shape`` holds the keyword arguments of :func:`tiny_critic_config` (``image_size``,
    ``patch_size``, ``text_hidden``, ``text_layers``, ``vision_hidden``, ``vision_layers``,
    ``num_heads``, ``initializer_range``, ...); the defaults give a tiny model, and
    ``build_tiny_critic(dir, **LLAVA15_7B_SHAPES, dtype=torch.bfloat16)`` one with LLaVA-1.5-7B's
    shapes, for speed and memory benchmarks with no weights to download. The weights are saved in
    ``dtype``. The directory loads offline with ``AutoModelForImageTextToText.from_pretrained`` and
    ``AutoProcessor.from_pretrained``.
    """
    import importlib.util

    from transformers import AutoModelForImageTextToText, LlavaProcessor

    # Without torchvision, transformers falls back to the PIL processor anyway, with a warning on
    # import; both save the same processor_config.json.
    if importlib.util.find_spec("torchvision"):
        from transformers import CLIPImageProcessor
    else:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor

    tokenizer = build_tokenizer(vocab_words)
    config = tiny_critic_config(tokenizer, **shape)
    image_size = config.vision_config.image_size
    patch_size = config.vision_config.patch_size
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    # A fixed seed makes the random weights, and so every score of the tiny critic, reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # built in the target dtype: a 7B-shaped model would need 28 GB in float32 first
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.eval()

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(save_dir, safe_serialization=True)
    processor.save_pretrained(save_dir)
    return save_dir
