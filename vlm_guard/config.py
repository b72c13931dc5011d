"""Configuration: one dataclass per method (``vlm_guard/methods/<name>/config.py``, registered in
:mod:`vlm_guard.methods.registry`) gathered in :class:`GuardConfig`, where ``None`` means the method is off.

Configs follow peft's habit: dataclasses whose fields carry ``metadata={"help": ...}``, validated in
``__post_init__`` with a ``ValueError`` naming the field and the allowed range, and serialised as
readable JSON. They are validated again on every assignment (``config.vhr.alpha = float("nan")``
raises and keeps the old value; a misspelt field name raises too), and a wrapper re-validates and
rebuilds its methods when its config was changed in place (e.g. a layer list edited).

Example:
    >>> from vlm_guard import GuardConfig
    >>> config = GuardConfig.from_methods("vhr,gift")
    >>> GuardConfig.from_dict(config.to_dict()) == config
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlm_guard.methods import registry
from vlm_guard.methods.base import (  # noqa: F401  (re-exported: the configs' base and checks)
    FROM_PRESET,
    PRESETS,
    MethodConfig,
    check_choice,
    check_layers,
    check_range,
    preset_field,
)
from vlm_guard.version import __version__

METHOD_ORDER = registry.MethodNames(description="every registered method, in run order")
"""The registered methods' names in run order: a live view of :mod:`vlm_guard.methods.registry` (a tuple in use)."""
ALL_METHODS = registry.MethodNames(lambda spec: spec.in_all, "the methods 'all' switches on")
"""The methods switched on by ``"all"`` (the paper methods; the baselines are for comparison): a live view."""


def _method_config_class(name: str) -> type[MethodConfig]:
    return registry.get_method(name).config_class


class GuardConfig:
    """Which methods run, each with its own config (``None`` = off).

    Every registered method (:mod:`vlm_guard.methods.registry`) is an attribute and a keyword:
    ``GuardConfig(vhr=VHRConfig(alpha=1.5))``, ``config.vhr``, ``config.var = {"p": 0.6}`` (a dict is converted).
    The methods act in a fixed order documented in :mod:`vlm_guard.core.contract`.
    """

    __hash__ = None

    def __init__(self, **methods: Any) -> None:
        unknown = [name for name in methods if not registry.is_method(name)]
        if unknown:
            raise TypeError(f"GuardConfig got unknown method(s) {unknown}; its methods are {list(METHOD_ORDER)}")
        for name in METHOD_ORDER:
            object.__setattr__(self, name, self._checked(name, methods.get(name)))
        object.__setattr__(self, "_vlm_guard_ready", True)

    def __getattr__(self, name: str) -> Any:
        # a method registered after this config was made is off in it
        if not name.startswith("_") and registry.is_method(name):
            return None
        raise AttributeError(f"GuardConfig has no method {name!r}; its methods are {list(METHOD_ORDER)}")

    @staticmethod
    def _checked(name: str, value: Any) -> Any:
        """``value`` as the method's config (a dict is converted), or ``ValueError``."""
        if value is None:
            return None
        config_class = _method_config_class(name)
        if isinstance(value, dict):
            value = config_class.from_dict(value)
        if not isinstance(value, config_class):
            raise ValueError(
                f"GuardConfig.{name} must be a {config_class.__name__}, a dict of its fields, or None; got {type(value).__name__}"
            )
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if not self.__dict__.get("_vlm_guard_ready") or name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        if not registry.is_method(name):
            raise AttributeError(f"GuardConfig has no method {name!r}; its methods are {list(METHOD_ORDER)}")
        object.__setattr__(self, name, self._checked(name, value))

    def _methods(self) -> dict[str, Any]:
        """``{method: config or None}`` over every registered method, in run order."""
        return {name: getattr(self, name) for name in METHOD_ORDER}

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._methods() == other._methods()

    def __repr__(self) -> str:
        return f"GuardConfig({', '.join(f'{name}={value!r}' for name, value in self._methods().items())})"

    def validate(self) -> None:
        """Validate every enabled method's config again (catches values edited in place, e.g. a layer list)."""
        for name in self.enabled_methods:
            getattr(self, name)._run_validation()

    @property
    def enabled_methods(self) -> list[str]:
        return [name for name, value in self._methods().items() if value is not None]

    @classmethod
    def from_methods(cls, methods: str | list[str] | None, preset: str = "released") -> GuardConfig:
        """Default configs for a comma-separated list: ``"vhr,var"``, ``"all"`` (the paper methods, VHR+VAR+GIFT) or
        ``"none"``, each with ``preset`` (``"released"`` or ``"paper"``)."""
        check_choice("GuardConfig.from_methods", "preset", preset, PRESETS)
        if methods is None:
            return cls()
        names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
        if names in (["none"], ["off"], []):
            return cls()
        if names == ["all"]:
            names = list(ALL_METHODS)
        unknown = [n for n in names if not registry.is_method(n)]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHOD_ORDER)}, 'all' or 'none'")
        return cls(**{name: _method_config_class(name)(preset=preset) for name in names})

    def to_dict(self) -> dict:
        return {
            "vlm_guard_version": __version__,
            **{name: (None if value is None else value.to_dict()) for name, value in self._methods().items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> GuardConfig:
        if not isinstance(data, dict):
            raise ValueError(
                f"GuardConfig.from_dict needs a dict (as written by GuardConfig.to_dict()), got "
                f"{type(data).__name__} ({data!r:.80}); use GuardConfig() for every method off"
            )
        data = dict(data)
        data.pop("vlm_guard_version", None)
        unknown = sorted(name for name in data if not registry.is_method(name))
        if unknown:
            raise ValueError(f"GuardConfig: unknown method(s) {unknown}; known methods are {list(METHOD_ORDER)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, atomically (:func:`vlm_guard.fileio.atomic_write_json`: a failure keeps the
        previous file)."""
        from vlm_guard.fileio import atomic_write_json

        atomic_write_json(path, self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> GuardConfig:
        """Read a config written by :meth:`save`; a bad field is a one-line ``ValueError`` naming the file and it."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); write it with GuardConfig.save()") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None

    def replace(self, **changes) -> GuardConfig:
        """A copy with some methods changed (``config.replace(var=None)``); the others are the same objects."""
        unknown = [name for name in changes if not registry.is_method(name)]
        if unknown:
            raise TypeError(
                f"GuardConfig.replace got unknown method(s) {unknown}; its methods are {list(METHOD_ORDER)}"
            )
        return type(self)(**{**self._methods(), **changes})
