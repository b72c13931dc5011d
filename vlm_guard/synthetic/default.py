"""Which shipped model is "the default model" (``$VLM_GUARD_DEFAULT_MODEL``), the synthetic world it was trained on,
and the bundled example images of each world.

Read by the worlds (``world_kind(None)`` is the default model's world) and re-exported by :mod:`vlm_guard.defaults`,
which loads the model.

Example:
    >>> default_world() in EXAMPLES_DIRS
    True
"""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
"""The package's ``assets`` folder."""

EXAMPLES_DIRS = {
    "everyday": ASSETS / "examples",
    "shapes": ASSETS / "examples_shapes",
    "everyday_v3": ASSETS / "examples_v3",
}
"""Bundled example images per world, with their ground-truth objects in ``examples.json``."""

DEFAULT_MODEL_ENV = "VLM_GUARD_DEFAULT_MODEL"
"""Environment variable choosing what "the default model" is: ``v3`` (unset), ``v2`` or ``fixture``."""

DEFAULT_MODEL = "v3"
"""The default model when ``$VLM_GUARD_DEFAULT_MODEL`` is unset (v2 until v3 met its bars, issue 25)."""

DEFAULT_MODEL_CHOICES = ("v3", "v2", "fixture")
V3_WEIGHTS = ASSETS / "default_model_v3" / "v3_weights.safetensors"
"""Default model v3's trained parts (an installation without them is refused with a line naming v2)."""
WORLD_OF_MODEL = {"v2": "everyday", "v3": "everyday_v3", "fixture": "shapes"}
"""The world each shipped model was trained on."""


def default_model_name() -> str:
    """``"v3"``, ``"v2"`` or ``"fixture"`` (``$VLM_GUARD_DEFAULT_MODEL``, default ``v3``)."""
    name = os.environ.get(DEFAULT_MODEL_ENV, DEFAULT_MODEL).strip() or DEFAULT_MODEL
    if name not in DEFAULT_MODEL_CHOICES:
        raise ValueError(
            f"{DEFAULT_MODEL_ENV}={name!r} is not one of {DEFAULT_MODEL_CHOICES}; unset it for default "
            "model v3, set it to 'v2' for default model v2, or to 'fixture' for the 3.6M test fixture"
        )
    if name == "v3" and not V3_WEIGHTS.exists():
        raise ValueError(
            f"default model v3's trained parts are missing from this installation ({V3_WEIGHTS}); reinstall "
            f"vlm-guard, or set {DEFAULT_MODEL_ENV}=v2 to use default model v2"
        )
    return name


def default_world() -> str:
    """The world the default model was trained on: ``"everyday_v3"`` (v3), ``"everyday"`` (v2) or ``"shapes"``
    (fixture)."""
    return WORLD_OF_MODEL[default_model_name()]


def examples_dir(world: str | None = None) -> Path:
    """Bundled examples of ``world`` (default: the default model's world)."""
    world = world or default_world()
    if world not in EXAMPLES_DIRS:
        raise ValueError(f"no bundled examples for world {world!r}; worlds: {sorted(EXAMPLES_DIRS)}")
    return EXAMPLES_DIRS[world]


__all__ = [
    "ASSETS",
    "EXAMPLES_DIRS",
    "DEFAULT_MODEL_ENV",
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_CHOICES",
    "WORLD_OF_MODEL",
    "default_model_name",
    "default_world",
    "examples_dir",
]
