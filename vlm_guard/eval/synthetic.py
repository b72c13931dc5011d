"""A synthetic POPE / CHAIR benchmark on the project's own world (:mod:`vlm_guard.toyworld.world`).

The shipped default model was trained on *biased* scenes where partners co-occur (``house``/``tree``,
``moon``/``star``, ``cup``/``plate``, ``kite``/``ball``; ``ring`` and ``cross`` are unpaired controls). This
benchmark asks about *held-out, unbiased* scenes (every type drawn independently) by default, so the
co-occurrence prior the model learned is often wrong, which is the failure the methods target.

Held-out seeds. Training draws scenes from ``World(seed=TrainConfig.seed + 1_000_003 * k)`` for the stages
``k = 1..4`` (``1_000_003 .. 4_000_012`` for the shipped seed 0) and ``vlm-guard toy report`` uses
``777_001``. This module uses two more seeds, disjoint from both:

- :data:`EVAL_SEED` (``900_001``): the reported numbers;
- :data:`TUNING_SEED` (``910_001``): anything tuned (method hyper-parameters), never reported.

Scenes are drawn from a string-seeded RNG, so distinct seeds give independent scene streams; a scene with a
single object can still coincide with a training scene by chance (there are only 1,920 such scenes), which
does not matter for the comparison between methods on the same items.

POPE-style splits, built per scene as matched (yes, no) pairs, so every split has as many "yes" as "no"
questions. Questions use the world's wording, ``"is there a {object} ?"``, the only wording the default
model knows. "Yes" objects are present objects chosen at random; "no" objects are absent objects chosen by
split:

- ``random``: uniformly among the absent types;
- ``popular``: the most frequent types of the training distribution first (the eight paired types, which a
  partner can bring along; ``ring``/``cross`` only when no paired type is absent), random within a tier;
- ``adversarial``: **only** the absent partners of present objects (the co-occurrence trap). A scene without
  an absent partner contributes no adversarial question, so the adversarial split draws from more scenes.

CHAIR-style captions: ``"describe the image"``; the mentioned objects (:func:`~vlm_guard.toyworld.world.
mentions_with_words`, plurals accepted, one mention per occurrence) are compared with the scene's types.
:func:`score_synthetic_caption` returns the same record keys as :func:`vlm_guard.eval.chair.score_caption`,
so :func:`~vlm_guard.eval.chair.chair_item_counts`, :func:`~vlm_guard.eval.chair.chair_metrics` and the
bootstrap helpers work unchanged.

Everything is a pure function of its arguments (seed, split, sizes).

Example:
    >>> questions = pope_questions("adversarial", n_questions=4)
    >>> [(q.object, q.label, q.kind) for q in questions][:2]  # doctest: +SKIP
    [('moon', 'yes', 'present'), ('star', 'no', 'absent_partner')]
    >>> score_synthetic_caption("a big red house , a small blue tree .", {"house"})["hallucinated"]
    [['tree', 'tree']]
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import Iterable

from vlm_guard.eval.chair import mention_record
from vlm_guard.toyworld.world import (
    OBJECT_TYPES,
    PARTNER_PAIRS,
    QUESTION_SPLITS,
    Scene,
    World,
    mentions_with_words,
    partner_of,
    question_text,
)

logger = logging.getLogger(__name__)

EVAL_SEED = 900_001
"""World seed of the reported synthetic benchmark (disjoint from training seeds and the toy report's 777_001)."""

TUNING_SEED = 910_001
"""World seed reserved for tuning hyper-parameters; numbers on it are never reported."""

SPLITS: tuple[str, ...] = QUESTION_SPLITS
"""``("random", "popular", "adversarial")``."""

CAPTION_PROMPT = "describe the image"
"""The caption prompt the default model was trained on."""

PAIRED_TYPES: frozenset[str] = frozenset(t for pair in PARTNER_PAIRS for t in pair)
"""Types that have a partner: the most frequent types of the biased training world (the "popular" tier)."""

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


def synthetic_world(seed: int = EVAL_SEED, bias: bool = False) -> World:
    """The world the benchmark draws from (unbiased by default: partners independent of each other)."""
    return World(seed=seed, bias=bias)


def absent_kind(object_type: str, present: Iterable[str]) -> str:
    """How an absent type relates to the present ones: ``absent_partner``, ``absent_popular`` or ``absent_other``.

    Example:
        >>> absent_kind("tree", {"house"}), absent_kind("star", {"house"}), absent_kind("ring", {"house"})
        ('absent_partner', 'absent_popular', 'absent_other')
    """
    present = set(present)
    if object_type in present:
        raise ValueError(f"{object_type!r} is present in the scene ({sorted(present)}); it cannot be an absent object.")
    if any(partner_of(t) == object_type for t in present):
        return "absent_partner"
    return "absent_popular" if object_type in PAIRED_TYPES else "absent_other"


def negative_candidates(scene: Scene, split: str, rng: random.Random) -> list[str]:
    """Absent types to ask about, best first, for one scene and split (see the module docstring).

    Args:
        scene: The scene.
        split: One of :data:`SPLITS`.
        rng: Source of the random order within a tier.

    Returns:
        Absent types; for ``adversarial`` only the absent partners of present objects (possibly none).

    Example:
        >>> from vlm_guard.toyworld.world import SceneObject
        >>> scene = Scene((SceneObject("house", "red", "big", 0, 0), SceneObject("ring", "blue", "small", 1, 1)))
        >>> negative_candidates(scene, "adversarial", random.Random(0))
        ['tree']
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    present = scene.types
    absent = [t for t in OBJECT_TYPES if t not in present]
    rng.shuffle(absent)
    if split == "random":
        return absent
    if split == "popular":
        return sorted(absent, key=lambda t: t not in PAIRED_TYPES)  # stable: random order within each tier
    return [t for t in absent if absent_kind(t, present) == "absent_partner"]


def scene_questions(scene: Scene, split: str, per_scene: int = 2, seed: int = 0) -> list[SyntheticQuestion]:
    """Matched (yes, no) question pairs for one scene: ``min(per_scene, #present, #candidates)`` pairs.

    Args:
        scene: The scene (``scene.index`` names the questions).
        split: One of :data:`SPLITS`.
        per_scene: Pairs per scene at most.
        seed: Extra seed of the object choice.

    Returns:
        Questions in the order yes, no, yes, no, ...

    Example:
        >>> from vlm_guard.toyworld.world import SceneObject
        >>> scene = Scene((SceneObject("moon", "red", "big", 0, 0),), index=7)
        >>> [(q.object, q.label, q.kind) for q in scene_questions(scene, "adversarial")]
        [('moon', 'yes', 'present'), ('star', 'no', 'absent_partner')]
    """
    if not isinstance(per_scene, int) or per_scene < 1:
        raise ValueError(f"per_scene must be a positive int, got {per_scene!r}.")
    rng = random.Random(f"synthetic-pope:{scene.seed}:{int(scene.biased)}:{scene.index}:{split}:{seed}")
    present = sorted(scene.types)
    rng.shuffle(present)
    negatives = negative_candidates(scene, split, rng)
    pairs = min(per_scene, len(present), len(negatives))
    questions: list[SyntheticQuestion] = []
    for yes_type, no_type in zip(present[:pairs], negatives[:pairs]):
        questions.append(_question(scene, split, yes_type, "yes", "present"))
        questions.append(_question(scene, split, no_type, "no", absent_kind(no_type, scene.types)))
    return questions


def _question(scene: Scene, split: str, object_type: str, label: str, kind: str) -> SyntheticQuestion:
    return SyntheticQuestion(
        question_id=f"{split}/{scene.index:06d}/{object_type}",
        scene_index=scene.index,
        text=question_text(object_type),
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
) -> list[SyntheticQuestion]:
    """The first ``n_questions`` questions of a split, from scenes ``start, start+1, ...`` of the world.

    Args:
        split: One of :data:`SPLITS`.
        n_questions: How many (an even number keeps yes/no balanced; an odd one ends on a "yes").
        seed: World seed (:data:`EVAL_SEED` to report, :data:`TUNING_SEED` to tune).
        bias: Draw biased (training-like) scenes instead of unbiased ones.
        per_scene: Yes/no pairs per scene at most.
        start: First scene index.

    Returns:
        The questions, deterministic in the arguments.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not isinstance(n_questions, int) or n_questions < 0:
        raise ValueError(f"n_questions must be a non-negative int, got {n_questions!r}.")
    world = synthetic_world(seed, bias)
    questions: list[SyntheticQuestion] = []
    index = start
    while len(questions) < n_questions:
        if index - start >= MAX_SCENES:
            raise ValueError(f"found only {len(questions)} {split} questions in {MAX_SCENES} scenes; ask for fewer.")
        questions.extend(scene_questions(world.scene(index), split, per_scene=per_scene))
        index += 1
    logger.debug("%s: %d questions from scenes %d..%d (seed %d)", split, n_questions, start, index - 1, seed)
    return questions[:n_questions]


def caption_items(n_captions: int, seed: int = EVAL_SEED, bias: bool = False, start: int = 0) -> list[SyntheticCaptionItem]:
    """Scenes ``start .. start + n_captions - 1`` to caption, with their ground-truth types.

    Example:
        >>> caption_items(2)[1].image_id
        'scene/000001'
    """
    if not isinstance(n_captions, int) or n_captions < 0:
        raise ValueError(f"n_captions must be a non-negative int, got {n_captions!r}.")
    world = synthetic_world(seed, bias)
    items = []
    for index in range(start, start + n_captions):
        scene = world.scene(index)
        items.append(SyntheticCaptionItem(f"scene/{index:06d}", index, tuple(sorted(scene.types))))
    return items


def score_synthetic_caption(caption: str, gt_objects: Iterable[str]) -> dict:
    """CHAIR record of a caption of a synthetic scene (same keys as :func:`vlm_guard.eval.chair.score_caption`).

    Args:
        caption: Generated caption.
        gt_objects: Types present in the scene.

    Returns:
        ``mentions`` / ``hallucinated`` (lists of ``[word, type]``, one per occurrence), ``gt_objects``,
        ``recalled_objects``, ``n_mentions``, ``n_hallucinated``, ``hallucinated_caption``, ``n_gt_objects``,
        ``n_recalled``, ``n_words``.

    Example:
        >>> record = score_synthetic_caption("a red house , a blue tree , a green trees .", {"house", "ring"})
        >>> record["n_mentions"], record["n_hallucinated"], record["n_recalled"], record["n_gt_objects"]
        (3, 2, 1, 2)
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}.")
    if isinstance(gt_objects, str):
        raise ValueError(f"gt_objects must be a collection of types, got the string {gt_objects!r}.")
    gt_set = set(gt_objects)
    unknown = sorted(gt_set - set(OBJECT_TYPES))
    if unknown:
        raise ValueError(f"gt_objects holds unknown type(s) {unknown}; types are {OBJECT_TYPES}.")
    mentions = [[word.lower(), object_type] for word, object_type in mentions_with_words(caption)]
    return mention_record(mentions, gt_set, len(_WORD.findall(caption.lower())))


__all__ = [
    "EVAL_SEED",
    "TUNING_SEED",
    "SPLITS",
    "CAPTION_PROMPT",
    "PAIRED_TYPES",
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
