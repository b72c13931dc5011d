"""Issue 14: data-parallel eval and calibration under torchrun / accelerate launch.

The sharding, part files and merge in one process (fast), then the real commands launched with
``python -m torch.distributed.run --nproc_per_node 2`` on CPU (gloo) with the shipped default model: records and
summary identical to one process; a run killed half-way (SIGKILL of one rank) resumed with one process, and part
files of a 3-process run resumed with 2 processes, identical again; the calibrated head map equal to one process's
up to float summation order.

Every launched command runs with ``--threads 1`` (torchrun sets one thread per process by default): the number of
CPU threads changes float summation order, which is not what is tested here.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_guard.eval.records import (
    FileBusyError,
    ResultsWriter,
    RunMismatchError,
    part_path,
    part_paths,
    read_header,
    read_records,
)
from vlm_guard.parallel import DataParallel, data_parallel, shard_batches

pytestmark = pytest.mark.slow  # torchrun subprocesses

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- in one process
def test_shard_batches_gives_every_item_to_one_rank_in_whole_batches():
    items = list(range(23))
    for world in (1, 2, 3, 5):
        for batch_size in (1, 2, 4):
            shares = [shard_batches(items, batch_size, rank, world) for rank in range(world)]
            assert sorted(item for share in shares for item in share) == items
            batches = {tuple(items[start : start + batch_size]) for start in range(0, len(items), batch_size)}
            for share in shares:  # re-batching a share gives batches of the one-process run
                assert all(
                    tuple(share[start : start + batch_size]) in batches for start in range(0, len(share), batch_size)
                )
    assert shard_batches(items[:7], 2, 1, 2) == [2, 3, 6]
    with pytest.raises(ValueError, match="rank 2"):
        shard_batches(items, 2, 2, 2)


def test_one_process_context_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = data_parallel("cpu")
    assert (context.rank, context.world_size, context.is_main, context.distributed) == (0, 1, True, False)
    assert context.broadcast({"a": 1}) == {"a": 1} and context.gather(3) == [3]
    assert context.device("cuda") == "cuda"
    assert DataParallel(rank=1, world_size=2, local_rank=1).device("cuda") == "cuda:1"
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        data_parallel("cpu")


def test_part_paths_of_any_world_size_and_only_of_this_file(tmp_path):
    out = tmp_path / "syn.jsonl"
    assert part_path(out, 1, 2).name == "syn.part-1-of-2.jsonl"
    for name in (
        "syn.part-1-of-2.jsonl",
        "syn.part-0-of-2.jsonl",
        "syn.part-2-of-3.jsonl",
        "syn.vhr.part-0-of-2.jsonl",
        "syn.part-0-of-2.jsonl.lock",
        "other.part-0-of-2.jsonl",
    ):
        (tmp_path / name).write_text("", encoding="utf-8")
    assert [path.name for path in part_paths(out)] == [
        "syn.part-0-of-2.jsonl",
        "syn.part-1-of-2.jsonl",
        "syn.part-2-of-3.jsonl",
    ]
    assert [path.name for path in part_paths(tmp_path / "syn.vhr.jsonl")] == ["syn.vhr.part-0-of-2.jsonl"]


def _records(path):
    return [(record["id"], record["answer"]) for record in read_records(path)]


def test_merge_parts_appends_what_is_missing_once_and_deletes_the_parts(tmp_path):
    fingerprint = {"methods": "none"}
    out = tmp_path / "run.jsonl"
    with ResultsWriter(out, fingerprint=fingerprint) as writer:
        writer.write({"id": "a", "answer": "A"})
    with ResultsWriter(part_path(out, 0, 2), fingerprint=fingerprint) as part:
        part.write({"id": "a", "answer": "A again"})  # already in the file: dropped
        part.write({"id": "c", "answer": "C"})
    with ResultsWriter(part_path(out, 1, 2), fingerprint=fingerprint) as part:
        part.write({"id": "b", "answer": "B"})
    with part_path(out, 1, 2).open("a", encoding="utf-8") as handle:
        handle.write('{"id": "d", "ans')  # a rank killed mid-write: the item is redone, not merged
    with ResultsWriter(out, fingerprint=fingerprint) as writer:
        assert writer.merge_parts(part_paths(out)) == 2
        assert _records(out) == [("a", "A"), ("c", "C"), ("b", "B")]
        writer.reorder(lambda record: record["id"])
        assert _records(out) == [("a", "A"), ("b", "B"), ("c", "C")]
        writer.write({"id": "e", "answer": "E"})  # still open for appending after the rewrite
    assert part_paths(out) == [] and not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("*.tmp"))
    assert read_header(out)["fingerprint"] == fingerprint
    assert _records(out)[-1] == ("e", "E")


def test_a_part_left_after_its_records_were_merged_adds_nothing(tmp_path):
    """A kill between merging a part and deleting it: the next merge finds its records done."""
    out = tmp_path / "run.jsonl"
    with ResultsWriter(part_path(out, 0, 1), fingerprint={}) as part:
        part.write({"id": "a", "answer": "A"})
    with ResultsWriter(out, fingerprint={}) as writer:
        writer.write({"id": "a", "answer": "A"})
        assert writer.merge_parts(part_paths(out)) == 0
    assert _records(out) == [("a", "A")] and part_paths(out) == []


def test_a_part_of_another_run_or_still_written_is_refused(tmp_path):
    out = tmp_path / "run.jsonl"
    with ResultsWriter(part_path(out, 0, 2), fingerprint={"methods": "vhr"}) as part:
        part.write({"id": "a", "answer": "A"})
    with ResultsWriter(out, fingerprint={"methods": "none"}) as writer:
        with pytest.raises(RunMismatchError, match="methods: 'vhr' -> 'none'"):
            writer.merge_parts(part_paths(out))
    assert part_paths(out)  # kept: nothing is lost
    busy = ResultsWriter(part_path(out, 1, 2), fingerprint={"methods": "none"})
    try:
        with ResultsWriter(tmp_path / "run2.jsonl", fingerprint={"methods": "none"}) as writer:
            with pytest.raises(FileBusyError):
                writer.merge_parts([part_path(out, 1, 2)])
    finally:
        busy.close()


def test_profiler_sums_of_disjoint_shares_add_up_to_one_profiler_over_everything():
    """What calibrate's reduction does, in one process: two profilers on disjoint batches (both taking the sink
    dimensions from the first batch), their sums added and loaded, give the map of one profiler over all batches."""
    from vlm_guard.calibration.calibrate import HeadProfiler
    from vlm_guard.testing import build_batch, tiny_model

    model = tiny_model("llava")
    batches = [build_batch(model, [(True, 5), (True, 9), (True, 7)], seed=seed) for seed in range(3)]
    with HeadProfiler.open(model, sink_dims=[5, 7]) as profiler:
        for inputs in batches:
            profiler.profile(inputs)
        reference = profiler.head_map({"n_images": 9})
    shares = []
    for rank_batches in ([batches[0], batches[2]], [batches[1]]):
        with HeadProfiler.open(model, sink_dims=[5, 7]) as profiler:
            profiler.decide_sink_dims(batches[0])
            for inputs in rank_batches:
                profiler.profile(inputs)
            shares.append(profiler.accumulated())
    total = {key: shares[0][key] + shares[1][key] for key in shares[0]}
    with HeadProfiler.open(model, sink_dims=[5, 7]) as profiler:
        profiler.decide_sink_dims(batches[0])
        profiler.load_accumulated(total)
        merged = profiler.head_map({"n_images": 9})
    assert profiler.prompts_profiled == 9
    tensors = merged._tensors()
    for name, value in reference._tensors().items():
        assert torch.allclose(tensors[name], value, rtol=1e-5, atol=1e-7, equal_nan=True), name
    assert not torch.isnan(reference.image_centric.head_fraction[2]).any()  # VAR statistics were measured
    _assert_close(merged.to_json(), reference.to_json())


# ---------------------------------------------------------------------------------------------- launched commands
EVAL = [
    "eval",
    "synthetic",
    "--limit",
    "4",
    "--batch-size",
    "2",
    "--n-resamples",
    "50",
    "--threads",
    "1",
    "--no-progress",
]


def _env(**extra):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **extra,
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: a CI container's host name may not resolve
    return env


def _launch(processes: int, *arguments: str, entry=("-m", "vlm_guard.cli"), check=True, **env):
    """``vlm-guard ARGUMENTS`` in one process, or under torchrun with ``processes`` CPU processes."""
    launcher = (
        [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    )
    command = [sys.executable, *launcher, *entry, *arguments]
    result = subprocess.run(command, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _stable_records(path: Path) -> list[dict]:
    """The records of a file, without the per-item timing (which differs between any two runs)."""
    return [{key: value for key, value in record.items() if key != "seconds"} for record in read_records(path)]


def _assert_same_run(reference: Path, other: Path):
    assert _stable_records(other) == _stable_records(reference)  # same records, same order
    assert read_header(other)["fingerprint"] == read_header(reference)["fingerprint"]
    summaries = [json.loads(path.with_name(path.stem + ".summary.json").read_text()) for path in (reference, other)]
    for key in ("metrics", "config", "n", "seed"):
        assert summaries[1][key] == summaries[0][key], key
    for name, task in summaries[0]["extra"]["tasks"].items():
        assert summaries[1]["extra"]["tasks"][name]["scored"] == task["scored"] == task["items"]
    assert part_paths(other) == [] and not list(other.parent.glob(other.stem + "*.lock"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eval_on_two_processes_equals_one_and_a_killed_run_resumes_with_any_number(tmp_path):
    one = tmp_path / "one.jsonl"
    _launch(1, *EVAL, "--out", str(one))
    assert len(read_records(one)) == 16  # 3 POPE splits x 4 + 4 captions

    two = tmp_path / "two.jsonl"
    result = _launch(2, "-v", *EVAL, "--out", str(two))
    assert "rank 1 of 2" in result.stderr  # two processes did run
    _assert_same_run(one, two)
    assert result.stdout.count("summary:") == 1  # rank 0 alone reports

    # one rank SIGKILLed after 3 records of its share: torchrun stops the other; every written record is kept
    # (this run joins the process group without accelerate, as where it is not installed)
    killed = tmp_path / "killed.jsonl"
    result = _launch(
        2,
        "-v",
        *EVAL,
        "--out",
        str(killed),
        entry=(str(REPO / "tests" / "parallel_fault_entry.py"),),
        check=False,
        VLM_GUARD_TEST_KILL_RANK="1",
        VLM_GUARD_TEST_KILL_AFTER="3",
        VLM_GUARD_TEST_NO_ACCELERATE="1",
    )
    assert result.returncode != 0
    assert "rank 1 of 2" in result.stderr
    parts = part_paths(killed)
    assert len(read_records(part_path(killed, 1, 2))) == 3
    written = sum(len(read_records(part)) for part in parts)
    assert 3 <= written < 16 and read_records(killed) == []
    _launch(1, *EVAL, "--out", str(killed))  # resumed by one process
    _assert_same_run(one, killed)

    # the parts of an interrupted 3-process run (and records already merged), resumed by 2 processes
    three = tmp_path / "three.jsonl"
    header = read_header(one)
    records = read_records(one)
    lines = {rank: [] for rank in range(3)}
    for index, record in enumerate(records[:11]):
        lines[index % 3].append(record)
    three.write_text("\n".join(json.dumps(line) for line in [header, *records[11:13]]) + "\n", encoding="utf-8")
    for rank, part_records in lines.items():
        part_path(three, rank, 3).write_text(
            "\n".join(json.dumps(line) for line in [header, *part_records]) + "\n", encoding="utf-8"
        )
    _launch(2, *EVAL, "--out", str(three))
    _assert_same_run(one, three)


def _assert_close(value, reference, where="head_map.json"):
    """Equal, floats up to summation order (NaN equals NaN)."""
    if isinstance(reference, dict):
        assert sorted(value) == sorted(reference), where
        for key in reference:
            _assert_close(value[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, list):
        assert len(value) == len(reference), where
        for index, (inner, inner_reference) in enumerate(zip(value, reference)):
            _assert_close(inner, inner_reference, f"{where}[{index}]")
    elif isinstance(reference, float):
        assert math.isclose(value, reference, rel_tol=1e-6, abs_tol=1e-9) or (
            math.isnan(value) and math.isnan(reference)
        ), where
    else:
        assert value == reference, where


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_calibrate_on_two_processes_equals_one_up_to_summation_order(tmp_path):
    from vlm_guard.calibration.head_map import HeadMap

    images = tmp_path / "images"
    _launch(1, "eval", "synthetic-images", "--out", str(images), "--n", "7")
    (images / "scene_000003_broken.png").write_bytes(b"not a png")  # skipped by every run, listed once
    calibrate = ["calibrate", "--images", str(images), "--batch-size", "2", "--no-cache", "--no-plots", "--quiet"]
    _launch(1, *calibrate, "--out", str(tmp_path / "one"))
    output = _launch(2, *calibrate, "--out", str(tmp_path / "two")).stdout
    assert output.count("head map written to") == 1
    maps = [HeadMap.from_pretrained(tmp_path / name) for name in ("one", "two")]
    tensors = [head_map._tensors() for head_map in maps]
    assert sorted(tensors[0]) == sorted(tensors[1])
    for name, reference in tensors[0].items():
        assert torch.allclose(tensors[1][name], reference, rtol=1e-5, atol=1e-7, equal_nan=True), name
    json_maps = [head_map.to_json() for head_map in maps]
    for entry in json_maps:
        entry["calibration"].pop("seconds"), entry["calibration"].pop("seconds_per_image")
    _assert_close(json_maps[1], json_maps[0])
    assert json_maps[0]["calibration"]["n_images"] == 7 and json_maps[0]["calibration"]["n_skipped"] == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_on_two_processes_chooses_what_one_process_chooses(tmp_path):
    tune = [
        "tune",
        "--methods",
        "pai",
        "--n-questions",
        "4",
        "--n-captions",
        "4",
        "--no-combine",
        "--batch-size",
        "2",
        "--budget",
        "600",
        "--no-progress",
        "--threads",
        "1",
    ]
    _launch(1, *tune, "--out", str(tmp_path / "one"))
    output = _launch(2, *tune, "--out", str(tmp_path / "two")).stdout
    assert "2 processes" in output and output.count("tuned head map written to") == 1
    tuned = [json.loads((tmp_path / name / "head_map.json").read_text())["tuned"] for name in ("one", "two")]
    for entry in tuned:  # timing: the plan's measured cost per item, the time spent, the date
        entry.pop("created_utc")
        entry["search"].pop("elapsed_s")
        entry["search"]["plan"] = {
            key: value
            for key, value in entry["search"]["plan"].items()
            if key not in ("seconds_per_item_greedy", "estimated_s")
        }
    assert tuned[1] == tuned[0]
    assert tuned[0]["search"]["complete"] and tuned[0]["table"]
    states = [json.loads((tmp_path / name / "tune_state.json").read_text())["trials"] for name in ("one", "two")]
    assert states[1] == states[0]  # every setting's per-item results, each item run once
