"""Training, reports and shipping of the embedded models: a project folder beside the ``vlm_guard`` package, not in
its wheel. Run from the repository root: ``python -m toyworld toy --help``.

- ``toyworld.shapes``: the test fixture (toy LLaVA trained from scratch on the shapes world);
- ``toyworld.everyday``: default model v2 (vision tower, projector and LoRA on SmolLM2-135M-Instruct);
- ``toyworld.v3``: default model v3 (``python -m toyworld.v3.train``);
- ``toyworld.checker``: the grounding checker the demo colours words with.
"""

from __future__ import annotations

COMMAND_MODULES = ["toyworld.commands"]


def main(argv: list[str] | None = None) -> int:
    """``python -m toyworld toy ...`` (its parsers: :mod:`toyworld.commands`)."""
    from vlm_guard.cli import main as cli_main

    return cli_main(argv, modules=COMMAND_MODULES)


def build_parser():
    """Every ``vlm-guard`` command and the ``toy`` commands, in one parser (for tests of every option)."""
    from vlm_guard.cli import COMMAND_MODULES as LIBRARY
    from vlm_guard.cli import build_parser as library_parser

    return library_parser([*LIBRARY, *COMMAND_MODULES])
