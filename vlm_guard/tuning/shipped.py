"""The shipped head maps: moved to :mod:`vlm_guard.calibration.shipped` (finding a head map is calibration's job).

``vlm_guard.tuning.shipped`` is the same module object, so reads and patches of its attributes reach it.
"""

from __future__ import annotations

import sys

from vlm_guard.calibration import shipped as _shipped

sys.modules[__name__] = _shipped
