"""``python -m toyworld toy ...``: train, report and ship the embedded models (run from the repository root; this
folder is not part of the installed wheel). ``python -m toyworld toy --help`` lists the commands."""

import sys

from vlm_guard.cli import main

sys.exit(main(modules=["toyworld.commands"]))
