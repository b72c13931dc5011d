"""``python -m vlm_guard.cli``: the ``vlm-guard`` command."""

import sys

from vlm_guard.cli import main

sys.exit(main())
