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


# Every module of this package but the shared ones is a family adapter that registers itself when imported: a new
# family is one file here.
SHARED_MODULES = frozenset({"base", "compat", "fingerprint", "inputs", "loading"})


def _import_families() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name not in SHARED_MODULES and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()

__all__ = ["ModelAdapter", "PromptSpans", "TextGeometry", "get_adapter", "register_adapter", "supported_families"]
