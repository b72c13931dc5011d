"""Packaging: a distribution name of our own (issue 17, item 5), the `vlm-guard` command, extras named in hints."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
# taken on the package index by an unrelated project that also ships a `vlm_guard` module
TAKEN_NAMES = {"vlm-guard"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_distribution_name_is_our_own_and_command_and_import_stay(project):
    assert _normalise(project["name"]) not in TAKEN_NAMES
    assert project["scripts"]["vlm-guard"] == "vlm_guard.cli:main"
    assert (ROOT / "vlm_guard" / "__init__.py").is_file()


def test_every_install_hint_names_our_distribution_and_a_real_extra(project):
    extras = set(project["optional-dependencies"])
    files = [*ROOT.joinpath("vlm_guard").rglob("*.py"), ROOT / "README.md", *ROOT.joinpath("scripts").glob("*.sh")]
    hints = [(path.name, match) for path in files for match in re.findall(r"pip install ['\"]?([A-Za-z0-9_.-]+)\[([a-z,]+)\]",
                                                                           path.read_text())]
    assert hints, "the README documents installing the extras"
    for source, (name, wanted) in hints:
        assert _normalise(name) == _normalise(project["name"]), (source, name)
        assert set(wanted.split(",")) <= extras, (source, wanted)
