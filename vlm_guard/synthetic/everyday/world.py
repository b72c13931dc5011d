"""A synthetic world of everyday objects that co-occur in ordinary text (default model v2).

Each scene places a few objects on a 4x4 grid of 32-pixel cells (128x128 pixels; one cell = one
32-pixel patch = one image token of the v2 vision tower). Object types are everyday things whose names
a pretrained language model knows, and most come in *partner pairs* that co-occur in web text
(fork/knife, cup/saucer, table/chair, toothbrush/toothpaste, keyboard/mouse, moon/star); ``ball``,
``clock`` and ``leaf`` are unpaired controls. In a biased (training) scene a drawn paired type brings
its partner with probability ``pair_prob``; unbiased scenes (held-out) draw every type independently.
``partner_preference`` measures that the language model itself prefers each partner.

Seeing is not free, as in real photographs: each object has its own size (``scale``, 45-100 % of its cell),
offset inside the cell and contrast (``shade``); some objects are faint and a few are nearly hidden
(``shade`` ~0.1, like an occluded object that the annotation still lists), the image carries sensor noise and
a few clutter strokes that are not objects. Training scenes also follow a skewed object frequency
(``TYPE_FREQUENCY``: cups, tables, chairs and keyboards are common; POPE's *popular* split asks about the
most frequent absent ones first). A model trained on captions that list faint and hidden partners learns the
co-occurrence, and its pretrained language model already prefers it: the conditions under which real VLMs
claim an absent usual partner.

Everything is deterministic by seed: ``World(seed).scene(i)`` is a pure function of ``(seed, i, settings)``.

Example:
    >>> world = World(seed=0)
    >>> scene = world.scene(3)
    >>> image = render(scene)                                   # PIL.Image, 128x128 RGB, noise and clutter
    >>> caption(scene)                                          # partners next to each other
    'A blue saucer and a yellow cup, and a red knife and a green fork.'
    >>> print(detailed_caption(scene))
    A blue saucer at the top left and a yellow cup at the bottom left, and a red knife at the top right
    and a green fork at the bottom left.
    >>> [q.text for q in questions(scene, split="adversarial")][:1]
    ['Is there a saucer in the image?']
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlm_guard.synthetic.world import (  # shared with the shapes world: a scene is objects in reading order
    Question,
    Scene,
)

OBJECT_TYPES: tuple[str, ...] = (
    "fork",
    "knife",
    "cup",
    "saucer",
    "table",
    "chair",
    "toothbrush",
    "toothpaste",
    "keyboard",
    "mouse",
    "moon",
    "star",
    "ball",
    "clock",
    "leaf",
)
"""Every object type; each is drawn as one recognisable Pillow glyph inside its cell."""

PARTNER_PAIRS: tuple[tuple[str, str], ...] = (
    ("fork", "knife"),
    ("cup", "saucer"),
    ("table", "chair"),
    ("toothbrush", "toothpaste"),
    ("keyboard", "mouse"),
    ("moon", "star"),
)
"""Pairs that co-occur in biased scenes and in ordinary text; ``ball``, ``clock``, ``leaf`` are controls."""

TYPE_FREQUENCY: dict[str, float] = {
    "cup": 3.0,
    "table": 3.0,
    "chair": 2.5,
    "keyboard": 2.0,
    "fork": 1.5,
    "knife": 1.5,
    "saucer": 1.0,
    "moon": 1.0,
    "star": 1.0,
    "toothbrush": 0.8,
    "toothpaste": 0.8,
    "mouse": 1.0,
    "ball": 0.8,
    "clock": 0.8,
    "leaf": 0.6,
}
"""Relative frequency with which a biased (training) scene draws each type (before partners are added)."""

POPULARITY: tuple[str, ...] = tuple(sorted(OBJECT_TYPES, key=lambda t: (-TYPE_FREQUENCY[t], OBJECT_TYPES.index(t))))
"""Types from most to least frequent in training scenes (POPE's *popular* order)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 90, 250),
    "yellow": (245, 225, 20),
    "white": (245, 245, 245),
}
"""Colour names and their RGB values (strong colours on a dark background)."""

BACKGROUND = (30, 30, 30)
GRID = 4  # cells per side
CELL = 32  # pixels per cell
IMAGE_SIZE = GRID * CELL

CAPTION_PROMPTS: tuple[str, ...] = ("Describe the image.", "What is in this picture?", "Describe this image briefly.")
"""Plain caption prompts (answered by ``caption``); the first is the evaluation prompt."""

DETAIL_PROMPTS: tuple[str, ...] = ("Describe the image in detail.", "Please describe this image in detail.")
"""Detail prompts (answered by ``detailed_caption``); the second is CHAIR's official wording."""

QUESTION_SPLITS = ("random", "popular", "adversarial")

_PARTNER: dict[str, str] = {}
for _a, _b in PARTNER_PAIRS:
    _PARTNER[_a], _PARTNER[_b] = _b, _a

_SYNONYMS: dict[str, str] = {t: t for t in OBJECT_TYPES}
_SYNONYMS.update({t + "s": t for t in OBJECT_TYPES})
_SYNONYMS.update(
    {
        "knives": "knife",
        "mice": "mouse",
        "leaves": "leaf",
        "toothbrushes": "toothbrush",
        "forks": "fork",
        "stars": "star",
        "saucers": "saucer",
        "plate": "saucer",
    }
)
_SYNONYMS.pop("plate")  # a plate is not a saucer: keep CHAIR strict


def partner_of(object_type: str) -> str | None:
    """The usual partner of ``object_type`` (``None`` for the unpaired controls)."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"unknown object type {object_type!r}; expected one of {OBJECT_TYPES}")
    return _PARTNER.get(object_type)


@dataclass(frozen=True)
class SceneObject:
    """One object: ``type`` in OBJECT_TYPES, ``colour`` in COLOURS, grid cell (row, col), and how well it
    shows: ``scale`` (glyph size as a fraction of the cell, 0.3..1), ``shade`` (contrast against the
    background, 0..1; below ~0.15 the object is practically hidden), ``dx``/``dy`` (offset of the glyph inside
    its cell as a fraction of the free space, -1..1)."""

    type: str
    colour: str
    row: int
    col: int
    scale: float = 1.0
    shade: float = 1.0
    dx: float = 0.0
    dy: float = 0.0

    def phrase(self) -> str:
        return f"a {self.colour} {self.type}"

    def place(self) -> str:
        vertical = "top" if self.row < GRID // 2 else "bottom"
        horizontal = "left" if self.col < GRID // 2 else "right"
        return f"at the {vertical} {horizontal}"


class World:
    """A deterministic generator of everyday scenes.

    Args:
        seed: base seed; scene ``i`` depends only on ``(seed, i)`` and the settings below.
        min_objects, max_objects: number of objects per scene.
        pair_prob: in biased scenes, probability that a drawn paired type brings its partner.
        bias: biased scenes (training distribution: skewed type frequency, partners together) or
            uniformly and independently drawn types (held-out).
        faint_prob: probability that an object is faint (``shade`` 0.3..0.55 instead of 0.75..1).
        hidden_prob: probability that an object is nearly hidden (``shade`` 0.08..0.16); it is still in the
            scene's annotation (captions, answers), as an occluded object is in a real annotation.
    """

    def __init__(
        self,
        seed: int = 0,
        min_objects: int = 2,
        max_objects: int = 6,
        pair_prob: float = 0.97,
        bias: bool = True,
        faint_prob: float = 0.25,
        hidden_prob: float = 0.06,
    ):
        if not 1 <= min_objects <= max_objects <= GRID * GRID:
            raise ValueError(f"need 1 <= min_objects ({min_objects}) <= max_objects ({max_objects}) <= {GRID * GRID}")
        for name, value in (("pair_prob", pair_prob), ("faint_prob", faint_prob), ("hidden_prob", hidden_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if faint_prob + hidden_prob > 1.0:
            raise ValueError(f"faint_prob + hidden_prob must be <= 1, got {faint_prob} + {hidden_prob}")
        self.seed, self.min_objects, self.max_objects = seed, min_objects, max_objects
        self.pair_prob, self.bias = pair_prob, bias
        self.faint_prob, self.hidden_prob = faint_prob, hidden_prob

    def _draw_types(self, rng: random.Random) -> list[str]:
        if not self.bias:
            return rng.sample(OBJECT_TYPES, len(OBJECT_TYPES))
        pool, order = list(OBJECT_TYPES), []
        while pool:  # weighted sampling without replacement
            pick = rng.choices(pool, [TYPE_FREQUENCY[t] for t in pool])[0]
            pool.remove(pick)
            order.append(pick)
        return order

    def _shade(self, rng: random.Random) -> float:
        draw = rng.random()
        if draw < self.hidden_prob:
            return rng.uniform(0.08, 0.16)
        if draw < self.hidden_prob + self.faint_prob:
            return rng.uniform(0.3, 0.55)
        return rng.uniform(0.75, 1.0)

    def scene(self, index: int) -> Scene:
        """The scene number ``index`` (deterministic)."""
        rng = random.Random(f"everyday:{self.seed}:{index}:{int(self.bias)}")
        count = rng.randint(self.min_objects, self.max_objects)
        types: list[str] = []
        for object_type in self._draw_types(rng):
            if len(types) >= count:
                break
            if object_type in types:
                continue
            types.append(object_type)
            partner = _PARTNER.get(object_type)
            if partner is None or partner in types:
                continue
            if self.bias and rng.random() < self.pair_prob and len(types) < self.max_objects:
                types.append(partner)
        cells = rng.sample(range(GRID * GRID), len(types))
        objects = [
            SceneObject(
                t,
                rng.choice(list(COLOURS)),
                cell // GRID,
                cell % GRID,
                scale=round(rng.uniform(0.45, 1.0), 3),
                shade=round(self._shade(rng), 3),
                dx=round(rng.uniform(-1, 1), 3),
                dy=round(rng.uniform(-1, 1), 3),
            )
            for t, cell in zip(types, cells)
        ]
        objects.sort(key=lambda o: (o.row, o.col))
        return Scene(tuple(objects), index=index, biased=self.bias, seed=self.seed)

    def scenes(self, start: int, count: int) -> list[Scene]:
        return [self.scene(i) for i in range(start, start + count)]


# ---- drawing -----------------------------------------------------------------------------------------------


def _glyph(object_type: str) -> Image.Image:
    """The object's shape as a CELL x CELL mask (255 = ink), drawn at full size."""
    mask = Image.new("L", (CELL, CELL), 0)
    draw = ImageDraw.Draw(mask)
    x0 = y0 = 0
    cx, cy = CELL / 2, CELL / 2

    def box(left, top, right, bottom):  # cell-relative fractions -> pixels
        return (left * CELL, top * CELL, right * CELL, bottom * CELL)

    t = object_type
    if t == "fork":
        draw.rectangle(box(0.45, 0.45, 0.55, 0.92), fill=255)
        draw.rectangle(box(0.30, 0.38, 0.70, 0.48), fill=255)
        for left in (0.30, 0.45, 0.60):
            draw.rectangle(box(left, 0.08, left + 0.10, 0.40), fill=255)
    elif t == "knife":
        draw.polygon(
            [
                (x0 + 0.42 * CELL, y0 + 0.08 * CELL),
                (x0 + 0.62 * CELL, y0 + 0.08 * CELL),
                (x0 + 0.58 * CELL, y0 + 0.55 * CELL),
                (x0 + 0.42 * CELL, y0 + 0.55 * CELL),
            ],
            fill=255,
        )
        draw.rectangle(box(0.40, 0.55, 0.60, 0.92), outline=255, width=2)
    elif t == "cup":
        draw.polygon(
            [
                (x0 + 0.20 * CELL, y0 + 0.25 * CELL),
                (x0 + 0.68 * CELL, y0 + 0.25 * CELL),
                (x0 + 0.62 * CELL, y0 + 0.80 * CELL),
                (x0 + 0.26 * CELL, y0 + 0.80 * CELL),
            ],
            fill=255,
        )
        draw.arc(box(0.56, 0.35, 0.88, 0.65), start=-90, end=90, fill=255, width=3)
    elif t == "saucer":
        draw.ellipse(box(0.08, 0.45, 0.92, 0.75), fill=255)
        draw.ellipse(box(0.35, 0.53, 0.65, 0.67), fill=0)
    elif t == "table":
        draw.rectangle(box(0.08, 0.30, 0.92, 0.42), fill=255)
        draw.rectangle(box(0.14, 0.42, 0.24, 0.90), fill=255)
        draw.rectangle(box(0.76, 0.42, 0.86, 0.90), fill=255)
    elif t == "chair":
        draw.rectangle(box(0.28, 0.08, 0.38, 0.90), fill=255)
        draw.rectangle(box(0.28, 0.50, 0.75, 0.60), fill=255)
        draw.rectangle(box(0.65, 0.60, 0.75, 0.90), fill=255)
    elif t == "toothbrush":
        draw.rectangle(box(0.10, 0.56, 0.90, 0.66), fill=255)
        for left in (0.62, 0.70, 0.78):
            draw.rectangle(box(left, 0.36, left + 0.05, 0.56), fill=255)
    elif t == "toothpaste":
        draw.polygon(
            [
                (x0 + 0.15 * CELL, y0 + 0.30 * CELL),
                (x0 + 0.70 * CELL, y0 + 0.38 * CELL),
                (x0 + 0.70 * CELL, y0 + 0.62 * CELL),
                (x0 + 0.15 * CELL, y0 + 0.70 * CELL),
            ],
            fill=255,
        )
        draw.rectangle(box(0.70, 0.43, 0.85, 0.57), fill=255)
    elif t == "keyboard":
        draw.rectangle(box(0.06, 0.30, 0.94, 0.72), outline=255, width=2)
        for row in (0.40, 0.52):
            for col in range(5):
                left = 0.16 + col * 0.14
                draw.rectangle(box(left, row, left + 0.08, row + 0.07), fill=255)
    elif t == "mouse":
        draw.ellipse(box(0.30, 0.20, 0.70, 0.85), fill=255)
        draw.line([(cx, y0 + 0.20 * CELL), (cx, y0 + 0.45 * CELL)], fill=0, width=2)
        draw.line([(cx, y0 + 0.20 * CELL), (cx, y0 + 0.02 * CELL)], fill=255, width=2)
    elif t == "moon":
        draw.ellipse(box(0.12, 0.12, 0.88, 0.88), fill=255)
        draw.ellipse(box(0.35, 0.02, 1.0, 0.75), fill=0)
    elif t == "star":
        points = []
        for k in range(10):
            radius = 0.42 * CELL if k % 2 == 0 else 0.18 * CELL
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif t == "ball":
        draw.ellipse(box(0.18, 0.18, 0.82, 0.82), fill=255)
    elif t == "clock":
        draw.ellipse(box(0.12, 0.12, 0.88, 0.88), outline=255, width=3)
        draw.line([(cx, cy), (cx, y0 + 0.25 * CELL)], fill=255, width=2)
        draw.line([(cx, cy), (x0 + 0.70 * CELL, cy)], fill=255, width=2)
    elif t == "leaf":
        draw.ellipse(box(0.15, 0.30, 0.85, 0.70), fill=255)
        draw.line([(x0 + 0.05 * CELL, y0 + 0.80 * CELL), (x0 + 0.85 * CELL, y0 + 0.40 * CELL)], fill=0, width=2)
    else:
        raise ValueError(f"unknown object type {t!r}; expected one of {OBJECT_TYPES}")
    return mask


def _mix(colour: tuple[int, int, int], shade: float) -> tuple[int, int, int]:
    """``colour`` at contrast ``shade`` against the background."""
    return tuple(round(b + shade * (c - b)) for c, b in zip(colour, BACKGROUND))


def _paste_object(image: Image.Image, obj: SceneObject) -> None:
    size = max(4, round(CELL * obj.scale))
    mask = _glyph(obj.type).resize((size, size), Image.BILINEAR)
    free = CELL - size
    left = obj.col * CELL + round(free / 2 * (1 + obj.dx))
    top = obj.row * CELL + round(free / 2 * (1 + obj.dy))
    image.paste(_mix(COLOURS[obj.colour], obj.shade), (left, top, left + size, top + size), mask)


NOISE_STD = 14.0
"""Sensor noise (standard deviation, 0..255 scale) of ``render``."""
CLUTTER_STROKES = (0, 4)
"""Number of clutter strokes (short faint lines that are not objects) per image: uniform in this range."""


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    for _ in range(rng.randint(*CLUTTER_STROKES)):
        x, y = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)
        angle, length = rng.uniform(0, math.pi), rng.uniform(4, 12)
        colour = _mix(COLOURS[rng.choice(list(COLOURS))], rng.uniform(0.25, 0.6))
        draw.line(
            [(x, y), (x + length * math.cos(angle), y + length * math.sin(angle))],
            fill=colour,
            width=rng.choice((1, 2)),
        )


def render(scene: Scene, image_size: int = IMAGE_SIZE, noise: bool = True) -> Image.Image:
    """Draw ``scene`` as an RGB image (``image_size`` a multiple of 128 keeps cells patch-aligned).

    With ``noise`` (the default, as in training and evaluation) the image also gets clutter strokes and
    Gaussian sensor noise, both deterministic by ``(scene.seed, scene.index, scene.biased)``;
    ``noise=False`` draws the objects alone (for inspecting glyphs).
    """
    if image_size % GRID:
        raise ValueError(f"image_size must be a multiple of {GRID}, got {image_size}")
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    rng = random.Random(f"everyday-render:{scene.seed}:{scene.index}:{int(scene.biased)}")
    if noise:
        _clutter(ImageDraw.Draw(image), rng)
    for obj in scene.objects:
        _paste_object(image, obj)
    if noise:
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels + np.random.default_rng(rng.getrandbits(32)).normal(0.0, NOISE_STD, pixels.shape)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    if image_size != IMAGE_SIZE:
        image = image.resize((image_size, image_size), Image.NEAREST)
    return image


# ---- text --------------------------------------------------------------------------------------------------


def _groups(scene: Scene) -> list[list[SceneObject]]:
    """Objects in reading order, a present partner placed right after its partner ("a fork and a knife")."""
    groups: list[list[SceneObject]] = []
    used: set[int] = set()
    for i, obj in enumerate(scene.objects):
        if i in used:
            continue
        used.add(i)
        group = [obj]
        for j, other in enumerate(scene.objects):
            if j not in used and other.type == _PARTNER.get(obj.type):
                group.append(other)
                used.add(j)
                break
        groups.append(group)
    return groups


def _join(parts: list[str]) -> str:
    text = (
        ", and ".join(parts)
        if len(parts) == 2
        else ", ".join(parts[:-1]) + (", and " if parts[:-1] else "") + parts[-1]
    )
    return text[0].upper() + text[1:] + "."


def caption(scene: Scene) -> str:
    """The plain reference caption, partners adjacent: ``'A red fork and a blue knife, and a green clock.'``."""
    if not scene.objects:
        return "An empty dark background."
    return _join([" and ".join(o.phrase() for o in group) for group in _groups(scene)])


def detailed_caption(scene: Scene) -> str:
    """The detail reference caption: the plain one with each object's quadrant."""
    if not scene.objects:
        return "An empty dark background with nothing on it."
    return _join([" and ".join(f"{o.phrase()} {o.place()}" for o in group) for group in _groups(scene)])


def question_text(object_type: str) -> str:
    """POPE's official wording."""
    return f"Is there a {object_type} in the image?"


def answer(scene: Scene, object_type: str) -> str:
    """Ground-truth answer: ``'Yes.'`` or ``'No.'``."""
    partner_of(object_type)
    return "Yes." if object_type in scene.types else "No."


def questions(scene: Scene, split: str = "random", per_scene: int = 2, seed: int = 0) -> list[Question]:
    """POPE-style questions: ``per_scene`` present and ``per_scene`` absent objects.

    Absent objects per ``split``: ``random`` uniformly; ``popular`` the most frequent types in training first
    (``POPULARITY``); ``adversarial`` the absent partners of present objects first (the co-occurrence trap).
    ``answer`` of each question is ``"yes"`` or ``"no"``.
    """
    if split not in QUESTION_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {QUESTION_SPLITS}")
    rng = random.Random(f"everyday-q:{scene.seed}:{scene.index}:{split}:{seed}")
    present = sorted(scene.types)
    absent = [t for t in OBJECT_TYPES if t not in scene.types]
    rng.shuffle(present)
    rng.shuffle(absent)
    if split == "popular":
        absent.sort(key=POPULARITY.index)
    elif split == "adversarial":
        absent.sort(key=lambda t: not (t in _PARTNER and _PARTNER[t] in scene.types))
    chosen = [(t, "yes") for t in present[:per_scene]] + [(t, "no") for t in absent[:per_scene]]
    rng.shuffle(chosen)
    return [Question(question_text(t), a, t, split) for t, a in chosen]


_WORD = re.compile(r"[a-z]+")


def mentioned_objects(text: str) -> set[str]:
    """Object types mentioned in ``text`` (plurals accepted; case-insensitive)."""
    return {_SYNONYMS[w] for w in _WORD.findall(text.lower()) if w in _SYNONYMS}


def mentions_with_words(text: str) -> list[tuple[str, str]]:
    """``(word as written, object type)`` for every object mention in ``text``, in order."""
    return [(w, _SYNONYMS[w.lower()]) for w in re.findall(r"[A-Za-z]+", text) if w.lower() in _SYNONYMS]
