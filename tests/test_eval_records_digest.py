"""The method-code digest every result record carries covers the code that changes generated text."""

from __future__ import annotations

from pathlib import Path

import vlm_guard
from vlm_guard.eval.runner import METHOD_CODE, code_digest

PACKAGE = Path(vlm_guard.__file__).resolve().parent


def _covered() -> set[Path]:
    return {path for pattern in METHOD_CODE for path in PACKAGE.glob(pattern)}


def test_the_digest_covers_the_engine_every_method_and_the_adapters():
    covered = _covered()
    for folder in ("core", "models"):
        assert set((PACKAGE / folder).glob("*.py")) <= covered, folder
    for method in (PACKAGE / "methods").iterdir():
        if method.is_dir() and (method / "__init__.py").exists():
            assert set(method.glob("*.py")) <= covered, method.name
    for name in ("wrapper.py", "config.py", "settings.py", "methods/registry.py"):
        assert PACKAGE / name in covered, name
    assert code_digest()["files"] == len(covered) > 30


def test_the_digest_changes_with_a_method_file(monkeypatch):
    before = code_digest()["sha256_16"]
    target = PACKAGE / "methods" / "gift" / "kernel.py"
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: real(self) + (b"#" if self == target else b""))
    assert code_digest()["sha256_16"] != before
