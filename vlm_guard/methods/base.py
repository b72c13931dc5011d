"""The base of every method's config (:class:`MethodConfig`): presets, validation on construction and on every
assignment, dict round trips; and the range checks the configs use. :mod:`vlm_guard.config` re-exports all of it
beside :class:`~vlm_guard.config.GuardConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


def check_range(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ``ValueError`` naming ``owner.name`` when ``value`` is outside the allowed range."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and math.isnan(value))
    ):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        allowed = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{owner}.{name}={value!r} is out of range; allowed range is {allowed}")


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} is not allowed; choose one of {list(choices)}")


def check_layers(owner: str, name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{owner}.{name} must be a list of layer indices (ints) or None, got {value!r}")


PRESETS = ("released", "paper")


class _FromPreset:
    """Default of a field whose value depends on the config's ``preset`` (resolved in ``__post_init__``)."""

    def __repr__(self) -> str:
        return "<from preset>"


FROM_PRESET = _FromPreset()


def preset_field(help: str, released: Any, paper: Any) -> Any:
    """A dataclass field whose default is set by the config's ``preset``.

    The help text gets ``[released: ...; paper: ...]`` appended, so every such field says which preset
    sets what. A value passed explicitly always wins over the preset.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Demo(MethodConfig):
        ...     p: float = preset_field("fraction moved", released=0.4, paper=0.6)
        >>> Demo().p, Demo(preset="paper").p, Demo(preset="paper", p=0.5).p
        (0.4, 0.6, 0.5)
    """
    values = {"released": released, "paper": paper}
    return field(
        default=FROM_PRESET, metadata={"help": f"{help} [released: {released!r}; paper: {paper!r}]", "presets": values}
    )


_MISSING = object()


@dataclass
class MethodConfig:
    """Base of the per-method configs. Subclasses set ``method`` and validate in ``validate()``.

    ``preset`` chooses the defaults of the fields declared with :func:`preset_field`: ``"released"``
    (default) reproduces the official released code that produced the paper's numbers, ``"paper"``
    follows the paper's text where the two differ (see ``docs/presets.md``). Fields passed explicitly
    keep their value whatever the preset.

    Validation runs at construction and again after every assignment to a field: a bad value raises
    ``ValueError`` and the field keeps its previous value. ``preset`` is fixed at construction (make a
    new config, e.g. ``VHRConfig(preset="paper")``, to switch).
    """

    method: ClassVar[str] = ""
    preset: str = field(
        default="released",
        metadata={
            "help": "'released' (default: the official released code's settings) or 'paper' (the paper's text where it differs)"
        },
    )

    def __new__(cls, *args, **kwargs):
        # Remember which fields the caller set (positional or by name): those win over a head map's tuned
        # values (see :func:`vlm_guard.settings.resolve_config`); the others may be filled in by tuning.
        instance = super().__new__(cls)
        names = [f.name for f in fields(cls)] if dataclasses.is_dataclass(cls) else []
        object.__setattr__(instance, "_explicit_fields", frozenset(names[: len(args)]) | frozenset(kwargs))
        return instance

    def __post_init__(self) -> None:
        check_choice(type(self).__name__, "preset", self.preset, PRESETS)
        for spec in fields(self):
            presets = spec.metadata.get("presets")
            if presets is not None and getattr(self, spec.name) is FROM_PRESET:
                value = presets[self.preset]
                setattr(self, spec.name, list(value) if isinstance(value, (list, tuple)) else value)
        self._run_validation()
        object.__setattr__(self, "_vlm_guard_ready", True)

    def _run_validation(self) -> None:
        object.__setattr__(self, "_vlm_guard_validating", True)
        try:
            self.validate()
        finally:
            object.__setattr__(self, "_vlm_guard_validating", False)

    def __setattr__(self, name: str, value: Any) -> None:
        state = self.__dict__
        if not state.get("_vlm_guard_ready") or state.get("_vlm_guard_validating") or name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        known = [f.name for f in fields(self)]
        if name not in known:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; its fields are {known}")
        if name == "preset" and value != state.get("preset"):
            raise ValueError(
                f"{type(self).__name__}.preset is fixed at construction (it chose the other fields' defaults); "
                f"make a new config: {type(self).__name__}(preset={value!r})"
            )
        previous = state.get(name, _MISSING)
        object.__setattr__(self, name, value)
        try:
            self._run_validation()
        except Exception:
            if previous is _MISSING:
                object.__delattr__(self, name)
            else:
                object.__setattr__(self, name, previous)
            raise
        object.__setattr__(self, "_explicit_fields", self.explicit_fields | {name})  # set by hand: explicit

    @property
    def explicit_fields(self) -> frozenset:
        """Fields the user set (constructor arguments, ``from_dict`` keys, or assigned later); the rest hold defaults."""
        return self.__dict__.get("_explicit_fields", frozenset())

    @classmethod
    def preset_values(cls, preset: str) -> dict:
        """``{field: value}`` of the fields that ``preset`` sets.

        Example:
            >>> from vlm_guard.methods.var.config import VARConfig
            >>> VARConfig.preset_values("paper")["p"]
            0.6
        """
        check_choice(cls.__name__, "preset", preset, PRESETS)
        return {spec.name: spec.metadata["presets"][preset] for spec in fields(cls) if "presets" in spec.metadata}

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> MethodConfig:
        if not isinstance(data, dict):
            raise ValueError(
                f"{cls.__name__}.from_dict needs a dict of its fields, got {type(data).__name__} ({data!r:.80}); "
                f"e.g. {cls.__name__}().to_dict()"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


__all__ = ["MethodConfig", "PRESETS", "FROM_PRESET", "preset_field", "check_range", "check_choice", "check_layers"]
