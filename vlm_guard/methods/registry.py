"""Registry of decoding methods, filled by one ``register_method`` call per method module."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from vlm_guard.config import METHOD_ORDER


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class and a factory ``build(config, adapter, head_map) -> Intervention``."""

    name: str
    config_class: type
    build: Callable


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_class: type, build: Callable) -> None:
    _METHODS[name] = MethodSpec(name, config_class, build)


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        try:
            importlib.import_module(f"vlm_guard.methods.{name}.intervention")
        except ModuleNotFoundError as error:
            raise ValueError(f"unknown method {name!r}; known methods are {list(METHOD_ORDER)}") from error
    if name not in _METHODS:
        raise ValueError(f"method module vlm_guard.methods.{name}.intervention did not register {name!r}")
    return _METHODS[name]
