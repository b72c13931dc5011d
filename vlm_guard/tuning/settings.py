"""Which value of each method setting runs, and where it came from.

Precedence, field by field, for every enabled method:

1. a value the user set in the config (a constructor argument, a ``from_dict`` key, or an attribute assigned
   later: :attr:`~vlm_guard.config.MethodConfig.explicit_fields`; choosing ``preset="paper"`` counts as setting
   the fields that preset governs) wins;
2. else the head map's tuned value (``head_map.tuned["settings"][method][field]``, written by ``vlm-guard tune``);
3. else the released default (the config class's default).

``GuardConfig.from_methods("vhr")`` sets no field, so every tuned value applies; ``VHRConfig(alpha=3.0)`` keeps
alpha 3 and takes the tuned target layers. ``dataclasses.replace`` passes every field to the constructor, so a
replaced config counts as fully explicit.

Default method set: :func:`default_methods` -- the combination tuning chose for the model when its head map has one,
else :data:`UNTUNED_DEFAULT_METHODS` (PAI at its released settings: in the project's own synthetic table,
``docs/results/synthetic.md``, it is significantly worse than greedy on no column; VHR at released settings is
significantly worse on random-split F1 there, VHR+GIFT and VHR+VAR+GIFT on the CHAIR columns, and
``tests/test_tuning.py`` checks the choice against that table).

Example:
    >>> config, sources = resolve_config(GuardConfig(vhr=VHRConfig(alpha=3.0)), head_map)   # doctest: +SKIP
    >>> sources["vhr"]["alpha"], sources["vhr"]["target_layers"]                            # doctest: +SKIP
    ('config', 'tuned')
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ..config import METHOD_ORDER, GuardConfig

logger = logging.getLogger(__name__)

SOURCE_CONFIG = "config"
"""The value was set by the user."""
SOURCE_TUNED = "tuned"
"""The value comes from the head map's tuned settings (``vlm-guard tune``)."""
SOURCE_DEFAULT = "released default"
"""The config class's default (the released code's value)."""

UNTUNED_DEFAULT_METHODS: tuple[str, ...] = ("pai",)
"""Methods enabled by default for a model without tuned settings (see the module docstring)."""

AUTO = "auto"
"""Method-set name meaning :func:`default_methods` of the head map."""


def tuned_settings(head_map: Any) -> dict[str, dict[str, Any]]:
    """``{method: {field: value}}`` stored by ``vlm-guard tune`` in ``head_map`` (empty when none)."""
    tuned = getattr(head_map, "tuned", None) or {}
    settings = tuned.get("settings") or {}
    return {name: dict(values) for name, values in settings.items() if name in METHOD_ORDER and values}


def has_tuned_settings(head_map: Any) -> bool:
    return bool(getattr(head_map, "tuned", None) or {}) and "default_methods" in head_map.tuned


def default_methods(head_map: Any) -> tuple[list[str], str]:
    """The method set to enable when the user names none, and why.

    Returns:
        ``(methods, reason)``: the tuned combination of ``head_map`` (possibly empty when tuning found no method
        that helps the model), else :data:`UNTUNED_DEFAULT_METHODS`.
    """
    if has_tuned_settings(head_map):
        methods = [m for m in head_map.tuned.get("default_methods") or [] if m in METHOD_ORDER]
        data = (head_map.tuned.get("tuning_data") or {}).get("name", "tuning data")
        if methods:
            return methods, f"chosen by `vlm-guard tune` for this model (on {data})"
        return [], f"`vlm-guard tune` found no method that helps this model (on {data}): none enabled"
    return list(UNTUNED_DEFAULT_METHODS), (
        "untuned default (PAI at released settings; run `vlm-guard tune` to choose settings for this model)"
    )


def default_config(head_map: Any) -> GuardConfig:
    """:func:`default_methods` as a config whose fields are all unset (so tuned values fill them in)."""
    methods, _ = default_methods(head_map)
    return GuardConfig.from_methods(methods or "none")


def resolve_config(config: GuardConfig, head_map: Any = None) -> tuple[GuardConfig, dict[str, dict[str, str]]]:
    """Fill the unset fields of ``config`` from the head map's tuned settings (see the module docstring).

    Args:
        config: The user's config.
        head_map: A :class:`~vlm_guard.heads.head_map.HeadMap` or None.

    Returns:
        ``(resolved, sources)``: a new config with the values that run (its explicit fields are the user's, so
        resolving it again gives the same result) and ``{method: {field: source}}`` with one of
        :data:`SOURCE_CONFIG`, :data:`SOURCE_TUNED`, :data:`SOURCE_DEFAULT` per field.
    """
    tuned = tuned_settings(head_map)
    changes: dict[str, Any] = {}
    sources: dict[str, dict[str, str]] = {}
    for name in config.enabled_methods:
        method_config = getattr(config, name)
        explicit = method_config.explicit_fields
        values = method_config.to_dict()
        field_sources = {}
        known = {f.name for f in dataclasses.fields(method_config)}
        unknown = sorted(set(tuned.get(name, {})) - known)
        if unknown:
            logger.warning("the head map's tuned %s settings name unknown field(s) %s; ignored", name, unknown)
        # a non-default preset the user chose sets its fields like explicit values ("released" is the baseline)
        preset_chosen = "preset" in explicit and getattr(method_config, "preset", "released") != "released"
        for item in dataclasses.fields(method_config):
            if item.name in explicit or (preset_chosen and "presets" in item.metadata):
                field_sources[item.name] = SOURCE_CONFIG
            elif item.name in tuned.get(name, {}):
                values[item.name] = tuned[name][item.name]
                field_sources[item.name] = SOURCE_TUNED
            else:
                field_sources[item.name] = SOURCE_DEFAULT
        resolved = type(method_config).from_dict(values)
        object.__setattr__(resolved, "_explicit_fields", explicit)
        changes[name] = resolved
        sources[name] = field_sources
    return (config.replace(**changes) if changes else config), sources


def describe_settings(config: GuardConfig, sources: dict[str, dict[str, str]], tuned_only: bool = False) -> list[str]:
    """One line per enabled method: ``vhr: alpha=1.5 (tuned), target_layers=[3, 4, 5] (tuned), ...``.

    Args:
        tuned_only: list only the fields set by the user or tuning, and say "released defaults" for the rest.
    """
    lines = []
    for name in config.enabled_methods:
        method_config = getattr(config, name)
        parts, defaults = [], 0
        for item in dataclasses.fields(method_config):
            source = sources.get(name, {}).get(item.name, SOURCE_DEFAULT)
            if tuned_only and (source == SOURCE_DEFAULT or (item.name == "preset" and method_config.preset == "released")):
                defaults += 1
                continue
            parts.append(f"{item.name}={getattr(method_config, item.name)!r} ({source})")
        if tuned_only and defaults:
            parts.append("other fields: released defaults" if parts else "all fields: released defaults")
        lines.append(f"{name}: " + ", ".join(parts))
    return lines


def tuned_report(head_map: Any) -> list[str]:
    """Lines for ``vlm-guard heads show``: each tuned setting beside its released default, and the default set."""
    from ..config import _method_config_class

    if not has_tuned_settings(head_map):
        return ["tuned settings: none (every method runs at its released defaults unless set; "
                "default method set: " + ",".join(UNTUNED_DEFAULT_METHODS) + "). Run `vlm-guard tune` to choose them."]
    tuned = head_map.tuned
    data = tuned.get("tuning_data") or {}
    lines = [f"tuned settings (vlm-guard tune {tuned.get('library_version', '?')}, on {data.get('name', '?')}; "
             f"objective: {tuned.get('objective', {}).get('text', '?')})"]
    methods, reason = default_methods(head_map)
    lines.append(f"default method set: {','.join(methods) or 'none'} -- {reason}")
    header = f"  {'method':<6} {'field':<16} {'value':<22} {'source':<18} {'released default':<22} gain on tuning data"
    lines.append(header)
    settings = tuned_settings(head_map)
    gains = tuned.get("gain") or {}
    for name in METHOD_ORDER:
        config_class = _method_config_class(name)
        defaults = config_class()
        if name not in settings:
            note = (tuned.get("skipped") or {}).get(name, "not tuned")
            lines.append(f"  {name:<6} {'(all)':<16} {'released defaults':<22} {SOURCE_DEFAULT:<18} {'':<22} {note}")
            continue
        first = True
        for item in dataclasses.fields(config_class):
            if item.name not in settings[name]:
                continue
            gain, first = (gains.get(name, "") if first else ""), False
            lines.append(f"  {name:<6} {item.name:<16} {settings[name][item.name]!r:<22} {SOURCE_TUNED:<18} "
                         f"{getattr(defaults, item.name)!r:<22} {gain}")
    lines.append("  (all other fields: released defaults; a value set in the user's config wins over both)")
    return lines


__all__ = [
    "SOURCE_CONFIG",
    "SOURCE_TUNED",
    "SOURCE_DEFAULT",
    "UNTUNED_DEFAULT_METHODS",
    "AUTO",
    "tuned_settings",
    "has_tuned_settings",
    "default_methods",
    "default_config",
    "resolve_config",
    "describe_settings",
    "tuned_report",
]
