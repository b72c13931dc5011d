"""The demo's temporary files: one folder owned by the running app, removed when it stops.

Gradio writes uploads and every picture it serves under ``GRADIO_TEMP_DIR`` (default
``/tmp/gradio``, shared by every Gradio app on the machine and never emptied). ``vlm-guard demo`` points
it at a fresh folder of its own for the lifetime of the server; the app sweeps files older than the
session lifetime while it runs (``gr.Blocks(delete_cache=...)``), deletes refused uploads at once
(:func:`discard_upload`), and removes the folder on exit.

Example:
    >>> with owned_temp_dir() as folder:      # build_app(session).launch() here keeps its files in folder
    ...     os.environ["GRADIO_TEMP_DIR"] == str(folder)
    True
    >>> folder.exists()                       # deleted on exit
    False
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

GRADIO_TEMP_ENV = "GRADIO_TEMP_DIR"
PREFIX = "vlm-guard-demo-"


@contextlib.contextmanager
def owned_temp_dir() -> Iterator[Path]:
    """A new temporary folder set as ``GRADIO_TEMP_DIR`` while the block runs, then deleted.

    Created inside an existing ``GRADIO_TEMP_DIR`` when one is set (so a caller's own temporary area
    still holds everything), else in the system temporary folder. The previous value of the variable
    is restored on exit.
    """
    previous = os.environ.get(GRADIO_TEMP_ENV)
    parent = previous if previous else None
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent)).resolve()
    os.environ[GRADIO_TEMP_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(GRADIO_TEMP_ENV, None)
        else:
            os.environ[GRADIO_TEMP_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("removed the demo's temporary folder %s", folder)


def discard_upload(path: str | os.PathLike | None, upload_folder: str | os.PathLike) -> bool:
    """Delete an uploaded file (and its now empty per-upload folder) if it lies inside ``upload_folder``.

    Anything outside it (a bundled example, a user's own file) is never touched.

    Returns:
        True when a file was deleted.
    """
    if not path:
        return False
    try:
        file = Path(path).resolve()
        folder = Path(upload_folder).resolve()
    except OSError:
        return False
    if folder == file or folder not in file.parents or not file.is_file():
        return False
    try:
        file.unlink()
    except OSError as error:
        logger.warning("could not delete the refused upload %s: %s", file, error)
        return False
    parent = file.parent
    if parent != folder:
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when empty
    return True


STRAY_AGE_SECONDS = 30


def sweep_stray_files(upload_folder: str | os.PathLike, age: float = STRAY_AGE_SECONDS) -> int:
    """Delete the empty ``tmp*`` files Gradio leaves at the top of its upload folder.

    ``gr.File(type="filepath")`` opens an empty ``NamedTemporaryFile(delete=False)`` there on every upload and
    never uses or deletes it (Gradio 6.x), and Gradio's own sweep does not know those files: without this,
    one file per upload stays until the server stops. Only empty regular files named ``tmp*`` directly in
    ``upload_folder`` and older than ``age`` seconds are touched.

    Returns:
        how many files were deleted.
    """
    folder = Path(upload_folder)
    now = time.time()
    deleted = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if (
                entry.name.startswith("tmp")
                and entry.is_file(follow_symlinks=False)
                and entry.stat().st_size == 0
                and now - entry.stat().st_mtime > age
            ):
                os.unlink(entry.path)
                deleted += 1
        except OSError:
            continue
    return deleted
