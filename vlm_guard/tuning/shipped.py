"""Head maps shipped inside the package (``vlm_guard/assets/head_maps/<name>-<fingerprint hash>/``): the default
model's calibrated map with the settings ``vlm-guard tune`` chose for it, found by ``vlm_guard.wrap`` when the
head-map cache has none for the model.

Its fingerprint carries the digest of the weights it was calibrated and tuned on, and ``check_compatible`` refuses
it for other weights, so a retrained model with the same geometry gets none (with a warning).

Example:
    >>> model, processor = vlm_guard.load_default()
    >>> vlm_guard.wrap(model, processor, "auto").head_map.tuned["default_methods"]   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SHIPPED_HEAD_MAPS = Path(__file__).resolve().parent.parent / "assets" / "head_maps"
"""Folder of the shipped head maps (one sub-folder per model, named like the cache's)."""

SHIPPED_ENV = "VLM_GUARD_SHIPPED_HEAD_MAPS"
"""Set to ``0`` to ignore the shipped head maps (e.g. to run the default model at the released settings without
passing a config with every field set)."""


def shipped_folder(fingerprint: dict) -> Path:
    """Where the shipped map of the model with ``fingerprint`` would be."""
    from ..heads.head_map import cache_folder

    return cache_folder(fingerprint, SHIPPED_HEAD_MAPS)


def find_shipped_head_map(adapter, model=None):  # noqa: ARG001 - model kept for callers
    """The shipped head map for ``adapter``'s model, or None (never raises; problems are logged)."""
    import os

    from ..heads.head_map import find_cached_head_map

    if os.environ.get(SHIPPED_ENV, "1").strip() == "0":
        return None
    return find_cached_head_map(adapter, SHIPPED_HEAD_MAPS, label="shipped")


__all__ = ["SHIPPED_HEAD_MAPS", "SHIPPED_ENV", "shipped_folder", "find_shipped_head_map"]
