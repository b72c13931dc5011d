"""Command-line entry point: ``vlm-guard <command> ...``.

Each command lives in the module that owns its job and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed ``argparse.Namespace``,
returning an exit code). This file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .version import __version__

# module path -> the commands it registers; imported lazily so `vlm-guard --help` stays fast
# and a command whose optional dependency is missing does not break the others.
COMMAND_MODULES = [
    "vlm_guard.commands.caption",
    "vlm_guard.toyworld.cli",
    "vlm_guard.heads.cli",
    "vlm_guard.tuning.cli",
    "vlm_guard.decoding.bench",
    "vlm_guard.eval.cli",
    "vlm_guard.demo.cli",
]


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-guard",
        description="Training-free hallucination mitigation for vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"vlm-guard {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("vlm_guard"):
                continue  # command not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"vlm-guard {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as error:
        print(f"vlm-guard {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a read-only folder, a full disk, a busy port...: one line, not a traceback
        from .images import display_name

        where = f": {display_name(error.filename)}" if getattr(error, "filename", None) else ""
        print(f"vlm-guard {args.command}: error: {_one_line(error.strerror or error)}{where}", file=sys.stderr)
        return 1


def _one_line(error: object) -> str:
    """The message on one line, printable whatever the locale (file names that are not UTF-8 included)."""
    text = " ".join(str(error).split("\n"))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


if __name__ == "__main__":
    sys.exit(main())
