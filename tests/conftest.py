"""Settings for every test of the repository (tests/ and, through its own conftest, toyworld/tests/)."""

import logging
import os

import pytest
import torch

torch.set_num_threads(2)

# "The default model" of every command is default model v3 (SmolLM2-135M: a wheel and seconds per caption);
# the suite runs those commands on the 3.6M test fixture instead. Tests of v3 and v2 themselves set this variable
# (tests/test_default_model_v3.py, tests/test_default_v2.py).
os.environ["VLM_GUARD_DEFAULT_MODEL"] = "fixture"


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield
