"""The decoding methods, one package each (``vlm_guard/methods/<name>/``), each registered with one
:func:`~vlm_guard.methods.registry.register_method` call in its ``__init__.py``; see :mod:`vlm_guard.methods.registry`."""

from vlm_guard.methods.registry import (
    MethodSpec,
    MethodUI,
    get_method,
    method_names,
    method_specs,
    register_method,
    unregister_method,
)

__all__ = [
    "MethodSpec",
    "MethodUI",
    "get_method",
    "method_names",
    "method_specs",
    "register_method",
    "unregister_method",
]
