import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """The parity models are tiny: one thread avoids oversubscribing shared CPUs (the suite's own choice)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _no_cached_head_map(tmp_path, monkeypatch):
    """Parity compares the preset defaults: a head map cached (or tuned) on this machine, or the tuned map shipped
    for the default model, must not apply."""
    from vlm_guard.calibration.head_map import CACHE_ENV
    from vlm_guard.tuning.shipped import SHIPPED_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty_head_map_cache"))
    monkeypatch.setenv(SHIPPED_ENV, "0")
