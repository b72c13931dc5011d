"""The method registry: every per-method fact, filled by one :func:`register_method` call per method.

A method is a package ``vlm_guard/methods/<name>/`` whose ``__init__.py`` registers a :class:`MethodSpec`: its
config class, how to build its intervention, where it runs among the others, whether ``"all"`` switches it on,
whether it runs a contrast pass, its main strength field with the demo's slider range and help, its tuning grid
and its benchmark configuration. Everything else in the library (:class:`~vlm_guard.config.GuardConfig`, the
wrapper, ``vlm-guard tune``, the demo, the benchmark) reads these specs, so a new method is one folder and one
call; a method defined outside the library registers the same way.

The built-in methods are the subpackages of :mod:`vlm_guard.methods`: :func:`get_method` imports one on first
use, :func:`method_specs` imports them all. This module imports only :mod:`vlm_guard.methods.base` (the configs'
base class), so :mod:`vlm_guard.config` and the methods' own config modules can import it freely.

Example:
    >>> from vlm_guard.methods.registry import get_method, method_names
    >>> method_names()
    ('vhr', 'var', 'gift', 'pai', 'vcd')
    >>> get_method("var").strength_field, get_method("pai").contrastive
    ('p', True)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlm_guard.methods.base import MethodConfig

PACKAGE = "vlm_guard.methods"


@dataclass(frozen=True)
class MethodUI:
    """A method's switch and strength slider in the demo.

    Attributes:
        label: the shown name (``"VHR"``).
        minimum / maximum / step: the slider's range.
        fallback: the slider's value when the config's default strength cannot be read.
        help: one line shown under the slider.
        shows: what the demo draws from the method's per-generation state after a run
            (``guarded.last_generation.states[name]``): names among ``"sink_mask"`` (the image tokens it marked as
            sinks, ``state.sink_mask``) and ``"saliency"`` (its saliency over the image, ``state.saliency``).
        switched_off_hint: what to do when the method builds no intervention on the model (switched itself off).
    """

    label: str
    minimum: float
    maximum: float
    step: float
    fallback: float
    help: str
    shows: tuple[str, ...] = ()
    switched_off_hint: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: registry name, also the :class:`~vlm_guard.config.GuardConfig` attribute (``"vhr"``).
        config_class: its :class:`~vlm_guard.config.MethodConfig` subclass.
        builder: ``build(config, adapter, head_map) -> Intervention | None`` (None: the method switches itself
            off on this model), or ``"module:function"`` imported on first use (keeps torch out of registration).
        order: where it runs among the active methods (lower first; see :mod:`vlm_guard.core.contract`).
        in_all: switched on by ``GuardConfig.from_methods("all")`` (the paper methods; baselines are not).
        contrastive: runs a contrast pass with one cache per prompt row (no beam search, one sequence per prompt).
        strength_field: the config field of its main strength (the demo's slider, the tuning curve's x axis).
        ui: the demo's control (None: the demo does not show the method).
        tuning_grid: ``grid(num_layers, head_map) -> [{field: value}, ...]`` or ``[({field: value}, band), ...]``:
            the settings ``vlm-guard tune`` tries (None: not tunable). The released default should be among them.
        forward_passes: ``passes(fields) -> int``, forward passes per generated token with these explicit fields
            (the structural cost of a tuning candidate; None: 1).
        bench_fields: fields the benchmark sets on the method's released defaults (e.g. VCD contrasting greedy
            decoding); None: the method has no row in the benchmark.
        bench_decode_target: the benchmark's target on its decode-latency ratio to plain (None: reported only).
    """

    name: str
    config_class: type
    builder: Callable | str
    order: float
    in_all: bool = False
    contrastive: bool = False
    strength_field: str | None = None
    ui: MethodUI | None = None
    tuning_grid: Callable | None = None
    forward_passes: Callable | None = None
    bench_fields: dict | None = None
    bench_decode_target: float | None = None

    def build(self, config: Any, adapter: Any, head_map: Any):
        """The method's intervention for ``config`` on a model (``adapter``), or None when it switches itself off."""
        builder = self.builder
        if isinstance(builder, str):
            module, _, attribute = builder.partition(":")
            builder = getattr(importlib.import_module(module), attribute)
        return builder(config, adapter, head_map)

    def grid(self, num_layers: int, head_map: Any = None) -> list[tuple[dict, str]]:
        """The tuning grid as ``[(fields, band), ...]`` (band ``""`` when the method has none)."""
        if self.tuning_grid is None:
            return []
        rows = []
        for row in self.tuning_grid(num_layers, head_map):
            fields, band = row if isinstance(row, tuple) else (row, "")
            rows.append((dict(fields), band))
        return rows

    def passes(self, fields: dict) -> int:
        """Forward passes per generated token of a setting with these explicit fields."""
        return 1 if self.forward_passes is None else int(self.forward_passes(fields))


_METHODS: dict[str, MethodSpec] = {}
_LOCK = threading.RLock()
_BUILTINS_LOADED = False


def register_method(
    name: str,
    config_class: type,
    build: Callable | str,
    *,
    order: float | None = None,
    in_all: bool = False,
    contrastive: bool = False,
    strength_field: str | None = None,
    ui: MethodUI | None = None,
    tuning_grid: Callable | None = None,
    forward_passes: Callable | None = None,
    bench_fields: dict | None = None,
    bench_decode_target: float | None = None,
    replace: bool = False,
) -> MethodSpec:
    """Register a method (see :class:`MethodSpec` for the arguments); returns its spec.

    ``order`` None places it after every method registered so far. Registering a name again raises unless
    ``replace=True``; the name must be a Python identifier that :class:`~vlm_guard.config.GuardConfig` does not
    already use.

    Example:
        >>> from dataclasses import dataclass
        >>> from vlm_guard.methods.base import MethodConfig
        >>> @dataclass
        ... class NoopConfig(MethodConfig):
        ...     method = "noop"
        >>> spec = register_method("noop", NoopConfig, lambda config, adapter, head_map: None)
        >>> "noop" in method_names(), get_method("noop").order > get_method("vcd").order
        (True, True)
        >>> unregister_method("noop")
    """
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or name != name.lower():
        raise ValueError(f"method name {name!r} must be a lower-case Python identifier not starting with '_'")
    if name in ("all", "none", "off", "auto") or name in _RESERVED:
        raise ValueError(f"method name {name!r} is reserved; choose another")
    if (
        not isinstance(config_class, type)
        or not issubclass(config_class, MethodConfig)
        or not dataclasses.is_dataclass(config_class)
    ):
        raise ValueError(
            f"method {name!r}: config_class must be a @dataclass subclass of vlm_guard.config.MethodConfig, "
            f"got {config_class!r}"
        )
    if not (callable(build) or (isinstance(build, str) and ":" in build)):
        raise ValueError(f"method {name!r}: build must be a callable or 'module:function', got {build!r}")
    if strength_field is not None and strength_field not in getattr(config_class, "__dataclass_fields__", {}):
        raise ValueError(
            f"method {name!r}: strength_field {strength_field!r} is not a field of {config_class.__name__}"
        )
    if ui is not None and strength_field is None:
        raise ValueError(f"method {name!r}: a demo control (ui) needs a strength_field for its slider")
    if order is None:
        _load_builtins()  # "after every method" includes the built-in ones not imported yet (they give their order)
    with _LOCK:
        if name in _METHODS and not replace:
            raise ValueError(f"method {name!r} is already registered; pass replace=True to replace it")
        if order is None:
            others = [spec.order for key, spec in _METHODS.items() if key != name]
            order = (max(others) if others else 0) + 10
        spec = MethodSpec(
            name,
            config_class,
            build,
            float(order),
            bool(in_all),
            bool(contrastive),
            strength_field,
            ui,
            tuning_grid,
            forward_passes,
            dict(bench_fields) if bench_fields is not None else None,
            bench_decode_target,
        )
        _METHODS[name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a registered method (tests, plug-ins); unknown names are ignored."""
    with _LOCK:
        _METHODS.pop(name, None)


@functools.lru_cache(maxsize=1)
def builtin_method_names() -> tuple[str, ...]:
    """The method packages shipped in :mod:`vlm_guard.methods` (each registers itself when imported)."""
    package = importlib.import_module(PACKAGE)
    return tuple(sorted(info.name for info in pkgutil.iter_modules(package.__path__) if info.ispkg))


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    for name in builtin_method_names():  # outside _LOCK: a package registering itself on another thread takes it
        importlib.import_module(f"{PACKAGE}.{name}")
    _BUILTINS_LOADED = True


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``, importing its built-in package on first use; ``ValueError`` for an unknown name."""
    spec = _METHODS.get(name)
    if spec is not None:
        return spec
    if isinstance(name, str) and name.isidentifier() and name in builtin_method_names():
        importlib.import_module(f"{PACKAGE}.{name}")
        spec = _METHODS.get(name)
        if spec is None:
            raise ValueError(f"method package {PACKAGE}.{name} did not register {name!r}")
        return spec
    raise ValueError(f"unknown method {name!r}; known methods are {list(method_names())}")


def method_specs() -> tuple[MethodSpec, ...]:
    """Every registered method (the built-in ones imported), in run order."""
    _load_builtins()
    with _LOCK:
        specs = list(_METHODS.values())
    return tuple(sorted(specs, key=lambda spec: spec.order))


def method_names() -> tuple[str, ...]:
    """Every registered method's name, in run order."""
    return tuple(spec.name for spec in method_specs())


def is_method(name: Any) -> bool:
    """Whether ``name`` is a registered (or built-in) method."""
    if not isinstance(name, str):
        return False
    try:
        get_method(name)
    except ValueError:
        return False
    return True


class LiveTuple(Sequence):
    """A live, read-only tuple computed from the registry at every use (``items()`` returns the tuple).

    Behaves as a tuple in iteration, ``in``, indexing, ``len``, ``index``, ``==`` with a tuple or list, and ``+``, so
    a module constant built on it follows methods registered after the module was imported.
    """

    def __init__(self, compute: Callable[[], tuple], description: str = ""):
        self._compute = compute
        self.description = description

    def items(self) -> tuple:
        return tuple(self._compute())

    def __getitem__(self, index):
        return self.items()[index]

    def __len__(self) -> int:
        return len(self.items())

    def __iter__(self) -> Iterator:
        return iter(self.items())

    def __contains__(self, value: object) -> bool:
        return value in self.items()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (LiveTuple, tuple, list)):
            return list(self.items()) == list(other)
        return NotImplemented

    __hash__ = None

    def __add__(self, other):
        return self.items() + tuple(other)

    def __radd__(self, other):
        return tuple(other) + self.items()

    def __repr__(self) -> str:
        return repr(self.items())


class MethodNames(LiveTuple):
    """A live tuple of the names of the registered methods that ``select`` keeps, in run order."""

    def __init__(
        self, select: Callable[[MethodSpec], bool] = lambda spec: True, description: str = "registered methods"
    ):
        super().__init__(lambda: tuple(spec.name for spec in method_specs() if select(spec)), description)


class MethodFacts(Mapping):
    """A live, read-only ``{method: value}`` mapping of one fact of the registered methods (those that have it)."""

    def __init__(self, fact: Callable[[MethodSpec], Any], description: str = ""):
        self._fact = fact
        self.description = description

    def _items(self) -> dict:
        return {spec.name: value for spec in method_specs() if (value := self._fact(spec)) is not None}

    def __getitem__(self, key):
        return self._items()[key]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return repr(self._items())


_RESERVED = frozenset(
    {
        "validate",
        "enabled_methods",
        "from_methods",
        "to_dict",
        "from_dict",
        "save",
        "load",
        "replace",
        "vlm_guard_version",
        "methods",
        "items",
    }
)
"""Names :class:`~vlm_guard.config.GuardConfig` uses for itself, so no method can take them."""

__all__ = [
    "MethodSpec",
    "MethodUI",
    "LiveTuple",
    "MethodNames",
    "MethodFacts",
    "register_method",
    "unregister_method",
    "get_method",
    "method_specs",
    "method_names",
    "builtin_method_names",
    "is_method",
]
