"""Command-line arguments shared by every command that loads a model (stdlib only, so ``--help`` stays fast).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_allow_pickle_argument(parser)
    >>> parser.parse_args(["--allow-pickle"]).allow_pickle
    True
"""

from __future__ import annotations

import argparse

ALLOW_PICKLE_FLAG = "--allow-pickle"
ALLOW_PICKLE_HELP = ("read a checkpoint that has only pickle weights (pytorch_model.bin, *.pt); off by default because "
                     "unpickling can run code: use it only for files you trust")


def add_allow_pickle_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow-pickle`` (``args.allow_pickle``): see :mod:`vlm_guard.models.loading`."""
    parser.add_argument(ALLOW_PICKLE_FLAG, action="store_true", help=ALLOW_PICKLE_HELP)
