"""A synthetic POPE / CHAIR benchmark on the project's own worlds (:mod:`vlm_guard.synthetic.worlds`).

Two worlds: ``everyday`` (the default model's: fork/knife, cup/saucer, table/chair, toothbrush/toothpaste,
keyboard/mouse, moon/star paired; ball, clock, leaf unpaired; POPE's and CHAIR's official wordings) and
``shapes`` (the 3.6M test fixture's: house/tree, moon/star, cup/plate, kite/ball; ring and cross; the toy
wording ``"is there a {object} ?"`` / ``"describe the image"``). Every function takes ``world=`` (a name, a
:class:`~vlm_guard.synthetic.worlds.WorldKind`, or ``None`` for the default model's world); the CLI picks the model's own world
(:func:`~vlm_guard.synthetic.worlds.world_for_model`).

Models are trained on *biased* scenes where partners co-occur. This benchmark asks about *held-out, unbiased*
scenes (every type drawn independently) by default, so the co-occurrence prior a model learned is often wrong,
which is the failure the methods target.

Held-out seeds. Training draws scenes from ``seed + 1_000_003 * k`` for its stages ``k = 1..4``
(``1_000_003 .. 4_000_012`` for the shipped seed 0); the toy reports use ``777_001`` (shapes) and ``424_242``
(everyday). This module uses two more seeds, disjoint from all of them:

- :data:`EVAL_SEED` (``900_001``): the reported numbers;
- :data:`TUNING_SEED` (``910_001``): anything tuned (method hyper-parameters), never reported.

POPE-style splits, built per scene as matched (yes, no) pairs, so every split has as many "yes" as "no"
questions. "Yes" objects are present objects chosen at random; "no" objects are absent objects chosen by split:

- ``random``: uniformly among the absent types;
- ``popular``: the most frequent types of the training distribution first (``WorldKind.popular_rank``: for
  everyday the training frequency order; for shapes the eight paired types, then ``ring``/``cross``), random
  within a tier;
- ``adversarial``: **only** the absent partners of present objects (the co-occurrence trap). A scene without
  an absent partner contributes no adversarial question, so the adversarial split draws from more scenes.

CHAIR-style captions: the world's caption prompt; the mentioned objects (the world's ``mentions_with_words``,
plurals accepted, one mention per occurrence) are compared with the scene's types.
:func:`score_synthetic_caption` returns the same record keys as :func:`vlm_guard.eval.chair.score_caption`,
so :func:`~vlm_guard.eval.chair.chair_item_counts`, :func:`~vlm_guard.eval.chair.chair_metrics` and the
bootstrap helpers work unchanged.

Everything is a pure function of its arguments (world, seed, split, sizes).

Example:
    >>> questions = pope_questions("adversarial", n_questions=4, world="everyday")
    >>> [(q.object, q.label, q.kind) for q in questions][:2]
    [('ball', 'yes', 'present'), ('saucer', 'no', 'absent_partner')]
    >>> score_synthetic_caption("A red fork and a blue knife.", {"fork"}, world="everyday")["hallucinated"]
    [['knife', 'knife']]
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from vlm_guard.eval.chair import mention_record
from vlm_guard.synthetic.world import QUESTION_SPLITS, Scene
from vlm_guard.synthetic.worlds import WorldKind, world_kind

logger = logging.getLogger(__name__)

EVAL_SEED = 900_001
"""World seed of the reported synthetic benchmark (disjoint from training seeds and the toy report's 777_001)."""

TUNING_SEED = 910_001
"""World seed reserved for tuning hyper-parameters; numbers on it are never reported."""

SPLITS: tuple[str, ...] = QUESTION_SPLITS
"""``("random", "popular", "adversarial")``."""


MAX_SCENES = 1_000_000
"""Give up after this many scenes (only reachable with impossible requests)."""

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class SyntheticQuestion:
    """One POPE-style question about a synthetic scene.

    Attributes:
        question_id: ``"{split}/{scene_index:06d}/{object}"`` (unique within a split).
        scene_index: Index of the scene in its world.
        text: The question, e.g. ``"is there a star ?"``.
        label: ``"yes"`` or ``"no"``.
        object: The type asked about.
        split: One of :data:`SPLITS`.
        kind: ``"present"``, ``"absent_partner"`` (an absent partner of a present object),
            ``"absent_popular"`` (another absent paired type) or ``"absent_other"`` (``ring``/``cross``).
    """

    question_id: str
    scene_index: int
    text: str
    label: str
    object: str
    split: str
    kind: str


@dataclass(frozen=True)
class SyntheticCaptionItem:
    """One scene to caption.

    Attributes:
        image_id: ``"scene/{scene_index:06d}"``.
        scene_index: Index of the scene in its world.
        gt_objects: The scene's types, sorted.
    """

    image_id: str
    scene_index: int
    gt_objects: tuple[str, ...]


def synthetic_world(seed: int = EVAL_SEED, bias: bool = False, world: str | WorldKind | None = None):
    """The scene generator the benchmark draws from (unbiased by default: partners independent of each other)."""
    return world_kind(world).world(seed=seed, bias=bias)


def absent_kind(object_type: str, present: Iterable[str], world: str | WorldKind | None = None) -> str:
    """How an absent type relates to the present ones: ``absent_partner``, ``absent_popular`` or ``absent_other``.

    Example:
        >>> [absent_kind(t, {"house"}, world="shapes") for t in ("tree", "star", "ring")]
        ['absent_partner', 'absent_popular', 'absent_other']
    """
    kind = world_kind(world)
    present = set(present)
    if object_type in present:
        raise ValueError(f"{object_type!r} is present in the scene ({sorted(present)}); it cannot be an absent object.")
    if any(kind.partner_of(t) == object_type for t in present):
        return "absent_partner"
    return "absent_popular" if object_type in kind.popular_types else "absent_other"


def negative_candidates(
    scene: Scene, split: str, rng: random.Random, world: str | WorldKind | None = None
) -> list[str]:
    """Absent types to ask about, best first, for one scene and split (see the module docstring).

    Args:
        scene: The scene.
        split: One of :data:`SPLITS`.
        rng: Source of the random order within a tier.
        world: The scene's world.

    Returns:
        Absent types; for ``adversarial`` only the absent partners of present objects (possibly none).

    Example:
        >>> from vlm_guard.synthetic.world import SceneObject
        >>> scene = Scene((SceneObject("house", "red", "big", 0, 0), SceneObject("ring", "blue", "small", 1, 1)))
        >>> negative_candidates(scene, "adversarial", random.Random(0), world="shapes")
        ['tree']
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    kind = world_kind(world)
    present = scene.types
    absent = [t for t in kind.object_types if t not in present]
    rng.shuffle(absent)
    if split == "random":
        return absent
    if split == "popular":
        return sorted(absent, key=kind.popular_rank.__getitem__)  # stable: random order within each tier
    return [t for t in absent if absent_kind(t, present, kind) == "absent_partner"]


def scene_questions(
    scene: Scene, split: str, per_scene: int = 2, seed: int = 0, world: str | WorldKind | None = None
) -> list[SyntheticQuestion]:
    """Matched (yes, no) question pairs for one scene: ``min(per_scene, #present, #candidates)`` pairs.

    Args:
        scene: The scene (``scene.index`` names the questions).
        split: One of :data:`SPLITS`.
        per_scene: Pairs per scene at most.
        seed: Extra seed of the object choice.
        world: The scene's world.

    Returns:
        Questions in the order yes, no, yes, no, ...

    Example:
        >>> from vlm_guard.synthetic.world import SceneObject
        >>> scene = Scene((SceneObject("moon", "red", "big", 0, 0),), index=7)
        >>> [(q.object, q.label, q.kind) for q in scene_questions(scene, "adversarial", world="shapes")]
        [('moon', 'yes', 'present'), ('star', 'no', 'absent_partner')]
    """
    if not isinstance(per_scene, int) or per_scene < 1:
        raise ValueError(f"per_scene must be a positive int, got {per_scene!r}.")
    kind = world_kind(world)
    rng = random.Random(f"synthetic-pope:{scene.seed}:{int(scene.biased)}:{scene.index}:{split}:{seed}")
    present = sorted(scene.types)
    rng.shuffle(present)
    negatives = negative_candidates(scene, split, rng, kind)
    pairs = min(per_scene, len(present), len(negatives))
    questions: list[SyntheticQuestion] = []
    for yes_type, no_type in zip(present[:pairs], negatives[:pairs]):
        questions.append(_question(scene, split, yes_type, "yes", "present", kind))
        questions.append(_question(scene, split, no_type, "no", absent_kind(no_type, scene.types, kind), kind))
    return questions


def _question(scene: Scene, split: str, object_type: str, label: str, kind: str, world: WorldKind) -> SyntheticQuestion:
    return SyntheticQuestion(
        question_id=f"{split}/{scene.index:06d}/{object_type}",
        scene_index=scene.index,
        text=world.question_text(object_type),
        label=label,
        object=object_type,
        split=split,
        kind=kind,
    )


def pope_questions(
    split: str,
    n_questions: int,
    seed: int = EVAL_SEED,
    bias: bool = False,
    per_scene: int = 2,
    start: int = 0,
    world: str | WorldKind | None = None,
) -> list[SyntheticQuestion]:
    """The first ``n_questions`` questions of a split, from scenes ``start, start+1, ...`` of the world.

    Args:
        split: One of :data:`SPLITS`.
        n_questions: How many (an even number keeps yes/no balanced; an odd one ends on a "yes").
        seed: World seed (:data:`EVAL_SEED` to report, :data:`TUNING_SEED` to tune).
        bias: Draw biased (training-like) scenes instead of unbiased ones.
        per_scene: Yes/no pairs per scene at most.
        start: First scene index.
        world: Which world (``"everyday"`` or ``"shapes"``).

    Returns:
        The questions, deterministic in the arguments.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not isinstance(n_questions, int) or n_questions < 0:
        raise ValueError(f"n_questions must be a non-negative int, got {n_questions!r}.")
    kind = world_kind(world)
    scenes = synthetic_world(seed, bias, kind)
    questions: list[SyntheticQuestion] = []
    index = start
    while len(questions) < n_questions:
        if index - start >= MAX_SCENES:
            raise ValueError(f"found only {len(questions)} {split} questions in {MAX_SCENES} scenes; ask for fewer.")
        questions.extend(scene_questions(scenes.scene(index), split, per_scene=per_scene, world=kind))
        index += 1
    logger.debug("%s: %d questions from scenes %d..%d (seed %d)", split, n_questions, start, index - 1, seed)
    return questions[:n_questions]


def caption_items(
    n_captions: int, seed: int = EVAL_SEED, bias: bool = False, start: int = 0, world: str | WorldKind | None = None
) -> list[SyntheticCaptionItem]:
    """Scenes ``start .. start + n_captions - 1`` to caption, with their ground-truth types.

    Example:
        >>> caption_items(2)[1].image_id
        'scene/000001'
    """
    if not isinstance(n_captions, int) or n_captions < 0:
        raise ValueError(f"n_captions must be a non-negative int, got {n_captions!r}.")
    scenes = synthetic_world(seed, bias, world)
    items = []
    for index in range(start, start + n_captions):
        scene = scenes.scene(index)
        items.append(SyntheticCaptionItem(f"scene/{index:06d}", index, tuple(sorted(scene.types))))
    return items


def score_synthetic_caption(caption: str, gt_objects: Iterable[str], world: str | WorldKind | None = None) -> dict:
    """CHAIR record of a caption of a synthetic scene (same keys as :func:`vlm_guard.eval.chair.score_caption`).

    Args:
        caption: Generated caption.
        gt_objects: Types present in the scene.
        world: The scene's world (its object vocabulary).

    Returns:
        ``mentions`` / ``hallucinated`` (lists of ``[word, type]``, one per occurrence), ``gt_objects``,
        ``recalled_objects``, ``n_mentions``, ``n_hallucinated``, ``hallucinated_caption``, ``n_gt_objects``,
        ``n_recalled``, ``n_words``.

    Example:
        >>> record = score_synthetic_caption("a red house , a blue tree , a green trees .", {"house", "ring"}, "shapes")
        >>> record["n_mentions"], record["n_hallucinated"], record["n_recalled"], record["n_gt_objects"]
        (3, 2, 1, 2)
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}.")
    if isinstance(gt_objects, str):
        raise ValueError(f"gt_objects must be a collection of types, got the string {gt_objects!r}.")
    kind = world_kind(world)
    gt_set = set(gt_objects)
    unknown = sorted(gt_set - set(kind.object_types))
    if unknown:
        raise ValueError(f"gt_objects holds unknown type(s) {unknown}; {kind.name} types are {kind.object_types}.")
    mentions = [[word.lower(), object_type] for word, object_type in kind.mentions_with_words(caption)]
    return mention_record(mentions, gt_set, len(_WORD.findall(caption.lower())))


__all__ = [
    "EVAL_SEED",
    "TUNING_SEED",
    "SPLITS",
    "SyntheticQuestion",
    "SyntheticCaptionItem",
    "synthetic_world",
    "absent_kind",
    "negative_candidates",
    "scene_questions",
    "pope_questions",
    "caption_items",
    "score_synthetic_caption",
]
