"""Atomic file writes: a file is either its previous version or its complete new one, never a part.

Every file the project writes goes through these helpers. Each writes a temporary file in the same folder (a
hidden name that starts with ``.`` and holds ``.tmp-``), flushes and ``fsync``s it, then ``os.replace``s it onto
the target (atomic on POSIX and Windows when both are on the same file system, which the same folder guarantees).
On any failure before the rename (a full disk, an encoding error, ``KeyboardInterrupt``, ...) the temporary file
is removed and the previous file is left exactly as it was; the error is raised again.

A pair of files that belong together (a head map's tensors and its JSON) is bound by a digest: write the tensors
first, record :func:`sha256_file` of them in the JSON, write the JSON second, and check the digest when reading.

Example::

    from vlm_guard.fileio import atomic_write_json, atomic_save_safetensors, sha256_file
    atomic_save_safetensors({"scores": scores}, folder / "map.safetensors")
    atomic_write_json(folder / "map.json", {"sha256": sha256_file(folder / "map.safetensors")}, indent=2)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_path",
    "atomic_paths",
    "atomic_folder",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "sha256_file",
    "TEMPORARY_MARK",
]

TEMPORARY_MARK = ".tmp-"  # in every temporary name: ``.<stem>.tmp-<random><suffix>``


def _target(path: str | os.PathLike) -> Path:
    """The file to replace: ``path`` with a symbolic link followed; refuses what is not a regular file."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists and is not a regular file (a folder or a device); pass a file path")
    return path


def _temporary_name(target: Path) -> Path:
    # the target's suffix is kept last, so writers that read it (matplotlib's savefig) pick the right format
    return target.with_name(f".{target.stem}{TEMPORARY_MARK}{secrets.token_hex(4)}{target.suffix}")


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable (a machine crash right after it keeps it); best effort where unsupported."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _mode_for(target: Path) -> int:
    """The permission bits the new file gets: the previous file's, or what a plain ``open(path, "w")`` gives."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return 0o666  # os.open applies the umask to it, as open() does


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s new content to; on a clean exit it replaces ``path``.

    For writers that take a file name (``safetensors.torch.save_file``, ``matplotlib``'s ``savefig``). The
    temporary file is created empty (same folder, same suffix, the previous file's permissions); the writer may
    overwrite it. On a clean exit it is fsynced and renamed onto ``path``; on any exception it is removed and
    ``path`` is left as it was.

    Args:
        path: the file to write; its folder must exist. A symbolic link is followed (its target is replaced).

    Raises:
        ValueError: ``path`` exists and is not a regular file (a folder, ``/dev/null``).

    Example::

        with atomic_path("plot.png") as temporary:
            figure.savefig(temporary)
    """
    target = _target(path)
    temporary = _temporary_name(target)
    descriptor = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), _mode_for(target)
    )
    os.close(descriptor)
    try:
        yield temporary
        with open(temporary, "rb+") as handle:  # the writer may have closed it without fsync
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_folder(target.parent)
    _remove_stale_temporaries(target)


STALE_AFTER_S = 3600.0
"""A temporary file of a target older than this was left by a killed process (no write takes an hour)."""


def _remove_stale_temporaries(target: Path) -> None:
    """Delete the temporary files of ``target`` that a killed writer left behind (``kill -9`` skips every cleanup)."""
    import time

    cutoff = time.time() - STALE_AFTER_S
    pattern = f".{target.stem}{TEMPORARY_MARK}*{target.suffix}"
    for leftover in target.parent.glob(pattern):
        with contextlib.suppress(OSError):
            if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                leftover.unlink()


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together: one temporary path per file, renamed in the given order.

    Every file is written to its temporary path first; only when the block exits cleanly are they fsynced and
    renamed, one after the other, so a failure (a full disk, an exception, a kill) while any of them is written
    leaves every previous file as it was. The renames are separate system calls: readers of such a pair should
    also check a digest one file records of the other (see the module docstring).

    Example::

        with atomic_paths(folder / "map.safetensors", folder / "map.json") as (tensors_tmp, json_tmp):
            save_file(tensors, str(tensors_tmp))
            json_tmp.write_text(json.dumps({"sha256": sha256_file(tensors_tmp)}))
    """
    with contextlib.ExitStack() as stack:
        # entered in order, left in reverse: enter the last file first so the first one is renamed first
        temporaries = [stack.enter_context(atomic_path(path)) for path in reversed(paths)]
        yield temporaries[::-1]


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``path``; on a clean exit it becomes ``path``.

    For outputs that are a folder of files written together (an exported model, a checkpoint, a cache entry). On any
    exception the temporary folder is deleted and ``path`` is left as it was. A previous ``path`` is renamed aside,
    the new folder renamed in, and the previous one deleted: between the two renames (two system calls) ``path`` is
    briefly absent, never partly written.

    Args:
        path: the folder to create or replace; its parent must exist.
        replace: with False an existing ``path`` is kept and the new folder discarded (a cache filled by another
            process first).

    Example::

        with atomic_folder("runs/export") as temporary:
            model.save_pretrained(temporary)
    """
    import shutil

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; pass a folder path")
    token = secrets.token_hex(4)
    temporary = target.with_name(f".{target.name}{TEMPORARY_MARK}{token}")
    temporary.mkdir()
    try:
        yield temporary
        for file in temporary.rglob("*"):
            if file.is_file() and not file.is_symlink():
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            if not replace:
                shutil.rmtree(temporary, ignore_errors=True)
                return
            previous = target.with_name(f".{target.name}.old-{token}")
            os.replace(target, previous)
            try:
                os.replace(temporary, target)
            except BaseException:
                os.replace(previous, target)
                raise
            shutil.rmtree(previous, ignore_errors=True)
        else:
            try:
                os.replace(temporary, target)
            except OSError:
                if replace or not target.is_dir():
                    raise
                shutil.rmtree(temporary, ignore_errors=True)  # another process made it meanwhile
                return
        _fsync_folder(target.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (the previous file stays whole on any failure).

    Args:
        path: the file to write; its folder must exist.
        data: the new content.

    Example::

        atomic_write_bytes("image.png", png_bytes)
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes needs bytes, got {type(data).__name__}; use atomic_write_text for str")
    _write_with(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Writes ``text`` to ``path`` atomically, encoded as ``encoding`` (UTF-8 by default).

    The text is encoded before anything touches the disk, so an encoding error leaves no file behind.

    Example::

        atomic_write_text("report.md", "# Results\\n")
    """
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text needs str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> None:
    """Writes ``json.dumps(obj, **json_kwargs)`` (plus a final newline) to ``path`` atomically.

    ``obj`` is serialised first: a value JSON cannot hold raises ``TypeError`` and leaves the previous file as it was.
    NaN and infinity are refused (``allow_nan=False`` unless given) since they are not JSON other readers accept.

    Example::

        atomic_write_json("summary.json", {"accuracy": 0.91}, indent=2)
    """
    json_kwargs.setdefault("allow_nan", False)
    atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n")


def atomic_save_safetensors(
    tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Saves torch ``tensors`` as a safetensors file atomically (``safetensors.torch.save_file`` to a temporary name).

    Args:
        tensors: name -> tensor (contiguous, not sharing memory, as ``save_file`` requires).
        path: the ``.safetensors`` file to write; its folder must exist.
        metadata: optional str -> str header metadata.

    Example::

        atomic_save_safetensors({"scores": torch.zeros(2, 4)}, "map.safetensors", metadata={"format": "pt"})
    """
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        save_file(dict(tensors), str(temporary), metadata=dict(metadata) if metadata is not None else None)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file's bytes, read in chunks (constant memory).

    Example::

        digest = sha256_file("map.safetensors")  # 64 hex characters
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
