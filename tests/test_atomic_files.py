"""A head map is saved as a bound pair: a kill, a full disk or an error while saving leaves the previous map loadable,
and a tensors file that is not the one the JSON was written with is refused (not loaded as a silent mix)."""

import dataclasses
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from vlm_guard import fileio
from vlm_guard.calibration import HeadMap, HeadMapFileError
from vlm_guard.calibration.calibrate import HeadProfiler
from vlm_guard.calibration.head_map import JSON_FILE, TENSOR_FILE, TENSORS_DIGEST_KEY
from vlm_guard.testing import build_batch, tiny_model


@pytest.fixture(scope="module")
def head_map():
    model = tiny_model("llava")
    with HeadProfiler.open(model) as profiler:
        profiler.profile(build_batch(model, [(True, 5), (True, 8)]))
        return profiler.head_map({"prompts": ["describe"], "n_skipped": 0})


def _names(folder):
    return sorted(path.name for path in folder.iterdir())


def _run_child(code, *args, **kwargs):
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        **kwargs,
    )


def test_the_json_records_the_tensors_digest(head_map, tmp_path):
    folder = head_map.save_pretrained(tmp_path / "map")
    data = json.loads((folder / JSON_FILE).read_text())
    assert data[TENSORS_DIGEST_KEY] == fileio.sha256_file(folder / TENSOR_FILE)
    assert _names(folder) == [JSON_FILE, TENSOR_FILE]  # no temporary file left behind


# repro turn3/01: SIGKILL right after the tensors are written, before the JSON
KILL_AFTER_TENSORS = r"""
import os, signal, sys, safetensors.torch as st
from vlm_guard.calibration.head_map import HeadMap
new = HeadMap.from_pretrained(sys.argv[1])
new.vhd_mean = new.vhd_mean * 0 + 7.0
real = st.save_file
def save_then_die(*args, **kwargs):
    real(*args, **kwargs); os.kill(os.getpid(), signal.SIGKILL)
st.save_file = save_then_die
new.save_pretrained(sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_kill_between_the_two_files_leaves_the_previous_map(head_map, tmp_path):
    source = head_map.save_pretrained(tmp_path / "source")
    folder = head_map.save_pretrained(tmp_path / "map")
    run = _run_child(KILL_AFTER_TENSORS, source, folder)
    assert run.returncode == -9, run.stderr
    assert HeadMap.from_pretrained(folder) == head_map


# repro turn3/02: a file-size limit (a full disk) while the map is overwritten
REWRITE = "import sys; from vlm_guard.calibration.head_map import HeadMap; HeadMap.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])"


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE")
@pytest.mark.parametrize("cut", ["tensors", "json"])
def test_full_disk_while_overwriting_leaves_the_previous_map(head_map, tmp_path, cut):
    import resource

    if cut == "json":  # RLIMIT_FSIZE caps each file: a JSON larger than the tensors is cut after they are written
        head_map = dataclasses.replace(head_map, calibration=dict(head_map.calibration, note="x" * 40_000))
    source = head_map.save_pretrained(tmp_path / "source")
    folder = head_map.save_pretrained(tmp_path / "map")
    before = {name: (folder / name).read_bytes() for name in _names(folder)}
    tensors_size, json_size = len(before[TENSOR_FILE]), len(before[JSON_FILE])
    limit = tensors_size // 2 if cut == "tensors" else tensors_size + 16  # the disk fills inside that file
    assert limit < (tensors_size if cut == "tensors" else json_size)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = _run_child(REWRITE, source, folder, preexec_fn=limit_file_size)
    assert run.returncode != 0 and "File too large" in run.stderr
    assert {name: (folder / name).read_bytes() for name in _names(folder)} == before  # nothing touched, no leftovers
    assert HeadMap.from_pretrained(folder) == head_map


def _failing_at(monkeypatch, failing_call, error):
    real_replace = os.replace
    calls = []

    def replace(source, target):
        calls.append(target)
        if len(calls) == failing_call:
            raise error
        real_replace(source, target)

    monkeypatch.setattr(fileio.os, "replace", replace)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_first_rename_leaves_the_previous_map(head_map, tmp_path, monkeypatch, error):
    folder = head_map.save_pretrained(tmp_path / "map")
    changed = HeadMap.from_pretrained(folder)
    changed.vhd_mean = changed.vhd_mean + 1
    _failing_at(monkeypatch, 1, error)
    with pytest.raises(type(error)):
        changed.save_pretrained(folder)
    monkeypatch.undo()
    assert _names(folder) == [JSON_FILE, TENSOR_FILE]
    assert HeadMap.from_pretrained(folder) == head_map


def test_a_pair_whose_digests_disagree_is_refused(head_map, tmp_path, monkeypatch):
    """The instant between the two renames (new tensors, old JSON) and a hand-swapped tensors file are refused."""
    folder = head_map.save_pretrained(tmp_path / "map")
    changed = HeadMap.from_pretrained(folder)
    changed.vhd_mean = changed.vhd_mean + 1
    _failing_at(monkeypatch, 2, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError):
        changed.save_pretrained(folder)
    monkeypatch.undo()
    assert _names(folder) == [JSON_FILE, TENSOR_FILE]
    with pytest.raises(HeadMapFileError) as refused:
        HeadMap.from_pretrained(folder)
    message = str(refused.value)
    assert str(folder) in message and "re-run `vlm-guard calibrate" in message and "\n" not in message
    changed.save_pretrained(folder)  # saving again repairs it
    assert HeadMap.from_pretrained(folder) == changed


@pytest.mark.parametrize("digest", ["0" * 63, 12, "G" * 64, None])
def test_a_malformed_digest_is_refused(head_map, tmp_path, digest):
    folder = head_map.save_pretrained(tmp_path / "map")
    data = json.loads((folder / JSON_FILE).read_text())
    data[TENSORS_DIGEST_KEY] = digest
    (folder / JSON_FILE).write_text(json.dumps(data))
    if digest is None:  # a map written before the digest was recorded reads as it is
        data.pop(TENSORS_DIGEST_KEY)
        (folder / JSON_FILE).write_text(json.dumps(data))
        assert HeadMap.from_pretrained(folder) == head_map
        return
    with pytest.raises(HeadMapFileError, match=f"{JSON_FILE}: field {TENSORS_DIGEST_KEY} is "):
        HeadMap.from_pretrained(folder)


def test_failed_tune_save_keeps_the_calibrated_map(head_map, tmp_path, monkeypatch):
    """``vlm-guard tune`` saves into the cache folder that holds the calibration: a failed save must not destroy it."""
    import safetensors.torch

    from vlm_guard.tuning.search import save_tuned

    folder = head_map.save_pretrained(tmp_path / "cache" / "model-0123")
    tuned = HeadMap.from_pretrained(folder)
    tuned.vhd_mean = tuned.vhd_mean * 2

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_tuned(tuned, folder)
    monkeypatch.undo()
    assert _names(folder) == [JSON_FILE, TENSOR_FILE]
    assert HeadMap.from_pretrained(folder) == head_map
    assert not torch.equal(head_map.vhd_mean, tuned.vhd_mean)
