"""A synthetic world of coloured shapes with a controllable co-occurrence bias.

Each scene places a few objects on a 4x4 grid of cells (64x64 pixels by default, one
cell = 16x16 pixels = 2x2 patches of a patch-8 vision tower). An object has a type (its
shape), a colour, a size and a grid position. Some types come in *partner pairs*
(``house``/``tree``, ``moon``/``star``, ...): in a biased scene, when one member of a pair
is drawn, its partner is added with probability ``pair_prob`` (default 0.9), so the two
appear together in most training scenes and rarely apart. A model trained on such scenes
learns the prior "tree => house" and tends to describe an absent partner: the failure mode
vlm-guard fights. Unbiased scenes (``bias=False``) draw every type independently.

Everything is deterministic by seed: ``World(seed).scene(i)`` is a pure function of
``(seed, i, settings)``.

Example:
    >>> world = World(seed=0)                  # biased (training) distribution
    >>> scene = world.scene(3)                 # Scene(objects=(SceneObject('cup', 'green', 'small', 0, 1), ...))
    >>> image = render(scene)                  # PIL.Image, 64x64 RGB
    >>> caption(scene)
    'a small green cup , a small purple kite , a small green plate , a small yellow ball .'
    >>> [q.text for q in questions(scene, split="adversarial")][:2]
    ['is there a cup ?', 'is there a tree ?']
    >>> sorted(mentioned_objects("Two houses and a tree."))
    ['house', 'tree']
    >>> World(seed=1, bias=False).scene(0)     # held-out, unbiased: types drawn independently
    Scene(objects=(SceneObject(type='ball', colour='green', size='small', row=2, col=2),), index=0, biased=False, seed=1)

API summary (all importable from ``vlm_guard.synthetic``):
    OBJECT_TYPES, PARTNER_PAIRS, COLOURS, SIZES, QUESTION_SPLITS   constants
    World(seed, min_objects, max_objects, pair_prob, bias)          .scene(i), .scenes(start, count)
    Scene(objects, index, biased, seed)                            .types -> set[str]
    SceneObject(type, colour, size, row, col)
    render(scene, image_size=64) -> PIL.Image
    caption(scene) -> str ; answer(scene, type) -> "yes" | "no"
    questions(scene, split="random"|"popular"|"adversarial", per_scene=2) -> list[Question]
    mentioned_objects(text) -> set[str] ; mentions_with_words(text) -> [(word, type)]
    partner_of(type) -> str | None
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

OBJECT_TYPES: tuple[str, ...] = (
    "house",
    "tree",
    "moon",
    "star",
    "cup",
    "plate",
    "kite",
    "ball",
    "ring",
    "cross",
)
"""Every object type of the world; each is drawn as one distinctive shape."""

PARTNER_PAIRS: tuple[tuple[str, str], ...] = (
    ("house", "tree"),
    ("moon", "star"),
    ("cup", "plate"),
    ("kite", "ball"),
)
"""Pairs that co-occur in biased scenes. ``ring`` and ``cross`` have no partner (controls)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (245, 225, 20),
    "purple": (170, 40, 210),
    "white": (245, 245, 245),
}
"""Colour names and their RGB values (strong colours on a dark background)."""

SIZES: dict[str, int] = {"small": 10, "big": 15}
"""Size names and the object's extent in pixels (inside a 16-pixel cell)."""

BACKGROUND = (25, 25, 25)
GRID = 4  # cells per side
IMAGE_SIZE = 64

_PARTNER: dict[str, str] = {}
for _a, _b in PARTNER_PAIRS:
    _PARTNER[_a], _PARTNER[_b] = _b, _a

# plural and synonym forms a generated caption may use -> canonical type
_SYNONYMS: dict[str, str] = {t: t for t in OBJECT_TYPES}
_SYNONYMS.update({t + "s": t for t in OBJECT_TYPES})
_SYNONYMS.update({"crosses": "cross", "houses": "house", "trees": "tree"})


def partner_of(object_type: str) -> str | None:
    """The usual partner of ``object_type`` (``None`` for unpaired types)."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"unknown object type {object_type!r}; expected one of {OBJECT_TYPES}")
    return _PARTNER.get(object_type)


@dataclass(frozen=True)
class SceneObject:
    """One object: ``type`` in OBJECT_TYPES, ``colour`` in COLOURS, ``size`` in SIZES, grid cell (row, col)."""

    type: str
    colour: str
    size: str
    row: int
    col: int

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.type}"


@dataclass(frozen=True)
class Scene:
    """A scene: objects in reading order (row-major), with the settings that produced it."""

    objects: tuple[SceneObject, ...]
    index: int = 0
    biased: bool = True
    seed: int = 0

    @property
    def types(self) -> set[str]:
        """The set of object types present."""
        return {o.type for o in self.objects}


@dataclass(frozen=True)
class Question:
    """A yes/no question with its ground truth; ``object`` is the type asked about."""

    text: str
    answer: str
    object: str
    kind: str = field(default="random")


class World:
    """A deterministic generator of scenes.

    Args:
        seed: base seed; scene ``i`` depends only on ``(seed, i)`` and the settings below.
        min_objects, max_objects: number of distinct-type objects per scene (before partners).
        pair_prob: in biased scenes, probability that a drawn paired type brings its partner.
        bias: draw biased scenes (training distribution) or independent types (held-out).

    Example:
        >>> scenes = [World(seed=1, bias=False).scene(i) for i in range(100)]
    """

    def __init__(
        self, seed: int = 0, min_objects: int = 1, max_objects: int = 4, pair_prob: float = 0.9, bias: bool = True
    ):
        if not 1 <= min_objects <= max_objects <= GRID * GRID:
            raise ValueError(f"need 1 <= min_objects ({min_objects}) <= max_objects ({max_objects}) <= {GRID * GRID}")
        if not 0.0 <= pair_prob <= 1.0:
            raise ValueError(f"pair_prob must lie in [0, 1], got {pair_prob}")
        self.seed, self.min_objects, self.max_objects = seed, min_objects, max_objects
        self.pair_prob, self.bias = pair_prob, bias

    def scene(self, index: int) -> Scene:
        """The scene number ``index`` (deterministic)."""
        rng = random.Random(f"{self.seed}:{index}:{int(self.bias)}")
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
            # biased: partner follows with pair_prob; unbiased: no forced partner
            # biased scenes: the partner follows with pair_prob (may exceed `count` by one)
            if self.bias and rng.random() < self.pair_prob and len(types) < self.max_objects:
                types.append(partner)
        cells = rng.sample(range(GRID * GRID), len(types))
        objects = [
            SceneObject(t, rng.choice(list(COLOURS)), rng.choice(list(SIZES)), cell // GRID, cell % GRID)
            for t, cell in zip(types, cells)
        ]
        objects.sort(key=lambda o: (o.row, o.col))
        return Scene(tuple(objects), index=index, biased=self.bias, seed=self.seed)

    def scenes(self, start: int, count: int) -> list[Scene]:
        """Scenes ``start .. start+count-1``."""
        return [self.scene(i) for i in range(start, start + count)]


def _shape_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if kind == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if kind == "house":
        return [
            (cx, cy - r),
            (cx + r, cy - r * 0.1),
            (cx + r * 0.8, cy - r * 0.1),
            (cx + r * 0.8, cy + r),
            (cx - r * 0.8, cy + r),
            (cx - r * 0.8, cy - r * 0.1),
            (cx - r, cy - r * 0.1),
        ]
    if kind == "cup":  # trapezoid wider at the top
        return [(cx - r, cy - r * 0.8), (cx + r, cy - r * 0.8), (cx + r * 0.55, cy + r), (cx - r * 0.55, cy + r)]
    raise ValueError(kind)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, cell: int) -> None:
    colour = COLOURS[obj.colour]
    cx = obj.col * cell + cell / 2 - 0.5
    cy = obj.row * cell + cell / 2 - 0.5
    r = SIZES[obj.size] / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    t = obj.type
    if t == "house":
        draw.polygon(_shape_points("house", cx, cy, r), fill=colour)
    elif t == "tree":
        draw.polygon(_shape_points("triangle", cx, cy - r * 0.2, r * 0.8), fill=colour)
        draw.rectangle((cx - r * 0.2, cy + r * 0.5, cx + r * 0.2, cy + r), fill=colour)
    elif t == "moon":
        draw.ellipse(box, fill=colour)
        draw.ellipse((cx - r * 0.4, cy - r * 1.1, cx + r * 1.4, cy + r * 0.7), fill=BACKGROUND)
    elif t == "star":
        draw.polygon(_shape_points("star", cx, cy, r), fill=colour)
    elif t == "cup":
        draw.polygon(_shape_points("cup", cx, cy, r), fill=colour)
    elif t == "plate":
        draw.ellipse((cx - r, cy - r * 0.45, cx + r, cy + r * 0.45), fill=colour)
    elif t == "kite":
        draw.polygon(_shape_points("diamond", cx, cy, r), fill=colour)
    elif t == "ball":
        draw.ellipse(box, fill=colour)
    elif t == "ring":
        width = max(2, round(r * 0.45))
        draw.ellipse(box, outline=colour, width=width)
    elif t == "cross":
        arm = r * 0.35
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=colour)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=colour)
    else:
        raise ValueError(f"unknown object type {t!r}; expected one of {OBJECT_TYPES}")


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``image_size`` pixels (a multiple of 16 keeps cells patch-aligned)."""
    if image_size % GRID:
        raise ValueError(f"image_size must be a multiple of {GRID}, got {image_size}")
    scale = image_size / IMAGE_SIZE
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, IMAGE_SIZE // GRID)
    if scale != 1:
        image = image.resize((image_size, image_size), Image.NEAREST)
    return image


def caption(scene: Scene) -> str:
    """The reference caption: objects in reading order, e.g. ``'a big red house , a small blue tree .'``."""
    if not scene.objects:
        return "nothing ."
    return " , ".join(o.phrase() for o in scene.objects) + " ."


def answer(scene: Scene, object_type: str) -> str:
    """Ground-truth answer (``'yes'``/``'no'``) to "is there a {object_type} ?"."""
    partner_of(object_type)  # validates
    return "yes" if object_type in scene.types else "no"


def question_text(object_type: str) -> str:
    return f"is there a {object_type} ?"


QUESTION_SPLITS = ("random", "popular", "adversarial")


def questions(scene: Scene, split: str = "random", per_scene: int = 2, seed: int = 0) -> list[Question]:
    """POPE-style yes/no questions: ``per_scene`` about present objects and ``per_scene`` about absent ones.

    Absent objects are chosen per ``split``:
      * ``random``: uniformly among absent types;
      * ``popular``: the paired types first (they are the most frequent in training);
      * ``adversarial``: the absent partners of present objects first (the co-occurrence trap),
        then random absent types.

    Args:
        scene: the scene.
        split: one of QUESTION_SPLITS.
        per_scene: questions per polarity (fewer if the scene lacks them).
        seed: extra seed for the choice of objects.
    Returns:
        list of ``Question`` with ``answer`` in {"yes", "no"}.
    """
    if split not in QUESTION_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {QUESTION_SPLITS}")
    rng = random.Random(f"q:{scene.seed}:{scene.index}:{split}:{seed}")
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


def vocabulary() -> list[str]:
    """Every word the world's captions, questions and answers use (for a word-level tokenizer)."""
    words = [
        "a",
        ",",
        ".",
        "is",
        "there",
        "?",
        "yes",
        "no",
        "nothing",
        "describe",
        "the",
        "image",
        "user",
        ":",
        "assistant",
        "and",
    ]
    words += list(OBJECT_TYPES) + list(COLOURS) + list(SIZES)
    return words
