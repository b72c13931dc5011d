"""Reading images from disk, the same way for every entry point (eval, demo, caption, calibrate).

:func:`load_image` opens a file (or takes a PIL image) and returns it as 8-bit RGB, the form every processor
expects, with the cases a plain ``Image.open(path).convert("RGB")`` gets wrong handled:

- 16-bit and 32-bit grey (``I;16``, ``I``, ``F``): scaled to 8 bits (``I;16`` value 32896 -> 128), not clipped to
  white;
- EXIF orientation: a rotated phone photo is turned upright (as ``transformers.image_utils.load_image`` does);
- transparency (RGBA, LA, palette with a transparent index): composited on white, as transformers'
  ``convert_to_rgb`` does, so transparent pixels do not show whatever colour happens to be stored under them;
- palette, bilevel, CMYK and YCbCr images: converted to RGB;
- decompression bombs: the pixel count is read from the header and checked against ``max_pixels`` before a single
  pixel is decoded; truncated or corrupt files fail in the full decode here, not later in a processor.

Every failure is an :class:`ImageLoadError` (a ``ValueError``) with a one-line message that names the file and
says what to do; :attr:`ImageLoadError.kind` tells callers (the demo) which case it was.

:func:`find_images` expands a folder, a file or a glob (``**`` included) into image files without following a
symbolic link into a loop; dangling links, links that loop, and second paths to a file already listed are
returned as skipped, with the reason, so the caller can count and report them.

:func:`display_name` makes any path printable, including file names that are not valid UTF-8.

Example:
    >>> from PIL import Image
    >>> from vlm_guard.images import load_image
    >>> image = load_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))   # or a path: load_image("photo.jpg")
    >>> image.mode, image.getpixel((0, 0))                            # transparency composited on white
    ('RGB', (255, 255, 255))
    >>> load_image("no_such_photo.jpg")
    Traceback (most recent call last):
    ...
    vlm_guard.images.ImageLoadError: no_such_photo.jpg: file not found; check the path.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest ``width * height`` read by default (67 M pixels, about 200 MB as RGB). PIL itself refuses images above
twice its own ``Image.MAX_IMAGE_PIXELS`` whatever this cap says."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File name endings :func:`find_images` takes from a folder (case-insensitive)."""

ImageInput = Union[str, os.PathLike, Image.Image]  # noqa: UP007 (a runtime alias on Python 3.10)


class ImageLoadError(ValueError):
    """An image that cannot be used; the message is one line, names the file and says what to do.

    Attributes:
        kind: ``"missing"`` (no such file), ``"not_a_file"`` (a folder...), ``"empty"`` (0 bytes),
            ``"too_many_pixels"`` (over the cap, or a decompression bomb), ``"unreadable"`` (corrupt, truncated or
            unsupported).
        name: the file as shown in the message.
        size: ``(width, height)`` from the header when known.
    """

    def __init__(self, message: str, *, kind: str, name: str, size: tuple[int, int] | None = None):
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.size = size


def display_name(path: str | os.PathLike | bytes) -> str:
    """``path`` as text that can always be printed or stored in JSON: bytes that are not UTF-8 (a file name from
    another locale) appear as ``\\xNN`` instead of making ``print`` or ``json.dump`` fail.

    Example:
        >>> display_name(os.fsdecode(b"caf\\xe9.png"))
        'caf\\\\xe9.png'
    """
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


# ---------------------------------------------------------------------------------------------- conversion
def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """An ``L`` image from a 16-bit, 32-bit integer or float grey image, scaled rather than clipped."""
    array = np.asarray(image)  # [H, W]; uint16 for I;16*, int32 for I, float32 for F
    if image.mode.startswith("I;16"):
        scaled = array.astype(np.float64) / 257.0  # 65535 -> 255, 32896 -> 128
    elif image.mode == "I":
        values = np.clip(array.astype(np.float64), 0, 65535)
        # a 16-bit source (Pillow opens some 16-bit files as "I"); values that fit 8 bits are taken as they are
        scaled = values / 257.0 if values.size and values.max() > 255 else values
    else:  # "F"
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scaled = values * 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else values
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded PIL image: EXIF orientation applied, 16-bit grey scaled, transparency
    composited on white, palette / CMYK / bilevel converted.

    Raises:
        ImageLoadError: the mode cannot be converted to RGB.
    """
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as error:  # a malformed EXIF block must not lose the image: keep it as stored
        logger.debug("ignoring unreadable EXIF orientation: %s", error)
        upright = image
    image = upright if upright is not None else image
    try:
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            image = _grey_to_8bit(image)
        if _has_transparency(image):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "palette images with transparency expressed in bytes..."
                rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except ValueError as error:
        name = display_name(getattr(image, "filename", "") or "the image")
        raise ImageLoadError(
            f"{name}: image mode {image.mode!r} cannot be converted to RGB ({error}); save it as an RGB PNG or JPEG.",
            kind="unreadable",
            name=name,
            size=image.size,
        ) from error


# ---------------------------------------------------------------------------------------------- loading
def load_image(
    source: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Open an image file (or take a PIL image) and return it as 8-bit RGB, fully decoded.

    Order: the file exists and is not empty; the header (format and size) is read and ``width * height`` checked
    against ``max_pixels`` before any pixel is decoded; the full decode (a truncated file fails here); then
    :func:`to_rgb`.

    Args:
        source: a path or a decoded ``PIL.Image``.
        max_pixels: largest accepted ``width * height`` (None: no cap of ours; PIL's own bomb limit still holds).
        name: how the image is named in messages (default: the path).

    Returns:
        An RGB ``PIL.Image`` held in memory (the file is closed).

    Raises:
        ImageLoadError: one line naming the image and what to do.

    Example:
        >>> from PIL import Image
        >>> scan16 = Image.new("I;16", (2, 2), 32896)            # a 16-bit grey scan, as from load_image("scan16.png")
        >>> load_image(scan16).getpixel((0, 0))                  # scaled to 8 bits, not clipped
        (128, 128, 128)
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}.")
    if isinstance(source, Image.Image):
        shown = name or "the image"
        _check_pixels(source.size, shown, max_pixels)
        return to_rgb(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"an image must be a file path or a PIL image, got {type(source).__name__}.")
    path = Path(source)
    shown = name or display_name(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        kind, why = ("missing", "dangling symbolic link") if path.is_symlink() else ("missing", "file not found")
        raise ImageLoadError(f"{shown}: {why}; check the path.", kind=kind, name=shown) from None
    except OSError as error:  # a symlink loop (ELOOP), a name too long, no permission
        raise ImageLoadError(
            f"{shown}: cannot be opened ({error.strerror or error}).", kind="unreadable", name=shown
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(f"{shown} is not a file; pass an image file.", kind="not_a_file", name=shown)
    if info.st_size == 0:
        raise ImageLoadError(f"{shown} is empty (0 bytes); pass a PNG, JPEG or WebP image.", kind="empty", name=shown)
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit (and raises past twice it); our cap is checked from the header below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                _check_pixels(opened.size, shown, max_pixels)
                opened.load()  # the full decode: truncated or corrupt data fails here
                return to_rgb(opened)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"{shown} declares too many pixels to decode safely (a decompression bomb? {error}); "
            f"downscale it, or raise the pixel cap if the image is genuine.",
            kind="too_many_pixels",
            name=shown,
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(
            f"{shown} is not a readable image (corrupt, truncated or unsupported: {type(error).__name__}: "
            f"{display_name(str(error))[:160]}); pass a PNG, JPEG or WebP file.",
            kind="unreadable",
            name=shown,
        ) from None
    except MemoryError:
        raise ImageLoadError(
            f"{shown} is too large to decode in the memory available; downscale it.", kind="too_many_pixels", name=shown
        ) from None


def _check_pixels(size: tuple[int, int], shown: str, max_pixels: int | None) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{shown} has no pixels ({width}x{height}).", kind="unreadable", name=shown, size=size)
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"{shown} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            f"(a decompression bomb is refused the same way); downscale it.",
            kind="too_many_pixels",
            name=shown,
            size=size,
        )


# ---------------------------------------------------------------------------------------------- finding files
@dataclass
class ImageSearch:
    """What :func:`find_images` found.

    Attributes:
        files: image files in sorted order, each reached once.
        skipped: ``display name -> reason`` for dangling links, looping links, unreadable folders and second paths
            to a file already in ``files``.
    """

    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


_GLOB_MAGIC = ("*", "?", "[")


def _is_glob(text: str) -> bool:
    return any(character in text for character in _GLOB_MAGIC)


def find_images(spec: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> ImageSearch:
    """Image files named by a folder (its files with an image extension, not recursive), one file, or a glob
    (``*``, ``?``, ``[..]``, and ``**`` for any number of folders).

    Symbolic links are followed once: a folder reached again through a link (a loop, or a second link to it) is
    not entered again, a link to nothing (dangling) or to itself (looping) is skipped with its reason, and a file
    reached through a second path is listed once. A glob takes every matching file whatever its extension.

    Args:
        spec: the folder, file or pattern.
        extensions: endings taken from a folder.

    Returns:
        An :class:`ImageSearch` (``files`` may be empty; the caller says what that means).
    """
    text = os.fspath(spec)
    text = os.path.expanduser(text)
    search = ImageSearch()
    seen_files: dict[tuple[int, int], Path] = {}

    def consider(path: Path) -> None:
        shown = display_name(path)
        try:
            info = path.stat()
        except FileNotFoundError:
            if path.is_symlink():
                search.skipped[shown] = "dangling symbolic link"
            return
        except OSError as error:  # ELOOP: a link that points (through others) at itself
            search.skipped[shown] = f"symbolic link loop ({error.strerror or error})"
            return
        if not stat.S_ISREG(info.st_mode):
            return
        key = (info.st_dev, info.st_ino)
        if key in seen_files:
            search.skipped[shown] = f"same file as {display_name(seen_files[key])}"
            return
        seen_files[key] = path
        search.files.append(path)

    if not _is_glob(text):
        path = Path(text)
        if path.is_dir():
            for entry in sorted(path.iterdir()):
                if entry.suffix.lower() in extensions and not entry.is_dir():
                    consider(entry)
            return search
        consider(path)
        if not search.files and not search.skipped and path.is_symlink():
            search.skipped[display_name(path)] = "dangling symbolic link"
        return search

    parts = Path(text).parts
    first_magic = next(index for index, part in enumerate(parts) if _is_glob(part))
    root = Path(*parts[:first_magic]) if first_magic else Path(".")
    pattern = list(parts[first_magic:])
    matches: list[Path] = []

    def enter(folder: Path, ancestors: frozenset) -> tuple[list[os.DirEntry], frozenset] | None:
        """The folder's sorted entries and the ancestors below it, or None when the folder is one of its own
        ancestors (a symbolic link loop) or cannot be read (both recorded as skipped)."""
        try:
            info = folder.stat()
        except OSError as error:
            search.skipped[display_name(folder)] = f"symbolic link loop ({error.strerror or error})"
            return None
        key = (info.st_dev, info.st_ino)
        if key in ancestors:
            search.skipped[display_name(folder)] = "symbolic link loop (a link back to a folder above it)"
            return None
        try:
            with os.scandir(folder) as iterator:
                entries = sorted(iterator, key=lambda entry: entry.name)
        except OSError as error:
            search.skipped[display_name(folder)] = f"folder cannot be read ({error.strerror or error})"
            return None
        return entries, ancestors | {key}

    def is_dir(entry: os.DirEntry) -> bool:
        try:
            return entry.is_dir()  # follows links; False for a dangling or looping one
        except OSError:
            return False

    def hidden(name: str, part: str) -> bool:
        return name.startswith(".") and not part.startswith(".")  # like glob: wildcards skip hidden names

    def walk(folder: Path, rest: list[str], ancestors: frozenset) -> None:
        """Match the pattern parts ``rest`` below ``folder``."""
        scanned = enter(folder, ancestors)
        if scanned is None:
            return
        entries, below = scanned
        head, tail = rest[0], rest[1:]
        if head == "**":
            for entry in entries:
                if hidden(entry.name, head):
                    continue
                if not tail and not is_dir(entry):
                    matches.append(Path(entry.path))
                elif tail and fnmatch.fnmatchcase(entry.name, tail[0]) and not hidden(entry.name, tail[0]):
                    if len(tail) == 1:
                        matches.append(Path(entry.path))  # ** matched no folder here
                if is_dir(entry):
                    walk(Path(entry.path), rest, below)  # ** takes this folder and goes on
                    if len(tail) > 1 and fnmatch.fnmatchcase(entry.name, tail[0]) and not hidden(entry.name, tail[0]):
                        walk(Path(entry.path), tail[1:], below)  # ** stopped before this folder
            return
        for entry in entries:
            if not fnmatch.fnmatchcase(entry.name, head) or hidden(entry.name, head):
                continue
            if not tail:
                matches.append(Path(entry.path))
            elif is_dir(entry):
                walk(Path(entry.path), tail, below)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                matches.append(Path(entry.path))  # a dangling / looping link where a folder was expected

    if root.is_dir():
        walk(root, pattern, frozenset())
    for path in sorted(dict.fromkeys(matches)):
        consider(path)
    return search


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "ImageSearch",
    "display_name",
    "find_images",
    "load_image",
    "to_rgb",
]
