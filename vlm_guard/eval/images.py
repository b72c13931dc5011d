"""Image loading for benchmark runs: an unreadable image is skipped and counted, never fatal.

A COCO folder may hold a truncated download or a stray non-image file; one bad file should not end a
3,000-question run. :class:`ImageLoader` returns ``None`` for such a file, logs one warning, and keeps the
reason in :attr:`ImageLoader.skipped` so the run summary can report how many items were dropped and why.

Example:
    >>> loader = ImageLoader("coco/val2014")                        # doctest: +SKIP
    >>> image = loader.load("COCO_val2014_000000310196.jpg")         # doctest: +SKIP
    >>> loader.skipped                                               # doctest: +SKIP
    {}
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Union

from PIL import Image

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, Image.Image, Callable[[], Image.Image]]
"""What an eval item names as its image: a path (relative to the loader's root), a PIL image, or a callable
returning one (e.g. a synthetic scene rendered on demand)."""


class ImageLoader:
    """Opens images as RGB, skipping (and counting) the ones that cannot be read.

    Args:
        root: Folder that relative paths are resolved against (``None``: relative to the working directory).
        cache_size: Keep the last few decoded images (POPE asks 6 questions per image): at most this many.

    Attributes:
        skipped: image name -> reason, for every image that could not be read.
    """

    def __init__(self, root: str | os.PathLike | None = None, cache_size: int = 16):
        if root is not None and not Path(root).is_dir():
            raise FileNotFoundError(
                f"image folder not found: {str(root)!r}; pass the folder holding the benchmark images "
                f"(e.g. COCO val2014)."
            )
        self.root = None if root is None else Path(root)
        self.cache_size = cache_size
        self.skipped: dict[str, str] = {}
        self._cache: dict[str, Image.Image] = {}

    def path_of(self, name: str | os.PathLike) -> Path:
        path = Path(name)
        return path if self.root is None or path.is_absolute() else self.root / path

    def load(self, source: ImageSource, name: str | None = None) -> Image.Image | None:
        """The image as RGB, or None when it cannot be read (recorded in :attr:`skipped`).

        Args:
            source: A path, a PIL image or a callable returning one.
            name: Key for :attr:`skipped` and the cache (default: the path as given).

        Returns:
            A ``PIL.Image`` in RGB mode, or None.
        """
        if isinstance(source, Image.Image):
            return source.convert("RGB")
        if callable(source):
            key = name or repr(source)
            try:
                return source().convert("RGB")
            except Exception as error:  # a generator that fails is a skipped item, like a bad file
                return self._skip(key, f"{type(error).__name__}: {error}")
        key = name or str(source)
        if key in self.skipped:
            return None
        if key in self._cache:
            return self._cache[key]
        path = self.path_of(source)
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")  # forces a full decode: truncated files fail here
        except FileNotFoundError:
            return self._skip(key, f"file not found: {path}")
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
            return self._skip(key, f"unreadable image {path}: {type(error).__name__}: {error}")
        if self.cache_size > 0:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = image
        return image

    def _skip(self, key: str, reason: str) -> None:
        if key not in self.skipped:
            logger.warning("skipping image %s: %s", key, reason)
        self.skipped[key] = reason
        return None

    @property
    def n_skipped(self) -> int:
        """Number of distinct images that could not be read."""
        return len(self.skipped)


__all__ = ["ImageLoader", "ImageSource"]
