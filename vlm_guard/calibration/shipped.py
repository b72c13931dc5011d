"""Head maps shipped inside the package (``vlm_guard/assets/head_maps/<name>-<fingerprint hash>/``): the default
model's calibrated map with the settings ``vlm-guard tune`` chose for it, found by ``vlm_guard.wrap`` when the
head-map cache has none for the model.

Its fingerprint carries the digest of the weights it was calibrated and tuned on, and ``check_compatible`` refuses
it for other weights, so a retrained model with the same geometry gets none (with a warning).

Example (not run: loads the default model, whose weights the shipped map must match)::

    model, processor = vlm_guard.load_default()
    vlm_guard.wrap(model, processor, "auto").head_map.tuned["default_methods"]
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
    from vlm_guard.calibration.head_map import cache_folder

    return cache_folder(fingerprint, SHIPPED_HEAD_MAPS)


def find_shipped_head_map(adapter, model=None):  # noqa: ARG001 - model kept for callers
    """The shipped head map for ``adapter``'s model, or None (never raises; problems are logged)."""
    import os

    from vlm_guard.calibration.head_map import find_cached_head_map

    if os.environ.get(SHIPPED_ENV, "1").strip() == "0":
        return None
    return find_cached_head_map(adapter, SHIPPED_HEAD_MAPS, label="shipped")


HELD_OUT_FILE = "held_out.json"
"""Beside a shipped map: each task profile's shipped setting measured on held-out scenes (written by
``docs/results/profiles_v2.py`` from the results files, never by hand)."""


def held_out_record(head_map, folder=None) -> dict | None:
    """The held-out measurements shipped beside ``head_map`` (``held_out.json``), or None when there are none or the
    file is unreadable (logged)."""
    import json

    if head_map is None:
        return None
    path = Path(folder) / HELD_OUT_FILE if folder is not None else shipped_folder(head_map.fingerprint) / HELD_OUT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
            raise ValueError("field profiles must be an object")
        return data
    except (OSError, ValueError) as error:
        logger.warning("%s is not a readable held-out record (%s); no held-out effect shown", path, error)
        return None


def _runs(config, settings: dict) -> bool:
    """True when ``config`` runs exactly the methods of ``settings`` with those field values."""
    if sorted(config.enabled_methods) != sorted(settings):
        return False
    return all(
        getattr(getattr(config, method), name) == value
        for method, values in settings.items()
        for name, value in values.items()
    )


def held_out_line(head_map, profile: str, config, folder=None) -> str | None:
    """One line with the held-out CHAIR_I (caption) or POPE (answer) effect of ``profile``'s shipped setting, read
    from ``held_out.json``; a note when ``config`` runs other settings; None when nothing was measured."""
    record = held_out_record(head_map, folder)
    if record is None:
        return None
    entry = record["profiles"].get(profile)
    if not isinstance(entry, dict):
        return None
    if not _runs(config, entry.get("settings") or {}):
        return (
            f"held-out effect: measured for the {profile} profile's shipped setting, not the settings running now "
            f"(see {record.get('source', HELD_OUT_FILE)})"
        )
    return entry.get("line")


__all__ = [
    "SHIPPED_HEAD_MAPS",
    "SHIPPED_ENV",
    "HELD_OUT_FILE",
    "shipped_folder",
    "find_shipped_head_map",
    "held_out_record",
    "held_out_line",
]
