"""The ``vlm_guard`` lmms-eval model's arguments: method set and per-method fields -> a :class:`GuardConfig`.

lmms-eval splits ``--model_args`` on commas, so a method list uses ``+``: ``methods=vhr+gift``. The method sets
mean what they mean for ``vlm-guard eval --methods``:

- ``none`` (default): the plain model;
- ``vhr+gift``: those methods at their released settings (a head map's tuned values are not used);
- ``vhr+gift@tuned``: those methods with the head map's tuned values where it has them (``vlm-guard tune``);
- ``auto``: the set tuning chose for this model, with its tuned values (else PAI; see
  :func:`vlm_guard.settings.default_methods`), as ``wrap(model, processor, "auto")``.

A per-method field is ``method.field=value`` (``gift.alpha=3``, ``vhr.target_layers=15-29``; a list is written
``a-b`` for a range or ``a+b+c``) and wins over both the released and the tuned value.

Nothing here imports lmms-eval.

Example:
    >>> split_model_args({"methods": "vhr+gift", "gift.alpha": 3})
    ('vhr+gift', {'gift': {'alpha': 3}})
    >>> field_value("vhr", "target_layers", "15-17")
    [15, 16, 17]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

AUTO = "auto"
"""The ``methods`` value for the model's default method set."""


def split_model_args(kwargs: Mapping[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    """``(methods, {method: {field: raw value}})`` from the model's keyword arguments.

    Raises:
        ValueError: a ``method.field`` key names an unknown method.
    """
    from vlm_guard.config import METHOD_ORDER

    methods = str(kwargs.get("methods", "none") if kwargs.get("methods") is not None else "none")
    fields: dict[str, dict[str, Any]] = {}
    for key, value in kwargs.items():
        if key == "methods":
            continue
        if "." not in key:
            raise ValueError(
                f"unknown model argument {key!r} for --model vlm_guard; arguments are pretrained, "
                f"methods, head_map, dtype, device, attn_implementation, batch_size, trust_remote_code, "
                f"allow_pickle and method fields such as gift.alpha=3."
            )
        method, name = key.split(".", 1)
        method = method.strip().lower()
        if method not in METHOD_ORDER:
            raise ValueError(
                f"model argument {key}={value!r} names unknown method {method!r}; methods are "
                f"{list(METHOD_ORDER)} (e.g. gift.alpha=3)."
            )
        fields.setdefault(method, {})[name.strip()] = value
    return methods, fields


def _parse_int_list(method: str, name: str, value: Any) -> list[int]:
    if isinstance(value, bool):
        raise ValueError(f"{method}.{name}={value!r} is not a layer list; write e.g. 15-29 or 3+4+5.")
    if isinstance(value, int):
        return [value]
    if isinstance(value, float) and value.is_integer():
        return [int(value)]
    text = str(value).strip()
    layers: list[int] = []
    try:
        for part in text.split("+"):
            part = part.strip()
            if "-" in part:
                low, high = (int(bound) for bound in part.split("-", 1))
                if high < low:
                    raise ValueError
                layers.extend(range(low, high + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise ValueError(
            f"{method}.{name}={value!r} is not a layer list; write e.g. 15-29 (a range) or 3+4+5 "
            f"(',' separates model arguments)."
        ) from None
    return layers


def field_value(method: str, name: str, value: Any) -> Any:
    """``value`` (as lmms-eval parsed it: bool, int, float or str) converted to the type of ``method.name``.

    Raises:
        ValueError: unknown field, or a value of the wrong kind (the message names the field and the fix).
    """
    import vlm_guard.methods.registry as registry

    config_class = registry.get_method(method).config_class
    specs = {spec.name: spec for spec in dataclasses.fields(config_class)}
    if name not in specs or name == "preset":
        known = sorted(spec for spec in specs if spec != "preset")
        raise ValueError(f"{method}.{name}: {config_class.__name__} has no field {name!r}; its fields are {known}.")
    annotation = str(specs[name].type).replace(" ", "")
    optional = "None" in annotation.split("|")
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    base = [part for part in annotation.split("|") if part != "None"][0]
    if base.startswith("list"):
        return _parse_int_list(method, name, value)
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{method}.{name}={value!r} must be true or false.")
    if base == "int":
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"{method}.{name}={value!r} must be a whole number.")
        return int(value)
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{method}.{name}={value!r} must be a number.")
        return float(value)
    return str(value)


def guard_config(methods: str, fields: Mapping[str, Mapping[str, Any]], head_map: Any = None):
    """The :class:`~vlm_guard.config.GuardConfig` of a ``methods`` value and per-method fields.

    Args:
        methods: ``none``, ``auto``, ``vhr+gift`` or ``vhr+gift@tuned`` (see the module docstring; commas work too
            when the value is given from Python).
        fields: ``{method: {field: raw value}}`` from :func:`split_model_args`.
        head_map: the head map that ``auto`` reads its set from (None: PAI, the untuned default).

    Returns:
        The config; fields left unset are filled from the head map by ``wrap`` / ``set_config``.

    Raises:
        ValueError: unknown methods, a field for a method that is not in the set, a bad value.
    """
    from vlm_guard.eval.runner import guard_config_for, method_label
    from vlm_guard.settings import default_config

    text = str(methods).strip().lower()
    if text == AUTO:
        config = default_config(head_map)
    else:
        label = method_label(text)
        try:
            config = guard_config_for(label)
        except ValueError as error:
            raise ValueError(
                f"methods={methods!r}: {error}; write methods as vhr+gift (or none, all, auto, vhr+gift@tuned)."
            ) from None
    for method, values in fields.items():
        method_config = getattr(config, method)
        if method_config is None:
            enabled = "+".join(config.enabled_methods) or "none"
            raise ValueError(
                f"{method}.{next(iter(values))} is set but methods={methods} runs {enabled}; add "
                f"{method} to methods (e.g. methods={enabled if enabled != 'none' else ''}"
                f"{'+' if enabled != 'none' else ''}{method})."
            )
        for name, raw in values.items():
            setattr(method_config, name, field_value(method, name, raw))  # validates; an explicit value wins
    return config
