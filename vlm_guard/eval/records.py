"""Resumable per-item results (JSON lines) and run summaries (JSON).

A benchmark run appends one JSON record per finished item to a ``.jsonl`` file and flushes it at once, so a run
killed at any moment loses at most the item in flight. Rerunning with the same file skips what is done::

    with ResultsWriter("runs/pope_random.jsonl", id_key="question_id") as writer:
        for question in questions:
            if question.question_id in writer.done_ids():
                continue
            writer.write({"question_id": question.question_id, "answer": generate(question)})

A kill in the middle of a write leaves a truncated last line; opening the file again reports it (a log warning
and :attr:`ResultsWriter.dropped_line`) and cuts it off, so that item is simply redone. Any other malformed line
is an error: it was not produced by an interrupted run.

:func:`write_summary` stores the metrics next to everything needed to reproduce them: the full config, the
library, transformers and torch versions, the seed and the number of items.
"""

from __future__ import annotations

import dataclasses
import datetime as _datetime
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from vlm_guard.version import __version__

logger = logging.getLogger(__name__)

SUMMARY_FORMAT = "vlm_guard.eval_summary/1"


def _json_default(value: Any) -> Any:
    """Convert numpy values (and sets, tuples inside dataclasses) for ``json.dumps``."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: Any, what: str, **kwargs: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=_json_default, **kwargs)
        # a file name that is not UTF-8 (a lone surrogate) cannot be written to a UTF-8 file: keep it escaped
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    except ValueError as error:  # NaN / inf
        raise ValueError(
            f"{what} holds a NaN or infinite number ({error}); JSON cannot store it: replace it with None or a "
            f"finite value."
        ) from None
    except TypeError as error:
        raise ValueError(
            f"{what} is not JSON serialisable: {error}; store plain numbers, strings, lists and dicts."
        ) from None


HEADER_KEY = "vlm_guard_run"
"""Key of the header line (the first line of a records file): ``{"vlm_guard_run": RUN_FORMAT, "fingerprint": ...}``."""
RUN_FORMAT = "vlm_guard.eval_records/1"


class RunMismatchError(ValueError):
    """A records file belongs to another run (other model, settings, prompts or code), or cannot be checked."""


class FileBusyError(ValueError):
    """Another process is writing the records file (the ``--out`` value cannot be used now)."""


@dataclasses.dataclass
class _Scan:
    records: list[dict]
    good_length: int  # bytes of complete, valid content
    needs_newline: bool  # last valid record lacks its newline
    dropped_line: str | None
    header: dict | None = None  # the run header (first line), if any
    line_numbers: list[int] = dataclasses.field(default_factory=list)  # the file line of each record (1-based)


def _scan_jsonl(path: Path) -> _Scan:
    data = path.read_bytes()
    records: list[dict] = []
    position = 0
    line_number = 0
    dropped_line = None
    needs_newline = False
    good_length = 0
    scan_header = None
    line_numbers: list[int] = []
    while position < len(data):
        line_number += 1
        end = data.find(b"\n", position)
        complete = end != -1
        raw = data[position:end] if complete else data[position:]
        next_position = end + 1 if complete else len(data)
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            position = next_position
            good_length = next_position if complete else good_length
            continue
        try:
            record = json.loads(text)
            valid = isinstance(record, dict)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply to be a record
            valid = False
        if not valid:
            if not complete:
                dropped_line = text
                logger.warning(
                    "%s:%d: dropping a truncated last line (an interrupted run); that item will be redone: %.80r",
                    path,
                    line_number,
                    text,
                )
                break
            raise ValueError(
                f"{path}:{line_number}: not a JSON object: {text[:120]!r}. Only a truncated last line is repaired "
                f"automatically; fix or move this file."
            )
        if HEADER_KEY in record:
            if scan_header is None and not records:
                scan_header = record
            elif record.get("fingerprint") != (scan_header or {}).get("fingerprint"):
                raise RunMismatchError(
                    f"{path}:{line_number}: a second run header with another fingerprint; this file mixes two runs "
                    f"(were files concatenated?). Split it, or delete it and rerun."
                )
        else:
            records.append(record)
            line_numbers.append(line_number)
        good_length = next_position
        needs_newline = not complete
        position = next_position
    return _Scan(
        records=records,
        good_length=good_length,
        needs_newline=needs_newline,
        dropped_line=dropped_line,
        header=scan_header,
        line_numbers=line_numbers,
    )


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read a results ``.jsonl`` file (a truncated last line is reported and skipped; the file is not changed).

    Args:
        path: File written by :class:`ResultsWriter`.

    Returns:
        The records in file order.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = Path(tmp.name) / "pope_random.jsonl"               # e.g. "runs/pope_random.jsonl"
        >>> with ResultsWriter(path) as writer:
        ...     writer.write({"id": 1, "answer": "Yes."})
        >>> read_records(path)
        [{'id': 1, 'answer': 'Yes.'}]
        >>> tmp.cleanup()
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {str(path)!r}.")
    return _scan_jsonl(path).records


def read_numbered_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Like :func:`read_records`, with each record's line number in the file (1-based; for error messages).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = Path(tmp.name) / "pope_random.jsonl"
        >>> with ResultsWriter(path, fingerprint={"methods": "vhr"}) as writer:   # line 1: the header
        ...     writer.write({"id": 7, "answer": "Yes."})
        >>> for line, record in read_numbered_records(path):
        ...     print(f"line {line}: {record['id']}")
        line 2: 7
        >>> tmp.cleanup()
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {str(path)!r}.")
    scan = _scan_jsonl(path)
    return list(zip(scan.line_numbers, scan.records))


def read_header(path: str | os.PathLike) -> dict | None:
    """The run header of a results file (``{"vlm_guard_run": ..., "fingerprint": {...}, ...}``), or None for a file
    written without one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {str(path)!r}.")
    return _scan_jsonl(path).header


def fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"field: old -> new"`` for every field of two flat fingerprints that differs (missing counts as None).

    Example:
        >>> fingerprint_differences({"methods": "vhr", "seed": 0}, {"methods": "gift", "seed": 0})
        ["methods: 'vhr' -> 'gift'"]
    """

    def short(value: Any) -> str:
        text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return [
        f"{key}: {short(old.get(key))} -> {short(new.get(key))}"
        for key in sorted(set(old) | set(new), key=str)
        if old.get(key) != new.get(key)
    ]


class _FileLock:
    """An exclusive lock on ``<records file>.lock`` held while a writer is open.

    POSIX ``flock`` is released by the kernel when the holder dies, so a lock file left by a killed run (``kill
    -9``, a crash, a reboot) is stale by construction and is simply taken over; the pid written into it only
    names the holder in the error. Without ``fcntl`` (Windows) the file is created exclusively and a lock whose
    pid is no longer running on this host is treated as stale and replaced.
    """

    def __init__(self, target: Path):
        self.path = target.with_name(target.name + ".lock")
        self._handle = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict) or "pid" not in info:
            return "another process"
        return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started_utc')}"

    def acquire(self) -> None:
        info = json.dumps(
            {
                "pid": os.getpid(),
                "host": platform.node(),
                "started_utc": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
            }
        )
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            self._acquire_exclusive(info)
            return
        for _ in range(10):
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise FileBusyError(
                    f"{self.path.with_suffix('')} is being written by another run ({self._holder()}); wait for it to "
                    f"finish, or pass another --out. (Two writers would duplicate items.)"
                ) from None
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and our lock: take the new one
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(info)
            handle.flush()
            self._handle = handle
            return
        raise FileBusyError(f"could not lock {self.path}; another run keeps replacing it. Pass another --out.")

    def _acquire_exclusive(self, info: str) -> None:  # pragma: no cover - Windows
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text(encoding="utf-8"))
                    pid = int(holder["pid"])
                    alive = holder.get("host") == platform.node() and _pid_alive(pid)
                except (OSError, ValueError, KeyError, TypeError):
                    alive = False
                if alive:
                    raise FileBusyError(
                        f"{self.path.with_suffix('')} is being written by another run "
                        f"({self._holder()}); wait for it, or pass another --out."
                    ) from None
                logger.warning("removing the stale lock %s (%s is not running)", self.path, self._holder())
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(info)
            self._handle = True
            return
        raise FileBusyError(f"could not lock {self.path}; pass another --out.")

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # removed while still held: a waiting opener re-checks the inode
        except OSError:
            pass
        if self._handle is not True:
            self._handle.close()  # releases the flock
        self._handle = None


def _pid_alive(pid: int) -> bool:  # pragma: no cover - Windows fallback
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class ResultsWriter:
    """Append-only, resumable JSON-lines results file: one record per finished item.

    Opening an existing file reads the ids already done, repairs a truncated last line (dropped and reported
    in :attr:`dropped_line`), and appends after it. Ids are compared as stored in JSON (``1`` and ``"1"`` differ).

    Args:
        path: The ``.jsonl`` file (parent folders are created).
        id_key: Record key holding the item id (``"question_id"`` for POPE, ``"image_id"`` for CHAIR).
        fsync: Also ``os.fsync`` after each record (survives a machine crash, not only a killed process).
        fingerprint: Flat ``field -> value`` identifying the run (see :func:`vlm_guard.eval.runner.run_fingerprint`).
            A new file starts with a header line holding it; an existing file must hold the same one, else
            :class:`RunMismatchError` names the fields that differ (a file with records but no header is refused
            too: it cannot be checked). None: no check, no header.
        required_keys: Keys every existing record must have (a missing one is a one-line ``ValueError``).

    While open, the writer holds ``<path>.lock`` (see :class:`_FileLock`): a second writer of the same file, in this
    or another process, gets :class:`FileBusyError`; a lock left by a killed run does not block.

    Attributes:
        path: The file.
        dropped_line: Text of the truncated line removed on opening, or None.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tmp = tempfile.TemporaryDirectory()
        >>> with ResultsWriter(Path(tmp.name) / "run.jsonl", id_key="question_id") as writer:
        ...     writer.write({"question_id": 1, "answer": "Yes."})
        ...     1 in writer.done_ids()
        True
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        path: str | os.PathLike,
        id_key: str = "id",
        fsync: bool = False,
        fingerprint: Mapping[str, Any] | None = None,
        required_keys: tuple[str, ...] = (),
    ):
        if not isinstance(id_key, str) or not id_key:
            raise ValueError(f"id_key must be a non-empty string, got {id_key!r}.")
        self.path = Path(path)
        self.id_key = id_key
        self.fsync = fsync
        self.fingerprint = None if fingerprint is None else json.loads(_dumps(dict(fingerprint), what="fingerprint"))
        self.required_keys = tuple(required_keys)
        self.dropped_line: str | None = None
        self.header: dict | None = None
        self._done: dict[Any, None] = {}
        if self.path.is_dir():
            raise ValueError(
                f"{self.path} is a folder; pass a file name for the records, e.g. {self.path / 'results.jsonl'}."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _FileLock(self.path)
        self._lock.acquire()
        try:
            if self.path.exists():
                self._resume()
            self._handle = self.path.open("a", encoding="utf-8")
            if self.fingerprint is not None and self.header is None:
                self._write_header()
        except BaseException:
            self._lock.release()
            raise

    def _write_header(self) -> None:
        self.header = {
            HEADER_KEY: RUN_FORMAT,
            "created_utc": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": self.fingerprint,
        }
        self._handle.write(_dumps(self.header, what="run header") + "\n")
        self._handle.flush()

    def _check_fingerprint(self, scan: _Scan) -> None:
        if self.fingerprint is None:
            return
        if scan.header is None:
            if scan.records:
                raise RunMismatchError(
                    f"{self.path} holds {len(scan.records)} records but no run fingerprint (written by an older "
                    f"vlm_guard), so they cannot be checked against this run's model and settings; pass another --out, "
                    f"or move the file away to start over."
                )
            return
        stored = scan.header.get("fingerprint")
        if not isinstance(stored, dict):
            raise RunMismatchError(
                f"{self.path}: the run header has no fingerprint; pass another --out or move the file away."
            )
        differences = fingerprint_differences(stored, self.fingerprint)
        if differences:
            raise RunMismatchError(
                f"{self.path} was written by a different run ({'; '.join(differences)}); resuming would mix its "
                f"answers with this run's settings. Pass another --out, or rerun with the same settings."
            )

    def _resume(self) -> None:
        scan = _scan_jsonl(self.path)
        self._check_fingerprint(scan)
        self.header = scan.header
        for index, (line, record) in enumerate(zip(scan.line_numbers, scan.records)):
            if self.id_key not in record:
                raise ValueError(
                    f"{self.path}:{line}: record {index + 1} has no {self.id_key!r} key (keys: {sorted(record)}); open it "
                    f"with the id_key it was written with."
                )
            missing = [key for key in self.required_keys if key not in record]
            if missing:
                raise ValueError(
                    f"{self.path}:{line}: record {index + 1} (id {record.get(self.id_key)!r}) lacks {missing}; the file "
                    f"was edited or written by another tool. Fix or delete that line, or pass another --out."
                )
            item_id = _hashable_id(record[self.id_key], f"{self.path}:{line}", self.id_key)
            if item_id in self._done:
                logger.warning("%s: id %r appears more than once; it counts as done.", self.path, item_id)
            self._done[item_id] = None
        if scan.dropped_line is not None or scan.needs_newline:
            with self.path.open("r+b") as handle:
                handle.truncate(scan.good_length)
                if scan.needs_newline:
                    handle.seek(scan.good_length)
                    handle.write(b"\n")
        self.dropped_line = scan.dropped_line
        logger.info("Resuming %s: %d items done", self.path, len(self._done))

    def done_ids(self) -> frozenset:
        """Ids of the items already written (by this or an earlier run)."""
        return frozenset(self._done)

    def __len__(self) -> int:
        return len(self._done)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one item's record and flush it to the file.

        Args:
            record: JSON-serialisable dict holding ``id_key`` (numpy numbers are converted).

        Raises:
            ValueError: If the id is missing or already written, or the record cannot be stored as JSON.
        """
        if self._handle.closed:
            raise ValueError(f"ResultsWriter for {self.path} is closed; open a new one to append.")
        if not isinstance(record, Mapping):
            raise ValueError(f"record must be a dict, got {type(record).__name__}.")
        if self.id_key not in record:
            raise ValueError(f"record has no {self.id_key!r} key (keys: {sorted(record)}); add the item id.")
        raw_id = record[self.id_key]
        item_id = _hashable_id(raw_id.item() if isinstance(raw_id, np.generic) else raw_id, self.path)
        if item_id in self._done:
            raise ValueError(f"id {item_id!r} is already in {self.path}; skip the items in done_ids() when resuming.")
        line = _dumps(dict(record), what=f"record {item_id!r}")
        self._handle.write(line + "\n")
        self._handle.flush()
        if self.fsync:
            os.fsync(self._handle.fileno())
        self._done[item_id] = None

    def records(self) -> list[dict]:
        """All records in the file, in order."""
        self._handle.flush()
        return read_records(self.path)

    def numbered_records(self) -> list[tuple[int, dict]]:
        """``(line number, record)`` of every record in the file, in order (see :func:`read_numbered_records`)."""
        self._handle.flush()
        return read_numbered_records(self.path)

    def merge_parts(self, parts: Sequence[str | os.PathLike]) -> int:
        """Append the records of per-rank part files (see :func:`part_path`) that this file lacks, then delete the parts.

        Each part is opened as a :class:`ResultsWriter` with this file's fingerprint and required keys (so a part of
        another run is refused, a part still being written is :class:`FileBusyError`, and a truncated last line is
        cut off); a record whose id is already here is dropped. A part is deleted only after its records are flushed
        here, so a kill at any moment loses nothing and duplicates nothing: a part left behind is merged again and
        its records already here are skipped.

        Args:
            parts: Part files, in the order their records are appended.

        Returns:
            The number of records appended.
        """
        added = 0
        for part in parts:
            part = Path(part)
            if not part.exists():
                continue
            with ResultsWriter(
                part, id_key=self.id_key, fingerprint=self.fingerprint, required_keys=self.required_keys
            ) as source:
                for record in source.records():
                    item_id = _hashable_id(record[self.id_key], part)
                    if item_id not in self._done:
                        self.write(record)
                        added += 1
                if not self.fsync:  # the part goes next: its records must be on disk here first
                    os.fsync(self._handle.fileno())
                part.unlink()
            logger.info("merged %s into %s", part, self.path)
        return added

    def reorder(self, key: Callable[[dict], Any]) -> None:
        """Rewrite the file with its records sorted by ``key`` (stable; the run header stays first).

        The new content goes to a temporary file that replaces this one in one rename
        (:func:`vlm_guard.fileio.atomic_write_text`), so a kill or a full disk leaves either the old or the new file,
        never a mix. The writer stays open (and locked) for more records, also when the rewrite fails.
        """
        from vlm_guard.fileio import atomic_write_text

        self._handle.flush()
        scan = _scan_jsonl(self.path)
        ordered = sorted(scan.records, key=key)
        if ordered == scan.records:
            return
        lines = [] if scan.header is None else [_dumps(scan.header, what="run header")]
        lines += [_dumps(record, what=f"record {record.get(self.id_key)!r}") for record in ordered]
        text = "".join(line + "\n" for line in lines)
        self._handle.close()
        try:
            atomic_write_text(self.path, text)
        finally:
            self._handle = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        """Close the file and release its lock (idempotent)."""
        handle = getattr(self, "_handle", None)
        if handle is not None and not handle.closed:
            handle.close()
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        self.close()


def _hashable_id(value: Any, where: Path | str, id_key: str = "id") -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, list):
        try:
            return tuple(_hashable_id(part, where, id_key) for part in value)
        except ValueError:
            pass
    raise ValueError(f"{where}: field {id_key!r} is {value!r}; an item id must be a string or a number.")


PART_INFIX = ".part-"


def part_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The records file rank ``rank`` of ``world_size`` processes writes while a data-parallel run is in flight:
    ``runs/syn.jsonl`` -> ``runs/syn.part-1-of-2.jsonl`` (rank 0 merges the parts into ``path`` and deletes them).

    Example:
        >>> part_path("runs/syn.jsonl", 1, 2).name
        'syn.part-1-of-2.jsonl'
    """
    path = Path(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}{PART_INFIX}{rank}-of-{world_size}.jsonl")


def part_paths(path: str | os.PathLike) -> list[Path]:
    """The part files of ``path`` left on disk by a data-parallel run with any number of processes, in (world size,
    rank) order: what a resumed run, with any number of processes, merges first.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = Path(tmp.name) / "syn.jsonl"                        # e.g. "runs/syn.jsonl"
        >>> for rank in (1, 0):
        ...     _ = part_path(path, rank, 2).write_text("")
        >>> [part.name for part in part_paths(path)]
        ['syn.part-0-of-2.jsonl', 'syn.part-1-of-2.jsonl']
        >>> tmp.cleanup()
    """
    import re

    path = Path(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    pattern = re.compile(re.escape(stem + PART_INFIX) + r"(\d+)-of-(\d+)\.jsonl")
    found = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            match = pattern.fullmatch(candidate.name)
            if match and candidate.is_file():
                found.append(((int(match.group(2)), int(match.group(1))), candidate))
    return [candidate for _, candidate in sorted(found)]


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _config_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise ValueError(f"config must be a dict, a dataclass or have to_dict(), got {type(config).__name__}.")


def write_summary(
    path: str | os.PathLike,
    config: Mapping[str, Any] | Any,
    metrics: Mapping[str, Any],
    *,
    seed: int | None,
    n: int,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Write a run summary JSON: metrics plus what produced them.

    The file is written atomically (:func:`vlm_guard.fileio.atomic_write_text`): a failure leaves the previous
    summary whole, never a half-written one.

    Args:
        path: Output ``.json`` file (parent folders are created).
        config: The full run config (dict, dataclass, or object with ``to_dict()``).
        metrics: Metric name -> value (numbers, or e.g. ``{"point":..., "low":..., "high":...}``).
        seed: Seed of the run (None when nothing was random, e.g. greedy decoding without bootstrap).
        n: Number of items the metrics were computed on.
        extra: More JSON-serialisable fields (model id, split, timing...), stored under ``"extra"``.

    Returns:
        The dict that was written.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tmp = tempfile.TemporaryDirectory()
        >>> summary = write_summary(Path(tmp.name) / "pope_random.summary.json", {"method": "vhr", "alpha": 2.0},
        ...                         {"f1": 0.855}, seed=0, n=3000)
        >>> summary["config"], summary["metrics"], summary["n"]
        ({'method': 'vhr', 'alpha': 2.0}, {'f1': 0.855}, 3000)
        >>> read_summary(Path(tmp.name) / "pope_random.summary.json") == summary
        True
        >>> tmp.cleanup()
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int (the number of items scored), got {n!r}.")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an int or None, got {seed!r}.")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict of name -> value, got {type(metrics).__name__}.")
    summary = {
        "format": SUMMARY_FORMAT,
        "created_utc": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
        "vlm_guard_version": __version__,
        "transformers_version": _package_version("transformers"),
        "torch_version": _package_version("torch"),
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "seed": None if seed is None else int(seed),
        "n": int(n),
        "config": _config_dict(config),
        "metrics": dict(metrics),
        "extra": dict(extra) if extra else {},
    }
    text = _dumps(summary, what="summary", indent=2, sort_keys=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from vlm_guard.fileio import atomic_write_text

    atomic_write_text(path, text + "\n")
    logger.info("Wrote summary %s (n=%d)", path, n)
    return json.loads(text)


def read_summary(path: str | os.PathLike) -> dict:
    """Read a summary written by :func:`write_summary`.

    Raises:
        ValueError: If the file is not such a summary.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"summary file not found: {str(path)!r}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
    except (UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{path} is not a summary written by write_summary ({type(error).__name__}).") from None
    if not isinstance(data, dict) or data.get("format") != SUMMARY_FORMAT:
        raise ValueError(f"{path} is not a summary written by write_summary (format {SUMMARY_FORMAT!r}).")
    checks = {
        "n": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
        "seed": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or null"),
        "metrics": (lambda v: isinstance(v, dict), "an object"),
        "config": (lambda v: isinstance(v, dict), "an object"),
        "extra": (lambda v: isinstance(v, dict), "an object"),
    }
    for field, (valid, expected) in checks.items():
        if field not in data:
            raise ValueError(
                f"{path}: field {field!r} is missing; the summary was edited: rerun the command to write it."
            )
        if not valid(data[field]):
            raise ValueError(
                f"{path}: field {field!r} is {str(data[field])[:60]!r}, not {expected}; the summary was "
                "edited: rerun the command to write it."
            )
    return data


def finite_or_none(value: float) -> float | None:
    """``value`` as a float, or None for NaN/inf (JSON cannot store those).

    Example:
        >>> finite_or_none(float("nan")) is None
        True
    """
    value = float(value)
    return value if math.isfinite(value) else None


__all__ = [
    "ResultsWriter",
    "RunMismatchError",
    "FileBusyError",
    "read_records",
    "part_path",
    "part_paths",
    "read_header",
    "fingerprint_differences",
    "write_summary",
    "read_summary",
    "finite_or_none",
    "SUMMARY_FORMAT",
]
