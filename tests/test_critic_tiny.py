"""The tiny offline LLaVA critic: a real checkpoint that Auto classes, chat templates and TRL accept."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from coherendream.critic.tiny import IMAGE_TOKEN, build_tiny_critic, build_tokenizer
from coherendream.vocabulary import NUMBER_WORDS, PALETTE, RELATIONS, SHAPES
from coherendream.prompts import (
    ANSWER_NO,
    ANSWER_YES,
    completion_messages,
    format_question,
    prompt_messages,
)

CAPTION = "two red cubes to the left of a blue sphere"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_critic(tmp_path_factory.mktemp("tiny") / "critic", seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    return model.eval(), processor


def test_saves_safetensors_and_reloads_offline_with_auto_classes(tiny_dir, loaded):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: any hub access would fail
    assert (tiny_dir / "model.safetensors").is_file()
    assert not list(tiny_dir.glob("*.bin"))
    model, processor = loaded
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.chat_template and processor.tokenizer.chat_template

    # A forward pass on the processor's own output: 8x8 patches of 8 px -> 64 image tokens.
    text = processor.apply_chat_template(prompt_messages(format_question(CAPTION, 4)), add_generation_prompt=True)
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    inputs = processor(text=[text], images=[[image]], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights_other_seed_other_weights(tiny_dir, loaded, tmp_path):
    from safetensors.torch import load_file

    again = load_file(build_tiny_critic(tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(build_tiny_critic(tmp_path / "other", seed=1) / "model.safetensors")
    first = load_file(tiny_dir / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_tokenizer_splits_words_and_each_punctuation_mark(loaded):
    tokenizer = loaded[1].tokenizer
    assert tokenizer.tokenize('"a red cube"?') == ['"', "a", "red", "cube", '"', "?"]
    ids = tokenizer('"a red cube"?').input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 7
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == loaded[0].config.image_token_id
    assert tokenizer.tokenize("a dragon") == ["a", tokenizer.unk_token]
    assert tokenizer.decode(tokenizer("a red cube, two cones?").input_ids, skip_special_tokens=True) == "a red cube, two cones?"


def test_default_vocabulary_covers_question_and_procedural_captions(loaded):
    tokenizer = loaded[1].tokenizer
    words = [*PALETTE, *SHAPES, *SHAPES.values(), *NUMBER_WORDS.values(), "a", "an"]
    words += [w for phrase in RELATIONS.values() for w in phrase.split()]
    text = format_question(" ".join(words), 4) + " Yes No yes no"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(tokenizer.tokenize(text))
    assert tokenizer.unk_token_id not in ids


def test_extra_vocabulary_words():
    tokenizer = build_tokenizer(["dragon", "castle"])
    assert tokenizer.unk_token_id not in tokenizer("a dragon castle", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="whitespace"):
        build_tokenizer(["two words"])


@pytest.mark.parametrize("answer", [ANSWER_YES, ANSWER_NO])
def test_chat_template_prompt_is_prefix_and_answer_is_one_token(loaded, answer):
    processor = loaded[1]
    tokenizer = processor.tokenizer
    prompt = prompt_messages(format_question(CAPTION, 4), num_images=1)
    completion = completion_messages(answer)
    head = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(prompt + completion, tokenize=False)
    assert head.startswith(tokenizer.bos_token + "USER: " + IMAGE_TOKEN)
    assert head.endswith("ASSISTANT:")
    assert full.startswith(head)
    assert full[len(head):] == f" {answer}{tokenizer.eos_token}"

    # The template writes BOS itself, so tokenizing without special tokens (as TRL does) gives one BOS.
    head_ids = tokenizer(head, add_special_tokens=False).input_ids
    full_ids = tokenizer(full, add_special_tokens=False).input_ids
    assert head_ids.count(tokenizer.bos_token_id) == 1
    assert full_ids[: len(head_ids)] == head_ids
    assert full_ids[len(head_ids):] == [tokenizer.convert_tokens_to_ids(answer), tokenizer.eos_token_id]
    assert tokenizer.encode(answer, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(answer)]


def test_chat_template_renders_several_images_and_assistant_mask(loaded):
    processor = loaded[1]
    prompt = prompt_messages(format_question(CAPTION, 4), num_images=4)
    text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert text.count(IMAGE_TOKEN) == 4
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    inputs = processor(text=[text], images=[[image] * 4], return_tensors="pt", add_special_tokens=False)
    assert int((inputs["input_ids"] == loaded[0].config.image_token_id).sum()) == 4 * 64
    assert inputs["pixel_values"].shape == (4, 3, 64, 64)

    # {% generation %} marks exactly the assistant answer and its EOS.
    out = processor.tokenizer.apply_chat_template(
        prompt + completion_messages(ANSWER_NO), tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, add_special_tokens=False,
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    marked = [i for i, m in zip(ids, mask) if m]
    assert processor.tokenizer.convert_ids_to_tokens(marked) == [ANSWER_NO, processor.tokenizer.eos_token]


def test_trl_vlm_collator_trains_on_the_answer_only(loaded):
    from PIL import Image
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    model, processor = loaded
    tokenizer = processor.tokenizer
    rows = [
        {"images": [Image.new("RGB", (64, 64), c)],
         "prompt": prompt_messages(format_question(text, 4)), "completion": completion_messages(answer)}
        for c, text, answer in [("red", CAPTION, ANSWER_YES), ("blue", "one cone", ANSWER_NO)]
    ]
    batch = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)(rows)
    for b, answer in enumerate([ANSWER_YES, ANSWER_NO]):
        labels = batch["labels"][b]
        kept = labels[labels != -100].tolist()
        assert kept == [tokenizer.convert_tokens_to_ids(answer), tokenizer.eos_token_id]
        assert int((batch["input_ids"][b] == tokenizer.bos_token_id).sum()) == 1
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0


def test_build_tiny_command_takes_the_model_sizes(tmp_path):
    import json

    from typer.testing import CliRunner

    from coherendream.cli import app

    out = tmp_path / "sized"
    res = CliRunner().invoke(app, ["critic", "build-tiny", str(out), "--image-size", "32", "--patch-size", "4", "--text-hidden", "48",
                                   "--text-layers", "3", "--text-heads", "6", "--vision-hidden", "24", "--vision-layers", "1",
                                   "--vision-feature-layer", "-2", "--initializer-range", "0.1"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["initializer_range"]) == (48, 3, 0.1)
    assert (text["num_attention_heads"], text["num_key_value_heads"], vision["num_attention_heads"]) == (6, 6, 6)
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["patch_size"], vision["image_size"]) == (24, 1, 4, 32)
    assert config["vision_feature_layer"] == -2


@pytest.mark.parametrize(("layers", "feature_layer", "hidden_state"), [(1, None, 1), (2, None, 1), (1, -2, 0)])
def test_image_tokens_come_from_the_chosen_vision_layer(tmp_path, layers, feature_layer, hidden_state):
    """-1 for a one-layer tower, LLaVA's penultimate layer otherwise, or the patch embeddings (hidden state 0)."""
    from transformers import AutoModelForImageTextToText

    path = build_tiny_critic(tmp_path / "t", vision_layers=layers, vision_feature_layer=feature_layer, initializer_range=0.1)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=pixels)
        tokens = tokens.pooler_output if hasattr(tokens, "pooler_output") else tokens
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        expected = model.model.multi_modal_projector(states[hidden_state][:, 1:])  # CLS dropped
    assert torch.allclose(torch.stack(list(tokens)).reshape(expected.shape), expected, atol=1e-6)
    assert not torch.allclose(states[0], states[1])  # the layers differ, so the test tells them apart


def test_vision_feature_layer_zero_is_refused(tmp_path):
    with pytest.raises(ValueError, match="use -2 for the patch embeddings"):
        build_tiny_critic(tmp_path / "zero", vision_layers=1, vision_feature_layer=0)


def test_llava15_7b_shapes_give_its_exact_parameter_count():
    """A random model with LLaVA-1.5-7B's shapes (for GPU benchmarks without a download) costs what it costs."""
    from transformers import LlavaForConditionalGeneration

    from coherendream.critic.tiny import LLAVA15_7B_SHAPES, tiny_critic_config

    config = tiny_critic_config(build_tokenizer(), **LLAVA15_7B_SHAPES)
    with torch.device("meta"):  # shapes only, no memory
        model = LlavaForConditionalGeneration(config)
    # llava-hf/llava-1.5-7b-hf: 7,063,427,072 parameters (CLIP ViT-L/14-336 + 2-layer MLP + Llama-2-7B, 32064 tokens)
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072
    assert config.image_seq_length == 576 and config.vision_feature_layer == -2


def test_shape_arguments_reach_the_saved_model(tmp_path):
    from transformers import AutoModelForImageTextToText

    path = build_tiny_critic(tmp_path / "shaped", text_hidden=32, text_intermediate=80, vision_hidden=48,
                             vision_intermediate=40, vision_heads=6, num_heads=4, vocab_size=500, dtype=torch.bfloat16)
    model = AutoModelForImageTextToText.from_pretrained(path)
    cfg = model.config
    assert (cfg.text_config.intermediate_size, cfg.vision_config.intermediate_size) == (80, 40)
    assert cfg.vision_config.num_attention_heads == 6 and cfg.text_config.num_attention_heads == 4
    assert model.get_input_embeddings().weight.shape[0] == 500  # padded past the word-level vocabulary
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="head counts"):
        build_tiny_critic(tmp_path / "bad", vision_hidden=48, vision_heads=5)
    with pytest.raises(TypeError, match="text_width"):
        build_tiny_critic(tmp_path / "typo", text_width=32)  # a misspelt shape is not silently ignored
