"""Issue 17 item 14: one-line errors instead of tracebacks, for each case the review found. Each command is run
through ``vlm_guard.cli.main`` (or a subprocess where the locale matters) and must print exactly one error line."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_eval_runner import coco_fixture, tiny_model_dir  # noqa: F401  (fixture)

from vlm_guard.cli import main
from vlm_guard.eval.records import read_records

REPO = Path(__file__).resolve().parents[1]


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _refused(argv, capsys, code=2) -> str:
    assert main(argv) == code
    return _error_line(capsys.readouterr().err)


def _synthetic(out, *extra):
    return [
        "eval",
        "synthetic",
        "--tasks",
        "pope",
        "--limit",
        "2",
        "--no-progress",
        "--n-resamples",
        "20",
        "--max-new-tokens",
        "2",
        "--max-unclear",
        "1",
        "--out",
        str(out),
        *extra,
    ]  # random models answer no yes/no


def test_eval_into_a_read_only_folder(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits: use a place nobody can create files in
        out = Path("/proc/vlm_guard_read_only/syn.jsonl")
    else:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        out = folder / "syn.jsonl"
    line = _refused(_synthetic(out), capsys)
    assert "--out" in line and "cannot write into" in line


def test_eval_out_is_a_folder(tmp_path, capsys):
    assert "is a folder" in _refused(_synthetic(tmp_path), capsys)


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "synthetic", "--out", "{tmp}/o.jsonl"],
        ["demo"],
        ["calibrate", "--images", "{tmp}", "--out", "{tmp}/map"],
        ["caption"],
    ],
)
def test_mistyped_model_path(command, tmp_path, capsys):
    argv = [part.format(tmp=tmp_path) for part in command] + ["--model", "./modles/tiny-llava"]
    line = _refused(argv, capsys)
    assert "--model ./modles/tiny-llava: no such folder" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize(
    "command",
    [
        ["eval", "synthetic", "--out", "{tmp}/o.jsonl"],
        ["demo"],
        ["calibrate", "--images", "{tmp}", "--out", "{tmp}/map"],
        ["caption"],
    ],
)
def test_device_cuda_without_a_gpu(command, tmp_path, capsys):
    argv = [part.format(tmp=tmp_path) for part in command] + ["--device", "cuda"]
    line = _refused(argv, capsys)
    assert "--device cuda: no CUDA GPU is available here" in line and "--device cpu" in line


def test_demo_on_a_busy_port(capsys):
    pytest.importorskip("gradio")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        line = _refused(["demo", "--port", str(port)], capsys)
    finally:
        holder.close()
    assert f"--port {port} on 127.0.0.1 is already in use" in line


def test_out_pointing_at_an_existing_file(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    line = _refused(["calibrate", "--images", str(tmp_path), "--out", str(existing)], capsys)
    assert "is an existing file" in line
    line = _refused(["eval", "synthetic-images", "--out", str(existing), "--n", "1"], capsys)
    assert "is an existing file" in line
    assert existing.read_text() == "keep me"


def test_images_folder_without_a_matching_image(coco_fixture, tmp_path, capsys):  # noqa: F811
    empty = tmp_path / "images"
    empty.mkdir()
    Image.new("RGB", (8, 8)).save(empty / "unrelated.png")
    line = _refused(
        [
            "eval",
            "pope",
            "--questions",
            str(coco_fixture / "coco_pope_random.json"),
            "--images",
            str(empty),
            "--out",
            str(tmp_path / "pope.jsonl"),
        ],
        capsys,
    )
    assert "none of the 4 images the questions name is in --images" in line and "COCO_val2014_" in line


def test_ctrl_c_during_eval_says_how_to_resume(tmp_path, tmp_path_factory, capsys, monkeypatch):
    import vlm_guard.eval.runner as runner

    real = runner.generate_answers
    calls = []

    def interrupted_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "syn.jsonl"
    argv = _synthetic(out, "--model", str(tiny_model_dir(tmp_path_factory)), "--batch-size", "1")
    monkeypatch.setattr(runner, "generate_answers", interrupted_on_the_second_batch)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted: rerun the same command to resume" in err and "Traceback" not in err
    assert len(read_records(out)) == 1
    monkeypatch.setattr(runner, "generate_answers", real)
    assert main(argv) == 0
    records = read_records(out)
    assert len(records) == 6 and len({record["id"] for record in records}) == 6


@pytest.mark.slow
def test_non_utf8_file_name_under_a_strict_utf8_locale(tmp_path, tmp_path_factory):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (90, 20, 20)).save(folder / "good.png")
    bad_name = os.fsdecode(b"caf\xe9_broken.png")  # a Latin-1 name: not UTF-8
    (folder / bad_name).write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("LC_", "PYTHONIO", "PYTHONUTF8"))
    }
    # a strict UTF-8 locale (e.g. en_US.UTF-8): stdout refuses what is not UTF-8 (C.UTF-8 would escape it)
    environment.update(
        {
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO),
            "PYTHONUTF8": "0",
            "PYTHONIOENCODING": "utf-8:strict",
        }
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm_guard.cli",
            "calibrate",
            "--model",
            str(tiny_model_dir(tmp_path_factory)),
            "--images",
            str(folder),
            "--out",
            str(tmp_path / "map"),
            "--no-cache",
            "--no-plots",
            "--quiet",
        ],
        cwd=REPO,
        env=environment,
        capture_output=True,
    )
    stdout, stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "profiled 1 images, skipped 1" in stdout and "caf\\xe9_broken.png" in stdout
    assert "caf\\\\xe9_broken.png" in (tmp_path / "map" / "head_map.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", [["eval", "synthetic", "--out", "{tmp}/o.jsonl"], ["demo"]])
def test_model_folder_without_config(command, tmp_path, capsys):
    folder = tmp_path / "half_copied_model"
    folder.mkdir()
    argv = [part.format(tmp=tmp_path) for part in command] + ["--model", str(folder)]
    assert "has no config.json" in _refused(argv, capsys)


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["caption", "--image", "x.png"],
            "vlm-guard caption: error: unrecognized arguments: --image; see vlm-guard caption --help",
        ),
        (
            ["eval", "synthetic", "--out", "o.jsonl", "--n-scenes", "3"],
            "vlm-guard eval synthetic: error: unrecognized arguments: --n-scenes 3; see vlm-guard eval synthetic --help",
        ),
        (["--bogus"], "vlm-guard: error: unrecognized arguments: --bogus; see vlm-guard --help"),
    ],
)
def test_an_unknown_option_is_reported_by_the_command_it_was_given_to(argv, line, capsys):
    """A new user's ``vlm-guard caption --image x.png`` (the image is positional) names the command whose help lists
    the right options, not the top-level parser."""
    assert _refused(argv, capsys) == line
