"""The drop-in wrapper: ``vlm_guard.wrap(model, processor, config, head_map).generate(...)``.

Example:
    >>> import vlm_guard
    >>> from PIL import Image
    >>> from vlm_guard.models.loading import chat_prompt
    >>> model, processor = vlm_guard.load_default()       # the test fixture when VLM_GUARD_DEFAULT_MODEL=fixture
    >>> guarded = vlm_guard.wrap(model, processor, vlm_guard.GuardConfig.from_methods("vhr"))
    >>> image, prompt = Image.new("RGB", (64, 64), "red"), chat_prompt(processor, "describe the image")
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
    >>> output_ids = guarded.generate(**inputs, max_new_tokens=4, do_sample=False)
    >>> with guarded.disabled():
    ...     plain_ids = guarded.generate(**inputs, max_new_tokens=4, do_sample=False)
    >>> output_ids.shape == plain_ids.shape
    True
    >>> guarded.unwrap() is model
    True
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers import LogitsProcessorList

from vlm_guard.config import GuardConfig
from vlm_guard.core.calls import check_generate_call
from vlm_guard.core.contract import Intervention
from vlm_guard.core.engine import GuardEngine
from vlm_guard.core.generations import GenerationRecord
from vlm_guard.methods.registry import get_method
from vlm_guard.models import ModelAdapter, get_adapter

logger = logging.getLogger(__name__)


class GuardedModel:
    """A VLM whose ``generate`` and forward run the configured interventions.

    Unknown attributes pass through to the wrapped model, so it can stand in for it.

    Construction is atomic: the config and the head map are validated and the methods built before
    anything is installed, and any error while installing removes what was installed, so the model
    is left as it was and can be wrapped again.

    Threads: one wrapper may be shared. Guarded calls (``generate``, forward) run one at a time (a
    per-wrapper lock; each generation's per-method state is its own: :attr:`last_generation`), and :meth:`disabled` switches the methods off
    for the calling thread only, so plain calls in other threads are unaffected and a plain call never
    picks up another thread's methods.

    Args:
        model: a supported ``...ForConditionalGeneration`` model.
        processor: its processor (used for the chat template spans and the image-free prompts).
        config: which methods run (default: none, i.e. the plain model).
        head_map: a calibrated :class:`vlm_guard.calibration.HeadMap` (from ``vlm-guard calibrate``) or the folder
            it was saved to; checked against the model's fingerprint.
    """

    def __init__(
        self,
        model: nn.Module,
        processor=None,
        config: GuardConfig | str | None = None,
        head_map=None,
        task: str | None = None,
    ):
        object.__setattr__(self, "model", model)
        self._unwrapped = False
        self._call_lock = threading.RLock()
        self.processor = processor
        self.adapter: ModelAdapter = get_adapter(model, processor)
        head_map = as_head_map(head_map)
        if head_map is not None:
            head_map.check_compatible(self.adapter)
        self.head_map = head_map
        self.task = task  # the task profile of the head map's tuned settings (vlm_guard.settings.PROFILES)
        config, sources = self._resolve(GuardConfig() if config is None else config)
        interventions = self._build(config)  # validates everything before the model is touched
        self._harm_warned: set[str] = set()
        self._warn_measured_harm(config)
        self.engine = GuardEngine(model, self.adapter)
        try:
            self.engine.install()
        except BaseException:
            self.engine.uninstall()
            raise
        self.guard_config = config
        self.settings_profile = self._requested_profile  # which task profile's tuned values run (a line)
        self.settings_sources: dict[str, dict[str, str]] = sources
        self.interventions: list[Intervention] = interventions
        self._config_snapshot = config.to_dict()

    # ------------------------------------------------------------------ configuration
    def _resolve(self, config: GuardConfig | str) -> tuple[GuardConfig, dict[str, dict[str, str]]]:
        """A method list becomes a config; unset fields take the head map's tuned values
        (:func:`vlm_guard.settings.resolve_config`)."""
        from vlm_guard.settings import resolve_request

        config, sources, self._requested_profile = resolve_request(config, self.head_map, self.task)
        return config, sources

    def _build(self, config: GuardConfig) -> list[Intervention]:
        if not isinstance(config, GuardConfig):
            raise ValueError(
                f"config must be a vlm_guard.GuardConfig, got {type(config).__name__}; use GuardConfig.from_methods('vhr,var')"
            )
        config.validate()
        interventions = []
        for name in config.enabled_methods:  # in the registry's run order
            intervention = get_method(name).build(getattr(config, name), self.adapter, self.head_map)
            if intervention is not None:
                interventions.append(intervention)
        return interventions

    def set_config(self, config: GuardConfig | str) -> None:
        """Switch methods (validates the config and rebuilds the interventions; cheap).

        Every field the config leaves unset takes the head map's tuned value when it has one (``vlm-guard tune``),
        else the released default; a field set in ``config`` always wins. The values that run are in
        :attr:`guard_config` and where each came from in :attr:`settings_sources` (see
        :func:`vlm_guard.settings.resolve_config`).

        Args:
            config: a :class:`GuardConfig`, or a method list such as ``"vhr,pai"``, ``"all"``, ``"none"``, or
                ``"auto"`` (the set tuned for this model, else PAI: :func:`vlm_guard.tuning.default_methods`).
        """
        self._check_wrapped()
        with self._call_lock:
            config, sources = self._resolve(config)
            interventions = self._build(config)
            self._warn_measured_harm(config)
            self.guard_config = config
            self.settings_profile = self._requested_profile
            self.settings_sources = sources
            self.interventions = interventions
            self._config_snapshot = config.to_dict()

    def _warn_measured_harm(self, config: GuardConfig) -> None:
        """One warning per setting that the head map's tuning measured as harmful on this model (once per wrapper)."""
        from vlm_guard.settings import measured_harm

        if self.head_map is None:
            return
        for line in measured_harm(self.head_map, self.task, config):
            if line not in self._harm_warned:
                self._harm_warned.add(line)
                logger.warning(line)

    def describe_settings(self, tuned_only: bool = True) -> list[str]:
        """One line per enabled method: the values that run and where each came from (config / tuned / default)."""
        from vlm_guard.settings import describe_settings

        return describe_settings(
            self.guard_config,
            self.settings_sources,
            tuned_only=tuned_only,
            profile=getattr(self, "settings_profile", None),
        )

    def _refresh(self) -> None:
        """Raise after :meth:`unwrap`; re-validate and rebuild when ``guard_config`` was replaced or edited in place."""
        self._check_wrapped()
        if self.guard_config.to_dict() != self._config_snapshot:
            logger.info("guard_config changed since the methods were built; validating and rebuilding them")
            self.set_config(self.guard_config)

    def _check_wrapped(self) -> None:
        if self._unwrapped:
            raise RuntimeError(
                "this GuardedModel was unwrapped (unwrap() restored the plain model); wrap the model again "
                "with vlm_guard.wrap(model, processor, config) to run the methods, or call the model itself."
            )

    # ------------------------------------------------------------------ calls
    def generate(self, *args, **kwargs):
        """Same arguments and return values as ``model.generate`` (see :mod:`vlm_guard.core.calls` for
        the calls that run the plain model with a warning, or are refused)."""
        self._refresh()
        if not self.engine.enabled or not self.interventions:
            return self.model.generate(*args, **kwargs)
        with self._call_lock:
            return self._generate_guarded(*args, **kwargs)

    def _generate_guarded(self, *args, **kwargs):
        if not self.engine.enabled or not self.interventions:
            return self.model.generate(*args, **kwargs)
        methods = self.guard_config.enabled_methods
        contrastive = [name for name in methods if get_method(name).contrastive]
        input_ids, kwargs = check_generate_call(self.model, methods, args, kwargs, contrastive=contrastive)
        if input_ids is None:  # embeddings only: the image cannot be placed (warned)
            return self.model.generate(*args, **kwargs)
        model_inputs = {key: value for key, value in kwargs.items() if key != "inputs"}
        model_inputs["input_ids"] = input_ids
        processors = self.logits_processor(**model_inputs)
        if processors:
            user_processors = kwargs.get("logits_processor") or []
            kwargs["logits_processor"] = LogitsProcessorList([*user_processors, *processors])
        images = {key: kwargs[key] for key in self.adapter.image_input_keys if kwargs.get(key) is not None}
        first = [processor for processor in processors if getattr(processor, "runs_first", False)]
        with (
            self.engine.activate(
                self.interventions,
                known_prompt=(input_ids, kwargs.get("attention_mask")),
                known_images=images,
                record=True,
            ),
            processors_first(self.model, first),
        ):
            return self.model.generate(*args, **kwargs)

    def logits_processor(self, **model_inputs) -> LogitsProcessorList:
        """The methods' logits processors (PAI's image-free and VCD's noised-image contrasts) for one prompt
        batch, for a hand-written decoding loop: apply them to each step's next-token scores,
        ``scores = processors(sequence_ids, logits[:, -1].float())``, as ``generate`` does. Build a new list
        per generation (each keeps the contrast prompt's own cache).

        Args:
            model_inputs: the prompt's forward arguments (``input_ids``, ``attention_mask``, image tensors).
        """
        if not self.engine.enabled:
            return LogitsProcessorList()
        processors = [p for i in self.interventions for p in i.logits_processors(self, model_inputs)]
        # the ones that run before generate's own processors (VCD's contrast) come first here too
        return LogitsProcessorList(sorted(processors, key=lambda p: not getattr(p, "runs_first", False)))

    def __call__(self, *args, **kwargs):
        """A forward pass with the interventions (e.g. for scoring or profiling)."""
        self._refresh()
        if not self.engine.enabled or not self.interventions:
            return self.model(*args, **kwargs)
        with self._call_lock, self.engine.activate(self.interventions, record=True):
            return self.model(*args, **kwargs)

    forward = __call__

    @property
    def last_generation(self) -> GenerationRecord | None:
        """The latest generation this wrapper started with its methods (a ``generate`` call, or a forward call whose
        cache started empty), as a read-only :class:`~vlm_guard.core.generations.GenerationRecord`: its ``prompt`` and
        its methods' per-generation ``states`` by name, e.g. ``guarded.last_generation.states["var"].sink_mask``
        (VAR's sinks), ``.states["gift"].saliency``, ``.states["vhr"].selected``. None before any. A call that
        continues the generation's cache keeps it; plain calls (:meth:`disabled`, no method on), the methods' side
        passes and contrast passes, and :meth:`interventions_active` blocks do not replace it."""
        generation = self.engine.last_started
        return None if generation is None else generation.record

    @contextlib.contextmanager
    def disabled(self) -> Iterator[GuardedModel]:
        """Run the plain model inside the block (in the calling thread only); restores the previous state in ``finally``."""
        self._check_wrapped()
        previous = self.engine.enabled
        self.engine.enabled = False
        try:
            yield self
        finally:
            self.engine.enabled = previous

    @contextlib.contextmanager
    def interventions_active(self, interventions: list[Intervention]) -> Iterator[None]:
        """Run extra interventions (e.g. profiling recorders) inside the block."""
        self._check_wrapped()
        with self._call_lock, self.engine.activate(interventions):
            yield

    @contextlib.contextmanager
    def observing(self, *observers: Intervention) -> Iterator[None]:
        """Run read-only observers (a recorder, a profiler: :class:`Intervention` objects that never edit) after the
        methods in every guarded call inside the block (see :meth:`vlm_guard.core.engine.GuardEngine.add_observer`).
        The block holds the wrapper's call lock, so calls from other threads wait and never see the observers; a call
        that runs no method runs no observer either (use :meth:`interventions_active` for those)."""
        self._check_wrapped()
        with self._call_lock, self.engine.observing(*observers):
            yield

    def unwrap(self) -> nn.Module:
        """Remove every trace of the wrapper and return the model with its original attention.

        The wrapper cannot be used afterwards (its calls raise ``RuntimeError``); calling ``unwrap`` again is harmless.
        """
        with self._call_lock:
            self.engine.uninstall()
            self._unwrapped = True
        return self.model

    # ------------------------------------------------------------------ drop-in behaviour
    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: pass through to the model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        methods = ",".join(self.guard_config.enabled_methods) or "none"
        state = ", unwrapped" if self.__dict__.get("_unwrapped") else ""
        return f"GuardedModel({type(self.model).__name__}, family={self.adapter.family}, methods={methods}{state})"


@contextlib.contextmanager
def processors_first(model: nn.Module, first: list) -> Iterator[None]:
    """Inside the block, ``model.generate`` puts the processors ``first`` (objects of this call) ahead of its own
    (repetition penalty, ...) and of the warpers, instead of after them where transformers merges a call's
    ``logits_processor``. One instance attribute wraps ``model._get_logits_processor`` and is removed on exit; a list
    without those objects (a plain call from another thread) is left as it is."""
    original = getattr(model, "_get_logits_processor", None)
    if not first or original is None:
        if first:
            logger.warning(
                "this transformers version has no GenerationMixin._get_logits_processor: %s run after "
                "generate's own logits processors",
                [type(p).__name__ for p in first],
            )
        yield
        return
    own = model.__dict__.get("_get_logits_processor")

    def reordered(*args, **kwargs):
        processors = original(*args, **kwargs)
        ours = [p for p in processors if any(p is mine for mine in first)]
        if not ours:
            return processors
        return LogitsProcessorList([*ours, *(p for p in processors if not any(p is mine for mine in ours))])

    model.__dict__["_get_logits_processor"] = reordered
    try:
        yield
    finally:
        if own is not None:
            model.__dict__["_get_logits_processor"] = own
        else:
            model.__dict__.pop("_get_logits_processor", None)


def as_head_map(head_map):
    """``head_map`` as a :class:`vlm_guard.calibration.HeadMap`: a map is returned as is, a folder path (``str`` or
    ``os.PathLike``) is read with ``HeadMap.from_pretrained``, None stays None.

    Raises:
        ValueError: anything else (the message says what to pass).
        FileNotFoundError / HeadMapFileError: the folder holds no readable head map.
    """
    if head_map is None:
        return None
    from vlm_guard.calibration.head_map import HeadMap

    if isinstance(head_map, HeadMap):
        return head_map
    if isinstance(head_map, (str, os.PathLike)):
        return HeadMap.from_pretrained(head_map)
    raise ValueError(
        f"head_map must be a vlm_guard.calibration.HeadMap, the folder it was saved to, or None; got "
        f"{type(head_map).__name__}. Load one with HeadMap.from_pretrained(folder)."
    )


def wrap(
    model: nn.Module, processor=None, config: GuardConfig | str | None = None, head_map=None, task: str | None = None
) -> GuardedModel:
    """Wrap ``model`` so that ``generate`` runs the methods in ``config``.

    When ``head_map`` is None a map for this model is looked up (:func:`vlm_guard.calibration.head_map.find_head_map`): a
    tuned map in the head-map cache (see :func:`vlm_guard.calibration.default_cache_dir`), then the one shipped with the
    package (the default model's, with its tuned settings), then a calibrated, untuned map in the cache (a tuned map
    is preferred, with a warning when it hides a calibrated one; pass ``head_map`` to choose); methods that need one
    and find none say so.

    Args:
        model: a Hugging Face VLM of a supported family (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
            Idefics3/SmolVLM).
        processor: its processor.
        config: a :class:`GuardConfig` or a method list (``"auto"``: the set tuned for this model, else PAI);
            default: every method off. Fields it leaves unset take the head map's tuned values.
        head_map: a :class:`vlm_guard.calibration.HeadMap`, the folder it was saved to (``vlm-guard calibrate --out``), or None.
        task: the task profile of the head map's tuned settings: ``"caption"`` (free-form descriptions) or
            ``"answer"`` (short answers); ``config="auto:caption"`` says the same. None: the map's default profile.
            :meth:`GuardedModel.describe_settings` says which profile ran.

    Returns:
        a :class:`GuardedModel`.
    """
    from vlm_guard.settings import check_task

    task = check_task(task)  # an unknown task fails before any lookup
    if head_map is None:
        head_map = _find_cached_head_map(model, processor)
    return GuardedModel(model, processor, config, head_map, task=task)  # atomic: on error the model is left unwrapped


def _find_cached_head_map(model, processor):
    try:
        from vlm_guard.calibration.head_map import find_head_map
    except ImportError:
        return None
    return find_head_map(
        get_adapter(model, processor)
    )  # a tuned map first (cache, then shipped), else a calibrated one
