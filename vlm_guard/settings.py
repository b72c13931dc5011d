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

Task profiles: a head map tuned by ``vlm-guard tune --profiles`` holds one setting per task (:data:`PROFILES`:
``caption`` for free-form descriptions, ``answer`` for short answers), because a method that helps long captions
may cost yes/no answers. ``wrap(model, processor, "auto:caption")`` (or ``"auto"`` with ``task="caption"``) takes
that profile's method set and tuned values; ``"auto"`` without a task takes the map's ``default_profile``
(``caption``). A map written before profiles existed (one ``settings`` / ``default_methods`` pair) is read as a
single profile that serves every task. The ``tuned`` section is checked against its schema
(:func:`validate_tuned`) when a map is read: a malformed one is refused with one line naming the field.

Example:
    >>> from types import SimpleNamespace
    >>> from vlm_guard import VHRConfig
    >>> head_map = SimpleNamespace(tuned={"settings": {"vhr": {"alpha": 1.25, "target_layers": [2, 3]}},
    ...                                   "default_methods": ["vhr"]})           # a HeadMap's tuned section
    >>> config, sources = resolve_config(GuardConfig(vhr=VHRConfig(alpha=3.0)), head_map)
    >>> sources["vhr"]["alpha"], sources["vhr"]["target_layers"]
    ('config', 'tuned')
    >>> config.vhr.alpha, config.vhr.target_layers
    (3.0, [2, 3])
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from vlm_guard.config import METHOD_ORDER, GuardConfig

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
"""Method-set name meaning :func:`default_methods` of the head map (``"auto:<task>"``: of that task's profile)."""

PROFILES: dict[str, str] = {
    "caption": "free-form descriptions (captions, detailed answers): tuned on CHAIR_I with recall kept",
    "answer": "short answers (yes/no, VQA): tuned on POPE accuracy with no split worse than greedy",
}
"""Task profiles a head map can carry tuned settings for."""
DEFAULT_PROFILE = "caption"
"""The profile ``"auto"`` uses when no task is given and the map names no ``default_profile``."""
LEGACY_PROFILE = "single"
"""Name reported for the one profile of a map tuned before profiles existed (it serves every task)."""


class TunedSectionError(ValueError):
    """A head map's ``tuned`` section does not match its schema (the message names the field)."""


_FIX = 're-run `vlm-guard tune` or delete the map\'s "tuned" section'


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _check_settings(settings: Any, where: str) -> dict:
    from vlm_guard.config import _method_config_class

    if not isinstance(settings, dict):
        raise TunedSectionError(
            f"field {where} must be an object {{method: {{field: value}}}}, got {_type_name(settings)}; {_FIX}"
        )
    for method, values in settings.items():
        if method not in METHOD_ORDER:
            raise TunedSectionError(
                f"field {where} names unknown method {method!r} (methods: {', '.join(METHOD_ORDER)}); {_FIX}"
            )
        if not isinstance(values, dict):
            raise TunedSectionError(
                f"field {where}.{method} must be an object {{field: value}}, got {_type_name(values)}; {_FIX}"
            )
        config_class = _method_config_class(method)
        known = {item.name for item in dataclasses.fields(config_class)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TunedSectionError(
                f"field {where}.{method} names unknown field(s) {unknown} (fields: {sorted(known)}); {_FIX}"
            )
        try:
            config_class.from_dict(dict(values)).validate()
        except (TypeError, ValueError) as error:
            raise TunedSectionError(
                f"field {where}.{method} holds a value the method refuses ({error}); {_FIX}"
            ) from None
    return {method: dict(values) for method, values in settings.items()}


def _check_methods(methods: Any, where: str) -> list[str]:
    if isinstance(methods, str):  # "vhr,gift": the method-list spelling GuardConfig.from_methods takes
        methods = [m.strip().lower() for m in methods.replace("+", ",").split(",") if m.strip()]
        methods = [] if methods in (["none"],) else methods
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise TunedSectionError(
            f'field {where} must be a list of method names such as ["vhr", "gift"], got '
            f"{_type_name(methods)} {str(methods)[:60]!r}; {_FIX}"
        )
    unknown = [m for m in methods if m not in METHOD_ORDER]
    if unknown:
        raise TunedSectionError(
            f"field {where} names unknown method(s) {unknown} (methods: {', '.join(METHOD_ORDER)}); {_FIX}"
        )
    return list(methods)


def _check_profile(section: Any, where: str) -> dict:
    if not isinstance(section, dict):
        raise TunedSectionError(
            f'field {where} must be an object with "settings" and "default_methods", got {_type_name(section)}; {_FIX}'
        )
    out = dict(section)
    if "settings" in section or "default_methods" in section:
        out["settings"] = _check_settings(section.get("settings", {}), f"{where}.settings")
        if "default_methods" not in section:
            raise TunedSectionError(
                f"field {where}.default_methods is missing (a list of method names, [] for none); {_FIX}"
            )
        out["default_methods"] = _check_methods(section["default_methods"], f"{where}.default_methods")
    return out


def validate_tuned(tuned: Any, source: str | None = None) -> dict:
    """The ``tuned`` section of a head map, checked against its schema (a copy; ``{}`` when there is none).

    Two formats: *profiles* (``{"profiles": {"caption": {"settings": {method: {field: value}}, "default_methods":
    [method, ...], ...}, "answer": {...}}, "default_profile": "caption", ...}``) and the *single profile* of maps tuned
    before profiles existed (``{"settings": ..., "default_methods": ..., ...}``), read as one profile for every task.
    Every method and field name is known, every value passes the method's own checks.

    Args:
        source: the file, for the message (``head_map.json``'s path).

    Raises:
        TunedSectionError: one line naming the file and the field (``tuned.settings``, ``tuned.profiles.caption...``).

    Example:
        >>> validate_tuned({"settings": [1, 2], "default_methods": []}, "m/head_map.json")
        Traceback (most recent call last):
        ...
        vlm_guard.settings.TunedSectionError: m/head_map.json: field tuned.settings must be an object {method: {field: value}}, got a list; re-run `vlm-guard tune` or delete the map's "tuned" section
    """
    try:
        if tuned is None:
            return {}
        if not isinstance(tuned, dict):
            raise TunedSectionError(f"field tuned must be an object, got {_type_name(tuned)}; {_FIX}")
        if not tuned:
            return {}
        out = dict(tuned)
        if "profiles" in tuned:
            profiles = tuned["profiles"]
            if not isinstance(profiles, dict) or not profiles:
                raise TunedSectionError(
                    f"field tuned.profiles must be a non-empty object {{profile: {{...}}}}, got "
                    f"{_type_name(profiles)}; {_FIX}"
                )
            unknown = sorted(set(profiles) - set(PROFILES))
            if unknown:
                raise TunedSectionError(
                    f"field tuned.profiles names unknown profile(s) {unknown} (profiles: {', '.join(PROFILES)}); {_FIX}"
                )
            out["profiles"] = {
                name: _check_profile(section, f"tuned.profiles.{name}") for name, section in profiles.items()
            }
            for name, section in out["profiles"].items():
                if "default_methods" not in section:
                    raise TunedSectionError(
                        f"field tuned.profiles.{name}.default_methods is missing (a list of method "
                        f"names, [] for none); {_FIX}"
                    )
            default = tuned.get("default_profile", DEFAULT_PROFILE)
            if not isinstance(default, str) or default not in out["profiles"]:
                raise TunedSectionError(
                    f"field tuned.default_profile is {default!r}, not one of the map's profiles "
                    f"{sorted(out['profiles'])}; {_FIX}"
                )
            out["default_profile"] = default
            return out
        return _check_profile(out, "tuned")
    except TunedSectionError as error:
        if source:
            raise TunedSectionError(f"{source}: {error}") from None
        raise


def check_task(task: Any) -> str | None:
    """``task`` as a profile name (``None`` stays None).

    Raises:
        ValueError: not one of :data:`PROFILES`.
    """
    if task is None:
        return None
    if not isinstance(task, str) or task.strip().lower() not in PROFILES:
        raise ValueError(
            f"unknown task {task!r}; tasks are {', '.join(repr(p) for p in PROFILES)} "
            f'(e.g. wrap(model, processor, "auto:caption") or task="answer")'
        )
    return task.strip().lower()


def parse_auto(text: str) -> tuple[bool, str | None]:
    """``(is auto, task)`` of a method-set string: ``"auto"`` -> ``(True, None)``, ``"auto:answer"`` ->
    ``(True, "answer")``, ``"vhr,pai"`` -> ``(False, None)``.

    Raises:
        ValueError: ``"auto:<x>"`` with an unknown task.

    Example:
        >>> parse_auto(" Auto:Caption "), parse_auto("vhr")
        ((True, 'caption'), (False, None))
    """
    head, sep, tail = text.strip().lower().partition(":")
    if head.strip() != AUTO:
        return False, None
    if not sep:
        return True, None
    return True, check_task(tail.strip())


def profile_section(head_map: Any, task: str | None = None) -> tuple[dict | None, str | None]:
    """``(section, profile)``: the tuned ``{"settings", "default_methods", ...}`` that serves ``task`` and the name
    of the profile it came from (:data:`LEGACY_PROFILE` for a single-profile map; ``(None, task)`` when the map has no
    tuned settings for it).

    Raises:
        ValueError: unknown task; TunedSectionError: a malformed ``tuned`` section.
    """
    task = check_task(task)
    tuned = validate_tuned(getattr(head_map, "tuned", None))
    if not tuned:
        return None, task
    if "profiles" in tuned:
        name = task or tuned["default_profile"]
        return tuned["profiles"].get(name), name
    return (tuned if "default_methods" in tuned else None), LEGACY_PROFILE


def tuned_settings(head_map: Any, task: str | None = None) -> dict[str, dict[str, Any]]:
    """``{method: {field: value}}`` stored by ``vlm-guard tune`` in ``head_map`` for ``task``'s profile (the map's
    default profile when None; empty when none)."""
    section, _ = profile_section(head_map, task)
    settings = (section or {}).get("settings") or {}
    return {name: dict(values) for name, values in settings.items() if name in METHOD_ORDER and values}


def has_tuned_settings(head_map: Any, task: str | None = None) -> bool:
    section, _ = profile_section(head_map, task)
    return section is not None and "default_methods" in section


def profile_note(head_map: Any, task: str | None = None) -> str:
    """One line saying which profile serves ``task`` and why (for ``describe_settings`` and the CLI)."""
    section, name = profile_section(head_map, task)
    asked = f"task {task!r}" if task else "no task given"
    if name == LEGACY_PROFILE:
        return f"profile: single (a map tuned before task profiles: its one setting serves every task; {asked})"
    if section is None and name is None:
        return f"profile: none (the head map holds no tuned settings; {asked})"
    if section is None:
        return f"profile: {name} ({asked}; the head map has no {name!r} profile: untuned default)"
    how = "the map's default profile" if not task else "the task's profile"
    return f"profile: {name} ({asked}: {how}; {PROFILES[name]})"


def default_methods(head_map: Any, task: str | None = None) -> tuple[list[str], str]:
    """The method set to enable when the user names none, and why.

    Returns:
        ``(methods, reason)``: the tuned combination of ``head_map``'s profile for ``task`` (possibly empty when
        tuning found no method that helps the model on that task), else :data:`UNTUNED_DEFAULT_METHODS`.
    """
    section, name = profile_section(head_map, task)
    if section is not None and "default_methods" in section:
        methods = [m for m in section.get("default_methods") or [] if m in METHOD_ORDER]
        tuned = validate_tuned(head_map.tuned)
        data = (tuned.get("tuning_data") or {}).get("name", "tuning data")
        profile = "" if name == LEGACY_PROFILE else f"{name} profile, "
        if methods:
            return methods, f"{profile}chosen by `vlm-guard tune` for this model (on {data})"
        return [], f"{profile}`vlm-guard tune` found no method that helps this model (on {data}): none enabled"
    return list(UNTUNED_DEFAULT_METHODS), (
        "untuned default (PAI at released settings; run `vlm-guard tune` to choose settings for this model)"
    )


def default_config(head_map: Any, task: str | None = None) -> GuardConfig:
    """:func:`default_methods` as a config whose fields are all unset (so tuned values fill them in)."""
    methods, _ = default_methods(head_map, task)
    return GuardConfig.from_methods(methods or "none")


def resolve_request(config: Any, head_map: Any = None, task: str | None = None) -> tuple[GuardConfig, dict, str | None]:
    """What ``wrap`` / ``set_config`` run for ``config`` (a :class:`GuardConfig`, a method list, ``"auto"`` or
    ``"auto:<task>"``) and ``task``: ``(resolved config, sources, profile note)`` (see :func:`resolve_config`).

    Raises:
        ValueError: unknown task, or ``"auto:<task>"`` and ``task=`` naming different tasks.
    """
    task = check_task(task)
    if isinstance(config, str):
        auto, named = parse_auto(config)
        if auto:
            if named and task and named != task:
                raise ValueError(f"config {config!r} and task={task!r} name different tasks; give one of them")
            task = named or task
            config = default_config(head_map, task)
        else:
            config = GuardConfig.from_methods(config)
    if not isinstance(config, GuardConfig):
        raise ValueError(
            f"config must be a vlm_guard.GuardConfig, got {type(config).__name__}; use GuardConfig.from_methods('vhr,var')"
        )
    config.validate()
    resolved, sources = resolve_config(config, head_map, task)
    note = profile_note(head_map, task) if head_map is not None and getattr(head_map, "tuned", None) else None
    return resolved, sources, note


def resolve_config(
    config: GuardConfig, head_map: Any = None, task: str | None = None
) -> tuple[GuardConfig, dict[str, dict[str, str]]]:
    """Fill the unset fields of ``config`` from the head map's tuned settings (see the module docstring).

    Args:
        config: The user's config.
        head_map: A :class:`~vlm_guard.calibration.head_map.HeadMap` or None.
        task: the task profile whose tuned values fill the unset fields (None: the map's default profile).

    Returns:
        ``(resolved, sources)``: a new config with the values that run (its explicit fields are the user's, so
        resolving it again gives the same result) and ``{method: {field: source}}`` with one of
        :data:`SOURCE_CONFIG`, :data:`SOURCE_TUNED`, :data:`SOURCE_DEFAULT` per field.
    """
    tuned = tuned_settings(head_map, task)
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


def measured_harm(head_map: Any, task: str | None, config: GuardConfig) -> list[str]:
    """Warnings for the enabled methods whose exact setting ``vlm-guard tune`` measured as harmful on this model.

    The head map's task profile (``task``, else its default profile) keeps every setting the tuner tried, with its
    paired interval against greedy on the tuning data. A method of ``config`` whose values equal a single-method row
    there that was significantly worse on the profile's objective, or broke a constraint (e.g. lost object recall),
    gets one line naming the setting, the measured change with its interval, and the fix. The row with the most
    items counts. Empty when the map has no tuning table, or the setting was not tried.
    """
    from vlm_guard.config import _method_config_class

    try:
        section, profile = profile_section(head_map, task)
    except (ValueError, TunedSectionError):
        return []
    rows = (section or {}).get("table") or []
    chosen: dict[str, dict] = {}
    for row in rows:
        methods = row.get("methods") if isinstance(row, dict) else None
        if not isinstance(methods, dict) or len(methods) != 1 or not isinstance(row.get("judgement"), dict):
            continue
        ((name, values),) = methods.items()
        if name not in config.enabled_methods or not isinstance(values, dict):
            continue
        try:
            tried = _method_config_class(name).from_dict(dict(values)).to_dict()
        except (KeyError, TypeError, ValueError):
            continue
        if tried != getattr(config, name).to_dict():
            continue
        if name not in chosen or int(row.get("n") or 0) > int(chosen[name].get("n") or 0):
            chosen[name] = row
    lines = []
    for name, row in chosen.items():
        judgement = row["judgement"]
        broken = list(judgement.get("broken") or [])
        if not (judgement.get("worse") or broken):
            continue
        objective = judgement.get("objective") or {}
        try:
            change = (
                f"{judgement.get('objective_name', 'objective')} {objective['greedy']:.1f} -> {objective['own']:.1f} "
                f"({objective['diff']:+.1f} points, 95 % interval [{objective['low']:+.1f}, {objective['high']:+.1f}])"
            )
        except (KeyError, TypeError, ValueError):
            change = "its objective"
        for constraint in broken:
            interval = (judgement.get("constraints") or {}).get(constraint) or {}
            if "diff" in interval:
                change += (
                    f"; {constraint} {interval['diff']:+.1f} points [{interval['low']:+.1f}, {interval['high']:+.1f}]"
                )
            else:
                change += f"; {constraint} constraint broken"
        lines.append(
            f"{row.get('label', name)} made this model worse on the {profile} profile's tuning data "
            f"({change}; n={row.get('n')}, `vlm-guard tune`'s {row.get('rung', '?')} rung): use 'auto' for the tuned "
            f"setting, or see every setting tried with `vlm-guard heads show`"
        )
    return lines


def describe_settings(
    config: GuardConfig, sources: dict[str, dict[str, str]], tuned_only: bool = False, profile: str | None = None
) -> list[str]:
    """One line per enabled method: ``vhr: alpha=1.5 (tuned), target_layers=[3, 4, 5] (tuned), ...``.

    Args:
        tuned_only: list only the fields set by the user or tuning, and say "released defaults" for the rest.
        profile: the task-profile line (:func:`profile_note`), added last when given.
    """
    lines = []
    for name in config.enabled_methods:
        method_config = getattr(config, name)
        parts, defaults = [], 0
        for item in dataclasses.fields(method_config):
            source = sources.get(name, {}).get(item.name, SOURCE_DEFAULT)
            if tuned_only and (
                source == SOURCE_DEFAULT or (item.name == "preset" and method_config.preset == "released")
            ):
                defaults += 1
                continue
            parts.append(f"{item.name}={getattr(method_config, item.name)!r} ({source})")
        if tuned_only and defaults:
            parts.append("other fields: released defaults" if parts else "all fields: released defaults")
        lines.append(f"{name}: " + ", ".join(parts))
    if profile:  # last, so that lines[i] is the i-th enabled method's
        if not config.enabled_methods:
            lines.append("methods: none (the plain model)")
        lines.append(profile)
    return lines


def tuned_report(head_map: Any) -> list[str]:
    """Lines for ``vlm-guard heads show``: each tuned setting beside its released default, and the default set."""
    from vlm_guard.config import _method_config_class

    tuned = validate_tuned(getattr(head_map, "tuned", None))
    if "profiles" in tuned:
        return _profiles_report(head_map, tuned)
    if not has_tuned_settings(head_map):
        return [
            "tuned settings: none (every method runs at its released defaults unless set; "
            "default method set: " + ",".join(UNTUNED_DEFAULT_METHODS) + "). Run `vlm-guard tune` to choose them."
        ]
    data = tuned.get("tuning_data") or {}
    lines = [
        f"tuned settings (vlm-guard tune {tuned.get('library_version', '?')}, on {data.get('name', '?')}; "
        f"objective: {tuned.get('objective', {}).get('text', '?')})"
    ]
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
            lines.append(
                f"  {name:<6} {item.name:<16} {settings[name][item.name]!r:<22} {SOURCE_TUNED:<18} "
                f"{getattr(defaults, item.name)!r:<22} {gain}"
            )
    lines.append("  (all other fields: released defaults; a value set in the user's config wins over both)")
    return lines


def _profiles_report(head_map: Any, tuned: dict) -> list[str]:
    from vlm_guard.config import _method_config_class

    data = tuned.get("tuning_data") or {}
    confirm = tuned.get("confirmation_data") or {}
    lines = [
        f"tuned task profiles (vlm-guard tune {tuned.get('library_version', '?')}, on {data.get('name', '?')}; "
        f"winners confirmed on {confirm.get('name', '?')}); default profile: {tuned['default_profile']}"
    ]
    for name, section in tuned["profiles"].items():
        methods, reason = default_methods(head_map, name)
        lines.append(f"  profile {name} ({PROFILES[name]}): {','.join(methods) or 'none'} -- {reason}")
        if section.get("decision"):
            lines.append(f"    decision: {section['decision']}")
        for method, values in (section.get("settings") or {}).items():
            defaults = _method_config_class(method)()
            for field_name, value in values.items():
                lines.append(
                    f"    {method:<6} {field_name:<16} {value!r:<22} (released default "
                    f"{getattr(defaults, field_name, '?')!r})"
                )
    lines.append(
        "  (a field not listed runs at its released default; a value set in the user's config wins over both; "
        'choose a profile with wrap(..., "auto:answer") or task=)'
    )
    return lines


__all__ = [
    "SOURCE_CONFIG",
    "SOURCE_TUNED",
    "SOURCE_DEFAULT",
    "UNTUNED_DEFAULT_METHODS",
    "AUTO",
    "PROFILES",
    "DEFAULT_PROFILE",
    "TunedSectionError",
    "validate_tuned",
    "check_task",
    "parse_auto",
    "profile_section",
    "profile_note",
    "resolve_request",
    "tuned_settings",
    "has_tuned_settings",
    "default_methods",
    "default_config",
    "resolve_config",
    "describe_settings",
    "tuned_report",
]
