"""What a forward call is: generations tracked by cache position, the call, the active scope.

Generations are tracked by cache position, not by the shape of a call: a forward call whose cache is
empty starts a generation (its prompt is read from ``input_ids``); a call that extends the cache of the
current generation continues it (one token, several tokens, a chunk); a ``use_cache=False`` step inside
``generate`` recomputes it; a call that continues a cache this engine did not start, or passes only
embeddings, gets one warning and runs the plain model (see :class:`Generation`).

The pieces, from the outside in:

- :class:`Frame`: the active scope, one per :meth:`GuardEngine.activate` block (nested for side passes), on a
  per-thread stack: the interventions it runs and the :class:`LayerPlan` of each layer they act on.
- :class:`Generation`: a prompt whose cache started empty, and every later call that extends that cache; it holds
  the interventions' per-generation states (what each :meth:`Intervention.begin` returned, handed to the hooks through
  :meth:`LayerContext.state`), and its decoding plan (the layers still acting after the prefill,
  :meth:`Intervention.decode_layers`) is sorted once. :class:`GenerationRecord` is its public read view
  (``GuardedModel.last_generation``: the prompt and the methods' states by name).
- :class:`CallState`: one forward call of a generation, decided once by the model's forward pre-hook
  (:meth:`GenerationTracking._on_model_forward`) and read by every layer; it builds each layer's
  :class:`~vlm_guard.core.contract.LayerContext` once.

:class:`GenerationTracking` is the part of :class:`~vlm_guard.core.engine.GuardEngine` that makes these decisions
(the engine mixes it in; it uses the engine's ``adapter``, ``geometry``, per-thread state and layer-hook
bookkeeping).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from vlm_guard.core.contract import Intervention, LayerContext, PromptContext
from vlm_guard.models.compat import output_cache

logger = logging.getLogger(__name__)


@dataclass
class LayerPlan:
    """What runs at one decoder layer, sorted once per call kind (prefill, decode) instead of at every layer call.

    Attributes:
        interventions: every method active at the layer, in registration order.
        explicit: those that read scores or weights (explicit rows).
        head_output / layer_input: those that edit per-head outputs / read the layer input.
    """

    interventions: tuple
    explicit: tuple
    head_output: tuple
    layer_input: tuple


def layer_plans(interventions, layers_of, decoding: bool = False) -> dict[int, LayerPlan]:
    """``{layer: LayerPlan}`` for ``interventions``, each acting at ``layers_of(intervention)``; ``decoding``: the plan
    of the calls after a prefill (layer-input readers only where ``Intervention.layer_input_while_decoding``)."""
    by_layer: dict[int, list[Intervention]] = {}
    for intervention in interventions:
        for layer in layers_of(intervention):
            by_layer.setdefault(layer, []).append(intervention)
    return {
        layer: LayerPlan(
            interventions=tuple(users),
            explicit=tuple(i for i in users if i.uses_scores or i.uses_weights),
            head_output=tuple(i for i in users if i.uses_head_output),
            layer_input=tuple(
                i for i in users if i.uses_layer_input and (i.layer_input_while_decoding or not decoding)
            ),
        )
        for layer, users in by_layer.items()
    }


def reads_layer_input(plan: dict) -> bool:
    """Whether a ``{layer: LayerPlan}`` has a method that reads a layer's input (its calls need the layer hooks)."""
    return any(layer_plan.layer_input for layer_plan in plan.values())


@dataclass(frozen=True)
class GenerationRecord:
    """The public read view of one generation (``GuardedModel.last_generation``).

    Attributes:
        prompt: the prompt context of the generation (ids, mask, image and query spans, the prefill's inputs).
        states: ``{method name: state}`` what each method's :meth:`Intervention.begin` returned for this generation
            (``VARState``, ``GIFTState`` ...; None for a method that keeps none), in run order; observers and side
            passes are not in it. The state objects are the ones the hooks fill during the prefill, so after it they
            hold what the methods computed (VAR's ``sink_mask``, GIFT's ``saliency``, VHR's ``selected`` heads ...);
            a later generation gets new ones and leaves these as they are.
    """

    prompt: PromptContext
    states: Mapping[str, Any]

    def __repr__(self) -> str:  # tensors as shapes: the default repr prints every value of every mask and matrix
        states = ", ".join(f"{name!r}: {brief(state)}" for name, state in self.states.items())
        return f"GenerationRecord(prompt={brief(self.prompt)}, states={{{states}}})"


def brief(value: Any, depth: int = 0) -> str:
    """A short readable form of a state value: tensors as ``Tensor[shape] dtype``, long mappings and sequences cut
    to their first items with a count, dataclasses field by field (two levels deep)."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if depth >= 2:
            return f"{type(value).__name__}(...)"
        inner = ", ".join(f"{f.name}={brief(getattr(value, f.name), depth + 1)}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({inner})"
    if isinstance(value, Mapping):
        items = list(value.items())
        shown = ", ".join(f"{key!r}: {brief(item, depth + 1)}" for key, item in items[:3])
        return "{" + shown + (f", ... ({len(items)} entries)" if len(items) > 3 else "") + "}"
    if isinstance(value, (list, tuple)):
        opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
        shown = ", ".join(brief(item, depth + 1) for item in value[:3])
        return f"{opening}{shown}" + (f", ... ({len(value)} items)" if len(value) > 3 else "") + closing
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Generation:
    """One generation: a prompt whose cache started empty, and every later call that extends that cache.

    Attributes:
        prompt: the prompt context; None when it cannot be known (embeddings only, a cache this wrapper did
            not start): every call of the generation then runs the plain model.
        interventions: the methods this generation runs (its identity: a call with other methods does not continue it).
        cache: weak reference to the key/value cache the generation extends (None until the first call returns).
        began: the interventions whose :meth:`Intervention.begin` ran for this generation (methods, then observers),
            in order; holding them keeps the ids of ``states`` theirs.
        states: ``{id(intervention): state}`` what each of them returned from ``begin`` (handed to the hooks as
            :attr:`LayerContext.states`, read with :meth:`LayerContext.state`).
        record: the public read view (:class:`GenerationRecord`), made once the methods began.
    """

    prompt: PromptContext | None
    interventions: tuple
    cache: weakref.ref | None = None
    decode_plan: dict | None = None  # {layer: LayerPlan} for the calls after the prefill (set at its end)
    began: tuple = ()
    states: dict = field(default_factory=dict)
    record: GenerationRecord | None = None

    def owns(self, cache) -> bool:
        return cache is not None and self.cache is not None and self.cache() is cache

    def state_of(self, intervention: Intervention) -> Any:
        """The state ``intervention`` returned from ``begin`` in this generation (None: none, or it did not run)."""
        return self.states.get(id(intervention))

    def begin(self, interventions, engine) -> None:
        """Run :meth:`Intervention.begin` of each of ``interventions`` (the frame's methods, then its observers) and
        keep what each returned; then make the public :attr:`record` (the methods' states by name)."""
        for intervention in interventions:
            self.states[id(intervention)] = intervention.begin(self.prompt, engine)
        self.began = tuple(interventions)
        by_name: dict[str, Any] = {}
        for method in self.interventions:
            by_name.setdefault(method.name, self.states.get(id(method)))
        self.record = GenerationRecord(self.prompt, MappingProxyType(by_name))


@dataclass
class CallState:
    """One forward call, decided once by the model's pre-hook and read by every layer.

    Attributes:
        generation: the generation the call belongs to.
        past_length: tokens already in the cache (absolute position of the call's first row).
        phase: ``"prefill"`` for the call that starts the generation, ``"decode"`` for every later one.
        row_cache: row masks shared by the layers of this call (see :class:`LayerContext`).
        plan: ``{layer: LayerPlan}`` the layers where methods act in this call.
        contexts: the :class:`LayerContext` of each layer of this call.
    """

    generation: Generation
    past_length: int
    phase: str
    row_cache: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    contexts: dict = field(default_factory=dict)


@dataclass
class Frame:
    """The interventions of one (possibly nested) forward or generate call and their prompt state.

    Attributes:
        interventions: every intervention the frame runs: its methods, then the engine's observers.
        methods: the methods only (what a generation is started with and continued by).
        known_prompt: ``(input_ids, attention_mask)`` given to ``generate`` (lets a prefill that passes only
            embeddings or prepared masks be placed).
        generation: the generation started inside this frame (``use_cache=False`` steps recompute it).
        call: the current forward call; None when it runs the plain model.
        record: whether a generation started in this frame becomes the engine's :attr:`last_started` (the wrapper's
            ``generate`` and forward calls; not side passes, contrast passes or ``interventions_active`` blocks).
    """

    interventions: list[Intervention]
    by_layer: dict[int, list[Intervention]] = field(default_factory=dict)
    plan: dict = field(default_factory=dict)  # {layer: LayerPlan} of every layer a method may act on
    known_prompt: tuple | None = None
    known_images: dict = field(
        default_factory=dict
    )  # the generate call's image tensors (see PromptContext.image_inputs)
    generation: Generation | None = None
    call: CallState | None = None
    call_generation: Generation | None = None  # the generation of the current call (also when it runs plain)
    warned_no_image: bool = False
    layer_hooks: tuple = ()  # the layers whose layer-input hook this frame uses
    layer_hooks_held: bool = False  # whether it holds them now (released after a prefill when decoding needs none)
    methods: tuple | None = None  # None: every intervention is a method (no observer joined)
    record: bool = False

    def __post_init__(self) -> None:
        if self.methods is None:
            self.methods = tuple(self.interventions)
        self.plan = layer_plans(self.interventions, lambda intervention: intervention.layers())
        self.by_layer = {layer: list(plan.interventions) for layer, plan in self.plan.items()}

    @property
    def prompt(self) -> PromptContext | None:
        """The prompt context of the current call (None when it runs the plain model)."""
        return self.call.generation.prompt if self.call is not None else None


def extends(input_ids: torch.Tensor, prompt_ids: torch.Tensor) -> bool:
    """Whether ``input_ids [B, S + n]`` is the prompt ``[B, S]`` followed by ``n >= 1`` more tokens."""
    if input_ids.ndim != 2 or input_ids.shape[0] != prompt_ids.shape[0] or input_ids.shape[1] <= prompt_ids.shape[1]:
        return False
    return bool(torch.equal(input_ids[:, : prompt_ids.shape[1]], prompt_ids.to(input_ids.device)))


def prompt_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor | None:
    """``[B, S]`` validity of a prompt's positions from whatever mask the forward call got: a 2-D mask, a
    prepared 4-D mask (bool, or additive float) or a dict of them per layer type (the last row of a causal
    prompt mask sees every real position); None when there is none."""
    batch, seq = input_ids.shape
    if isinstance(attention_mask, dict):
        full = attention_mask.get("full_attention")
        attention_mask = (
            full
            if full is not None
            else next((m for m in attention_mask.values() if isinstance(m, torch.Tensor)), None)
        )
    if not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.ndim == 2 and attention_mask.shape == (batch, seq):
        return attention_mask
    if attention_mask.ndim == 4 and attention_mask.shape[-1] >= seq and attention_mask.shape[0] in (1, batch):
        last_row = attention_mask[:, 0, -1, :seq]  # [B|1, S]
        valid = last_row if last_row.dtype == torch.bool else last_row == 0
        return valid.expand(batch, seq).long()
    return None


def past_length(cache, kwargs: dict) -> int:
    """Tokens already in the cache. A dynamic cache's length is a shape, read without waiting on the device;
    otherwise (a static cache, whose length is a count over its slots) ``cache_position[0]`` when given (4.57),
    else the cache's length."""
    if cache is not None and hasattr(cache, "get_seq_length") and not getattr(cache, "is_compileable", True):
        return int(cache.get_seq_length())
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


class GenerationTracking:
    """The engine's decisions about calls: which frame is active in this thread, what each forward call is
    (the start of a generation, a continuation, or a call that runs plain), and each layer's context.

    Mixed into :class:`~vlm_guard.core.engine.GuardEngine`, whose ``__init__`` sets the attributes used here
    (``adapter``, ``geometry``, ``_thread_state``, ``_generation``, ``last_started``) and which provides
    ``_hold_layer_hooks``.
    """

    @property
    def enabled(self) -> bool:
        """Whether interventions run in the calling thread (``GuardedModel.disabled`` switches it off there only)."""
        return getattr(self._thread_state, "enabled", True)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._thread_state.enabled = bool(value)

    @property
    def _frames(self) -> list[Frame]:
        """The calling thread's stack of active frames (a forward in another thread never sees them)."""
        frames = getattr(self._thread_state, "frames", None)
        if frames is None:
            frames = self._thread_state.frames = []
        return frames

    def _current(self) -> Frame | None:
        state = self._thread_state  # read once: this runs at every layer
        frames = getattr(state, "frames", None)
        if not frames or not getattr(state, "enabled", True):
            return None
        frame = frames[-1]
        return frame if frame.interventions else None

    def continued_prompt(self, cache, interventions) -> PromptContext | None:
        """The prompt of the generation that ``cache`` continues, when this engine started it with ``interventions``
        (what a ``generate`` call that continues the wrapper's cache runs in); None otherwise."""
        generation = self._generation
        if (
            cache is None
            or generation is None
            or not generation.owns(cache)
            or generation.interventions != tuple(interventions)
        ):
            return None
        return generation.prompt

    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        """Decide once per forward call what it is: the start of a generation (the cache is empty), a
        continuation of the generation that owns the cache, or a call whose prompt context cannot be known
        (one warning, the plain model runs)."""
        frame = self._current()
        if frame is None:
            return None
        frame.call = None
        frame.call_generation = None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None and not isinstance(input_ids, torch.Tensor):
            input_ids = None
        past = past_length(cache, kwargs)
        interventions = frame.methods
        if past > 0:
            generation = self._generation
            if generation is None or not generation.owns(cache) or generation.interventions != interventions:
                logger.warning(
                    "vlm_guard: this call continues a cache of %d tokens that this wrapper did not start with the "
                    "current methods (a prefix cache built elsewhere, another generation's cache, or methods changed "
                    "since), so its prompt and image positions are unknown; the plain model runs for the rest of this "
                    "cache. Start the cache through the wrapper (guarded(...) or guarded.generate(...)) to run the methods.",
                    past,
                )
                self._register(Generation(None, interventions), cache)
                return None
            frame.call_generation = generation
            if generation.prompt is None:
                return None
            if past < generation.prompt.prompt_length:
                logger.warning(
                    "vlm_guard: the cache was cut back to %d tokens, inside its prompt of %d; the methods' per-sample "
                    "state no longer matches, so the plain model runs for the rest of this cache.",
                    past,
                    generation.prompt.prompt_length,
                )
                self._register(Generation(None, interventions), cache)
                return None
            frame.call = CallState(generation, past, "decode", plan=self._decode_plan(frame, generation))
            self._hold_layer_hooks(frame, reads_layer_input(frame.call.plan))
            return None
        generation = frame.generation
        if (
            cache is None
            and generation is not None
            and generation.prompt is not None
            and input_ids is not None
            and extends(input_ids, generation.prompt.input_ids)
        ):
            # generate(use_cache=False): every step recomputes the whole sequence of the same generation
            frame.call = CallState(generation, 0, "decode", plan=self._decode_plan(frame, generation))
            frame.call_generation = generation
            self._hold_layer_hooks(frame, reads_layer_input(frame.call.plan))
            return None
        prompt = self._new_prompt(frame, input_ids, kwargs)
        generation = Generation(prompt, interventions)
        frame.generation = generation
        frame.call_generation = generation
        if prompt is None:
            return None
        frame.call = CallState(generation, 0, "prefill", plan=frame.plan)
        self._hold_layer_hooks(frame, True)  # released after an earlier prefill of this frame
        spans = prompt.spans
        if not prompt.all_have_image and any(i.needs_image for i in frame.interventions) and not frame.warned_no_image:
            missing = (~spans.has_image).nonzero().flatten().tolist()
            logger.warning(
                "prompt rows %s contain no image token (id %d): image-dependent interventions are skipped for them.",
                missing,
                self.adapter.image_token_id,
            )
            frame.warned_no_image = True
        generation.begin(frame.interventions, self)
        if frame.record:
            self.last_started = generation
        return None

    def _new_prompt(self, frame: Frame, input_ids: torch.Tensor | None, kwargs: dict) -> PromptContext | None:
        """The prompt context of a call that starts a generation, or None (with one warning) when the call
        passes only embeddings that no ``generate`` input_ids describe."""
        embeds = kwargs.get("inputs_embeds")
        known_ids, known_mask = frame.known_prompt if frame.known_prompt is not None else (None, None)
        if (
            input_ids is None
            and embeds is not None
            and known_ids is not None
            and tuple(known_ids.shape) == tuple(embeds.shape[:2])
        ):
            input_ids = known_ids
        if input_ids is None:
            logger.warning(
                "vlm_guard needs input_ids to find image positions; this call passed only embeddings, so the plain "
                "model runs it (and the calls that continue its cache). Pass input_ids as well to run the methods."
            )
            return None
        attention_mask = prompt_mask(kwargs.get("attention_mask"), input_ids)
        if (
            attention_mask is None
            and known_ids is not None
            and known_mask is not None
            and known_ids.shape == input_ids.shape
        ):
            attention_mask = known_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        spans = self.adapter.prompt_spans(input_ids, attention_mask)
        # the cache stays out: the generation holds it only by a weak reference
        model_inputs = {key: value for key, value in kwargs.items() if key not in ("cache", "past_key_values")}
        image_inputs = {
            key: model_inputs[key] for key in self.adapter.image_input_keys if model_inputs.get(key) is not None
        }
        if (
            image_inputs.get("pixel_values") is None
            and known_ids is not None
            and tuple(known_ids.shape) == tuple(input_ids.shape)
        ):
            image_inputs = dict(frame.known_images)
        return PromptContext(
            input_ids=input_ids,
            attention_mask=attention_mask,
            spans=spans,
            model_inputs=model_inputs,
            image_inputs=image_inputs,
        )

    def _decode_plan(self, frame: Frame, generation: Generation) -> dict:
        """The layer plan of the calls after a prefill: each method at its :meth:`Intervention.decode_layers`
        (asked once per generation, when its prefill ends)."""
        if generation.decode_plan is None:
            states = generation.states
            generation.decode_plan = layer_plans(
                frame.interventions,
                lambda intervention: intervention.decode_layers(states.get(id(intervention))),
                decoding=True,
            )
        return generation.decode_plan

    def _after_model_forward(self, module: nn.Module, args: tuple, kwargs: dict, output):
        frame = self._current()
        if frame is None or frame.call_generation is None:
            return None
        if frame.call is not None and frame.call.phase == "prefill":
            frame.call.generation.decode_plan = None
            plan = self._decode_plan(frame, frame.call.generation)  # the methods' per-sample state is complete now
            if not reads_layer_input(plan):
                self._hold_layer_hooks(frame, False)  # the decoding steps take the layers' fast call path
        self._register(frame.call_generation, output_cache(output))
        return None

    def _register(self, generation: Generation, cache) -> None:
        """Make ``generation`` the owner of ``cache`` (calls that extend it continue the generation)."""
        if cache is None:
            return
        if not generation.owns(cache):
            try:
                generation.cache = weakref.ref(cache)
            except TypeError:  # a legacy tuple cache: every later call is unknown (plain, with a warning)
                return
        self._generation = generation

    def _layer_context(self, call: CallState, layer: int, query_length: int, key_length: int) -> LayerContext:
        """The layer's context, built once per call (the layer-input hook and the attention share it)."""
        ctx = call.contexts.get(layer)
        if ctx is not None and ctx.key_length == key_length and ctx.query_length == query_length:
            return ctx
        prompt = call.generation.prompt
        step = 0 if call.phase == "prefill" else max(0, call.past_length + query_length - prompt.prompt_length)
        ctx = call.contexts[layer] = LayerContext(
            layer=layer,
            phase=call.phase,
            step=step,
            prompt=prompt,
            query_length=query_length,
            key_length=key_length,
            num_heads=self.geometry.num_heads,
            num_kv_heads=self.geometry.num_kv_heads,
            past_length=call.past_length,
            _cache=call.row_cache,
            states=call.generation.states,
        )
        return ctx
