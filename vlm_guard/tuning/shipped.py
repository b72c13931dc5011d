"""Head maps shipped inside the package (``vlm_guard/assets/head_maps/<name>-<fingerprint hash>/``): the default
model's calibrated map with the settings ``vlm-guard tune`` chose for it, found by ``vlm_guard.wrap`` when the
head-map cache has none for the model.

A shipped map records the sha256 prefix of the weights it was tuned on (``tuned["weights_sha256_16"]``); it is only
used for a model loaded from a local folder holding those weights (a retrained model with the same name and
geometry gets none, with a warning).

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


def shipped_folder(fingerprint: dict) -> Path:
    """Where the shipped map of the model with ``fingerprint`` would be."""
    from ..heads.head_map import cache_folder

    return cache_folder(fingerprint, SHIPPED_HEAD_MAPS)


def find_shipped_head_map(adapter, model=None):
    """The shipped head map for ``adapter``'s model, or None (never raises; problems are logged)."""
    from ..heads.head_map import HeadMap, model_name

    try:
        fingerprint = adapter.describe()
    except Exception as error:
        logger.debug("no shipped head-map lookup: %s", error)
        return None
    if not model_name(fingerprint):
        return None
    folder = shipped_folder(fingerprint)
    if not (folder / "head_map.json").is_file():
        return None
    try:
        head_map = HeadMap.from_pretrained(folder)
        head_map.check_compatible(adapter)
    except (OSError, ValueError) as error:
        logger.warning("ignoring the shipped head map at %s: %s", folder, error)
        return None
    expected = (head_map.tuned or {}).get("weights_sha256_16")
    if expected:
        from ..eval.runner import weights_digest

        source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or fingerprint.get("name_or_path") or "")
        actual = weights_digest(source) if source and Path(source).is_dir() else None
        if actual != expected:
            logger.warning("the shipped head map %s was tuned on weights %s, but this model's are %s: not used "
                           "(calibrate and tune this model: `vlm-guard calibrate`, `vlm-guard tune`)",
                           folder.name, expected, actual or "unknown")
            return None
    logger.info("using the shipped head map from %s", folder)
    return head_map


__all__ = ["SHIPPED_HEAD_MAPS", "shipped_folder", "find_shipped_head_map"]
