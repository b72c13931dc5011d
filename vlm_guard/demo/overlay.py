"""Pictures for the demo: per-token attention heatmaps, VAR sink marks, GIFT saliency, the head-map plot.

Pure functions from arrays to ``PIL`` images (matplotlib's Agg backend, no display), so they are
tested without a browser.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> image = Image.new("RGB", (336, 336), "white")
    >>> attention = np.random.default_rng(0).random(64)           # [I] one value per image token
    >>> sink_mask = attention > 0.9                                # [I] VAR's visual sinks
    >>> grid = ImageGrid(rows=8, cols=8)
    >>> picture = heatmap_overlay(image, grid.to_grid(attention), marks=grid.to_grid(sink_mask))
    >>> picture.size, picture.mode
    ((336, 336), 'RGB')
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DISPLAY_SIDE = 384
"""Long side of the pictures shown in the demo (small images are upscaled with nearest neighbours)."""

SINK_COLOUR = (0, 255, 255)
FLAG_COLOUR = (255, 80, 80)
SCALE_WIDTH = 96
"""Width of the colour scale drawn right of a heatmap (bar, tick labels and title)."""
SCALE_BACKGROUND = (255, 255, 255)
SCALE_TEXT = (30, 30, 30)


@dataclass(frozen=True)
class ImageGrid:
    """How a sequence of image tokens lies on the picture.

    Attributes:
        rows / cols: the patch grid (row-major order of the tokens).
        offset: index of the first token of the grid among the image tokens (LLaVA-NeXT puts the
            base image first; later tiles are not drawn).
    """

    rows: int
    cols: int
    offset: int = 0

    @property
    def size(self) -> int:
        return self.rows * self.cols

    def to_grid(self, values: np.ndarray) -> np.ndarray:
        """``[I]`` per-image-token values -> ``[rows, cols]``."""
        values = np.asarray(values)
        if values.shape[0] < self.offset + self.size:
            raise ValueError(
                f"{values.shape[0]} image tokens cannot fill a {self.rows}x{self.cols} grid at offset {self.offset}"
            )
        return values[self.offset : self.offset + self.size].reshape(self.rows, self.cols)


def square_grid(count: int) -> ImageGrid | None:
    """A square grid for ``count`` tokens, or None when ``count`` is not a perfect square."""
    side = math.isqrt(count)
    return ImageGrid(side, side) if side > 0 and side * side == count else None


def display_image(image: Image.Image, center_crop: bool = False, side: int = DISPLAY_SIDE) -> Image.Image:
    """The image as the model saw it (centre square when the processor crops), scaled to ``side``."""
    image = image.convert("RGB")
    if center_crop:
        width, height = image.size
        crop = min(width, height)
        left, top = (width - crop) // 2, (height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
    width, height = image.size
    scale = side / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
    return image.resize(new_size, resample)


def _normalise(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-12:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def heatmap_overlay(
    image: Image.Image,
    values: np.ndarray,
    marks: np.ndarray | None = None,
    colormap: str = "inferno",
    opacity: float = 0.55,
    smooth: bool = False,
    scale_title: str | None = None,
    scale_format: str = "{:.3g}",
) -> Image.Image:
    """Blend a ``[rows, cols]`` map over ``image`` and outline the cells where ``marks`` is True.

    Args:
        image: the display image (see :func:`display_image`).
        values: ``[rows, cols]`` scores; min-max normalised for colour.
        marks: ``[rows, cols]`` bool cells to outline (VAR's visual sinks), or None.
        colormap: a matplotlib colormap name.
        opacity: weight of the heat colours.
        smooth: bilinear upscaling of the map instead of crisp patches.
        scale_title: when given, a colour scale (:func:`colour_scale`) with this title is drawn to the
            right, labelled with the map's real minimum and maximum.
        scale_format: format of the scale's tick labels (e.g. ``"{:.1%}"``).
    Returns:
        an RGB image of the size of ``image`` (``SCALE_WIDTH`` wider with a scale).
    """
    from matplotlib import colormaps

    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be a [rows, cols] map, got shape {values.shape}")
    rows, cols = values.shape
    colours = colormaps[colormap](_normalise(values))[..., :3]  # [rows, cols, 3] in [0, 1]
    heat = Image.fromarray((colours * 255).astype(np.uint8), "RGB")
    heat = heat.resize(image.size, Image.BILINEAR if smooth else Image.NEAREST)
    blended = Image.blend(image.convert("RGB"), heat, opacity)
    if marks is not None and np.asarray(marks).any():
        draw = ImageDraw.Draw(blended)
        cell_width, cell_height = image.size[0] / cols, image.size[1] / rows
        line = max(2, round(min(cell_width, cell_height) / 10))
        for row, col in zip(*np.nonzero(np.asarray(marks))):
            box = (
                col * cell_width + line / 2,
                row * cell_height + line / 2,
                (col + 1) * cell_width - line / 2,
                (row + 1) * cell_height - line / 2,
            )
            draw.rectangle(box, outline=SINK_COLOUR, width=line)
    if scale_title is None:
        return blended
    finite = np.nan_to_num(np.asarray(values, dtype=np.float64))
    scale = colour_scale(float(finite.min()), float(finite.max()), blended.size[1], colormap, scale_title, scale_format)
    canvas = Image.new("RGB", (blended.size[0] + scale.size[0], blended.size[1]), SCALE_BACKGROUND)
    canvas.paste(blended, (0, 0))
    canvas.paste(scale, (blended.size[0], 0))
    return canvas


def colour_scale(
    low: float,
    high: float,
    height: int,
    colormap: str = "inferno",
    title: str = "",
    value_format: str = "{:.3g}",
    width: int = SCALE_WIDTH,
) -> Image.Image:
    """A vertical colour bar from ``low`` (bottom) to ``high`` (top) with tick labels, as drawn beside a heatmap.

    The bar shows the colormap at full strength (on the picture it is blended with the image). A flat
    map (``low == high``) gets a single labelled colour.

    Args:
        low / high: the values the darkest and brightest colours stand for.
        height: pixel height (the heatmap's).
        colormap: as in :func:`heatmap_overlay`.
        title: one or two words above the bar (e.g. ``"attention"``).
        value_format: tick label format.
        width: pixel width of the whole scale.
    Returns:
        an RGB image ``width x height``.

    Example:
        >>> colour_scale(0.0, 0.12, 384, title="attention", value_format="{:.1%}").size
        (96, 384)
    """
    from matplotlib import colormaps

    canvas = Image.new("RGB", (width, height), SCALE_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    top, bottom = 28, max(height - 14, 40)
    bar_left, bar_right = 8, 26
    flat = high - low < 1e-12
    fractions = np.linspace(1.0, 0.0, bottom - top)  # [rows] top row = high
    colours = colormaps[colormap](np.zeros_like(fractions) if flat else fractions)[:, :3]  # [rows, 3]
    for row, colour in enumerate(colours):
        draw.line([(bar_left, top + row), (bar_right, top + row)], fill=tuple(int(round(255 * c)) for c in colour))
    draw.rectangle((bar_left, top, bar_right, bottom - 1), outline=SCALE_TEXT)
    if title:
        draw.text((4, 6), title, fill=SCALE_TEXT, font=font)
    ticks = [(low, bottom - 1)] if flat else [(high, top), ((low + high) / 2, (top + bottom) // 2), (low, bottom - 1)]
    for value, y in ticks:
        draw.line([(bar_right, y), (bar_right + 4, y)], fill=SCALE_TEXT)
        draw.text((bar_right + 7, y - 7), value_format.format(value), fill=SCALE_TEXT, font=font)
    if flat:
        draw.text((bar_right + 7, top), "(flat)", fill=SCALE_TEXT, font=font)
    return canvas


PLACEHOLDER_FONT_SIZE = 18


def wrap_words(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[list[tuple[int, str]]]:
    """Lines of ``(x, word)`` fitting ``width`` pixels. Each word is placed on its own, one explicit gap (the width
    of "n" in ``font``) after the previous one: the default font's space is too narrow to read as one."""
    gap = max(4, round(draw.textlength("n", font=font)))
    lines: list[list[tuple[int, str]]] = [[]]
    x = 0
    for word in text.split():
        length = round(draw.textlength(word, font=font))
        if lines[-1] and x + length > width:
            lines.append([])
            x = 0
        lines[-1].append((x, word))
        x += length + gap
    return lines


def placeholder(text: str, side: int = DISPLAY_SIDE) -> Image.Image:
    """A grey square with a short note (for a map that does not exist for this run), wrapped to its width."""
    canvas = Image.new("RGB", (side, side), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=PLACEHOLDER_FONT_SIZE)
    margin, height = 16, PLACEHOLDER_FONT_SIZE + 6
    lines = wrap_words(text, font, side - 2 * margin, draw)
    y = side // 2 - height * len(lines) // 2
    for line in lines:
        for x, word in line:
            draw.text((margin + x, y), word, fill=(220, 220, 220), font=font)
        y += height
    return canvas


def head_map_figure(scores: np.ndarray, title: str = "VHD per head", selected: np.ndarray | None = None) -> Image.Image:
    """A layers x heads heatmap of head scores (e.g. VHD), with selected heads dotted.

    Args:
        scores: ``[L, H]``.
        title: plot title.
        selected: ``[L, H]`` bool heads to mark (e.g. the heads VHR reinforces), or None.
    Returns:
        the rendered figure as an RGB image.
    """
    from matplotlib.figure import Figure  # no pyplot: nothing global changes

    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"head scores must be [layers, heads], got shape {scores.shape}")
    layers, heads = scores.shape
    figure = Figure(figsize=(max(4.0, 0.25 * heads + 2.5), max(3.0, 0.18 * layers + 1.8)), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    picture = axes.imshow(scores, aspect="auto", cmap="viridis", origin="upper")
    figure.colorbar(picture, ax=axes, fraction=0.046, pad=0.04)
    if selected is not None:
        rows, cols = np.nonzero(np.asarray(selected, dtype=bool))
        axes.scatter(cols, rows, s=8, c="white", marker="o", label="VHR heads")
        axes.legend(loc="upper right", fontsize=7, framealpha=0.6)
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        return rendered.convert("RGB")
