"""Configuration: one dataclass per method (in its own module under ``decoding/``) gathered in
:class:`GuardConfig`, where ``None`` means the method is off.

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

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from vlm_guard.version import __version__


def check_range(owner: str, name: str, value: Any, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raise ``ValueError`` naming ``owner.name`` when ``value`` is outside the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
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
    return field(default=FROM_PRESET, metadata={"help": f"{help} [released: {released!r}; paper: {paper!r}]", "presets": values})


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
    preset: str = field(default="released", metadata={
        "help": "'released' (default: the official released code's settings) or 'paper' (the paper's text where it differs)"})

    def __new__(cls, *args, **kwargs):
        # Remember which fields the caller set (positional or by name): those win over a head map's tuned
        # values (see :func:`vlm_guard.settings.resolve_config`); the others may be filled in by tuning.
        instance = super().__new__(cls)
        names = [f.name for f in fields(cls)] if dataclasses.is_dataclass(cls) else []
        object.__setattr__(instance, "_explicit_fields", frozenset(names[:len(args)]) | frozenset(kwargs))
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
            raise ValueError(f"{type(self).__name__}.preset is fixed at construction (it chose the other fields' defaults); "
                             f"make a new config: {type(self).__name__}(preset={value!r})")
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
            >>> from vlm_guard.methods.var.intervention import VARConfig
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
    def from_dict(cls, data: dict) -> "MethodConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_dict needs a dict of its fields, got {type(data).__name__} ({data!r:.80}); "
                             f"e.g. {cls.__name__}().to_dict()")
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


METHOD_ORDER = ("vhr", "var", "gift", "pai", "vcd")
# the methods switched on by "all" (the paper methods; the baselines are for comparison)
ALL_METHODS = ("vhr", "var", "gift")


def _method_config_class(name: str) -> type[MethodConfig]:
    import vlm_guard.methods.registry as registry

    return registry.get_method(name).config_class


@dataclass
class GuardConfig:
    """Which methods run, each with its own config (``None`` = off).

    The methods act in a fixed order documented in :mod:`vlm_guard.core.contract`.
    """

    vhr: Any = field(default=None, metadata={"help": "VHR head reinforcement (vlm_guard.methods.vhr.intervention.VHRConfig)"})
    var: Any = field(default=None, metadata={"help": "VAR sink recycling (vlm_guard.methods.var.intervention.VARConfig)"})
    gift: Any = field(default=None, metadata={"help": "GIFT gaze-shift saliency (vlm_guard.methods.gift.intervention.GIFTConfig)"})
    pai: Any = field(default=None, metadata={"help": "PAI baseline (vlm_guard.methods.pai.intervention.PAIConfig)"})
    vcd: Any = field(default=None, metadata={"help": "VCD baseline (vlm_guard.methods.vcd.intervention.VCDConfig)"})

    def __post_init__(self) -> None:
        for name in METHOD_ORDER:
            object.__setattr__(self, name, self._checked(name, getattr(self, name)))
        object.__setattr__(self, "_vlm_guard_ready", True)

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
        if name not in METHOD_ORDER:
            raise AttributeError(f"GuardConfig has no method {name!r}; its methods are {list(METHOD_ORDER)}")
        object.__setattr__(self, name, self._checked(name, value))

    def validate(self) -> None:
        """Validate every enabled method's config again (catches values edited in place, e.g. a layer list)."""
        for name in self.enabled_methods:
            getattr(self, name)._run_validation()

    @property
    def enabled_methods(self) -> list[str]:
        return [name for name in METHOD_ORDER if getattr(self, name) is not None]

    @classmethod
    def from_methods(cls, methods: str | list[str] | None, preset: str = "released") -> "GuardConfig":
        """Default configs for a comma-separated list: ``"vhr,var"``, ``"all"`` (VHR+VAR+GIFT) or ``"none"``,
        each with ``preset`` (``"released"`` or ``"paper"``)."""
        check_choice("GuardConfig.from_methods", "preset", preset, PRESETS)
        if methods is None:
            return cls()
        names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
        if names in (["none"], ["off"], []):
            return cls()
        if names == ["all"]:
            names = list(ALL_METHODS)
        unknown = [n for n in names if n not in METHOD_ORDER]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHOD_ORDER)}, 'all' or 'none'")
        return cls(**{name: _method_config_class(name)(preset=preset) for name in names})

    def to_dict(self) -> dict:
        return {
            "vlm_guard_version": __version__,
            **{name: (None if getattr(self, name) is None else getattr(self, name).to_dict()) for name in METHOD_ORDER},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "GuardConfig":
        if not isinstance(data, dict):
            raise ValueError(f"GuardConfig.from_dict needs a dict (as written by GuardConfig.to_dict()), got "
                             f"{type(data).__name__} ({data!r:.80}); use GuardConfig() for every method off")
        data = dict(data)
        data.pop("vlm_guard_version", None)
        unknown = sorted(set(data) - set(METHOD_ORDER))
        if unknown:
            raise ValueError(f"GuardConfig: unknown method(s) {unknown}; known methods are {list(METHOD_ORDER)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, atomically (:func:`vlm_guard.fileio.atomic_write_json`: a failure keeps the
        previous file)."""
        from vlm_guard.fileio import atomic_write_json

        atomic_write_json(path, self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> "GuardConfig":
        """Read a config written by :meth:`save`; a bad field is a one-line ``ValueError`` naming the file and it."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); write it with GuardConfig.save()") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None

    def replace(self, **changes) -> "GuardConfig":
        return dataclasses.replace(self, **changes)
