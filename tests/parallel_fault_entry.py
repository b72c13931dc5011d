"""``vlm_guard.cli`` with a fault injected, for tests/test_parallel.py (not a test module).

Launched by ``torchrun`` in place of ``-m vlm_guard.cli``: the rank named by ``VLM_GUARD_TEST_KILL_RANK`` kills
itself with SIGKILL (no cleanup, as an out-of-memory kill or a lost node would) right after it has written
``VLM_GUARD_TEST_KILL_AFTER`` records to its part file; torchrun then stops the other ranks.
"""

import os
import signal
import sys

from vlm_guard.cli import main
from vlm_guard.eval import records

KILL_RANK = int(os.environ["VLM_GUARD_TEST_KILL_RANK"])
KILL_AFTER = int(os.environ["VLM_GUARD_TEST_KILL_AFTER"])
_written = 0
_write = records.ResultsWriter.write


def _write_then_maybe_die(self, record):
    global _written
    _write(self, record)
    if int(os.environ.get("RANK", "0")) == KILL_RANK and records.PART_INFIX in self.path.name:
        _written += 1
        if _written >= KILL_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)


records.ResultsWriter.write = _write_then_maybe_die

if __name__ == "__main__":
    sys.exit(main())
