"""Checks on values a user gives (a device, a model, output paths, a port), run before any slow work (loading a
model), each failing with a one-line ``ValueError`` / ``FileNotFoundError`` that names the value and the fix (printed
by ``vlm_guard.cli.main``); and how a model is named in messages and plots. Shared by the commands
(:mod:`vlm_guard.cli`, which re-exports the checks as :mod:`vlm_guard.cli.checks`) and the library's runners.

Example:
    >>> check_device("cpu")
    'cpu'
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def display_name(path) -> str:
    """``path`` as printable text (:func:`vlm_guard.images.display_name`; imported when a message is made, so that
    importing this module stays light)."""
    from vlm_guard.images import display_name as shown

    return shown(path)


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` when torch can use it here; otherwise a one-line error (``cuda`` without a GPU, a typo)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"{flag} {device!r} is not a torch device ({error}); use cpu, cuda, cuda:1 or mps.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = f"torch {torch.__version__}, " + (
                f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            )
            raise ValueError(f"{flag} {device}: no CUDA GPU is available here ({built}); use {flag} cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered "
                f"from 0; pass one of them."
            )
    if parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{flag} {device}: Apple MPS is not available here; use {flag} cpu.")
    return device


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or text.endswith(("/", os.sep))
        or text.count("/") > 1
        or os.sep != "/"
        and os.sep in text
    )


def check_model_argument(model: str | None, flag: str = "--model") -> str | None:
    """A ``--model`` value that can be loaded: an existing model folder (with ``config.json``), or a hub id
    (``org/name``). A path that does not exist (a typo) is refused here, before transformers turns it into a hub
    lookup with a long traceback."""
    if model is None:
        return None
    path = Path(model).expanduser()
    shown = display_name(model)
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{flag} {shown} is a file; pass the model folder (the one holding config.json) or a hub id."
            )
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{flag} {shown} has no config.json; pass a folder written by save_pretrained or a hub id."
            )
        return model
    if _looks_like_path(str(model)):
        raise FileNotFoundError(
            f"{flag} {shown}: no such folder; check the path (or pass a hub id like llava-hf/llava-1.5-7b-hf)."
        )
    return model


def model_load_error(model: str | None, error: BaseException, flag: str = "--model") -> ValueError:
    """A one-line error for a model that could not be loaded (``from_pretrained``'s ``OSError``: a hub id that is
    not cached on a machine without access to the hub, a misspelt id, missing files)."""
    reason = " ".join(str(error).split())
    if len(reason) > 300:
        reason = reason[:297] + "..."
    return ValueError(
        f"{flag} {display_name(model or 'default')}: could not load it ({reason}); pass a local folder "
        f"(with config.json) or a hub id whose files are in the local cache."
    )


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a file this process can create or append to: not a folder, not a device, pipe or socket (such as
    ``/dev/null``: a result written there is lost), in a folder that exists or can be made, and that can be written
    (checked by creating a temporary file there)."""
    out = Path(path).expanduser()
    shown = display_name(out)
    if out.is_dir():
        raise ValueError(f"{flag} {shown} is a folder; pass a file name, e.g. {display_name(out / 'results.jsonl')}.")
    if out.exists() and not out.is_file():  # /dev/null, a pipe, a socket, a link to one: the result could not be kept
        what = "a link to " if out.is_symlink() else ""
        raise ValueError(
            f"{flag} {shown} is {what}{_file_kind(out)}, not a regular file: what is written there cannot be "
            f"read back; pass a file name in a folder."
        )
    if out.is_symlink() and not out.exists():
        raise ValueError(
            f"{flag} {shown} is a link to nothing ({display_name(os.readlink(out))}); pass a file name "
            f"in a folder, or remove the link."
        )
    _check_writable_folder(out.parent, flag, shown)
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"{flag} {shown} is read-only; pass another {flag} or make it writable.")
    return out


def check_head_map_folder(path: str | os.PathLike | None, flag: str = "--head-map") -> Path | None:
    """A ``--head-map`` folder that holds a head map's two files (read fully later, with the model), else a
    one-line error now, before the model loads."""
    if path is None:
        return None
    folder = Path(path).expanduser()
    shown = display_name(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {shown}: no such folder; pass the --out folder of `vlm-guard calibrate`.")
    missing = [name for name in ("head_map.json", "head_map.safetensors") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{flag} {shown} holds no {' or '.join(missing)}; pass the --out folder of `vlm-guard calibrate`."
        )
    return folder


def _file_kind(path: Path) -> str:
    import stat

    mode = path.stat().st_mode
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder to write into: not an existing file, creatable and writable."""
    out = Path(path).expanduser()
    shown = display_name(out)
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{flag} {shown} is an existing file; {flag} names a folder to write into: pass a new or existing folder."
        )
    _check_writable_folder(out, flag, shown)
    return out


def _check_writable_folder(folder: Path, flag: str, shown: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vlm_guard_write_test_"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(
            f"{flag} {shown}: cannot write into {display_name(folder)} ({reason}); pass a {flag} in a "
            f"folder you can write to."
        ) from None


def check_port(host: str, port: int, flag: str = "--port") -> int:
    """``port`` when a server can listen on ``host:port`` now; a one-line error when another program holds it."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closing socket does not count
    try:
        probe.bind((host.strip("[]"), port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ValueError(
                f"{flag} {port} on {host} is already in use (another demo or server?); pass another "
                f"{flag}, or stop the program that holds it."
            ) from None
        if error.errno == errno.EACCES:
            raise ValueError(
                f"{flag} {port} on {host} needs privileges (ports below 1024); pass {flag} 7860 or "
                f"another port above 1023."
            ) from None
        raise ValueError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); check --host and {flag}."
        ) from None
    finally:
        probe.close()
    return port


def display_model_name(fingerprint: dict) -> str:
    """The model a map was calibrated on, without the builder's folders: a hub id as it is
    (``llava-hf/llava-1.5-7b-hf``), a local path by its last component."""
    name = str(fingerprint.get("name_or_path") or "").replace("\\", "/").rstrip("/")
    if not name:
        return "(unnamed)"
    if name.startswith(("/", "~", ".")) or (len(name) > 1 and name[1] == ":") or name.count("/") > 1:
        return name.rsplit("/", 1)[-1]
    return name


__all__ = [
    "display_model_name",
    "model_load_error",
    "check_device",
    "check_head_map_folder",
    "check_model_argument",
    "check_output_file",
    "check_output_folder",
    "check_port",
]
