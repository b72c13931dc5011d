"""The GIFT query span is the user's own words for every family: the chat template's separator after
the image (llava-1.5-hf's newline) is not part of it."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPImageProcessor, LlavaProcessor

from vlm_guard.models import get_adapter
from vlm_guard.testing import offline_tokenizer, tiny_model

# the chat template of llava-hf/llava-1.5-7b-hf: "USER: <image>\n{question} ASSISTANT:"
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CORPUS = ["USER: is there a house in the image ? ASSISTANT: yes", "USER: describe the image\n ASSISTANT: a house"] * 8


def llava_15_processor(kind: str):
    tokenizer = offline_tokenizer(kind, CORPUS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        chat_template=LLAVA_15_TEMPLATE,
        num_additional_image_tokens=0,
    )


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_level_bpe"])
def test_llava_15_query_span_starts_at_the_question(kind):
    processor = llava_15_processor(kind)
    tokenizer = processor.tokenizer
    model = tiny_model("llava")
    model.config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    adapter = get_adapter(model, processor)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a house in the image ?"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<image>\nis there" in text
    ids = torch.tensor([tokenizer(text.replace("<image>", "<image>" * 16), add_special_tokens=False)["input_ids"]])
    spans = adapter.prompt_spans(ids)
    after_image = spans.after_image[0].nonzero().flatten().tolist()
    query = spans.query[0].nonzero().flatten().tolist()
    separator = tokenizer.decode(ids[0, after_image[0] : query[0]].tolist())
    assert separator.strip() == "" and "\n" in separator, "the newline after the image is not the user's words"
    assert tokenizer.decode(ids[0, query].tolist()).strip() == "is there a house in the image ?"
    assert adapter.query_prefix_ids()


def test_templates_without_a_separator_keep_the_whole_span():
    # the shipped default model's template puts a plain space (no token) between the image and the text
    from vlm_guard.defaults import load_default

    model, processor = load_default()
    adapter = get_adapter(model, processor)
    assert adapter.query_prefix_ids() is None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a house ?"}]}]
    from PIL import Image

    inputs = processor(
        images=Image.new("RGB", (64, 64)),
        text=processor.apply_chat_template(messages, add_generation_prompt=True),
        return_tensors="pt",
    )
    spans = adapter.prompt_spans(inputs["input_ids"], inputs["attention_mask"])
    query = spans.query[0].nonzero().flatten().tolist()
    assert processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, query].tolist()) == [
        "is",
        "there",
        "a",
        "house",
        "?",
    ]
