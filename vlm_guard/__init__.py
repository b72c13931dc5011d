"""vlm_guard: training-free hallucination mitigation for Hugging Face vision-language models.

Example:
    >>> import vlm_guard
    >>> model, processor = vlm_guard.load_default()
    >>> guarded = vlm_guard.wrap(model, processor, vlm_guard.GuardConfig.from_methods("all"))

The heavy imports (torch, transformers) happen on first use of ``wrap`` / ``GuardConfig`` / ..., so
``import vlm_guard.eval`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vlm_guard import moved as _moved
from vlm_guard.version import __version__

_moved.install()  # the previous layout's module paths, deprecated (vlm_guard.moved)

if TYPE_CHECKING:  # pragma: no cover
    from vlm_guard.config import GuardConfig
    from vlm_guard.methods.gift.config import GIFTConfig
    from vlm_guard.methods.pai.config import PAIConfig
    from vlm_guard.methods.var.config import VARConfig
    from vlm_guard.methods.vcd.config import VCDConfig
    from vlm_guard.methods.vhr.config import VHRConfig
    from vlm_guard.wrapper import GuardedModel, wrap

_LAZY = {
    "GuardConfig": "vlm_guard.config",
    "GuardedModel": "vlm_guard.wrapper",
    "wrap": "vlm_guard.wrapper",
    "register_method": "vlm_guard.methods.registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name.endswith("Config") and name[:1].isupper():  # a registered method's config class: VHRConfig, ...
        from vlm_guard.methods.registry import method_specs

        for spec in method_specs():
            if spec.config_class.__name__ == name:
                return spec.config_class
    raise AttributeError(f"module 'vlm_guard' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (tab completion shows ``wrap``, ``GuardConfig`` ... though they load on first use)."""
    return sorted(set(__all__) | {"calibrate", "load_default", "tune"})


def load_default(*args, **kwargs):
    """The shipped default model and processor (see :func:`vlm_guard.defaults.load_default`)."""
    from vlm_guard.defaults import load_default as _load_default

    return _load_default(*args, **kwargs)


def calibrate(*args, **kwargs):
    """Profile a model's heads once and return a :class:`vlm_guard.calibration.head_map.HeadMap`
    (see :func:`vlm_guard.calibration.calibrate.calibrate`)."""
    from vlm_guard.calibration.calibrate import calibrate as _calibrate

    return _calibrate(*args, **kwargs)


def tune(*args, **kwargs):
    """Choose each method's strength and layer band for one model on a tuning split and store them in its head map
    (see :func:`vlm_guard.tuning.search.tune`)."""
    from vlm_guard.tuning.search import tune as _tune

    return _tune(*args, **kwargs)


__all__ = [
    "GuardConfig",
    "GuardedModel",
    "wrap",
    "register_method",
    "VHRConfig",
    "VARConfig",
    "GIFTConfig",
    "PAIConfig",
    "VCDConfig",
    "load_default",
    "calibrate",
    "tune",
    "__version__",
]
