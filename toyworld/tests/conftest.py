"""The suite's settings (``tests/conftest.py``: the default model is the test fixture, quiet transformers) for the
training tests too."""

import runpy
from pathlib import Path

_suite = runpy.run_path(str(Path(__file__).resolve().parents[2] / "tests" / "conftest.py"))
globals().update({name: value for name, value in _suite.items() if not name.startswith("__")})
