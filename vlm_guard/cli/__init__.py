"""Command-line entry point: ``vlm-guard <command> ...``.

Each command's parser is built by a ``register(subparsers)`` function in a module that imports only the standard
library and light helpers (no torch, transformers or gradio), so ``vlm-guard --help`` and every
``vlm-guard COMMAND --help`` answer at once; the parser's ``func`` (called with the parsed
``argparse.Namespace``, returning an exit code) imports the module that does the work when the command runs
(see :func:`vlm_guard.cli.arguments.deferred`). Every numeric option is checked while the arguments are
parsed (:class:`vlm_guard.cli.arguments.Number`); paths, devices and model names are checked by each command
before its model loads.

Ctrl-C and SIGTERM stop any command with one line, ``vlm-guard COMMAND: interrupted`` (``...: interrupted: rerun
the same command to resume`` for the commands that resume), and exit code 130, never a traceback, also while the
heavy libraries are being imported.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from vlm_guard.cli.arguments import INTERRUPTED, ArgumentParser
from vlm_guard.version import __version__

# modules whose ``register(subparsers)`` adds commands; each imports only light modules (tests/test_cli_light.py)
COMMAND_MODULES = [
    "vlm_guard.cli.caption",
    "vlm_guard.cli.heads",
    "vlm_guard.cli.tune",
    "vlm_guard.cli.bench",
    "vlm_guard.cli.eval",
    "vlm_guard.cli.export_lmms",
    "vlm_guard.cli.demo",
]

EXIT_INTERRUPTED = 130
"""Exit code of an interrupted command (128 + SIGINT, what a shell reports for Ctrl-C)."""


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def build_parser(modules: list[str] | None = None, prog: str = "vlm-guard") -> argparse.ArgumentParser:
    """The parser of every command in ``modules`` (default :data:`COMMAND_MODULES`)."""
    parser = ArgumentParser(
        prog=prog,
        description="Training-free hallucination mitigation for vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"vlm-guard {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES if modules is None else modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("vlm_guard"):
                continue  # command not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None, *, modules: list[str] | None = None) -> int:
    """Run one command; ``modules`` replaces :data:`COMMAND_MODULES` (the repository's ``python -m toyworld``)."""
    args = None
    previous = _sigterm_as_interrupt()  # {signal: handler before main}, restored on the way out
    try:
        parser = build_parser() if modules is None else build_parser(modules, prog="python -m toyworld")
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:  # --help, --version, or a usage error already printed on one line
            return stop.code if isinstance(stop.code, int) else 2
        return _run(parser, args)
    except KeyboardInterrupt:
        return _interrupted(args, argv)
    except Exception as error:
        if _caused_by_interrupt(error):  # a library turned the interrupt into its own error (an import, a worker)
            return _interrupted(args, argv)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
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
        where = f": {_display(error.filename)}" if getattr(error, "filename", None) else ""
        print(f"vlm-guard {args.command}: error: {_one_line(error.strerror or error)}{where}", file=sys.stderr)
        return 1


def _sigterm_as_interrupt():
    """SIGTERM raises ``KeyboardInterrupt`` in the main thread, so ``kill`` stops a command the way Ctrl-C does
    (files closed, temporary files removed, one line). Returns the handlers to restore when ``main`` returns
    (none when called from another thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT)}
    previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, interrupt)
    return {signum: handler for signum, handler in previous.items() if handler is not None}


def _interrupted(args: argparse.Namespace | None, argv: list[str] | None = None) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C while the line is printed changes nothing
        try:
            signal.signal(signum, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    command = getattr(args, "command", None)
    if args is None:  # stopped before the arguments were parsed (while the commands' modules were imported)
        words = [word for word in (sys.argv[1:] if argv is None else argv) if not word.startswith("-")]
        command = words[0] if words and words[0].replace("-", "_").isidentifier() else None
    note = getattr(args, "interrupt_note", None) or INTERRUPTED
    _forget_unhandled_interrupt()
    try:
        print(f"vlm-guard{' ' + command if command else ''}: {note}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed (a pipe whose reader went away)
        pass
    return EXIT_INTERRUPTED


def _forget_unhandled_interrupt() -> None:
    """Clear CPython's "KeyboardInterrupt went unhandled" flag, so the process exits with our code (130).

    ``exec`` of a *string* (dataclasses, namedtuple and many libraries build functions that way while they are
    imported) sets that flag when the interrupt passes through it, even though ``main`` catches the interrupt
    further up; at exit the interpreter then kills itself with SIGINT (exit status -2) instead of returning 130.
    Running a string through ``exec`` once more resets the flag (its entry point clears it before it runs code).
    """
    exec("pass", {})  # noqa: S102 - a constant string; the point is the interpreter's bookkeeping


def _caused_by_interrupt(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _display(path) -> str:
    return (
        os.fsencode(path).decode("utf-8", "backslashreplace")
        if isinstance(path, (str, bytes, os.PathLike))
        else str(path)
    )


def _one_line(error: object) -> str:
    """The message on one line, printable whatever the locale (file names that are not UTF-8 included)."""
    text = " ".join(str(error).split("\n"))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


if __name__ == "__main__":
    sys.exit(main())
