"""Real processors of every supported family, sized for the tiny models of vlm_guard.testing (same token ids, same
number of image tokens per 32x32 image), built offline from a word-level tokenizer. Plus a tiny SmolVLM model (the
SmolVLM processor has its own batching rules). Used by the eval batching tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlm_guard.testing import BOS, FAKE, IMAGE, PAD, VISION_END, VISION_START, VOCAB, tiny_model

EOS = 2
WORDS = ["describe", "the", "image", "is", "there", "a", "dog", "?", "User:", "Assistant:"]
IMAGE_STRINGS = {
    "llava": "<image>",
    "llava_next": "<image>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}


def _tokenizer(special: dict[str, int], fast_class=PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    token_of = {index: f"w{index}" for index in range(VOCAB)}  # id -> token; fillers where nothing is named
    token_of.update({index: word for index, word in enumerate(WORDS, start=10)})
    token_of.update(
        {index: token for token, index in {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, **special}.items()}
    )
    vocab = {token: index for index, token in token_of.items()}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return fast_class(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(special),
        padding_side="left",
    )


def _chat_template(family: str) -> str:
    return (
        "{% for m in messages %}User: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        + IMAGE_STRINGS[family]
        + " {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} Assistant:{% endif %}"
    )


def tiny_processor(family: str):
    """The processor of ``family`` (or ``"smolvlm"``) for the tiny model of :func:`tiny_family_model`."""
    import transformers

    template = _chat_template(family)
    if family == "llava":
        return transformers.LlavaProcessor(
            image_processor=transformers.CLIPImageProcessor(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            ),
            tokenizer=_tokenizer({"<image>": IMAGE}),
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if family == "llava_next":
        return transformers.LlavaNextProcessor(
            image_processor=transformers.LlavaNextImageProcessor(
                size={"shortest_edge": 32},
                crop_size={"height": 32, "width": 32},
                image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
            ),
            tokenizer=_tokenizer({"<image>": IMAGE}),
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        special = {
            "<|image_pad|>": IMAGE,
            "<|vision_start|>": VISION_START,
            "<|vision_end|>": VISION_END,
            "<|video_pad|>": 104,
        }
        image_processor = transformers.Qwen2VLImageProcessor(
            min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2, temporal_patch_size=1
        )
        processor_class = transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
        return processor_class(
            image_processor=image_processor,
            tokenizer=_tokenizer(special, transformers.Qwen2TokenizerFast),
            video_processor=transformers.Qwen2VLVideoProcessor(),
            chat_template=template,
        )
    if family in ("idefics3", "smolvlm"):
        special = {"<image>": IMAGE, "<fake_token_around_image>": FAKE, "<global-img>": 105, "<end_of_utterance>": 106}
        special.update({f"<row_{r}_col_{c}>": 106 + 6 * (r - 1) + c for r in range(1, 4) for c in range(1, 4)})
        sizes = {"size": {"longest_edge": 32}, "max_image_size": {"longest_edge": 32}}
        if family == "idefics3":
            return transformers.Idefics3Processor(
                image_processor=transformers.Idefics3ImageProcessor(**sizes),
                tokenizer=_tokenizer(special),
                image_seq_len=4,
                chat_template=template,
            )
        return transformers.SmolVLMProcessor(
            image_processor=transformers.SmolVLMImageProcessor(**sizes),
            tokenizer=_tokenizer(special),
            image_seq_len=4,
            chat_template=template,
            video_processor=transformers.SmolVLMVideoProcessor(),
        )
    raise ValueError(family)


def tiny_family_model(family: str, seed: int = 0):
    """``vlm_guard.testing.tiny_model(family)``, or a SmolVLM of the same size for ``"smolvlm"``."""
    if family != "smolvlm":
        return tiny_model(family, seed=seed)
    import transformers

    from vlm_guard.testing import _llama_text

    torch.manual_seed(seed)
    vision = transformers.SmolVLMVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = transformers.SmolVLMConfig(
        vision_config=vision.to_dict(), text_config=_llama_text().to_dict(), image_token_id=IMAGE, scale_factor=2
    )
    model = transformers.SmolVLMForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model
