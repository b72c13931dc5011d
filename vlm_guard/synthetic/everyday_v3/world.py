"""The everyday world of default model v3: more image tokens per object and long detailed descriptions.

The objects, glyphs, colours, partner pairs and POPE questions are those of the v2 world
(:mod:`vlm_guard.synthetic.everyday.world`). What changes:

* Scenes hold 3-5 objects on the 4x4 grid, drawn at ``cell`` pixels per grid cell (32 -> a 128-pixel image;
  with 16-pixel patches every object spans 2x2 = 4 image tokens, 64 tokens per image; ``cell=48`` gives
  192 pixels and 144 tokens).
* ``independent_world(seed)`` draws every object type uniformly without replacement (no partner co-occurrence):
  the scenes the vision tower and the projector learn from. ``biased_world(seed)`` is the v2 training
  distribution (skewed type frequency, a paired type brings its partner with ``pair_prob``): the scenes of the
  language-side instruct stage only, where the vision side is frozen.
* ``long_description(scene)`` answers the detail prompts in 100-200 SmolLM2 tokens: an opening count, one
  sentence per object with its size, brightness, colour and grid position, a relation to the object described
  just before it, the number of stray strokes (clutter that is not an object), and a closing list of every object (the late part of a caption where real VLMs hallucinate).

Example:
    >>> scene = independent_world(seed=0).scene(3)
    >>> image = render(scene)                           # 128x128 RGB, noise and clutter
    >>> long_description(scene)[:60]
    'The image shows three objects on a dark, slightly noisy back'
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from vlm_guard.synthetic.everyday.world import (
    BACKGROUND,
    CAPTION_PROMPTS,
    COLOURS,
    GRID,
    OBJECT_TYPES,
    PARTNER_PAIRS,
    POPULARITY,
    QUESTION_SPLITS,
    SceneObject,
    World,
    _glyph,
    _groups,
    _mix,
    answer,
    caption,
    mentioned_objects,
    partner_of,
    question_text,
    questions,
)
from vlm_guard.synthetic.world import Scene

__all__ = [
    "BACKGROUND",
    "CAPTION_PROMPTS",
    "COLOURS",
    "DETAIL_PROMPTS",
    "GRID",
    "MAX_OBJECTS",
    "MIN_OBJECTS",
    "OBJECT_TYPES",
    "PARTNER_PAIRS",
    "POPULARITY",
    "QUESTION_SPLITS",
    "Scene",
    "SceneObject",
    "World",
    "answer",
    "biased_world",
    "brightness_word",
    "caption",
    "clutter_count",
    "independent_world",
    "long_description",
    "mentioned_objects",
    "partner_of",
    "position_phrase",
    "question_text",
    "questions",
    "relation_phrase",
    "render",
    "size_word",
]

MIN_OBJECTS, MAX_OBJECTS = 3, 5
CELL = 32
"""Default pixels per grid cell (128-pixel images)."""

DETAIL_PROMPTS: tuple[str, ...] = ("Describe the image in detail.", "Please describe this image in detail.")
"""Detail prompts, answered by ``long_description``; the second is CHAIR's official wording."""

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ROWS = ("top", "second", "third", "bottom")
_COLUMNS = ("on the far left", "left of centre", "right of centre", "on the far right")


def independent_world(seed: int, **settings) -> World:
    """Scenes whose object types are drawn uniformly without replacement: no partner co-occurrence."""
    settings.setdefault("min_objects", MIN_OBJECTS)
    settings.setdefault("max_objects", MAX_OBJECTS)
    return World(seed=seed, bias=False, **settings)


def biased_world(seed: int, pair_prob: float = 0.97, **settings) -> World:
    """The v2 training distribution (skewed frequency, partners together with ``pair_prob``), 3-6 objects."""
    settings.setdefault("min_objects", MIN_OBJECTS)
    settings.setdefault("max_objects", MAX_OBJECTS)
    return World(seed=seed, bias=True, pair_prob=pair_prob, **settings)


# ---- drawing -----------------------------------------------------------------------------------------------


def _paste(image: Image.Image, obj: SceneObject, cell: int) -> None:
    size = max(4, round(cell * obj.scale))
    mask = _glyph(obj.type).resize((size, size), Image.BILINEAR)
    free = cell - size
    left = obj.col * cell + round(free / 2 * (1 + obj.dx))
    top = obj.row * cell + round(free / 2 * (1 + obj.dy))
    image.paste(_mix(COLOURS[obj.colour], obj.shade), (left, top, left + size, top + size), mask)


NOISE_STD = 14.0
CLUTTER_STROKES = (0, 4)


def _render_rng(scene: Scene) -> random.Random:
    return random.Random(f"everyday-v3-render:{scene.seed}:{scene.index}:{int(scene.biased)}")


def clutter_count(scene: Scene) -> int:
    """How many clutter strokes ``render(scene)`` draws (its first draw)."""
    return _render_rng(scene).randint(*CLUTTER_STROKES)


def render(scene: Scene, cell: int = CELL, noise: bool = True) -> Image.Image:
    """Draw ``scene`` natively at ``cell`` pixels per grid cell (an image of ``GRID * cell`` pixels).

    Clutter strokes and sensor noise (``noise=True``) are deterministic by ``(scene.seed, scene.index,
    scene.biased)`` and scale with the image.
    """
    if cell < 8:
        raise ValueError(f"cell must be >= 8 pixels, got {cell}")
    side = GRID * cell
    image = Image.new("RGB", (side, side), BACKGROUND)
    rng = _render_rng(scene)
    if noise:
        draw, unit = ImageDraw.Draw(image), cell / 32
        for _ in range(rng.randint(*CLUTTER_STROKES)):
            x, y = rng.uniform(0, side), rng.uniform(0, side)
            angle, length = rng.uniform(0, math.pi), rng.uniform(4, 12) * unit
            colour = _mix(COLOURS[rng.choice(list(COLOURS))], rng.uniform(0.25, 0.6))
            draw.line(
                [(x, y), (x + length * math.cos(angle), y + length * math.sin(angle))],
                fill=colour,
                width=max(1, round(rng.choice((1, 2)) * unit)),
            )
    for obj in scene.objects:
        _paste(image, obj, cell)
    if noise:
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels + np.random.default_rng(rng.getrandbits(32)).normal(0.0, NOISE_STD, pixels.shape)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image


# ---- text --------------------------------------------------------------------------------------------------


def size_word(obj: SceneObject) -> str:
    """``small`` / ``medium-sized`` / ``large`` from the glyph's scale (0.45..1 of the cell)."""
    return "small" if obj.scale < 0.62 else "medium-sized" if obj.scale < 0.82 else "large"


def brightness_word(obj: SceneObject) -> str:
    """``barely visible`` (hidden, shade < 0.2) / ``faint`` (< 0.6) / ``bright``."""
    return "barely visible" if obj.shade < 0.2 else "faint" if obj.shade < 0.6 else "bright"


def position_phrase(obj: SceneObject) -> str:
    """``'in the top row, on the far left'``: the object's grid row and column."""
    return f"in the {_ROWS[obj.row]} row, {_COLUMNS[obj.col]}"


def relation_phrase(obj: SceneObject, other: SceneObject) -> str:
    """Where ``obj`` is relative to ``other``: ``'above and to the left of'``, ``'below'``, ``'to the right of'``."""
    vertical = "above" if obj.row < other.row else "below" if obj.row > other.row else ""
    horizontal = "to the left of" if obj.col < other.col else "to the right of" if obj.col > other.col else ""
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    return vertical or horizontal or "at the same place as"


def _number(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def long_description(scene: Scene) -> str:
    """The detail answer (100-200 SmolLM2 tokens for 3-5 objects): count, one sentence per object (size,
    brightness, colour, type, position, relation to the previous object), and the closing list of objects.
    Objects come in reading order with a present partner right after its partner (as ``caption``)."""
    if not scene.objects:
        return "The image shows an empty dark background with nothing on it."
    ordered = [obj for group in _groups(scene) for obj in group]
    count = len(ordered)
    noun = "object" if count == 1 else "objects"
    sentences = [f"The image shows {_number(count)} {noun} on a dark, slightly noisy background."]
    previous = None
    for obj in ordered:
        text = f"A {size_word(obj)} {brightness_word(obj)} {obj.colour} {obj.type} is {position_phrase(obj)}."
        if previous is not None:
            text += f" It is {relation_phrase(obj, previous)} the {previous.colour} {previous.type}."
        sentences.append(text)
        previous = obj
    strokes = clutter_count(scene)
    sentences.append(
        "There are no stray marks apart from the objects."
        if strokes == 0
        else f"There {'is' if strokes == 1 else 'are'} also {_number(strokes)} thin stray "
        f"{'stroke' if strokes == 1 else 'strokes'} that {'is' if strokes == 1 else 'are'} not objects."
    )
    names = [f"a {obj.type}" for obj in ordered]
    listed = names[0] if count == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    sentences.append(f"In total there {'is' if count == 1 else 'are'} {_number(count)} {noun}: {listed}.")
    return " ".join(sentences)
