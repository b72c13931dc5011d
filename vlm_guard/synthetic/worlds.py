"""The project's synthetic worlds, described once so that eval, tuning and the examples can use either.

Three worlds exist, each with the model trained on it:

* ``everyday`` (:mod:`vlm_guard.synthetic.everyday.world`): everyday objects whose names a pretrained language
  model knows (fork/knife, cup/saucer, ...), natural wording: POPE's official question
  ``"Is there a {object} in the image?"`` and CHAIR's ``"Please describe this image in detail."``. The
  default model (v2, on SmolLM2-135M-Instruct) is trained on it; any instruction-following VLM can be asked
  about it.
* ``everyday_v3`` (:mod:`vlm_guard.synthetic.everyday_v3.kind`): the everyday objects and wording, 3-5 objects
  drawn independently at 192 pixels, answered with long detail descriptions (default model v3).
* ``shapes`` (:mod:`vlm_guard.synthetic.world`): ten shapes in the toy vocabulary of the 3.6M test fixture
  (``"is there a {object} ?"``, ``"describe the image"``), the only wording that model knows.

:func:`world_for_model` picks a model's world from ``config.vlm_guard_world`` (written into the configs of
both shipped models) and falls back to ``everyday`` for any other model.

Example:
    >>> kind = world_kind("everyday")
    >>> kind.question_text("knife"), kind.caption_prompt
    ('Is there a knife in the image?', 'Please describe this image in detail.')
    >>> scene = kind.world(seed=1, bias=False).scene(0)
    >>> image = kind.render(scene)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

WORLD_NAMES = ("everyday", "shapes", "everyday_v3")
WORLDS_HELP = (
    "everyday: everyday objects, natural wording (default model v2); shapes: the 3.6M test fixture's toy "
    "vocabulary; everyday_v3: the everyday objects at 192 px with long detail descriptions (default model v3)"
)
"""What each world is, for the ``--world`` options' help."""
CONFIG_KEY = "vlm_guard_world"
"""Model-config attribute naming the world a model was trained on."""


@dataclass(frozen=True)
class WorldKind:
    """What eval, tuning and examples need to know about one world.

    Attributes:
        name: ``"everyday"`` or ``"shapes"``.
        module: The world's module (``World``, ``render``, ``mentions_with_words``, ``partner_of`` ...).
        caption_prompt: The prompt of CHAIR-style captions.
        pope_template: The question, ``{object}`` standing for the type.
        popular_rank: Each type's tier for POPE's *popular* split (0 = most frequent in training); random order
            within a tier.
        popular_types: Types counted as ``absent_popular`` (the frequent ones) when absent and not a partner.
        caption_tokens: A generation budget that fits the longest reference caption.
    """

    name: str
    module: ModuleType
    caption_prompt: str
    pope_template: str
    popular_rank: dict
    popular_types: frozenset
    caption_tokens: int

    @property
    def object_types(self) -> tuple[str, ...]:
        return self.module.OBJECT_TYPES

    @property
    def partner_pairs(self) -> tuple[tuple[str, str], ...]:
        return self.module.PARTNER_PAIRS

    def partner_of(self, object_type: str) -> str | None:
        return self.module.partner_of(object_type)

    def question_text(self, object_type: str) -> str:
        return self.module.question_text(object_type)

    def world(self, seed: int, bias: bool = False):
        """The world's scene generator (unbiased: every type drawn independently)."""
        return self.module.World(seed=seed, bias=bias)

    def render(self, scene, image_size: int | None = None):
        return self.module.render(scene) if image_size is None else self.module.render(scene, image_size)

    def mentions_with_words(self, text: str) -> list[tuple[str, str]]:
        return self.module.mentions_with_words(text)

    def reference_caption(self, scene) -> str:
        return self.module.caption(scene)


def _everyday_kind(name: str, world: ModuleType, caption_tokens: int) -> WorldKind:
    """An everyday-objects world (v2's or v3's): natural POPE and CHAIR wording, popularity from the module."""
    return WorldKind(
        name=name,
        module=world,
        caption_prompt=world.DETAIL_PROMPTS[1],
        pope_template="Is there a {object} in the image?",
        popular_rank={t: i for i, t in enumerate(world.POPULARITY)},
        popular_types=frozenset(world.POPULARITY[: len(world.POPULARITY) // 2]),
        caption_tokens=caption_tokens,
    )


def _everyday() -> WorldKind:
    from vlm_guard.synthetic.everyday import world

    return _everyday_kind("everyday", world, caption_tokens=120)


def _shapes() -> WorldKind:
    import vlm_guard.synthetic.world as world

    paired = frozenset(t for pair in world.PARTNER_PAIRS for t in pair)
    return WorldKind(
        name="shapes",
        module=world,
        caption_prompt="describe the image",
        pope_template="is there a {object} ?",
        popular_rank={t: 0 if t in paired else 1 for t in world.OBJECT_TYPES},
        popular_types=paired,
        caption_tokens=48,
    )


def _everyday_v3() -> WorldKind:
    from vlm_guard.synthetic.everyday_v3 import kind as world

    return _everyday_kind("everyday_v3", world, caption_tokens=world.CAPTION_TOKENS)


_BUILDERS: dict[str, Callable[[], WorldKind]] = {"everyday": _everyday, "shapes": _shapes, "everyday_v3": _everyday_v3}
_CACHE: dict[str, WorldKind] = {}


def world_kind(name: str | WorldKind | None) -> WorldKind:
    """The world called ``name`` (a :class:`WorldKind` passes through; ``None``: the default model's world,
    see :func:`vlm_guard.synthetic.default.default_world`)."""
    if isinstance(name, WorldKind):
        return name
    if name is None:
        from vlm_guard.synthetic.default import default_world

        name = default_world()
    if name not in _BUILDERS:
        raise ValueError(f"unknown world {name!r}; expected one of {WORLD_NAMES}")
    if name not in _CACHE:
        _CACHE[name] = _BUILDERS[name]()
    return _CACHE[name]


MARKER_FILE = "vlm_guard.json"
"""A JSON file in a model folder whose ``"world"`` names the world the model was trained on."""


def world_of_folder(folder: str | Path | None) -> str | None:
    """The world recorded in a local model folder (``vlm_guard.json``; a v2 assembly's ``v2_config.json``
    means ``everyday``), or ``None``."""
    if not folder:
        return None
    folder = Path(folder)
    try:
        if (folder / MARKER_FILE).is_file():
            name = json.loads((folder / MARKER_FILE).read_text()).get("world")
            return world_kind(name).name if name else None
        if (folder / "v2_config.json").is_file():
            return "everyday"
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{folder / MARKER_FILE}: cannot read the model's world ({error}); fix or delete the file"
        ) from None
    return None


def world_for_model(model: Any, requested: str | None = "auto") -> WorldKind:
    """The world to ask ``model`` about: ``requested`` unless ``"auto"``/``None``; else the model config's
    ``vlm_guard_world``, else the world recorded in its folder (:func:`world_of_folder`), else ``everyday``
    (natural wording that any instruction-following VLM understands)."""
    if requested not in (None, "auto"):
        return world_kind(requested)
    config = getattr(model, "config", None)
    name = getattr(config, CONFIG_KEY, None)
    if name is None:
        name = world_of_folder(getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None))
    return world_kind(name or "everyday")


def world_for_model_argument(model: str | None, requested: str | None = "auto") -> WorldKind:
    """Like :func:`world_for_model` before loading: ``model`` is a CLI ``--model`` value (``None`` = the
    default model)."""
    if requested not in (None, "auto"):
        return world_kind(requested)
    if model is None:
        from vlm_guard.synthetic.default import default_world

        return world_kind(default_world())
    return world_kind(world_of_folder(model) or "everyday")


__all__ = [
    "WORLD_NAMES",
    "CONFIG_KEY",
    "MARKER_FILE",
    "WorldKind",
    "world_kind",
    "world_for_model",
    "world_for_model_argument",
    "world_of_folder",
]
