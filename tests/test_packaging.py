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
    hints = [
        (path.name, match)
        for path in files
        for match in re.findall(r"pip install ['\"]?([A-Za-z0-9_.-]+)\[([a-z,]+)\]", path.read_text())
    ]
    assert hints, "the README documents installing the extras"
    for source, (name, wanted) in hints:
        assert _normalise(name) == _normalise(project["name"]), (source, name)
        assert set(wanted.split(",")) <= extras, (source, wanted)


@pytest.mark.slow
def test_the_wheel_carries_the_library_and_no_training_code(tmp_path):
    """``pip wheel .``: the ``vlm_guard`` package with its assets; the training project (``toyworld/``) and the tests
    stay in the repository; the installed command has no ``toy`` command."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # from a copy of the files git tracks, so a stale build/ folder of an earlier build cannot leak into the wheel
    source = tmp_path / "source"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (item.decode() for item in listed)):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert "vlm_guard" in tops
    assert not {"toyworld", "tests"} & tops, sorted(tops)
    assert not [name for name in names if re.search(r"(^|/)(train|checker)\.py$", name)], "training code in the wheel"
    assert any(name.startswith("vlm_guard/assets/default_model_v2/") for name in names)


def test_the_command_has_no_training_commands():
    from vlm_guard.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if getattr(action, "choices", None)).choices
    assert "toy" not in commands and {"caption", "calibrate", "tune", "eval", "demo", "bench"} <= set(commands)


def test_the_package_lists_its_public_names_for_tab_completion():
    import vlm_guard

    names = dir(vlm_guard)
    assert {"wrap", "GuardConfig", "GuardedModel", "VHRConfig", "load_default"} <= set(names)
    assert "importlib" not in names and "TYPE_CHECKING" not in names
