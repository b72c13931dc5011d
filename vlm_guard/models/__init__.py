"""Model-family adapters: one small file per VLM family, chosen by the model's class.

Example:
    >>> from vlm_guard.defaults import load_fixture
    >>> from vlm_guard.models import get_adapter
    >>> model, processor = load_fixture()                 # the 3.6M test fixture, a LLaVA
    >>> adapter = get_adapter(model, processor)
    >>> adapter.geometry.num_heads, adapter.image_token_id
    (6, 4)
"""

from __future__ import annotations

from torch import nn

from vlm_guard.models.base import ModelAdapter, PromptSpans, TextGeometry

ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(adapter_class: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator adding a family adapter to the registry."""
    ADAPTERS.append(adapter_class)
    return adapter_class


def supported_families() -> list[str]:
    return [adapter.family for adapter in ADAPTERS]


def get_adapter(model: nn.Module, processor=None) -> ModelAdapter:
    """The adapter for ``model``'s family.

    Raises:
        ValueError: the model belongs to no supported family (the message lists them).
    """
    for adapter_class in ADAPTERS:
        if adapter_class.matches(model):
            return adapter_class(model, processor)
    supported = ", ".join(f"{a.family} ({'/'.join(a.model_classes)})" for a in ADAPTERS)
    raise ValueError(
        f"vlm_guard does not support {type(model).__name__}. Supported families: {supported}. "
        "Adding a family is one small adapter file in vlm_guard/models/."
    )


from vlm_guard.models import idefics3, llava, llava_next, qwen2_vl  # noqa: E402,F401  (registration)
from vlm_guard.models import gemma3, glm4v, internvl, llava_onevision, mistral3, qwen3_vl  # noqa: E402,F401  (registration)

__all__ = ["ModelAdapter", "PromptSpans", "TextGeometry", "get_adapter", "register_adapter", "supported_families"]
