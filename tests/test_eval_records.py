"""Resumable JSONL results and run summaries."""

import dataclasses
import json
import logging
from importlib import metadata

import numpy as np
import pytest

from vlm_guard.eval.records import ResultsWriter, read_records, read_summary, write_summary
from vlm_guard.version import __version__


def test_write_then_resume(tmp_path):
    path = tmp_path / "runs" / "pope.jsonl"
    with ResultsWriter(path, id_key="question_id") as writer:
        assert writer.done_ids() == frozenset()
        writer.write({"question_id": 1, "answer": "Yes."})
        writer.write({"question_id": 2, "answer": "No.", "score": np.float32(0.5), "n": np.int64(3)})
        assert writer.done_ids() == {1, 2}
        # flushed as written: a reader sees both lines before close
        assert [r["question_id"] for r in read_records(path)] == [1, 2]
    with ResultsWriter(path, id_key="question_id") as writer:
        assert writer.done_ids() == {1, 2} and len(writer) == 2
        assert writer.dropped_line is None
        writer.write({"question_id": 3, "answer": "Yes."})
    records = read_records(path)
    assert [r["question_id"] for r in records] == [1, 2, 3]
    assert records[1]["score"] == 0.5 and records[1]["n"] == 3


def test_truncated_last_line_is_reported_and_dropped(tmp_path, caplog):
    path = tmp_path / "run.jsonl"
    with ResultsWriter(path, id_key="question_id") as writer:
        writer.write({"question_id": 1, "answer": "Yes."})
        writer.write({"question_id": 2, "answer": "No."})
    with path.open("a", encoding="utf-8") as handle:  # a kill in the middle of writing item 3
        handle.write('{"question_id": 3, "answer": "Ye')
    assert [r["question_id"] for r in read_records(path)] == [1, 2]  # reading tolerates it too
    with caplog.at_level(logging.WARNING, logger="vlm_guard.eval.records"):
        writer = ResultsWriter(path, id_key="question_id")
    assert "truncated last line" in caplog.text and "run.jsonl:3" in caplog.text
    assert writer.dropped_line == '{"question_id": 3, "answer": "Ye'
    assert writer.done_ids() == {1, 2}
    writer.write({"question_id": 3, "answer": "Yes."})
    writer.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["question_id"] for line in lines] == [1, 2, 3]


def test_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}', encoding="utf-8")
    with ResultsWriter(path) as writer:
        assert writer.done_ids() == {"a", "b"} and writer.dropped_line is None
        writer.write({"id": "c"})
    assert [r["id"] for r in read_records(path)] == ["a", "b", "c"]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="run.jsonl:2: not a JSON object"):
        ResultsWriter(path)
    with pytest.raises(ValueError, match="run.jsonl:2"):
        read_records(path)


def test_write_errors(tmp_path):
    path = tmp_path / "run.jsonl"
    with ResultsWriter(path, id_key="image_id") as writer:
        writer.write({"image_id": 5, "caption": "A dog."})
        with pytest.raises(ValueError, match="id 5 is already in"):
            writer.write({"image_id": 5, "caption": "again"})
        with pytest.raises(ValueError, match="no 'image_id' key"):
            writer.write({"caption": "A cat."})
        with pytest.raises(ValueError, match="NaN or infinite"):
            writer.write({"image_id": 6, "score": float("nan")})
        with pytest.raises(ValueError, match="not JSON serialisable"):
            writer.write({"image_id": 7, "score": object()})
        assert writer.done_ids() == {5}
    with pytest.raises(ValueError, match="is closed"):
        writer.write({"image_id": 8})
    with pytest.raises(ValueError, match="no 'question_id' key"):
        ResultsWriter(path, id_key="question_id")
    assert len(read_records(path)) == 1


@dataclasses.dataclass
class _Config:
    method: str = "vhr"
    alpha: float = 2.0
    layers: tuple = (1, 18, 19)


def test_write_summary(tmp_path):
    path = tmp_path / "out" / "summary.json"
    config = {"model": "llava-hf/llava-1.5-7b-hf", "method": "vhr", "alpha": 2.0, "max_new_tokens": 512}
    metrics = {"f1": {"point": 0.85, "low": np.float64(0.84), "high": 0.86}, "accuracy": 0.86}
    written = write_summary(path, config, metrics, seed=0, n=3000, extra={"split": "random"})
    summary = read_summary(path)
    assert summary == written
    assert summary["vlm_guard_version"] == __version__
    try:
        expected_transformers = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        expected_transformers = None
    assert summary["transformers_version"] == expected_transformers
    assert summary["seed"] == 0 and summary["n"] == 3000
    assert summary["config"] == config
    assert summary["metrics"]["f1"]["low"] == 0.84
    assert summary["extra"] == {"split": "random"}
    assert not list(path.parent.glob("*.tmp"))
    dataclass_summary = write_summary(tmp_path / "s2.json", _Config(), {"chair_s": 0.3}, seed=None, n=500)
    assert dataclass_summary["config"] == {"method": "vhr", "alpha": 2.0, "layers": [1, 18, 19]}
    assert dataclass_summary["seed"] is None


def test_write_summary_errors(tmp_path):
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_summary(tmp_path / "s.json", {}, {"f1": float("nan")}, seed=0, n=1)
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        write_summary(tmp_path / "s.json", {}, {}, seed=0, n=-1)
    with pytest.raises(ValueError, match="config must be a dict"):
        write_summary(tmp_path / "s.json", "vhr", {}, seed=0, n=1)
    not_summary = tmp_path / "other.json"
    not_summary.write_text("{}")
    with pytest.raises(ValueError, match="not a summary written by write_summary"):
        read_summary(not_summary)
