"""What the demo accepts: size caps, image validation and the bundled examples.

Everything a user sends passes through :func:`validate_image` / :func:`validate_prompt` before the
model sees it; they raise :class:`DemoInputError` with a message meant for the user (shown in the
browser as a ``gr.Error``), never a traceback.

Example:
    >>> from PIL import Image
    >>> limits = DemoLimits()
    >>> image = validate_image(Image.new("RGBA", (64, 48)), limits)   # or an upload's path; DemoInputError if refused
    >>> image.mode, image.size
    ('RGB', (64, 48))
    >>> examples = load_examples()                     # the PNGs shipped in vlm_guard/assets/examples
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlm_guard.images import ImageLoadError, load_image, to_rgb

logger = logging.getLogger(__name__)

MEGABYTE = 1024 * 1024


class DemoInputError(ValueError):
    """Bad user input (file, prompt, setting); the message is shown to the user as is."""


@dataclass(frozen=True)
class DemoLimits:
    """Caps that protect a shared demo server.

    Attributes:
        max_upload_bytes: largest accepted image file.
        max_image_pixels: largest accepted ``width * height`` (checked from the header, before decoding).
        max_new_tokens: upper bound of the "max new tokens" control.
        default_new_tokens: its initial value.
        max_prompt_chars: longest accepted prompt.
        queue_size: requests waiting in the queue before new ones are refused.
        max_sessions: browser sessions whose state the server keeps; beyond it the oldest is dropped
            (Gradio's ``state_session_capacity``).
        session_ttl_seconds: a session's results and image are dropped, and the app's temporary files
            (uploads, rendered pictures) deleted, this long after they were made.
    """

    max_upload_bytes: int = field(default=10 * MEGABYTE, metadata={"help": "largest accepted image file in bytes"})
    max_image_pixels: int = field(default=4096 * 4096, metadata={"help": "largest accepted width*height"})
    max_new_tokens: int = field(default=128, metadata={"help": "cap of the max-new-tokens control"})
    default_new_tokens: int = field(default=48, metadata={"help": "initial max new tokens"})
    max_prompt_chars: int = field(default=500, metadata={"help": "longest accepted prompt"})
    queue_size: int = field(default=16, metadata={"help": "requests allowed to wait in the queue"})
    max_sessions: int = field(default=64, metadata={"help": "browser sessions whose state is kept (oldest dropped)"})
    session_ttl_seconds: int = field(default=1800, metadata={"help": "seconds a session's results and files are kept"})

    def __post_init__(self) -> None:
        for name in (
            "max_upload_bytes",
            "max_image_pixels",
            "max_new_tokens",
            "default_new_tokens",
            "max_prompt_chars",
            "queue_size",
            "max_sessions",
            "session_ttl_seconds",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoLimits.{name} must be a positive integer, got {value!r}")
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"DemoLimits.default_new_tokens={self.default_new_tokens} exceeds max_new_tokens={self.max_new_tokens}"
            )


def _describe_bytes(size: int) -> str:
    return f"{size / MEGABYTE:.1f} MB" if size >= MEGABYTE / 10 else f"{size} bytes"


def validate_image(source: str | os.PathLike | Image.Image | None, limits: DemoLimits) -> Image.Image:
    """Check an uploaded image against ``limits`` and return it decoded as RGB.

    Order: file size, then the header (format and pixel count, before any pixel is decoded, so a
    decompression bomb is refused cheaply), then the full decode (truncated or corrupt data).

    Args:
        source: a file path (as Gradio passes uploads) or an already decoded image.
        limits: the caps.
    Returns:
        an RGB ``PIL.Image`` fully loaded in memory.
    Raises:
        DemoInputError: with a message for the user.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tmp = tempfile.TemporaryDirectory()
        >>> upload = Path(tmp.name) / "not_an_image.txt"
        >>> _ = upload.write_text("hello")
        >>> validate_image(upload, DemoLimits())
        Traceback (most recent call last):
        ...
        vlm_guard.demo.inputs.DemoInputError: "not_an_image.txt" is not a readable image ...
        >>> tmp.cleanup()
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        raise DemoInputError("No image: upload one or pick a bundled example first.")
    if isinstance(source, Image.Image):
        _check_pixels(source.size, "the image", limits)
        return to_rgb(source)
    path = Path(source)
    name = path.name
    if not path.is_file():
        raise DemoInputError(f'"{name}" was not received (no such file); upload it again.')
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise DemoInputError(
            f'"{name}" is {_describe_bytes(size)}; this demo accepts images up to '
            f"{_describe_bytes(limits.max_upload_bytes)}. Resize or compress it and upload it again."
        )
    if size == 0:
        raise DemoInputError(f'"{name}" is empty (0 bytes); upload a PNG, JPEG or WebP image.')
    try:  # the loader of every entry point: header pixel cap before decoding, 16-bit, EXIF, transparency
        return load_image(path, max_pixels=limits.max_image_pixels, name=f'"{name}"')
    except ImageLoadError as error:
        if error.kind == "too_many_pixels" and error.size is not None:
            _check_pixels(error.size, f'"{name}"', limits)  # raises the demo's own message
        if error.kind == "too_many_pixels":
            raise DemoInputError(
                f'"{name}" declares too many pixels to decode safely; the limit is {limits.max_image_pixels:,} pixels.'
            ) from None
        logger.info("rejected upload %s: %s", name, error)
        raise DemoInputError(
            f'"{name}" is not a readable image (corrupt or unsupported format). Upload a PNG, JPEG or WebP file.'
        ) from None


def _check_pixels(size: tuple[int, int], what: str, limits: DemoLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise DemoInputError(f"{what} has no pixels ({width}x{height}).")
    if width * height > limits.max_image_pixels:
        raise DemoInputError(
            f"{what} is {width}x{height} = {width * height:,} pixels; this demo accepts at most "
            f"{limits.max_image_pixels:,} pixels. Downscale it and upload it again."
        )


def validate_prompt(prompt: str | None, limits: DemoLimits) -> str:
    """A stripped, non-empty prompt no longer than ``limits.max_prompt_chars``."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise DemoInputError("The prompt is empty: type a question or instruction (e.g. 'Describe the image.').")
    if len(prompt) > limits.max_prompt_chars:
        raise DemoInputError(
            f"The prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}. Shorten it."
        )
    return prompt


def validate_max_new_tokens(value, limits: DemoLimits) -> int:
    """An integer in ``[1, limits.max_new_tokens]``."""
    try:
        number = int(value)
    except (TypeError, ValueError) as error:
        raise DemoInputError(f"max new tokens must be a whole number, got {value!r}.") from error
    if not 1 <= number <= limits.max_new_tokens:
        raise DemoInputError(f"max new tokens={number} is out of range; choose 1..{limits.max_new_tokens}.")
    return number


# ---------------------------------------------------------------------------- examples
@dataclass
class Example:
    """One bundled example image.

    Attributes:
        name: file stem (e.g. ``"house_tree"``).
        path: the PNG.
        objects: ground-truth object types in the image (empty when the JSON does not say).
        note: a short description from the JSON, if any.
        absent: objects the scene's usual partners suggest but that are not there (a biased model may
            describe them anyway).
    """

    name: str
    path: Path
    objects: list[str] = field(default_factory=list)
    note: str = ""
    absent: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}: {', '.join(self.objects)}" if self.objects else self.name

    @property
    def short_label(self) -> str:
        """The gallery's caption: the name in words (``"fork without knife"``); the ground truth shows once picked."""
        return self.name.replace("_", " ")


def image_fingerprint(image: Image.Image) -> str:
    """SHA-256 of the RGB pixels and size: identifies an example however Gradio renamed its file."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.size}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _objects_of(entry) -> list[str]:
    if isinstance(entry, dict):
        for key in ("objects", "ground_truth", "truth", "types"):
            if key in entry:
                return _objects_of(entry[key])
        return []
    if isinstance(entry, (list, tuple)):
        names = []
        for item in entry:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, dict):
                name = item.get("type") or item.get("name") or item.get("object")
                if name:
                    names.append(str(name))
        return names
    return []


def load_examples(folder: str | os.PathLike | None = None) -> list[Example]:
    """The bundled example images (sorted by name) with their ground truth, or ``[]`` when none ship.

    The ground truth is read from the first ``*.json`` in the folder, either a list of entries with a
    file name (``file``/``image``/``path``/``name``) and ``objects``, or a mapping file name -> objects.
    """
    if folder is None:
        from vlm_guard.defaults import EXAMPLES_DIR

        folder = EXAMPLES_DIR
    folder = Path(folder)
    if not folder.is_dir():
        return []
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    truth: dict[str, dict] = {}
    for json_path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(json_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("could not read example ground truth %s: %s", json_path, error)
            continue
        if isinstance(data, dict) and isinstance(data.get("examples"), (list, dict)):
            data = data["examples"]
        entries = (
            data.items()
            if isinstance(data, dict)
            else (
                ((e.get("file") or e.get("image") or e.get("path") or e.get("name") or ""), e)
                for e in data
                if isinstance(e, dict)
            )
        )
        for key, entry in entries:
            stem = Path(str(key)).stem
            note = ""
            if isinstance(entry, dict):
                note = entry.get("caption") or entry.get("description") or entry.get("note") or ""
            absent = _objects_of(entry.get("absent_partners", [])) if isinstance(entry, dict) else []
            truth[stem] = {"objects": _objects_of(entry), "note": str(note), "absent": absent}
        break
    examples = []
    for path in images:
        info = truth.get(path.stem, {})
        examples.append(
            Example(
                name=path.stem,
                path=path,
                objects=list(dict.fromkeys(info.get("objects", []))),
                note=info.get("note", ""),
                absent=list(info.get("absent", [])),
            )
        )
    return examples
