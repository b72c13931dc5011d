"""Synthetic world (coloured shapes with a co-occurrence bias) and the toy models trained on it.

See ``vlm_guard.synthetic.world`` for the world's API, ``model`` for the toy LLaVA builder,
``train`` for the training recipe and ``report`` for the measurements shipped beside the model.
"""

from vlm_guard.synthetic.world import (
    COLOURS,
    OBJECT_TYPES,
    PARTNER_PAIRS,
    QUESTION_SPLITS,
    SIZES,
    Question,
    Scene,
    SceneObject,
    World,
    answer,
    caption,
    mentioned_objects,
    mentions_with_words,
    partner_of,
    questions,
    render,
)

__all__ = [
    "COLOURS",
    "OBJECT_TYPES",
    "PARTNER_PAIRS",
    "QUESTION_SPLITS",
    "SIZES",
    "Question",
    "Scene",
    "SceneObject",
    "World",
    "answer",
    "caption",
    "mentioned_objects",
    "mentions_with_words",
    "partner_of",
    "questions",
    "render",
]
