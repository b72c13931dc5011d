"""The drop-in wrapper: ``vlm_guard.wrap(model, processor, config, head_map).generate(...)``.

Example:
    >>> import vlm_guard
    >>> model, processor = vlm_guard.load_default()
    >>> guarded = vlm_guard.wrap(model, processor, vlm_guard.GuardConfig.from_methods("vhr"))
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
    >>> output_ids = guarded.generate(**inputs, max_new_tokens=32, do_sample=False)
    >>> with guarded.disabled():
    ...     plain_ids = guarded.generate(**inputs, max_new_tokens=32, do_sample=False)
    >>> model = guarded.unwrap()
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from torch import nn
from transformers import LogitsProcessorList

from .config import METHOD_ORDER, GuardConfig
from .decoding.base import Intervention
from .decoding.engine import GuardEngine
from .decoding.registry import get_method
from .models import ModelAdapter, get_adapter

logger = logging.getLogger(__name__)

CONTRASTIVE_METHODS = ("pai", "vcd")


class GuardedModel:
    """A VLM whose ``generate`` and forward run the configured interventions.

    Unknown attributes pass through to the wrapped model, so it can stand in for it.

    Args:
        model: a supported ``...ForConditionalGeneration`` model.
        processor: its processor (used for the chat template spans and the image-free prompts).
        config: which methods run (default: none, i.e. the plain model).
        head_map: a calibrated :class:`vlm_guard.heads.HeadMap` (from ``vlm-guard calibrate``);
            checked against the model's fingerprint.
    """

    def __init__(self, model: nn.Module, processor=None, config: GuardConfig | None = None, head_map=None):
        object.__setattr__(self, "model", model)
        self.processor = processor
        self.adapter: ModelAdapter = get_adapter(model, processor)
        if head_map is not None:
            head_map.check_compatible(self.adapter)
        self.head_map = head_map
        self.engine = GuardEngine(model, self.adapter)
        self.engine.install()
        self.guard_config = GuardConfig()
        self.interventions: list[Intervention] = []
        self.set_config(config or GuardConfig())

    # ------------------------------------------------------------------ configuration
    def set_config(self, config: GuardConfig) -> None:
        """Switch methods (rebuilds the interventions; cheap)."""
        if not isinstance(config, GuardConfig):
            raise ValueError(f"config must be a vlm_guard.GuardConfig, got {type(config).__name__}; use GuardConfig.from_methods('vhr,var')")
        interventions = []
        for name in METHOD_ORDER:
            method_config = getattr(config, name)
            if method_config is None:
                continue
            intervention = get_method(name).build(method_config, self.adapter, self.head_map)
            if intervention is not None:
                interventions.append(intervention)
        self.guard_config = config
        self.interventions = interventions

    # ------------------------------------------------------------------ calls
    def generate(self, *args, **kwargs):
        """Same arguments and return values as ``model.generate``."""
        if not self.engine.enabled or not self.interventions:
            return self.model.generate(*args, **kwargs)
        num_beams = kwargs.get("num_beams", getattr(getattr(self.model, "generation_config", None), "num_beams", 1)) or 1
        contrastive = [name for name in self.guard_config.enabled_methods if name in CONTRASTIVE_METHODS]
        if num_beams > 1 and contrastive:
            raise ValueError(
                f"num_beams={num_beams} is not supported with {contrastive}: their contrast pass keeps one cache per row. "
                "Use greedy or sampling (num_beams=1), or switch those methods off."
            )
        model_inputs = dict(kwargs)
        if args:
            model_inputs.setdefault("input_ids", args[0])
        processors = [p for i in self.interventions for p in i.logits_processors(self, model_inputs)]
        if processors:
            user_processors = kwargs.get("logits_processor") or []
            kwargs["logits_processor"] = LogitsProcessorList([*user_processors, *processors])
        with self.engine.activate(self.interventions):
            return self.model.generate(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        """A forward pass with the interventions (e.g. for scoring or profiling)."""
        if not self.engine.enabled or not self.interventions:
            return self.model(*args, **kwargs)
        with self.engine.activate(self.interventions):
            return self.model(*args, **kwargs)

    forward = __call__

    @contextlib.contextmanager
    def disabled(self) -> Iterator["GuardedModel"]:
        """Run the plain model inside the block; restores the previous state in ``finally``."""
        previous = self.engine.enabled
        self.engine.enabled = False
        try:
            yield self
        finally:
            self.engine.enabled = previous

    @contextlib.contextmanager
    def interventions_active(self, interventions: list[Intervention]) -> Iterator[None]:
        """Run extra interventions (e.g. profiling recorders) inside the block."""
        with self.engine.activate(interventions):
            yield

    def unwrap(self) -> nn.Module:
        """Remove every trace of the wrapper and return the model with its original attention."""
        self.engine.uninstall()
        return self.model

    # ------------------------------------------------------------------ drop-in behaviour
    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: pass through to the model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        methods = ",".join(self.guard_config.enabled_methods) or "none"
        return f"GuardedModel({type(self.model).__name__}, family={self.adapter.family}, methods={methods})"


def wrap(model: nn.Module, processor=None, config: GuardConfig | None = None, head_map=None) -> GuardedModel:
    """Wrap ``model`` so that ``generate`` runs the methods in ``config``.

    When ``head_map`` is None a cached map for this model is looked up in the head-map cache folder
    (see :func:`vlm_guard.heads.default_cache_dir`); methods that need one and find none say so.

    Args:
        model: a Hugging Face VLM of a supported family (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
            Idefics3/SmolVLM).
        processor: its processor.
        config: a :class:`GuardConfig` (default: every method off).
        head_map: a :class:`vlm_guard.heads.HeadMap` or None.

    Returns:
        a :class:`GuardedModel`.
    """
    if head_map is None:
        head_map = _find_cached_head_map(model, processor)
    return GuardedModel(model, processor, config, head_map)


def _find_cached_head_map(model, processor):
    try:
        from .heads.head_map import find_cached_head_map
    except ImportError:
        return None
    return find_cached_head_map(get_adapter(model, processor))
