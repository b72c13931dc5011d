"""The few places where transformers 4.57 and 5.x name things differently."""

from __future__ import annotations

import inspect
from functools import cache

import torch
from torch import nn


@cache
def _cache_argument(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` with the name this transformers version's forward takes
    (``cache`` on 5.x, ``past_key_values`` on 4.57)."""
    return {_cache_argument(type(model)): cache}


def output_cache(output):
    """The key/value cache of a forward output, under either name."""
    fields = getattr(output, "__dataclass_fields__", None) or {}
    if "cache" in fields:  # 5.x: reading the deprecated alias would log a warning
        return getattr(output, "cache", None)
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def generate_prefill_positions(model: nn.Module, inputs: dict):
    """The position ids ``model.generate`` gives the prefill of the prompt ``inputs`` (``input_ids``,
    ``attention_mask`` and image tensors: a forward call's keyword arguments), or None where its ``generate`` leaves
    them to the forward. ``cumsum(mask) - 1`` for most families; the multimodal RoPE positions of Qwen2-VL, Qwen3-VL
    and GLM-4.1V (``[4, B, S]``: the text positions, then time, height, width from the image grid). 5.x computes them
    in ``_prepare_position_ids_for_generation``, 4.57 in ``prepare_inputs_for_generation`` (where Qwen3-VL and
    GLM-4.1V leave them to the forward: None). Either may cache state on the model (``rope_deltas``): the caller saves
    and restores it."""
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is not None:  # 5.x
        return prepare(inputs["input_ids"], dict(inputs))
    length = inputs["input_ids"].shape[1]
    cache_position = torch.arange(length, device=inputs["input_ids"].device)
    return model.prepare_inputs_for_generation(**inputs, cache_position=cache_position).get("position_ids")
