"""The v3 everyday world as eval, tuning and the examples see it (:class:`~vlm_guard.synthetic.worlds.WorldKind`
``"everyday_v3"``).

The objects, the words that name them, the partner pairs, the POPE questions and the mention parser are the v2
world's (:mod:`vlm_guard.synthetic.everyday.world`). What differs is the scene and the picture:

* ``World(seed, bias=False)`` draws 3-5 object types uniformly without replacement (no partner co-occurrence,
  :func:`~vlm_guard.synthetic.everyday_v3.world.independent_world`); ``bias=True`` is the training distribution of
  v3's instruct stage (:func:`~vlm_guard.synthetic.everyday_v3.world.biased_world`).
* ``render(scene, image_size=192)`` draws natively at the v3 model's size (192 pixels, 48 per grid cell).
* The reference caption is the long detail description (100-200 tokens), the answer the model was trained to give
  to the CHAIR prompt.

Example:
    >>> scene = World(seed=1).scene(0)
    >>> 3 <= len(scene.objects) <= 5, render(scene).size
    (True, (192, 192))
"""

from __future__ import annotations

from vlm_guard.synthetic.everyday.world import (  # noqa: F401 (the world's vocabulary, re-exported)
    OBJECT_TYPES,
    PARTNER_PAIRS,
    POPULARITY,
    mentions_with_words,
    partner_of,
    question_text,
)
from vlm_guard.synthetic.everyday_v3 import world as _v3
from vlm_guard.synthetic.everyday_v3.world import DETAIL_PROMPTS, GRID  # noqa: F401

IMAGE_SIZE = 192
"""The v3 default model's input side in pixels (``V3Spec(image_size=192)``: 144 image tokens)."""

CAPTION_TOKENS = 256
"""Generation budget of a detail description (the reference descriptions run 100-185 SmolLM2 tokens)."""


def World(seed: int, bias: bool = False):  # noqa: N802 (the constructor every world exposes)
    """The scene generator: independent types (``bias=False``), or the biased training distribution."""
    return _v3.biased_world(seed) if bias else _v3.independent_world(seed)


def render(scene, image_size: int = IMAGE_SIZE):
    """``scene`` drawn natively at ``image_size`` pixels (a multiple of the 4-cell grid)."""
    if image_size % GRID:
        raise ValueError(f"image_size must be a multiple of {GRID} (the grid), got {image_size}")
    return _v3.render(scene, cell=image_size // GRID)


def caption(scene) -> str:
    """The reference answer to the detail prompt: :func:`~vlm_guard.synthetic.everyday_v3.world.long_description`."""
    return _v3.long_description(scene)


__all__ = [
    "CAPTION_TOKENS",
    "DETAIL_PROMPTS",
    "IMAGE_SIZE",
    "OBJECT_TYPES",
    "PARTNER_PAIRS",
    "POPULARITY",
    "World",
    "caption",
    "mentions_with_words",
    "partner_of",
    "question_text",
    "render",
]
