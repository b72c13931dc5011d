"""The schema of a tuning state file (``tune_state.json``), checked when a tune resumes from it.

A state holds every per-item result of every setting tried (see :class:`vlm_guard.tuning.search.TuningState`)::

    {"format": "vlm_guard.tune_state", "version": 1, "identity": {...}, "elapsed_s": 12.5,
     "plan": null | {"rungs": [{"pope/random": 8, "chair": 8}, ...], ...},
     "trials": {"<setting key>": {"label": "vhr alpha=0.5", "methods": {"vhr": {"alpha": 0.5}}, "band": "",
                                  "items": {"pope/random": {"<item id>": {"c": 1, "y": 0}, ...}, "chair": {...}}}},
     "seconds": {"<setting key>": [seconds, items]}}          # optional (tune --profiles)

An item's result is ``{"skip": 1}`` (unreadable image), a POPE result ``{"c": 0|1, "y": 0|1}`` (correct, said yes)
or a CHAIR result ``{"m", "h", "g", "r"}`` (mentions, hallucinated, ground-truth objects, recalled; counts with
``h <= m`` and ``r <= g``); see :func:`vlm_guard.tuning.objective.compact_result`. A value of another type would
either crash the search later with a traceback or bend the metrics silently, so :func:`validate_state` refuses it
with one line naming the file and the field.

Example:
    >>> text = ('{"format": "vlm_guard.tune_state", "version": 1, "identity": {}, "elapsed_s": 12.5, '
    ...         '"plan": null, "trials": {}}')                       # a tune_state.json with no trial yet
    >>> state = json.loads(text)
    >>> validate_state("tune_state.json", state, 1) is state
    True
    >>> state["elapsed_s"] = "12.5"
    >>> validate_state("tune_state.json", state, 1)
    Traceback (most recent call last):
    ...
    vlm_guard.tuning.state_schema.TuningStateError: tune_state.json: field elapsed_s is '12.5', not a non-negative number of seconds; ...
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["TuningStateError", "validate_state"]


class TuningStateError(ValueError):
    """A tuning state file does not hold what a tuning state holds (the message names the file and the field)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_state(path: str | os.PathLike, data: Any, version: int) -> dict:
    """Check a loaded tuning state against the schema above; returns it unchanged.

    ``format`` and ``identity`` are checked by the caller (they say whose state it is, not whether it is damaged).

    Raises:
        TuningStateError: the first field that breaks the schema, named by its path (``trials[<key>].items...``).
    """

    def fail(field: str, value: Any, expected: str) -> TuningStateError:
        return TuningStateError(
            f"{path}: field {field} is {_short(value)}, {expected}; the tuning state is damaged "
            "or was edited: delete it to start over, or pass another --state"
        )

    if not isinstance(data, dict):
        raise fail("(the whole file)", type(data).__name__, "not a JSON object")
    for key in ("version", "elapsed_s", "plan", "trials"):
        if key not in data:
            raise TuningStateError(
                f"{path}: field {key} is missing; the tuning state is damaged or was edited: delete "
                "it to start over, or pass another --state"
            )
    stored = data["version"]
    if not _is_int(stored) or stored < 1:
        raise fail("version", stored, "not a positive integer")
    if stored > version:
        raise TuningStateError(
            f"{path}: field version is {stored}, newer than this vlm_guard reads ({version}); "
            "upgrade vlm_guard or pass another --state"
        )
    if not _is_number(data["elapsed_s"]) or data["elapsed_s"] < 0:
        raise fail("elapsed_s", data["elapsed_s"], "not a non-negative number of seconds")
    _check_plan(data["plan"], fail)
    trials = data["trials"]
    if not isinstance(trials, dict):
        raise fail("trials", trials, "not an object (setting key -> trial)")
    for key, trial in trials.items():
        _check_trial(key, trial, fail)
    seconds = data.get("seconds")
    if seconds is not None:
        if not isinstance(seconds, dict):
            raise fail("seconds", seconds, "not an object (setting key -> [seconds, items])")
        for key, entry in seconds.items():
            if (
                not isinstance(entry, list)
                or len(entry) != 2
                or not _is_number(entry[0])
                or entry[0] < 0
                or not _is_int(entry[1])
                or entry[1] < 0
            ):
                raise fail(f"seconds[{key!r}]", entry, "not [seconds >= 0, items >= 0]")
    return data


def _check_plan(plan: Any, fail) -> None:
    if plan is None:
        return
    if not isinstance(plan, dict):
        raise fail("plan", plan, "not null or an object")
    rungs = plan.get("rungs")
    if not isinstance(rungs, list) or not rungs:
        raise fail("plan.rungs", rungs, "not a non-empty list of {task: items}")
    for index, sizes in enumerate(rungs):
        if not isinstance(sizes, dict):
            raise fail(f"plan.rungs[{index}]", sizes, "not an object {task: items}")
        for task, size in sizes.items():
            if not _is_int(size) or size < 0:
                raise fail(f"plan.rungs[{index}][{task!r}]", size, "not a non-negative integer")


_POPE_KEYS = {"c", "y"}
_CHAIR_KEYS = {"m", "h", "g", "r"}


def _check_trial(key: str, trial: Any, fail) -> None:
    where = f"trials[{key!r}]"
    if not isinstance(trial, dict):
        raise fail(where, trial, "not an object {label, methods, band, items}")
    methods = trial.get("methods")
    if not isinstance(methods, dict) or not all(isinstance(v, dict) for v in methods.values()):
        raise fail(f"{where}.methods", methods, "not an object {method: {field: value}}")
    try:
        keyed = json.loads(key)
    except json.JSONDecodeError:
        keyed = None
    if keyed != methods:  # the key names the setting whose results these are
        raise fail(f"{where}.methods", methods, "not the setting its key names")
    if not isinstance(trial.get("label"), str):
        raise fail(f"{where}.label", trial.get("label"), "not a string")
    if not isinstance(trial.get("band", ""), str):
        raise fail(f"{where}.band", trial.get("band"), "not a string")
    items = trial.get("items")
    if not isinstance(items, dict):
        raise fail(f"{where}.items", items, "not an object {task: {item id: result}}")
    for task, results in items.items():
        if not isinstance(results, dict):
            raise fail(f"{where}.items[{task!r}]", results, "not an object {item id: result}")
        pope = task.startswith("pope")
        for item_id, result in results.items():
            _check_result(f"{where}.items[{task!r}][{item_id!r}]", result, pope, fail)


def _check_result(where: str, result: Any, pope: bool, fail) -> None:
    if not isinstance(result, dict):
        raise fail(where, result, "not an object")
    if result == {"skip": 1}:
        return
    expected = _POPE_KEYS if pope else _CHAIR_KEYS
    if set(result) != expected:
        raise fail(
            where,
            result,
            f'not {{"skip": 1}} or a {"POPE" if pope else "CHAIR"} result with the fields {sorted(expected)}',
        )
    for name, value in result.items():
        if not _is_int(value) or value < 0 or (pope and value > 1):
            raise fail(f"{where}.{name}", value, "not 0 or 1" if pope else "not a non-negative integer")
    if not pope:
        for part, whole in (("h", "m"), ("r", "g")):
            if result[part] > result[whole]:
                raise fail(f"{where}.{part}", result[part], f"larger than {whole} ({result[whole]})")
