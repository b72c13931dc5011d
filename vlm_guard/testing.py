"""Tiny random-weight models of every supported family, built from configs (no download), and
matching left-padded prompt batches. Used by the test suite and the benchmark.

Example:
    >>> from vlm_guard.testing import tiny_model, build_batch
    >>> model = tiny_model("llava")
    >>> inputs = build_batch(model, [(True, 5), (False, 3), (True, 9)])
"""

from __future__ import annotations

import inspect

import torch

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3")

VOCAB = 128
BOS, PAD, IMAGE, VISION_START, VISION_END, FAKE = 1, 0, 100, 101, 102, 103
TEXT_IDS = (10, 90)  # ordinary text tokens are drawn from this range


def _llama_text(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=BOS, pad_token_id=PAD, eos_token_id=2,
                  tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def _clip_vision(image_size=32, patch_size=8, **overrides):
    from transformers import CLIPVisionConfig

    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                  patch_size=patch_size, projection_dim=32)
    values.update(overrides)
    return CLIPVisionConfig(**values)


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa", text_overrides: dict | None = None,
               vision_overrides: dict | None = None, dtype=torch.float32):
    """A random-weight model of ``family`` in eval mode.

    Args:
        family: one of :data:`FAMILIES`.
        seed: weight seed.
        attn_implementation: for the whole model ("sdpa" or "eager").
        text_overrides / vision_overrides: config fields to change (e.g. ``num_hidden_layers``).
    """
    import transformers

    torch.manual_seed(seed)
    text_overrides = dict(text_overrides or {})
    vision_overrides = dict(vision_overrides or {})
    if family == "llava":
        config = transformers.LlavaConfig(vision_config=_clip_vision(**vision_overrides), text_config=_llama_text(**text_overrides),
                                          image_token_index=IMAGE, projector_hidden_act="gelu")
        model_class = transformers.LlavaForConditionalGeneration
    elif family == "llava_next":
        config = transformers.LlavaNextConfig(vision_config=_clip_vision(**vision_overrides), text_config=_llama_text(**text_overrides),
                                              image_token_index=IMAGE, image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
        model_class = transformers.LlavaNextForConditionalGeneration
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                    bos_token_id=BOS, pad_token_id=PAD, eos_token_id=2, tie_word_embeddings=False)
        text.update(text_overrides)
        if family == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8, spatial_merge_size=2,
                          temporal_patch_size=1, in_channels=3)
            vision.update(vision_overrides)
            config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                                vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
            model_class = transformers.Qwen2VLForConditionalGeneration
        else:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=8,
                          spatial_merge_size=2, temporal_patch_size=1, in_channels=3, window_size=16, fullatt_block_indexes=[1])
            vision.update(vision_overrides)
            config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                                   vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
            model_class = transformers.Qwen2_5_VLForConditionalGeneration
    elif family == "idefics3":
        from transformers import Idefics3VisionConfig

        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
        vision.update(vision_overrides)
        config = transformers.Idefics3Config(vision_config=Idefics3VisionConfig(**vision).to_dict(),
                                             text_config=_llama_text(**text_overrides).to_dict(), image_token_id=IMAGE, scale_factor=2)
        model_class = transformers.Idefics3ForConditionalGeneration
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {list(FAMILIES)}")
    config._attn_implementation = attn_implementation
    model = model_class(config).to(dtype).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # never stop early: comparisons see every token
    return model


def image_token_count(model, family: str) -> int:
    """Image tokens per image for the tiny models' default image (32x32)."""
    vision = model.config.vision_config
    if family == "llava":
        return (vision.image_size // vision.patch_size) ** 2
    if family == "llava_next":
        pixel_values, image_sizes = _llava_next_pixels(model, 1)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            return sum(f.shape[0] for f in features)
        return features.shape[0]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return (32 // vision.patch_size) ** 2 // vision.spatial_merge_size**2
    if family == "idefics3":
        return (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor**2
    raise ValueError(family)


def _llava_next_pixels(model, n_images: int):
    vision = model.config.vision_config
    # image_sizes (32, 32) -> best resolution 32x32 -> 1 tile + the base image
    pixel_values = torch.randn(n_images, 2, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(1))
    image_sizes = torch.tensor([[32, 32]] * n_images)
    return pixel_values, image_sizes


def _family_of(model) -> str:
    from .models import get_adapter

    return get_adapter(model).family


def build_batch(model, rows: list[tuple[bool, int]], seed: int = 0) -> dict:
    """A left-padded batch: one row per ``(has_image, n_text_tokens)``: BOS, a few text tokens, the
    image block (if any), then the rest of the text.

    Returns:
        model inputs (``input_ids``, ``attention_mask`` and the family's image tensors).
    """
    family = _family_of(model)
    family = "idefics3" if family == "idefics3" else family
    generator = torch.Generator().manual_seed(seed)
    n_image_tokens = image_token_count(model, family)
    sequences = []
    for has_image, n_text in rows:
        text = torch.randint(*TEXT_IDS, (n_text,), generator=generator).tolist()
        head, tail = text[: max(1, n_text // 3)], text[max(1, n_text // 3):]
        image_block: list[int] = []
        if has_image:
            if family in ("qwen2_vl", "qwen2_5_vl"):
                image_block = [VISION_START] + [IMAGE] * n_image_tokens + [VISION_END]
            elif family == "idefics3":
                image_block = [FAKE] + [IMAGE] * n_image_tokens + [FAKE]
            else:
                image_block = [IMAGE] * n_image_tokens
        sequences.append([BOS] + head + image_block + tail)
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, sequence in enumerate(sequences):
        input_ids[index, width - len(sequence):] = torch.tensor(sequence)
        attention_mask[index, width - len(sequence):] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    n_images = sum(1 for has_image, _ in rows if has_image)
    if n_images == 0:
        return inputs
    vision = model.config.vision_config
    if family == "llava":
        inputs["pixel_values"] = torch.randn(n_images, 3, vision.image_size, vision.image_size, generator=generator)
    elif family == "llava_next":
        inputs["pixel_values"], inputs["image_sizes"] = _llava_next_pixels(model, n_images)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        grid = 32 // vision.patch_size
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        inputs["pixel_values"] = torch.randn(n_images * grid * grid, patch_dim, generator=generator)
        inputs["image_grid_thw"] = torch.tensor([[1, grid, grid]] * n_images)
        if "mm_token_type_ids" in inspect.signature(type(model).forward).parameters:  # transformers >= 5
            inputs["mm_token_type_ids"] = (input_ids == IMAGE).int()
    elif family == "idefics3":
        pixel_values = torch.zeros(len(rows), 1, 3, vision.image_size, vision.image_size)
        for index, (has_image, _) in enumerate(rows):
            if has_image:
                pixel_values[index, 0] = torch.randn(3, vision.image_size, vision.image_size, generator=generator)
        inputs["pixel_values"] = pixel_values
        inputs["pixel_attention_mask"] = torch.ones(len(rows), 1, vision.image_size, vision.image_size, dtype=torch.bool)
    return inputs


TOKENIZER_KINDS = ("sentencepiece", "byte_level_bpe", "word_level", "wordpiece")


def offline_tokenizer(kind: str, corpus: list[str], vocab_size: int = 200):
    """A small fast tokenizer of ``kind`` trained on ``corpus`` with the ``tokenizers`` library (offline).

    Kinds (:data:`TOKENIZER_KINDS`): ``"sentencepiece"`` (Unigram with the ``\u2581`` word-start marker,
    as Llama / Vicuna), ``"byte_level_bpe"`` (BPE with the ``\u0120`` byte-level marker, as GPT-2 / Qwen),
    ``"word_level"`` (whole words, no marker, as the shipped default model), ``"wordpiece"`` (``##``
    continuation pieces, as BERT).

    Returns:
        a ``transformers.PreTrainedTokenizerFast``.

    Example:
        >>> tokenizer = offline_tokenizer("wordpiece", ["describe the image"])
        >>> tokenizer.decode(tokenizer("describe the image")["input_ids"])
        'describe the image'
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<pad>"]
    if kind == "sentencepiece":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="<unk>")
    elif kind == "byte_level_bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "word_level":
        tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
        trainer = trainers.WordLevelTrainer(special_tokens=special)
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {list(TOKENIZER_KINDS)}")
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")


def word_level_tokenizer(corpus: list[str]):
    """:func:`offline_tokenizer` of kind ``"word_level"`` (the shipped default model's kind)."""
    return offline_tokenizer("word_level", corpus)


def greedy_loop(model, inputs: dict, max_new_tokens: int, cache=None, processors=None, pass_mask: bool = True,
                pass_positions: bool = True) -> torch.Tensor:
    """A hand-written greedy decoding loop: one prefill call, then one call per new token that extends
    the cache (what a user writes instead of ``generate``). ``model`` may be a guarded wrapper.

    Args:
        model: the model or :class:`vlm_guard.GuardedModel` whose forward is called.
        inputs: the prompt's forward arguments (left padded).
        max_new_tokens: tokens to generate.
        cache: a cache object to fill (e.g. a ``StaticCache``); None lets the model create a dynamic one.
        processors: logits processors applied to each step's scores (``guarded.logits_processor(...)``).
        pass_mask: give each decode call the growing 2-D mask; False lets the model place the token itself
            (M-RoPE models, rows without padding).
        pass_positions: with ``pass_mask``, also give the left-padding-aware positions ``cumsum(mask) - 1``
            (what ``generate`` does for LLaVA; Idefics3's ``generate`` counts positions from the cache).
    Returns:
        ``[B, S + max_new_tokens]`` prompt and generated ids, like ``generate``.
    """
    from .models.compat import cache_kwargs, output_cache

    base = getattr(model, "model", model) if hasattr(model, "engine") else model
    sequence = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(sequence)
    with torch.no_grad():
        extra = cache_kwargs(base, cache) if cache is not None else {}
        output = model(**inputs, use_cache=True, **extra)
        cache = output_cache(output)
        for step in range(max_new_tokens):
            scores = output.logits[:, -1].float()
            if processors is not None:
                scores = processors(sequence, scores)
            token = scores.argmax(dim=-1, keepdim=True)  # [B, 1]
            sequence = torch.cat([sequence, token], dim=1)
            if step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step_inputs = {"input_ids": token}
            if pass_mask:
                step_inputs["attention_mask"] = mask
                if pass_positions:
                    step_inputs["position_ids"] = mask.long().cumsum(-1)[:, -1:] - 1
            output = model(**step_inputs, use_cache=True, **cache_kwargs(base, cache))
    return sequence
