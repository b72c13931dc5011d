"""Checks for the JSON files the project reads back: each refusal is one line naming the file and the field.

A file that was damaged (a disk error, a hand edit) must not reach the code that uses it: a string where a number
belongs gives a ``TypeError`` traceback far from the file, or worse, a silently different run. These helpers read a
JSON file and check it, raising :class:`FileSchemaError` (a ``ValueError``) with a message such as::

    runs/toy/checkpoint/state.json: field step is "7", not a non-negative integer; the checkpoint is damaged or was
    edited: restore it from a copy, or start a new --out

Used for the toy-model training runs (``train_config.json``: :func:`load_dataclass`; ``state.json``:
:func:`check_train_state`).

Example:
    >>> import dataclasses, json, tempfile
    >>> from pathlib import Path
    >>> @dataclasses.dataclass
    ... class TrainConfig:
    ...     steps: int = 100
    ...     lr: float = 1e-3
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = Path(tmp.name) / "train_config.json"                # e.g. runs/toy/train_config.json
    >>> _ = path.write_text(json.dumps({"steps": 300, "lr": 0.01}))
    >>> load_dataclass(path, TrainConfig, "start a new --out")
    TrainConfig(steps=300, lr=0.01)
    >>> _ = path.write_text(json.dumps({"steps": "7", "lr": 0.01}))
    >>> load_dataclass(path, TrainConfig, "start a new --out")
    Traceback (most recent call last):
    ...
    vlm_guard.schema.FileSchemaError: ...train_config.json: field steps is "7", not an integer; start a new --out
    >>> tmp.cleanup()
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

__all__ = [
    "FileSchemaError",
    "check_dataclass",
    "check_train_state",
    "is_int",
    "is_number",
    "load_dataclass",
    "read_json",
    "short",
]


class FileSchemaError(ValueError):
    """A file does not hold what it should; the message names the file and the field, and says what to do."""


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any, finite: bool = True) -> bool:
    """An int or float that is not a bool (and, with ``finite``, not NaN or infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (not finite or math.isfinite(value))


def short(value: Any) -> str:
    """``value`` as JSON, cut to 60 characters (for error messages)."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: Any, field: str, value: Any, expected: str, remedy: str) -> FileSchemaError:
    return FileSchemaError(f"{path}: field {field} is {short(value)}, {expected}; {remedy}")


def read_json(path: str | os.PathLike, remedy: str) -> Any:
    """The parsed content of the JSON file ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        FileSchemaError: the file is not UTF-8 JSON (the message gives the line and the ``remedy``).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise FileSchemaError(f"{path}: not UTF-8 text (byte {error.start}); {remedy}") from None
    except json.JSONDecodeError as error:
        raise FileSchemaError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); {remedy}"
        ) from None


def _check_type(path: Any, field: str, value: Any, kind: Any, remedy: str) -> None:
    """``value`` (a field read from JSON) against the annotation ``kind``: int, float, bool, str, dict, list or
    tuple (JSON arrays, items checked when typed), Optional/Union, or a nested dataclass (a JSON object)."""
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is types.UnionType:
        arguments = typing.get_args(kind)
        if value is None and type(None) in arguments:
            return
        errors = []
        for argument in (a for a in arguments if a is not type(None)):
            try:
                _check_type(path, field, value, argument, remedy)
                return
            except FileSchemaError as error:
                errors.append(error)
        raise errors[0]
    if dataclasses.is_dataclass(kind):
        check_dataclass(path, value, kind, remedy, prefix=f"{field}.")
        return
    if kind is bool:
        ok, expected = isinstance(value, bool), "not true or false"
    elif kind is int:
        ok, expected = is_int(value), "not an integer"
    elif kind is float:
        ok, expected = is_number(value), "not a finite number"
    elif kind is str:
        ok, expected = isinstance(value, str), "not a string"
    elif kind is dict or origin is dict:
        ok, expected = isinstance(value, dict), "not an object"
    elif kind in (list, tuple) or origin in (list, tuple):
        ok, expected = isinstance(value, list), "not a list"
        items = [a for a in typing.get_args(kind) if a is not Ellipsis]
        if ok and len(set(items)) == 1:
            for index, item in enumerate(value):
                _check_type(path, f"{field}[{index}]", item, items[0], remedy)
    else:
        return  # an annotation JSON has no form for (Any, a callable): the dataclass itself checks it
    if not ok:
        raise _fail(path, field, value, expected, remedy)


def check_dataclass(path: str | os.PathLike, data: Any, cls: type, remedy: str, prefix: str = "") -> dict:
    """Check that ``data`` (read from ``path``) can make ``cls``: an object whose keys are fields of ``cls`` and whose
    values have the fields' types. A missing field is allowed (the dataclass default applies, so files of older
    versions still read). Returns ``data`` unchanged.

    Raises:
        FileSchemaError: the first key that is not a field, or the first field of the wrong type.
    """
    if not isinstance(data, dict):
        raise _fail(path, prefix.rstrip(".") or "(the whole file)", data, "not a JSON object", remedy)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key, value in data.items():
        if key not in fields:
            raise FileSchemaError(
                f"{path}: field {prefix}{key} is not a setting of {cls.__name__} (known: "
                f"{', '.join(sorted(fields))}); {remedy}"
            )
        _check_type(path, f"{prefix}{key}", value, hints.get(key, Any), remedy)
    return data


def load_dataclass(path: str | os.PathLike, cls: type, remedy: str) -> Any:
    """``cls(**content of path)``, the file checked first (:func:`check_dataclass`); a value the dataclass itself
    refuses (its ``__post_init__`` raises ``ValueError``) is reported the same way, naming the file."""
    data = check_dataclass(path, read_json(path, remedy), cls, remedy)
    try:
        return cls(**data)
    except (TypeError, ValueError) as error:
        raise FileSchemaError(f"{path}: {error}; {remedy}") from None


def check_train_state(
    path: str | os.PathLike,
    data: Any,
    stages: typing.Sequence[str],
    remedy: str,
    optimizer: bool = False,
    files: typing.Sequence[str] = (),
) -> dict:
    """Check a training checkpoint's ``state.json`` (the toy-model trainers): returns ``data`` unchanged.

    The fields: ``stage`` (one of ``stages``), ``step`` (integer >= 0), ``elapsed_s`` and the optional ``cpu_s``
    (seconds >= 0), ``losses`` (stage -> list of ``[step, loss]``, a loss may be NaN or null when a run diverged),
    with ``optimizer`` the ``param_groups`` list (objects with ``params``, a list of integers), and for each name in
    ``files`` an entry ``files.<name>`` = ``{"name": file name, "sha256": 64 hex digits}``.

    Raises:
        FileSchemaError: the first field that breaks the schema, named by its path (``losses.vision[3]``).
    """

    def fail(field: str, value: Any, expected: str) -> FileSchemaError:
        return _fail(path, field, value, expected, remedy)

    def require(container: dict, key: str, prefix: str = "") -> Any:
        if key not in container:
            raise FileSchemaError(f"{path}: field {prefix}{key} is missing; {remedy}")
        return container[key]

    if not isinstance(data, dict):
        raise fail("(the whole file)", data, "not a JSON object")
    stage = require(data, "stage")
    if stage not in stages:
        raise fail("stage", stage, f"not one of {', '.join(stages)}")
    step = require(data, "step")
    if not is_int(step) or step < 0:
        raise fail("step", step, "not a non-negative integer")
    for key in ("elapsed_s", "cpu_s"):
        value = require(data, key) if key == "elapsed_s" else data.get(key, 0.0)
        if not is_number(value) or value < 0:
            raise fail(key, value, "not a non-negative number of seconds")
    losses = require(data, "losses")
    if not isinstance(losses, dict):
        raise fail("losses", losses, "not an object (stage -> [[step, loss], ...])")
    for name, points in losses.items():
        if name not in stages:
            raise fail(f"losses.{name}", points, f"under a stage that is not one of {', '.join(stages)}")
        if not isinstance(points, list):
            raise fail(f"losses.{name}", points, "not a list of [step, loss] pairs")
        for index, point in enumerate(points):
            if not (
                isinstance(point, list)
                and len(point) == 2
                and is_int(point[0])
                and point[0] >= 0
                and (point[1] is None or is_number(point[1], finite=False))
            ):
                raise fail(f"losses.{name}[{index}]", point, "not a [step, loss] pair")
    if optimizer:
        groups = require(data, "param_groups")
        if not isinstance(groups, list):
            raise fail("param_groups", groups, "not a list of optimizer parameter groups")
        for index, group in enumerate(groups):
            field = f"param_groups[{index}]"
            if not isinstance(group, dict):
                raise fail(field, group, "not an object")
            params = require(group, "params", f"{field}.")
            if not isinstance(params, list) or not all(is_int(p) and p >= 0 for p in params):
                raise fail(f"{field}.params", params, "not a list of parameter indices")
            for key in ("lr", "base_lr"):
                if key in group and (not is_number(group[key]) or group[key] < 0):
                    raise fail(f"{field}.{key}", group[key], "not a non-negative number")
    for name in files:
        entries = require(data, "files")
        if not isinstance(entries, dict):
            raise fail("files", entries, "not an object (role -> {name, sha256})")
        entry = require(entries, name, "files.")
        if not isinstance(entry, dict):
            raise fail(f"files.{name}", entry, "not an object {name, sha256}")
        file_name = require(entry, "name", f"files.{name}.")
        if not isinstance(file_name, str) or not file_name or os.path.basename(file_name) != file_name:
            raise fail(f"files.{name}.name", file_name, "not a file name in the checkpoint folder")
        digest = require(entry, "sha256", f"files.{name}.")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise fail(f"files.{name}.sha256", digest, "not a SHA-256 digest (64 hex digits)")
    return data
