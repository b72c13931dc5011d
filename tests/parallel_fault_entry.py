"""``vlm_guard.cli`` with a fault injected, for tests/test_parallel.py (not a test module).

Launched by ``torchrun`` in place of ``-m vlm_guard.cli``: the rank named by ``VLM_GUARD_TEST_KILL_RANK`` kills
itself with SIGKILL (no cleanup, as an out-of-memory kill or a lost node would) right after it has written
``VLM_GUARD_TEST_KILL_AFTER`` records to its part file; torchrun then stops the other ranks. With
``VLM_GUARD_TEST_NO_ACCELERATE=1`` accelerate cannot be imported, so the process group is joined through
``torch.distributed.init_process_group`` (the path taken where accelerate is not installed).
"""

import os
import signal
import sys

if os.environ.get("VLM_GUARD_TEST_NO_ACCELERATE") == "1":
    sys.modules["accelerate"] = None  # `import accelerate` raises ImportError

from vlm_guard.cli import main  # noqa: E402
from vlm_guard.eval import records  # noqa: E402

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
