import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """The parity models are tiny: one thread avoids oversubscribing shared CPUs (the suite's own choice)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
