"""The few places where transformers 4.57 and 5.x name things differently."""

from __future__ import annotations

import inspect
from functools import cache

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
