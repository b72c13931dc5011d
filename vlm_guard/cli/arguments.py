"""Command-line building blocks shared by every command (stdlib only, so ``--help`` stays fast).

- :class:`Number`: the ``type=`` of every numeric option. It refuses NaN, infinities and values outside the
  option's range while the arguments are parsed, before any work, with one line that names the option, the value
  and the allowed range (``argument --batch-size: 0 is out of range: an integer >= 1``). Shorthands:
  :func:`positive_int`, :func:`non_negative_int`, :func:`positive_float`, :func:`share`, :func:`int_range`,
  :func:`float_range`. A ``tests/test_cli_errors.py`` test fails for an option declared with a bare ``int`` or
  ``float``.
- :class:`ArgumentParser`: argparse's parser whose usage errors are one line (``vlm-guard eval synthetic: error:
  ...; see vlm-guard eval synthetic --help``) instead of the usage block and the message.
- :func:`deferred`: a command function named by module and attribute, imported only when the command runs, so
  building the parser imports neither torch nor transformers.

Example:
    >>> parser = ArgumentParser(prog="demo")
    >>> _ = parser.add_argument("--batch-size", type=positive_int, default=4)
    >>> parser.parse_args(["--batch-size", "8"]).batch_size
    8
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: 0 is out of range: an integer >= 1
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable
from typing import Any

ALLOW_PICKLE_FLAG = "--allow-pickle"
ALLOW_PICKLE_HELP = (
    "read a checkpoint that has only pickle weights (pytorch_model.bin, *.pt); off by default because "
    "unpickling can run code: use it only for files you trust"
)

DTYPE_NAMES = ("float32", "float16", "bfloat16")
"""The model dtypes the commands take by name; the same tuple as :data:`vlm_guard.models.loading.DTYPE_NAMES`
(which imports torch), repeated here so a parser needs no torch (a test keeps the two equal)."""

WORLD_CAPTION_TOKENS = {"everyday_v3": 256, "everyday": 120, "shapes": 48}
"""Each synthetic world's caption budget (``WorldKind.caption_tokens``; quoted in ``--help``, which must not import
the worlds; a test keeps the two equal)."""

INTERRUPTED = "interrupted"
INTERRUPTED_RESUMABLE = "interrupted: rerun the same command to resume"


def add_allow_pickle_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow-pickle`` (``args.allow_pickle``): see :mod:`vlm_guard.models.loading`."""
    parser.add_argument(ALLOW_PICKLE_FLAG, action="store_true", help=ALLOW_PICKLE_HELP)


THREADS_HELP = (
    "torch CPU threads (default on cpu: 1 for the shipped default model, which is small enough to decode fastest on "
    "one thread, most of all on a busy machine; torch's default for other models)"
)


def plain_description(doc: str) -> str:
    """A module docstring as a command's ``--help`` description: without reStructuredText's double backquotes.

    Example:
        >>> plain_description("``vlm-guard caption``: one image")
        'vlm-guard caption: one image'
    """
    return doc.replace("``", "")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (``args.threads``; None: :func:`cpu_threads` decides)."""
    parser.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)


def cpu_threads(args: argparse.Namespace) -> int | None:
    """The torch thread count a command sets: ``--threads`` when given; else 1 for the shipped default model on the
    CPU (``--model`` not given); else None (torch's default, e.g. for a 7B model on a many-core machine)."""
    threads = getattr(args, "threads", None)
    if threads:
        return int(threads)
    device = str(getattr(args, "device", None) or "cpu")
    if device.startswith("cpu") and getattr(args, "model", None) is None:
        return 1
    return None


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU thread count from :func:`cpu_threads` (nothing when it is None)."""
    threads = cpu_threads(args)
    if threads:
        import torch

        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- numbers
class Number:
    """An argparse ``type=``: text -> ``int`` or ``float`` within ``[minimum, maximum]`` (either bound optional,
    ``strict`` bounds exclude the bound itself), finite. Raises ``argparse.ArgumentTypeError`` with the value and
    the allowed range; argparse prefixes the option's name."""

    def __init__(
        self,
        kind: type,
        minimum: float | None = None,
        maximum: float | None = None,
        *,
        strict_minimum: bool = False,
        strict_maximum: bool = False,
        note: str = "",
    ):
        if kind not in (int, float):
            raise TypeError(f"Number kind must be int or float, got {kind!r}")
        self.kind, self.minimum, self.maximum = kind, minimum, maximum
        self.strict_minimum, self.strict_maximum, self.note = strict_minimum, strict_maximum, note
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def describe(self) -> str:
        """``"an integer >= 1"``, ``"a number in (0, 1]"``."""
        what = "an integer" if self.kind is int else "a number"
        shown = (lambda value: str(int(value))) if self.kind is int else (lambda value: f"{value:g}")
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            text = (
                f"{what} in {'(' if self.strict_minimum else '['}{shown(low)}, {shown(high)}"
                f"{')' if self.strict_maximum else ']'}"
            )
        elif low is not None:
            text = f"{what} {'>' if self.strict_minimum else '>='} {shown(low)}"
        elif high is not None:
            text = f"{what} {'<' if self.strict_maximum else '<='} {shown(high)}"
        else:
            text = f"a finite {'integer' if self.kind is int else 'number'}"
        return text + (f" ({self.note})" if self.note else "")

    def allows(self, value: float) -> bool:
        if self.minimum is not None and (value < self.minimum or self.strict_minimum and value == self.minimum):
            return False
        if self.maximum is not None and (value > self.maximum or self.strict_maximum and value == self.maximum):
            return False
        return True

    def __call__(self, text: str) -> int | float:
        shown = str(text).strip()
        try:
            if self.kind is int:
                value: int | float = int(shown, 10)
            else:
                value = float(shown)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shown!r} is not {self.describe()}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{shown} is not {self.describe()}")
        if not self.allows(value):
            raise argparse.ArgumentTypeError(f"{shown} is out of range: {self.describe()}")
        return value

    def __repr__(self) -> str:
        return f"Number({self.describe()})"


def int_range(minimum: int | None = None, maximum: int | None = None, note: str = "") -> Number:
    """Integers in ``[minimum, maximum]``."""
    return Number(int, minimum, maximum, note=note)


def float_range(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    strict_minimum: bool = False,
    strict_maximum: bool = False,
    note: str = "",
) -> Number:
    """Finite floats in ``[minimum, maximum]`` (``strict_*``: the bound excluded)."""
    return Number(float, minimum, maximum, strict_minimum=strict_minimum, strict_maximum=strict_maximum, note=note)


positive_int = int_range(1)
"""Counts that must be at least one (a batch size, a number of items)."""
non_negative_int = int_range(0)
"""Counts where 0 means "none" or "off"."""
positive_float = float_range(0.0, strict_minimum=True)
"""Strengths, budgets and sizes that must be above zero."""
non_negative_float = float_range(0.0)
share = float_range(0.0, 1.0)
"""A fraction in [0, 1]."""
seed_int = int_range(0, 2**32 - 1, note="a seed")
"""Random seeds (numpy and torch take 0 .. 2**32 - 1)."""
max_new_tokens_int = int_range(1, 1 << 20)
"""A generation budget in tokens."""


def number_actions(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.Action]]:
    """Every ``(command path, action)`` of ``parser`` and its subcommands (used by the tests to find numeric options
    declared without a :class:`Number`)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += number_actions(child, path + (name,))
        else:
            found.append((path, action))
    return found


# ---------------------------------------------------------------------------------------------- parser
class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a usage error printed as one line that names the command and where help is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        text = " ".join(str(message).split())
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        sys.stderr.write(f"{self.prog}: error: {text}; see {self.prog} --help\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but an unknown option is reported by the command it was given to (``vlm-guard caption:
        error: unrecognized arguments: --image; see vlm-guard caption --help``), not by the top-level parser."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner: argparse.ArgumentParser = self
            while True:  # down the chosen (sub)commands: "vlm-guard eval synthetic"
                chosen = [
                    action.choices[getattr(parsed, action.dest)]
                    for action in owner._actions
                    if isinstance(action, argparse._SubParsersAction)
                    and getattr(parsed, action.dest, None) in action.choices
                ]
                if not chosen:
                    break
                owner = chosen[0]
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def deferred(module: str, function: str) -> Callable[[argparse.Namespace], Any]:
    """A command function that imports ``module`` only when called (the parser is built without it)."""

    def run(args: argparse.Namespace) -> Any:
        return getattr(importlib.import_module(module), function)(args)

    run.__name__ = function
    run.__qualname__ = f"deferred({module}.{function})"
    run.deferred_target = (module, function)  # type: ignore[attr-defined]
    return run


__all__ = [
    "ALLOW_PICKLE_FLAG",
    "ALLOW_PICKLE_HELP",
    "DTYPE_NAMES",
    "INTERRUPTED",
    "INTERRUPTED_RESUMABLE",
    "ArgumentParser",
    "Number",
    "add_allow_pickle_argument",
    "deferred",
    "float_range",
    "int_range",
    "max_new_tokens_int",
    "non_negative_float",
    "non_negative_int",
    "number_actions",
    "positive_float",
    "positive_int",
    "seed_int",
    "share",
]
