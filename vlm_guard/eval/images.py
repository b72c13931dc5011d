"""Image loading for benchmark runs: an unreadable image is skipped and counted, never fatal.

Decoding is :func:`vlm_guard.images.load_image` (the one loader of every entry point: 16-bit, EXIF orientation,
transparency, pixel cap); this module adds the skip-and-count policy and a cache bounded in bytes.

A COCO folder may hold a truncated download or a stray non-image file; one bad file should not end a
3,000-question run. :class:`ImageLoader` returns ``None`` for such a file, logs one warning, and keeps the
reason in :attr:`ImageLoader.skipped` so the run summary can report how many items were dropped and why.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = Path(tmp.name)                                     # e.g. "coco/val2014"
    >>> Image.new("RGB", (640, 480)).save(folder / "COCO_val2014_000000310196.jpg")
    >>> _ = (folder / "stray.jpg").write_bytes(b"not a jpeg")
    >>> loader = ImageLoader(folder)
    >>> loader.load("COCO_val2014_000000310196.jpg").size
    (640, 480)
    >>> loader.load("stray.jpg") is None                            # skipped, with one warning
    True
    >>> print(loader.skipped["stray.jpg"])
    /.../stray.jpg is not a readable image (corrupt, truncated or unsupported: ...); pass a PNG, JPEG or WebP file.
    >>> tmp.cleanup()
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Union

from PIL import Image

from vlm_guard.images import DEFAULT_MAX_PIXELS, ImageLoadError, display_name, load_image

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, Image.Image, Callable[[], Image.Image]]  # noqa: UP007 (a runtime alias on Python 3.10)
"""What an eval item names as its image: a path (relative to the loader's root), a PIL image, or a callable
returning one (e.g. a synthetic scene rendered on demand)."""


DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
"""Decoded images kept by default: 256 MB of RGB pixels (about 270 COCO images, or one 9k x 9k image)."""


class ImageLoader:
    """Opens images as RGB through :func:`vlm_guard.images.load_image`, skipping (and counting) the ones that
    cannot be read.

    Args:
        root: Folder that relative paths are resolved against (``None``: relative to the working directory).
        cache_bytes: Keep recently decoded images (POPE asks 6 questions per image) up to this many bytes of
            pixels in all, least recently used dropped first; 0 turns the cache off. An image larger than the
            whole budget is not cached.
        max_pixels: Largest ``width * height`` read (larger images and decompression bombs are skipped).

    Attributes:
        skipped: image name -> reason, for every image that could not be read.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        if root is not None and not Path(root).is_dir():
            raise FileNotFoundError(
                f"image folder not found: {display_name(root)!r}; pass the folder holding the benchmark images "
                f"(e.g. COCO val2014)."
            )
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be a non-negative integer, got {cache_bytes!r}.")
        self.root = None if root is None else Path(root)
        self.cache_bytes = cache_bytes
        self.max_pixels = max_pixels
        self.skipped: dict[str, str] = {}
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()
        self._cached_bytes = 0

    def path_of(self, name: str | os.PathLike) -> Path:
        path = Path(name)
        return path if self.root is None or path.is_absolute() else self.root / path

    @property
    def cached_bytes(self) -> int:
        """Bytes of pixels held in the cache now (never more than ``cache_bytes``)."""
        return self._cached_bytes

    def load(self, source: ImageSource, name: str | None = None) -> Image.Image | None:
        """The image as RGB, or None when it cannot be read (recorded in :attr:`skipped`).

        Args:
            source: A path, a PIL image or a callable returning one.
            name: Key for :attr:`skipped` and the cache (default: the path as given).

        Returns:
            A ``PIL.Image`` in RGB mode, or None.
        """
        if isinstance(source, Image.Image):
            try:
                return load_image(source, max_pixels=self.max_pixels, name=name)
            except ImageLoadError as error:
                return self._skip(name or repr(source), str(error))
        if callable(source):
            key = name or repr(source)
            try:
                return load_image(source(), max_pixels=self.max_pixels, name=key)
            except Exception as error:  # a generator that fails is a skipped item, like a bad file
                return self._skip(key, f"{type(error).__name__}: {error}")
        key = name or display_name(source)
        if key in self.skipped:
            return None
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            image = load_image(self.path_of(source), max_pixels=self.max_pixels)
        except ImageLoadError as error:
            return self._skip(key, str(error))
        self._remember(key, image)
        return image

    def _remember(self, key: str, image: Image.Image) -> None:
        size = image.width * image.height * len(image.getbands())
        if size > self.cache_bytes:
            return
        while self._cache and self._cached_bytes + size > self.cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.width * dropped.height * len(dropped.getbands())
        self._cache[key] = image
        self._cached_bytes += size

    def _skip(self, key: str, reason: str) -> None:
        if key not in self.skipped:
            logger.warning("skipping image %s: %s", key, reason)
        self.skipped[key] = reason
        return None

    @property
    def n_skipped(self) -> int:
        """Number of distinct images that could not be read."""
        return len(self.skipped)


__all__ = ["DEFAULT_CACHE_BYTES", "ImageLoader", "ImageSource"]
