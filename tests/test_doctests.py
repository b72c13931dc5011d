"""Every ``>>>`` example in ``vlm_guard/`` runs as a doctest, so no example claims output that nothing checks.

Each module whose source has a ``>>>`` line is imported and its examples are run by :mod:`doctest`
(``ELLIPSIS | NORMALIZE_WHITESPACE``), one test per module, failing with doctest's report. A second test per module
checks that every ``>>>`` line of its source is an example the finder runs: none skipped (``+SKIP``), none hidden
where the finder does not look (a nested function's docstring, a comment, a string in the code). An example that
cannot run here (a real checkpoint, the hub, a GPU, minutes of work) is written as a plain code block instead
(``Example (not run: <why>)::`` followed by indented code without prompts).

The examples run offline on CPU, in a temporary working folder with an empty head-map cache; "the default model" is
the 3.6M test fixture (``VLM_GUARD_DEFAULT_MODEL=fixture``, set by ``conftest.py``).
"""

from __future__ import annotations

import doctest
import importlib
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "vlm_guard"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
PROMPT = re.compile(r"^\s*>>>\s+[^\s#]")  # a prompt with code; doctest drops a blank or comment-only one


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _prompt_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if PROMPT.match(line))


MODULES = {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py")) if _prompt_lines(path)}


def _doctests(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    return sorted((test for test in tests if test.examples), key=lambda test: test.lineno or 0)


@pytest.fixture
def _isolated(tmp_path, monkeypatch):
    """A temporary working folder (an example that writes a relative path writes there) and head-map cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_GUARD_CACHE", str(tmp_path / "head_map_cache"))
    monkeypatch.setenv("VLM_GUARD_DEFAULT_MODEL", "fixture")


def test_modules_found():
    assert len(MODULES) > 40, f"only {len(MODULES)} modules with examples under {PACKAGE_DIR}"
    assert not [name for name in MODULES if name.endswith("__main__")], "a __main__ module cannot be imported to test"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_examples_run(name, _isolated):
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS, verbose=False)
    for test in _doctests(name):
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    if results.failed:
        pytest.fail(
            f"{results.failed} of {results.attempted} examples of {name} failed:\n" + "".join(report), pytrace=False
        )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_example_is_run(name):
    tests = _doctests(name)
    found = sum(len(test.examples) for test in tests)
    skipped = [
        f"{test.name} line {(test.lineno or 0) + example.lineno + 1}"
        for test in tests
        for example in test.examples
        if example.options.get(doctest.SKIP)
    ]
    prompts = _prompt_lines(MODULES[name])
    assert not skipped, (
        f"{name}: examples marked +SKIP claim a result nothing checks: {skipped}; make them run, "
        f"or write them as a plain code block (Example (not run: why)::)"
    )
    assert found == prompts, (
        f"{MODULES[name]}: {prompts} '>>>' lines but the doctest finder runs {found} examples; a '>>>' line outside "
        f"a docstring the finder reads (module, class, function or method) is never run: move it, or drop the prompts"
    )
