"""Issue 17 item 2: each eval records file carries the fingerprint of the run that writes it; a resume with another
fingerprint is refused naming the differing fields; a second writer is refused (a lock, stale locks taken over);
a merged file never counts an item twice; a record missing fields is a one-line error."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_runner import tiny_model_dir

from vlm_guard.cli import main
from vlm_guard.eval.records import (
    FileBusyError,
    ResultsWriter,
    RunMismatchError,
    fingerprint_differences,
    read_header,
    read_records,
    read_summary,
)

REPO = Path(__file__).resolve().parents[1]


def _eval(out, *extra):
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


def _error_line(err: str) -> str:
    """The one error line of a command's stderr (progress bars aside); fails on a traceback or several errors."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- the writer alone
def test_header_holds_the_fingerprint_and_a_changed_one_is_refused(tmp_path):
    path = tmp_path / "run.jsonl"
    fingerprint = {"model.weights_digest": "aaaa", "methods": "vhr", "generation.max_new_tokens.chair": 48}
    with ResultsWriter(path, fingerprint=fingerprint) as writer:
        writer.write({"id": "a", "answer": "yes"})
    assert read_header(path)["fingerprint"] == fingerprint
    assert [record["id"] for record in read_records(path)] == ["a"]  # the header is not a record
    with ResultsWriter(path, fingerprint=fingerprint) as writer:  # same run: resumes
        assert writer.done_ids() == {"a"}
    changed = {**fingerprint, "model.weights_digest": "bbbb", "methods": "gift"}
    with pytest.raises(RunMismatchError) as error:
        ResultsWriter(path, fingerprint=changed)
    message = str(error.value)
    assert "model.weights_digest: 'aaaa' -> 'bbbb'" in message and "methods: 'vhr' -> 'gift'" in message
    assert "max_new_tokens" not in message and "\n" not in message
    assert fingerprint_differences({"x": 1}, {"x": 1, "y": 2}) == ["y: null -> 2"]


def test_a_file_without_fingerprint_cannot_be_resumed_by_a_fingerprinted_run(tmp_path):
    path = tmp_path / "legacy.jsonl"
    path.write_text('{"id": "a", "answer": "yes"}\n', encoding="utf-8")
    with pytest.raises(RunMismatchError, match="no run fingerprint"):
        ResultsWriter(path, fingerprint={"methods": "none"})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with ResultsWriter(empty, fingerprint={"methods": "none"}):
        pass
    assert read_header(empty)["fingerprint"] == {"methods": "none"}


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    path = tmp_path / "run.jsonl"
    with ResultsWriter(path) as first:
        first.write({"id": 1})
        with pytest.raises(FileBusyError, match=f"pid {os.getpid()}"):
            ResultsWriter(path)
    assert not (tmp_path / "run.jsonl.lock").exists()  # released and removed on close
    # another process holds the lock, then is killed (-9): its lock file stays behind, stale
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from vlm_guard.eval.records import ResultsWriter; "
            "w = ResultsWriter(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
            str(path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileBusyError, match=f"pid {holder.pid}"):
            ResultsWriter(path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "run.jsonl.lock").exists()
    with ResultsWriter(path) as writer:  # the stale lock does not block
        assert writer.done_ids() == {1}


def test_missing_record_fields_are_one_line_errors(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"id": "a", "task": "pope/random", "prompt": "p"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"record 1 \(id 'a'\) lacks \['answer'\]"):
        ResultsWriter(path, required_keys=("id", "task", "prompt", "answer"))


# ---------------------------------------------------------------------------------------------- the eval command
def test_eval_resume_with_other_settings_is_refused(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "syn.jsonl"
    model = ["--model", str(tiny_model_dir(tmp_path_factory))]
    assert main(_eval(out, *model)) == 0
    before = out.read_bytes()
    header = read_header(out)["fingerprint"]
    assert {
        "model.weights_digest",
        "model.config_digest",
        "methods",
        "head_map",
        "guard_config.vhr",
        "generation.max_new_tokens.pope/random",
        "prompts.chat_template",
        "code.method_code",
        "code.vlm_guard_version",
        "data.world_seed",
    } <= set(header)
    capsys.readouterr()
    refusals = {
        "generation.max_new_tokens.pope/random: 2 -> 3": _eval(out, *model, "--max-new-tokens", "3"),
        "methods: 'none' -> 'vhr'": _eval(out, *model, "--methods", "vhr"),
        "data.world_seed: 900001 -> 910001": _eval(out, *model, "--world-seed", "910001"),
        "model.weights_digest": _eval(out),  # the shipped default model instead of the tiny one
    }
    for expected, args in refusals.items():
        assert main(args) == 2
        err = _error_line(capsys.readouterr().err)
        assert expected in err and "was written by a different run" in err, err
    assert out.read_bytes() == before  # nothing was appended
    assert main(_eval(out, *model, "--batch-size", "1")) == 0  # the same run resumes (batch size is not identity)
    assert out.read_bytes() == before


def test_merged_records_count_each_item_once(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "syn.jsonl"
    model = ["--model", str(tiny_model_dir(tmp_path_factory))]
    assert main(_eval(out, *model)) == 0
    n_before = read_summary(tmp_path / "syn.summary.json")["n"]
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines + lines), encoding="utf-8")  # two copies of the same run merged into one file
    assert main(_eval(out, *model)) == 0
    assert read_summary(tmp_path / "syn.summary.json")["n"] == n_before == 6


def test_eval_record_missing_fields_is_one_line(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "syn.jsonl"
    model = ["--model", str(tiny_model_dir(tmp_path_factory))]
    assert main(_eval(out, *model)) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[1])
    del record["label"]
    out.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(_eval(out, *model)) == 2
    err = _error_line(capsys.readouterr().err)
    assert "lacks ['label']" in err
