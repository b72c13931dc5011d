"""Files the project reads back are checked against their schema: a damaged or edited field is a one-line error that
names the file (and line) and the field, never a silent drop or a traceback. Eval records here; tune state and head
map JSON fields below."""

import json

import pytest

from vlm_guard.cli import main
from vlm_guard.eval.records import read_numbered_records, read_summary

from test_eval_runner import tiny_model_dir


def _eval(out, model_dir, tasks="pope"):
    return ["eval", "synthetic", "--tasks", tasks, "--limit", "2", "--no-progress", "--n-resamples", "20",
            "--max-new-tokens", "2", "--max-unclear", "1", "--out", str(out), "--model", str(model_dir)]


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def _fixed_code_digest():
    """The method code's digest is part of a run's identity; pin it so that edits to the source tree made while
    these tests run (a developer saving a file) do not turn a resume into a refusal."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("vlm_guard.eval.runner.code_digest", lambda: {"sha256_16": "0" * 16, "files": 0})
        yield


@pytest.fixture(scope="module")
def pope_run(tmp_path_factory):
    """A finished 6-item POPE run (2 items of each split) and its lines."""
    folder = tmp_path_factory.mktemp("pope_run")
    model_dir = tiny_model_dir(tmp_path_factory)
    out = folder / "syn.jsonl"
    assert main(_eval(out, model_dir)) == 0
    return out, model_dir, out.read_text(encoding="utf-8").splitlines()


def _with_record_edit(out, lines, index, change):
    """Write the run's file back with record line ``index`` (1-based line of the file) changed."""
    record = json.loads(lines[index - 1])
    change(record)
    edited = list(lines)
    edited[index - 1] = json.dumps(record)
    out.write_text("\n".join(edited) + "\n", encoding="utf-8")
    return record


@pytest.mark.parametrize("field, value, expected", [
    ("task", "pope/randomm", "field 'task' 'pope/randomm', not a task of this run"),   # repro turn3/05
    ("task", "pope/popular", "field 'task' 'pope/popular', but item"),                 # another task of the run
    ("task", None, "field 'task' None"),
    ("task", ["pope/random"], "field 'task' ['pope/random']"),
    ("id", 3.5, "field 'id' is 3.5"),
    ("id", True, "field 'id' is True"),
    ("id", {"a": 1}, "field 'id' is {'a': 1}"),
    ("prompt", 7, "field 'prompt' 7, not a string"),
    ("answer", None, "field 'answer' None, not a string"),
    ("label", "maybe", "field 'label' 'maybe', not 'yes' or 'no'"),
    ("label", 1, "field 'label' 1"),
])
def test_an_edited_record_is_refused_naming_the_line_and_the_field(pope_run, capsys, field, value, expected):
    out, model_dir, lines = pope_run
    try:
        _with_record_edit(out, lines, 2, lambda record: record.__setitem__(field, value))
        capsys.readouterr()
        assert main(_eval(out, model_dir)) == 2
        err = _error_line(capsys.readouterr().err)
        assert f"{out}:2:" in err and expected in err, err
    finally:
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_an_unedited_file_still_resumes(pope_run):
    out, model_dir, lines = pope_run
    assert main(_eval(out, model_dir)) == 0
    assert out.read_text(encoding="utf-8").splitlines() == lines
    assert read_summary(out.with_name("syn.summary.json"))["metrics"]["pope/random"]["n"] == 2


def test_a_truncated_last_line_is_redone_on_resume(pope_run):
    """A kill in the middle of a write leaves half a line: the resume drops it and redoes that item."""
    out, model_dir, lines = pope_run
    try:
        out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")
        assert main(_eval(out, model_dir)) == 0
        numbered = read_numbered_records(out)
        assert len(numbered) == 6 and [line for line, _ in numbered] == list(range(2, 8))
        assert read_summary(out.with_name("syn.summary.json"))["n"] == 6
    finally:
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("field, value, expected", [
    ("n_mentions", -1, "field 'n_mentions' -1, not a non-negative integer"),
    ("n_words", 2.5, "field 'n_words' 2.5"),
    ("n_recalled", "1", "field 'n_recalled' '1'"),
    ("n_hallucinated", 10_000, "field 'n_hallucinated' 10000 larger than 'n_mentions'"),
])
def test_an_edited_chair_count_is_refused(tmp_path, tmp_path_factory, capsys, field, value, expected):
    out = tmp_path / "chair.jsonl"
    model_dir = tiny_model_dir(tmp_path_factory)
    assert main(_eval(out, model_dir, tasks="chair")) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    _with_record_edit(out, lines, 2, lambda record: record.__setitem__(field, value))
    capsys.readouterr()
    assert main(_eval(out, model_dir, tasks="chair")) == 2
    err = _error_line(capsys.readouterr().err)
    assert f"{out}:2:" in err and expected in err, err
