"""A synthetic world of everyday objects that co-occur in ordinary text (default model v2).

Each scene places a few objects on a 4x4 grid of 32-pixel cells (128x128 pixels; one cell = one
32-pixel patch = one image token of the v2 vision tower). Object types are everyday things whose names
a pretrained language model knows, and most come in *partner pairs* that co-occur in web text
(fork/knife, cup/saucer, table/chair, toothbrush/toothpaste, keyboard/mouse, moon/star); ``ball``,
``clock`` and ``leaf`` are unpaired controls. In a biased (training) scene a drawn paired type brings
its partner with probability ``pair_prob``; unbiased scenes (held-out) draw every type independently.
``partner_preference`` measures that the language model itself prefers each partner.

Everything is deterministic by seed: ``World(seed).scene(i)`` is a pure function of ``(seed, i, settings)``.

Example:
    >>> world = World(seed=0)
    >>> scene = world.scene(3)
    >>> image = render(scene)                                   # PIL.Image, 128x128 RGB
    >>> caption(scene)                                          # partners next to each other
    'A red fork and a blue knife, and a green clock.'
    >>> detailed_caption(scene)
    'A red fork at the top left and a blue knife at the top right, and a green clock at the bottom left.'
    >>> [q.text for q in questions(scene, split="adversarial")][:1]
    ['Is there a cup in the image?']
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..world import Question, Scene  # shared with the shapes world: a scene is objects in reading order

OBJECT_TYPES: tuple[str, ...] = (
    "fork", "knife", "cup", "saucer", "table", "chair", "toothbrush", "toothpaste", "keyboard", "mouse",
    "moon", "star", "ball", "clock", "leaf",
)
"""Every object type; each is drawn as one recognisable Pillow glyph inside its cell."""

PARTNER_PAIRS: tuple[tuple[str, str], ...] = (
    ("fork", "knife"), ("cup", "saucer"), ("table", "chair"), ("toothbrush", "toothpaste"),
    ("keyboard", "mouse"), ("moon", "star"),
)
"""Pairs that co-occur in biased scenes and in ordinary text; ``ball``, ``clock``, ``leaf`` are controls."""

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
_SYNONYMS.update({"knives": "knife", "mice": "mouse", "leaves": "leaf", "toothbrushes": "toothbrush",
                  "forks": "fork", "stars": "star", "saucers": "saucer", "plate": "saucer"})
_SYNONYMS.pop("plate")  # a plate is not a saucer: keep CHAIR strict


def partner_of(object_type: str) -> str | None:
    """The usual partner of ``object_type`` (``None`` for the unpaired controls)."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"unknown object type {object_type!r}; expected one of {OBJECT_TYPES}")
    return _PARTNER.get(object_type)


@dataclass(frozen=True)
class SceneObject:
    """One object: ``type`` in OBJECT_TYPES, ``colour`` in COLOURS, grid cell (row, col)."""

    type: str
    colour: str
    row: int
    col: int

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
        bias: biased scenes (training distribution) or independently drawn types (held-out).
    """

    def __init__(self, seed: int = 0, min_objects: int = 1, max_objects: int = 4, pair_prob: float = 0.9,
                 bias: bool = True):
        if not 1 <= min_objects <= max_objects <= GRID * GRID:
            raise ValueError(f"need 1 <= min_objects ({min_objects}) <= max_objects ({max_objects}) <= {GRID * GRID}")
        if not 0.0 <= pair_prob <= 1.0:
            raise ValueError(f"pair_prob must lie in [0, 1], got {pair_prob}")
        self.seed, self.min_objects, self.max_objects = seed, min_objects, max_objects
        self.pair_prob, self.bias = pair_prob, bias

    def scene(self, index: int) -> Scene:
        """The scene number ``index`` (deterministic)."""
        rng = random.Random(f"everyday:{self.seed}:{index}:{int(self.bias)}")
        count = rng.randint(self.min_objects, self.max_objects)
        types: list[str] = []
        for object_type in rng.sample(OBJECT_TYPES, len(OBJECT_TYPES)):
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
        objects = [SceneObject(t, rng.choice(list(COLOURS)), cell // GRID, cell % GRID) for t, cell in zip(types, cells)]
        objects.sort(key=lambda o: (o.row, o.col))
        return Scene(tuple(objects), index=index, biased=self.bias, seed=self.seed)

    def scenes(self, start: int, count: int) -> list[Scene]:
        return [self.scene(i) for i in range(start, start + count)]


# ---- drawing -----------------------------------------------------------------------------------------------

def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    c = COLOURS[obj.colour]
    x0, y0 = obj.col * CELL, obj.row * CELL
    cx, cy = x0 + CELL / 2, y0 + CELL / 2

    def box(l, t, r, b):  # cell-relative fractions -> pixels
        return (x0 + l * CELL, y0 + t * CELL, x0 + r * CELL, y0 + b * CELL)

    t = obj.type
    if t == "fork":
        draw.rectangle(box(0.45, 0.45, 0.55, 0.92), fill=c)
        draw.rectangle(box(0.30, 0.38, 0.70, 0.48), fill=c)
        for left in (0.30, 0.45, 0.60):
            draw.rectangle(box(left, 0.08, left + 0.10, 0.40), fill=c)
    elif t == "knife":
        draw.polygon([(x0 + 0.42 * CELL, y0 + 0.08 * CELL), (x0 + 0.62 * CELL, y0 + 0.08 * CELL),
                      (x0 + 0.58 * CELL, y0 + 0.55 * CELL), (x0 + 0.42 * CELL, y0 + 0.55 * CELL)], fill=c)
        draw.rectangle(box(0.40, 0.55, 0.60, 0.92), outline=c, width=2)
    elif t == "cup":
        draw.polygon([(x0 + 0.20 * CELL, y0 + 0.25 * CELL), (x0 + 0.68 * CELL, y0 + 0.25 * CELL),
                      (x0 + 0.62 * CELL, y0 + 0.80 * CELL), (x0 + 0.26 * CELL, y0 + 0.80 * CELL)], fill=c)
        draw.arc(box(0.56, 0.35, 0.88, 0.65), start=-90, end=90, fill=c, width=3)
    elif t == "saucer":
        draw.ellipse(box(0.08, 0.45, 0.92, 0.75), fill=c)
        draw.ellipse(box(0.35, 0.53, 0.65, 0.67), fill=BACKGROUND)
    elif t == "table":
        draw.rectangle(box(0.08, 0.30, 0.92, 0.42), fill=c)
        draw.rectangle(box(0.14, 0.42, 0.24, 0.90), fill=c)
        draw.rectangle(box(0.76, 0.42, 0.86, 0.90), fill=c)
    elif t == "chair":
        draw.rectangle(box(0.28, 0.08, 0.38, 0.90), fill=c)
        draw.rectangle(box(0.28, 0.50, 0.75, 0.60), fill=c)
        draw.rectangle(box(0.65, 0.60, 0.75, 0.90), fill=c)
    elif t == "toothbrush":
        draw.rectangle(box(0.10, 0.56, 0.90, 0.66), fill=c)
        for left in (0.62, 0.70, 0.78):
            draw.rectangle(box(left, 0.36, left + 0.05, 0.56), fill=c)
    elif t == "toothpaste":
        draw.polygon([(x0 + 0.15 * CELL, y0 + 0.30 * CELL), (x0 + 0.70 * CELL, y0 + 0.38 * CELL),
                      (x0 + 0.70 * CELL, y0 + 0.62 * CELL), (x0 + 0.15 * CELL, y0 + 0.70 * CELL)], fill=c)
        draw.rectangle(box(0.70, 0.43, 0.85, 0.57), fill=c)
    elif t == "keyboard":
        draw.rectangle(box(0.06, 0.30, 0.94, 0.72), outline=c, width=2)
        for row in (0.40, 0.52):
            for col in range(5):
                left = 0.16 + col * 0.14
                draw.rectangle(box(left, row, left + 0.08, row + 0.07), fill=c)
    elif t == "mouse":
        draw.ellipse(box(0.30, 0.20, 0.70, 0.85), fill=c)
        draw.line([(cx, y0 + 0.20 * CELL), (cx, y0 + 0.45 * CELL)], fill=BACKGROUND, width=2)
        draw.line([(cx, y0 + 0.20 * CELL), (cx, y0 + 0.02 * CELL)], fill=c, width=2)
    elif t == "moon":
        draw.ellipse(box(0.12, 0.12, 0.88, 0.88), fill=c)
        draw.ellipse(box(0.35, 0.02, 1.0, 0.75), fill=BACKGROUND)
    elif t == "star":
        points = []
        for k in range(10):
            radius = 0.42 * CELL if k % 2 == 0 else 0.18 * CELL
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=c)
    elif t == "ball":
        draw.ellipse(box(0.18, 0.18, 0.82, 0.82), fill=c)
    elif t == "clock":
        draw.ellipse(box(0.12, 0.12, 0.88, 0.88), outline=c, width=3)
        draw.line([(cx, cy), (cx, y0 + 0.25 * CELL)], fill=c, width=2)
        draw.line([(cx, cy), (x0 + 0.70 * CELL, cy)], fill=c, width=2)
    elif t == "leaf":
        draw.ellipse(box(0.15, 0.30, 0.85, 0.70), fill=c)
        draw.line([(x0 + 0.05 * CELL, y0 + 0.80 * CELL), (x0 + 0.85 * CELL, y0 + 0.40 * CELL)], fill=BACKGROUND,
                  width=2)
    else:
        raise ValueError(f"unknown object type {t!r}; expected one of {OBJECT_TYPES}")


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` as an RGB image (``image_size`` a multiple of 128 keeps cells patch-aligned)."""
    if image_size % GRID:
        raise ValueError(f"image_size must be a multiple of {GRID}, got {image_size}")
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj)
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
    text = ", and ".join(parts) if len(parts) == 2 else ", ".join(parts[:-1]) + (", and " if parts[:-1] else "") + parts[-1]
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

    Absent objects per ``split``: ``random`` uniformly; ``popular`` the paired types first (the most frequent
    in training); ``adversarial`` the absent partners of present objects first (the co-occurrence trap).
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
        absent.sort(key=lambda t: t not in _PARTNER)
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
