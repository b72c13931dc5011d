"""Deprecated: the head map and calibration moved to :mod:`vlm_guard.calibration` (the measures each method uses to
:mod:`vlm_guard.methods`). ``from vlm_guard.heads import HeadMap`` keeps working for one release, with a
``DeprecationWarning``."""

from __future__ import annotations

import importlib
import warnings

_MOVED = {
    "HeadMap",
    "HeadMapFileError",
    "HeadMapMismatchError",
    "ImageCentricStats",
    "default_cache_dir",
    "find_cached_head_map",
    "token_vhd",
}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(
            f"vlm_guard.heads.{name} moved to vlm_guard.calibration.{name}; vlm_guard.heads goes away in "
            "the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        value = getattr(importlib.import_module("vlm_guard.calibration"), name)
        globals()[name] = value  # warned once: ``from ... import`` looks a name up twice
        return value
    raise AttributeError(f"module 'vlm_guard.heads' has no attribute {name!r}")


__all__ = sorted(_MOVED)
