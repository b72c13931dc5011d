"""``--help`` of every command and ``heads show`` answer without importing torch, transformers or gradio (issue 28
item 2): checked deterministically on ``sys.modules`` in a fresh interpreter, not timed. ``heads show`` and the VHD
plot name the model, never an absolute path of the machine that built the map (issue 28 item 5)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "gradio", "safetensors", "matplotlib")
SHIPPED_MAPS = sorted(
    path for path in (REPO / "vlm_guard" / "assets" / "head_maps").iterdir() if (path / "head_map.json").is_file()
)


def _fresh(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_help_imports_no_heavy_library():
    code = f"""
import contextlib, io, sys
from vlm_guard.cli import build_parser
import argparse
parser = build_parser()
paths = {{()}}
def walk(p, path):
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths.add(path + (name,)); walk(child, path + (name,))
walk(parser, ())
for path in sorted(paths):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            parser.parse_args(list(path) + ["--help"])
        except SystemExit:
            pass
    assert "usage:" in out.getvalue(), path
print(len(paths))
print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))
"""
    count, heavy = _fresh(code).strip().splitlines()
    assert int(count) >= 15  # every command and sub-command of vlm-guard
    assert heavy == "[]", f"--help imported {heavy}"


def test_main_help_exits_without_heavy_imports():
    code = """
import sys
from vlm_guard.cli import main
try:
    main(["eval", "synthetic", "--help"])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "gradio") if m in sys.modules))
"""
    assert _fresh(code).strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("folder", SHIPPED_MAPS, ids=[path.name for path in SHIPPED_MAPS])
def test_heads_show_reads_a_shipped_map_without_torch(folder):
    code = f"""
import sys
from vlm_guard.cli import main
assert main(["heads", "show", {str(folder)!r}]) == 0
print("HEAVY", sorted(m for m in ("torch", "transformers", "safetensors", "gradio") if m in sys.modules))
"""
    out = _fresh(code)
    assert out.strip().splitlines()[-1] == "HEAVY []"
    assert "/root" not in out and "/work" not in out and "/home" not in out
    assert "vlm_guard head map" in out and ("tuned settings" in out or "tuned task profiles" in out)


@pytest.mark.parametrize("folder", SHIPPED_MAPS, ids=[path.name for path in SHIPPED_MAPS])
def test_heads_show_says_what_the_full_reader_says(folder):
    from vlm_guard.calibration.head_map import HeadMap
    from vlm_guard.cli.heads import _full_summary, display_model_name, light_summary
    from vlm_guard.settings import tuned_report

    head_map = HeadMap.from_pretrained(folder)
    light = light_summary(folder).splitlines()
    full = (head_map.summary() + "\n\n" + "\n".join(tuned_report(head_map))).splitlines()
    assert len(light) == len(full)
    for mine, theirs in zip(light, full):
        if theirs.startswith("model "):
            assert mine.endswith(" " + display_model_name(head_map.fingerprint)) and not mine.split()[-1].startswith(
                "/"
            )
        else:
            assert mine == theirs
    assert _full_summary(str(folder)).splitlines() == light


def test_heads_show_sends_a_map_it_does_not_check_to_the_full_reader(tmp_path, capsys):
    from vlm_guard.cli import main

    folder = SHIPPED_MAPS[0]
    copy = tmp_path / "map"
    copy.mkdir()
    for name in ("head_map.json", "head_map.safetensors"):
        (copy / name).write_bytes((folder / name).read_bytes())
    data = json.loads((copy / "head_map.json").read_text())
    data["tuned"] = {"settings": [1, 2], "default_methods": []}  # a broken tuned section: the full reader's error
    (copy / "head_map.json").write_text(json.dumps(data))
    assert main(["heads", "show", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "settings" in err and len(err.strip().splitlines()) == 1
    data["tuned"] = {}
    data["tensors_sha256"] = "0" * 64  # tensors that are not the ones the JSON was written with
    (copy / "head_map.json").write_text(json.dumps(data))
    assert main(["heads", "show", str(copy)]) == 2
    assert "head_map.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name_or_path, shown",
    [
        ("/root/.cache/vlm_guard/models/default-v2-913254c020304393", "default-v2-913254c020304393"),
        ("/work/main/vlm_guard/assets/default_model/", "default_model"),
        ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-7b-hf"),
        ("C:\\models\\qwen", "qwen"),
        ("", "(unnamed)"),
    ],
)
def test_model_names_drop_the_builders_folders(name_or_path, shown):
    from vlm_guard.cli.heads import display_model_name

    assert display_model_name({"name_or_path": name_or_path}) == shown


def test_shipped_assets_hold_no_absolute_build_path():
    offenders = []
    for path in (REPO / "vlm_guard" / "assets").rglob("*.json"):
        text = path.read_text(encoding="utf-8", errors="replace")
        for marker in ('"/work/', '"/root/', '"/home/'):
            if marker in text:
                offenders.append(f"{path.relative_to(REPO)}: {marker}")
    assert not offenders, offenders


def test_vhd_plot_title_names_the_model(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    import vlm_guard.calibration.plots as plots
    from vlm_guard.calibration.head_map import HeadMap

    head_map = HeadMap.from_pretrained(SHIPPED_MAPS[0])
    head_map.fingerprint["name_or_path"] = "/home/builder/models/my-model"
    titles = []
    real = pyplot.Axes.set_title
    pyplot.Axes.set_title = lambda self, text, *args, **kwargs: titles.append(text) or real(self, text, *args, **kwargs)
    try:
        plots.plot_vhd(head_map, tmp_path / "vhd.png")
    finally:
        pyplot.Axes.set_title = real
    assert titles and titles[0].endswith(": my-model"), titles
