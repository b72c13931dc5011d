"""vlm_guard.fileio: a failed write leaves the previous file whole and no temporary file behind."""

import errno
import json
import os
import stat

import pytest
import torch

from vlm_guard import fileio
from vlm_guard.fileio import (
    atomic_path,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
)


def _only(folder):
    return sorted(path.name for path in folder.iterdir())


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1}, indent=2)
    assert json.loads(target.read_text()) == {"x": 1}
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _only(tmp_path) == ["a.json"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_rename_keeps_old_file_and_removes_temporary(tmp_path, monkeypatch, failure):
    target = tmp_path / "state.json"
    target.write_text("old")

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(type(failure)):
        atomic_write_json(target, {"new": True})
    assert target.read_text() == "old"
    assert _only(tmp_path) == ["state.json"]


def test_full_disk_mid_write_keeps_old_file(tmp_path, monkeypatch):
    """The writer fails after part of the data is on disk (ENOSPC from write)."""
    target = tmp_path / "records.json"
    target.write_text("old content")

    class FullDisk:
        def __init__(self, real):
            self.real = real

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

        def write(self, data):
            self.real.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.real.flush()

    real_open = open

    def open_full(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode else handle

    monkeypatch.setattr("builtins.open", open_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "new content that does not fit")
    monkeypatch.undo()
    assert target.read_text() == "old content"
    assert _only(tmp_path) == ["records.json"]


def test_unserialisable_json_touches_nothing(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")})
    assert target.read_text() == "old"
    assert _only(tmp_path) == ["a.json"]


def test_interrupt_inside_atomic_path_keeps_old_file(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old png")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temporary:
            assert temporary.parent == tmp_path and temporary.suffix == ".png"
            temporary.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old png"
    assert _only(tmp_path) == ["plot.png"]


def test_refuses_what_is_not_a_regular_file(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        atomic_write_text(tmp_path / "folder", "x")
    if os.path.exists("/dev/null"):
        with pytest.raises(ValueError, match="/dev/null"):
            atomic_write_text("/dev/null", "x")
    assert _only(tmp_path) == ["folder"]


def test_symbolic_link_is_followed(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def test_keeps_permissions_of_previous_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_new_file_gets_umask_permissions(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_safetensors_round_trip_and_failure(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    target = tmp_path / "map.safetensors"
    scores = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    atomic_save_safetensors({"scores": scores}, target, metadata={"format": "pt"})
    assert torch.equal(load_file(str(target))["scores"], scores)
    before = target.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", fail)
    with pytest.raises(OSError):
        atomic_save_safetensors({"scores": scores * 2}, target)
    assert target.read_bytes() == before
    assert _only(tmp_path) == ["map.safetensors"]


def test_sha256_file(tmp_path):
    import hashlib

    target = tmp_path / "a.bin"
    data = os.urandom(3 * 1024 + 7)
    target.write_bytes(data)
    assert sha256_file(target, chunk_bytes=1024) == hashlib.sha256(data).hexdigest()


def test_atomic_folder_replaces_a_folder_whole(tmp_path):
    from vlm_guard.fileio import atomic_folder

    target = tmp_path / "export"
    with atomic_folder(target) as temporary:
        (temporary / "a.txt").write_text("one")
    assert _only(target) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as temporary:
            (temporary / "b.txt").write_text("half")
            raise KeyboardInterrupt
    assert _only(target) == ["a.txt"] and _only(tmp_path) == ["export"]  # the previous folder, no leftovers
    with atomic_folder(target) as temporary:
        (temporary / "b.txt").write_text("two")
    assert _only(target) == ["b.txt"] and _only(tmp_path) == ["export"]
    with atomic_folder(target, replace=False) as temporary:  # a cache another process filled first is kept
        (temporary / "c.txt").write_text("three")
    assert _only(target) == ["b.txt"] and _only(tmp_path) == ["export"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        with atomic_folder(tmp_path / "file"):
            pass


def test_atomic_folder_failed_swap_restores_the_previous_folder(tmp_path, monkeypatch):
    from vlm_guard.fileio import atomic_folder

    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "state.json").write_text("old")
    real_replace = os.replace
    calls = []

    def replace(source, destination):
        calls.append(destination)
        if len(calls) == 2:  # the new folder's rename, after the previous one was moved aside
            raise OSError(errno.EIO, "Input/output error")
        real_replace(source, destination)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError):
        with atomic_folder(target) as temporary:
            (temporary / "state.json").write_text("new")
    monkeypatch.undo()
    assert (target / "state.json").read_text() == "old" and _only(tmp_path) == ["checkpoint"]


def test_temporaries_left_by_a_killed_writer_are_removed_later(tmp_path):
    target = tmp_path / "head_map.json"
    stale = tmp_path / f".head_map{fileio.TEMPORARY_MARK}dead0000.json"
    fresh = tmp_path / f".head_map{fileio.TEMPORARY_MARK}live0000.json"  # maybe another writer's, still working
    other = tmp_path / f".other{fileio.TEMPORARY_MARK}dead0000.json"
    for path in (stale, fresh, other):
        path.write_text("partial")
    old = os.stat(stale).st_mtime - 2 * fileio.STALE_AFTER_S
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    atomic_write_json(target, {"x": 1})
    assert _only(tmp_path) == sorted([fresh.name, other.name, "head_map.json"])
