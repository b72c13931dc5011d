"""The guarded attention engine.

One attention function (and its mask function) is registered in transformers' ``AttentionInterface``
under a name unique to this engine, and set on the text backbone's config only: the vision tower keeps
its own implementation. Layers where no intervention is active call the model's original
implementation (SDPA or eager) with the original arguments, so with every method off the outputs are
bit-identical to the plain model. Intervening layers compute explicit fp32 weights only for the query
rows an intervention asks for, and splice them into the original output.

Generations are tracked by cache position, not by the shape of a call: a forward call whose cache is
empty starts a generation (its prompt is read from ``input_ids``); a call that extends the cache of the
current generation continues it (one token, several tokens, a chunk); a ``use_cache=False`` step inside
``generate`` recomputes it; a call that continues a cache this engine did not start, or passes only
embeddings, gets one warning and runs the plain model (see :class:`Generation`).

Hot path (a decoding step). What can be decided once is: which layers each method acts on is sorted
into a :class:`LayerPlan` once per frame, and again once per generation right after its prefill
(:meth:`Intervention.decode_layers`: a layer whose edit is the identity for this sample, such as VHR
with no head chosen or VAR with no sink, leaves the plan), so every other layer calls the model's own
attention and dispatches exactly its operations; the methods' key matrices, head scales and masks are
built at the prefill; layer-input hooks exist only while a frame needs them (a method that reads the layer input
at the prefill only, like VAR, has them removed for the decoding steps). Nothing in a step reads a
tensor's value: a method asks for every row with :data:`~vlm_guard.core.contract.EVERY_ROW`, and
prompt-level facts (every sample has an image) are Python values read once at the prefill
(``tests/test_hot_path.py`` runs a step of every method under a mode that fails on ``.item()``,
``bool(tensor)``, ``.tolist()``, ``nonzero`` ...).

Memory of long prompts: a prefill's explicit rows (VAR edits every text row after the image, GIFT reads
the query rows of its saliency layer) are computed in chunks of rows, so that one chunk's fp32 scores
``[B, H, rows, K]`` hold about as many elements as the prompt's hidden states ``[B, S, M]``
(``EXPLICIT_CHUNK_RATIO``); each row's result is the same as computed whole (GIFT accumulates its
saliency over the chunks of its layer). ``GuardEngine.chunk_rows`` fixes the chunk size (tests).

All state lives on the engine (and so on the wrapper that owns it): two engines on two models do not
interfere, and :meth:`GuardEngine.uninstall` restores the model exactly (implementation name, hooks,
registry entries).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from vlm_guard.models.base import ModelAdapter
from vlm_guard.models.compat import output_cache
from vlm_guard.core.contract import EVERY_ROW, Intervention, LayerContext, PromptContext, RowSelection

EVERY_ROW_SELECTION = RowSelection(index=None, mask=None)  # every row of every sample (a decoding step), shared

logger = logging.getLogger(__name__)

SUPPORTED_BASE_IMPLEMENTATIONS = ("sdpa", "eager")
# elements of one chunk of explicit prefill scores ``[B, H, rows, K]`` per element of the prompt's hidden states
# ``[B, S, M]``: a chunk of rows is then no larger than one hidden-state tensor of the prompt (the model holds
# many of those), so the explicit rows of a long prompt add little to the plain model's peak memory
EXPLICIT_CHUNK_RATIO = 1.0
MIN_CHUNK_ELEMENTS = 1 << 16
# model attributes that a forward call may overwrite as a side effect (Qwen2-VL caches its M-RoPE deltas)
_FORWARD_STATE_ATTRIBUTES = ("rope_deltas",)


COMPILE_REASON = (
    "vlm_guard's methods run outside torch.compile graphs (they read per-generation state: the cache length, the "
    "prompt's image positions, the heads chosen at the prefill). Compile with fullgraph=False (the default; "
    "transformers' CompileConfig default too): each method's hooks and the attention of the layers it edits then run "
    "eagerly and the rest of the model compiled, with the eager tokens; or switch the methods off "
    "(guarded.disabled(), or unwrap()) to compile the whole graph. See docs/compile.md."
)


def _eager(function):
    """``function`` run eagerly under ``torch.compile`` (a graph break there; with ``fullgraph=True`` the compiler's
    error names :data:`COMPILE_REASON`)."""
    try:
        return torch.compiler.disable(function, reason=COMPILE_REASON)
    except TypeError:  # torch before 2.7 takes no reason (its error then names the function only)
        return torch.compiler.disable(function)


class StopForward(Exception):
    """Raised by :meth:`GuardEngine.side_pass` to end a forward call right after a given decoder layer."""


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
            layer_input=tuple(i for i in users if i.uses_layer_input and (i.layer_input_while_decoding or not decoding)),
        )
        for layer, users in by_layer.items()
    }


def reads_layer_input(plan: dict) -> bool:
    """Whether a ``{layer: LayerPlan}`` has a method that reads a layer's input (its calls need the layer hooks)."""
    return any(layer_plan.layer_input for layer_plan in plan.values())


@dataclass
class Generation:
    """One generation: a prompt whose cache started empty, and every later call that extends that cache.

    Attributes:
        prompt: the prompt context; None when it cannot be known (embeddings only, a cache this wrapper did
            not start): every call of the generation then runs the plain model.
        interventions: the methods whose per-sample state (chosen heads, sinks, saliency) this generation set.
        cache: weak reference to the key/value cache the generation extends (None until the first call returns).
    """

    prompt: PromptContext | None
    interventions: tuple
    cache: weakref.ref | None = None
    decode_plan: dict | None = None  # {layer: LayerPlan} for the calls after the prefill (set at its end)

    def owns(self, cache) -> bool:
        return cache is not None and self.cache is not None and self.cache() is cache


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
        known_prompt: ``(input_ids, attention_mask)`` given to ``generate`` (lets a prefill that passes only
            embeddings or prepared masks be placed).
        generation: the generation started inside this frame (``use_cache=False`` steps recompute it).
        call: the current forward call; None when it runs the plain model.
    """

    interventions: list[Intervention]
    by_layer: dict[int, list[Intervention]] = field(default_factory=dict)
    plan: dict = field(default_factory=dict)  # {layer: LayerPlan} of every layer a method may act on
    known_prompt: tuple | None = None
    known_images: dict = field(default_factory=dict)  # the generate call's image tensors (see PromptContext.image_inputs)
    generation: Generation | None = None
    call: CallState | None = None
    call_generation: Generation | None = None  # the generation of the current call (also when it runs plain)
    warned_no_image: bool = False
    layer_hooks: tuple = ()  # the layers whose layer-input hook this frame uses
    layer_hooks_held: bool = False  # whether it holds them now (released after a prefill when decoding needs none)

    def __post_init__(self) -> None:
        self.plan = layer_plans(self.interventions, lambda intervention: intervention.layers())
        self.by_layer = {layer: list(plan.interventions) for layer, plan in self.plan.items()}

    @property
    def prompt(self) -> PromptContext | None:
        """The prompt context of the current call (None when it runs the plain model)."""
        return self.call.generation.prompt if self.call is not None else None


def save_forward_state(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """Attributes a forward call may overwrite (see ``_FORWARD_STATE_ATTRIBUTES``), to restore after a side pass."""
    saved = []
    for module in (model, getattr(model, "model", None)):
        if module is None:
            continue
        for name in _FORWARD_STATE_ATTRIBUTES:
            if name in getattr(module, "__dict__", {}):
                saved.append((module, name, module.__dict__[name]))
    return saved


def restore_forward_state(saved: list[tuple[nn.Module, str, object]]) -> None:
    for module, name, value in saved:
        setattr(module, name, value)


def _grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float = 1.0, zero: torch.Tensor | None = None) -> torch.Tensor:
    """``scaling * q k^T`` without materialising repeated keys (one ``baddbmm`` over views).

    Args:
        query: ``[B, H, R, D]`` fp32.
        key: ``[B, KVH, K, D]`` fp32.
    Returns:
        ``[B*KVH, G*R, K]`` (``G = H / KVH``), the memory of ``[B, H, R, K]``.
    """
    batch, num_heads, rows, dim = query.shape
    num_kv_heads, keys = key.shape[1], key.shape[2]
    grouped = query.reshape(batch * num_kv_heads, (num_heads // num_kv_heads) * rows, dim)  # [B*KVH, groups*R, D]
    keys_t = key.reshape(batch * num_kv_heads, keys, dim).transpose(1, 2)  # [B*KVH, D, K]
    if scaling == 1.0:
        scores = torch.bmm(grouped, keys_t)
    else:  # the scale inside the product (beta=0: the input is not read, a 0-d tensor of the dtype will do)
        scores = torch.baddbmm(zero if zero is not None else grouped.new_zeros(()), grouped, keys_t, beta=0.0, alpha=scaling)
    return scores  # [B*KVH, groups*R, K]


def _grouped_output(weights: torch.Tensor, value: torch.Tensor, grouped: torch.Tensor | None = None) -> torch.Tensor:
    """``weights @ v`` for grouped heads in the model's layout: ``[B, H, R, K] x [B, KVH, K, D] -> [B, R, H, D]``
    (one row per head, a decoding step: a view of the product, no transpose). ``grouped``: the weights as
    ``[B*KVH, G*R, K]`` when the caller holds them so (no reshape)."""
    batch, num_heads, rows, keys = weights.shape
    num_kv_heads, dim = value.shape[1], value.shape[-1]
    if grouped is None:
        grouped = weights.reshape(batch * num_kv_heads, (num_heads // num_kv_heads) * rows, keys)
    product = torch.bmm(grouped, value.reshape(batch * num_kv_heads, keys, dim))  # [B*KVH, G*R, D]
    if rows == 1:
        return product.view(batch, 1, num_heads, dim)
    return product.view(batch, num_heads, rows, dim).transpose(1, 2)


def _place_window(key, value, attention_mask, missing: int, past_length: int, query_length: int):
    """Keys ``[B, KVH, K, D]`` of a sliding-window cache (the last ``K`` positions) padded on the left by ``missing``
    masked positions, so that key ``j`` is absolute position ``j``; the mask (bool, additive float, or None: causal
    from ``past_length``) likewise."""
    key = torch.nn.functional.pad(key, (0, 0, missing, 0))
    value = torch.nn.functional.pad(value, (0, 0, missing, 0))
    if attention_mask is not None and attention_mask.ndim == 4:
        fill = False if attention_mask.dtype == torch.bool else torch.finfo(attention_mask.dtype).min
        attention_mask = torch.nn.functional.pad(attention_mask[..., : key.shape[2] - missing], (missing, 0), value=fill)
    else:
        key_positions = torch.arange(key.shape[2], device=key.device)
        rows = torch.arange(query_length, device=key.device)[:, None] + past_length  # absolute position of each row
        attention_mask = ((key_positions[None, :] <= rows) & (key_positions[None, :] >= missing))[None, None]  # [1, 1, Q, K]
    return key, value, attention_mask


class GuardEngine:
    """Installs the guarded attention on one model and runs interventions inside :meth:`activate`.

    Args:
        model: the VLM.
        adapter: its family adapter.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter):
        self.model = model
        self.adapter = adapter
        self.name = f"vlm_guard_{id(self):x}"
        self._thread_state = threading.local()  # frames and the on/off switch are per thread
        self._hooks: list = []
        # the model's hooks and the layer-input hooks exist only while a frame needs them (a module with hooks takes
        # torch's slower call path): "model" or a layer index -> [handles, frames using them]
        self._dynamic_hooks: dict[object, list] = {}
        self._dynamic_hooks_lock = threading.Lock()
        self._original_implementations: list[tuple[object, str]] = []
        self._layer_of: dict[int, int] = {}
        self._base_attention = None
        self._returns_weights = False
        self._generation: Generation | None = None  # the latest generation that holds the methods' per-sample state
        self._zeros: dict = {}  # device -> a 0-d fp32 zero (the unread input of the scores' baddbmm)
        self.chunk_rows: int | None = None  # rows per chunk of a prefill's explicit rows; None: from the memory budget
        # frames with methods active, in any thread: 0 lets a compiled graph take the base attention inline (the one
        # Python value torch.compile guards on here, so it compiles at most twice); the guarded path runs eagerly
        self._active_frames = 0
        # one object per hook, registered again and again (a compiled graph guards on the hooks' identity)
        self._model_pre_hook = _eager(self._on_model_forward)
        self._model_post_hook = _eager(self._after_model_forward)
        self._layer_hook_functions: dict[int, object] = {}
        self._guarded_attention_eager = _eager(self._guarded_attention)
        self.installed = False
        self.geometry = adapter.geometry

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

    # ------------------------------------------------------------------ install / uninstall
    def install(self) -> None:
        if self.installed:
            return
        attention_modules = self.adapter.attention_modules()
        self._layer_of = {id(module): index for index, module in enumerate(attention_modules)}
        configs = {id(m.config): m.config for m in attention_modules if hasattr(m, "config")}
        text_model = self.adapter.text_model
        if hasattr(text_model, "config"):
            configs[id(text_model.config)] = text_model.config
        implementations = {config._attn_implementation for config in configs.values()}
        if len(implementations) != 1:
            raise ValueError(f"text backbone layers use several attention implementations: {sorted(map(str, implementations))}")
        original = implementations.pop() or "eager"
        if any(getattr(config, "_vlm_guard_engine", None) for config in configs.values()) or str(original).startswith("vlm_guard_"):
            raise ValueError("this model is already wrapped by vlm_guard; call unwrap() on the existing wrapper first.")
        base_implementation = original
        if original not in SUPPORTED_BASE_IMPLEMENTATIONS:
            logger.warning(
                "attn_implementation=%r is not supported by vlm_guard's explicit rows; the text backbone will run "
                "'sdpa' while wrapped (unwrap() restores %r).",
                original,
                original,
            )
            base_implementation = "sdpa"
        if base_implementation == "eager":
            module_namespace = sys.modules[type(attention_modules[0]).__module__]
            self._base_attention = module_namespace.eager_attention_forward
            self._returns_weights = True
        else:
            self._base_attention = ALL_ATTENTION_FUNCTIONS[base_implementation]
        AttentionInterface.register(self.name, self._attention)
        AttentionMaskInterface.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS[base_implementation])
        for config in configs.values():
            self._original_implementations.append((config, original))
            config._attn_implementation = self.name
        self.installed = True

    def uninstall(self) -> None:
        """Undo :meth:`install`, also a partial one that raised midway (everything installed is recorded as it goes)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        with self._dynamic_hooks_lock:
            for handles, _ in self._dynamic_hooks.values():
                for handle in handles:
                    handle.remove()
            self._dynamic_hooks.clear()
        for config, original in self._original_implementations:
            config._attn_implementation = original
        self._original_implementations.clear()
        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)
        self.installed = False

    # ------------------------------------------------------------------ frames
    @contextlib.contextmanager
    def activate(self, interventions: list[Intervention], known_prompt: tuple | None = None,
                 known_images: dict | None = None) -> Iterator[Frame]:
        """Run the enclosed forward / generate calls with ``interventions`` (nested calls allowed:
        an intervention's side pass runs inside its own frame).

        Args:
            interventions: the methods.
            known_prompt: ``(input_ids [B, S], attention_mask [B, S] or None)`` of a ``generate`` call, used
                when its prefill passes only embeddings or prepared (4-D / per-layer-type) masks.
            known_images: the image tensors of that ``generate`` call (kept with the generation it starts).
        """
        frame = Frame(list(interventions), known_prompt=known_prompt, known_images=dict(known_images or {}))
        # a frame without methods needs no hook (its calls run the plain model); one with methods needs the model's
        # hooks, and a layer-input hook where a method reads the layer input: taken by the model's pre-hook at a call that
        # needs them (a prefill, or a continuing call whose methods still read the layer input), not here, so that a
        # loop of single decoding calls (one frame each) runs its layers without them
        hooked = ["model"] if frame.interventions else []
        frame.layer_hooks = tuple(layer for layer, plan in frame.plan.items() if plan.layer_input)
        self._acquire_hooks(hooked)
        if frame.interventions:
            with self._dynamic_hooks_lock:
                self._active_frames += 1
        try:
            self._frames.append(frame)
            try:
                yield frame
            finally:
                self._frames.pop()
                for intervention in frame.interventions:
                    intervention.end()
        finally:
            if frame.interventions:
                with self._dynamic_hooks_lock:
                    self._active_frames -= 1
            self._hold_layer_hooks(frame, False)
            self._release_hooks(hooked)

    def _hold_layer_hooks(self, frame: Frame, hold: bool) -> None:
        """Acquire (``hold``) or release the frame's layer-input hooks, once: released after a prefill whose decoding
        steps read no layer input, acquired again when the frame starts another generation."""
        if hold != frame.layer_hooks_held and frame.layer_hooks:
            (self._acquire_hooks if hold else self._release_hooks)(list(frame.layer_hooks))
            frame.layer_hooks_held = hold

    def _acquire_hooks(self, keys: list) -> None:
        """Register the hooks of ``keys`` ("model", or a layer index) unless registered already; count the user."""
        if not keys:
            return
        with self._dynamic_hooks_lock:
            for key in keys:
                entry = self._dynamic_hooks.get(key)
                if entry is None:
                    if key == "model":
                        handles = [self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True),
                                   self.model.register_forward_hook(self._model_post_hook, with_kwargs=True)]
                    else:
                        layer = self.adapter.decoder_layers[key]
                        function = self._layer_hook_functions.get(key)
                        if function is None:
                            function = self._layer_hook_functions[key] = _eager(self._make_layer_hook(key))
                        handles = [layer.register_forward_pre_hook(function, with_kwargs=True)]
                    entry = self._dynamic_hooks[key] = [handles, 0]
                entry[1] += 1

    def _release_hooks(self, keys: list) -> None:
        with self._dynamic_hooks_lock:
            for key in keys:
                entry = self._dynamic_hooks.get(key)
                if entry is None:
                    continue
                entry[1] -= 1
                if entry[1] <= 0:
                    for handle in entry[0]:
                        handle.remove()
                    del self._dynamic_hooks[key]

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Plain model inside (used for contrast passes of the baselines)."""
        with self.activate([]) as frame:
            yield

    def side_pass(self, interventions: list[Intervention], model_inputs: dict, stop_after_layer: int | None = None):
        """One extra forward (no cache, no grad) with ``interventions`` only, e.g. to record something.

        Args:
            interventions: active during the pass (the caller's other methods are not).
            model_inputs: keyword arguments of the model's forward.
            stop_after_layer: end the pass right after this decoder layer (its later layers, the norm
                and the LM head are skipped); None runs the whole model.
        Returns:
            the model output, or None when the pass was stopped early.

        State a forward call caches on the model (Qwen2-VL's ``rope_deltas``) is restored afterwards: every
        side pass leaves the model exactly as it found it.
        """
        hook = None
        if stop_after_layer is not None:
            def stop(module, args, output):
                raise StopForward(stop_after_layer)

            hook = self.adapter.decoder_layers[stop_after_layer].register_forward_hook(stop)
        saved = save_forward_state(self.model)
        try:
            with torch.no_grad(), self.activate(interventions):
                try:
                    return self.model(**model_inputs, use_cache=False)
                except StopForward:
                    return None
        finally:
            if hook is not None:
                hook.remove()
            restore_forward_state(saved)

    def continued_prompt(self, cache, interventions) -> PromptContext | None:
        """The prompt of the generation that ``cache`` continues, when this engine started it with ``interventions``
        (what a ``generate`` call that continues the wrapper's cache runs in); None otherwise."""
        generation = self._generation
        if cache is None or generation is None or not generation.owns(cache) or generation.interventions != tuple(interventions):
            return None
        return generation.prompt

    def _current(self) -> Frame | None:
        state = self._thread_state  # read once: this runs at every layer
        frames = getattr(state, "frames", None)
        if not frames or not getattr(state, "enabled", True):
            return None
        frame = frames[-1]
        return frame if frame.interventions else None

    # ------------------------------------------------------------------ hooks
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
        past = self._past_length(cache, kwargs)
        interventions = tuple(frame.interventions)
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
                    past, generation.prompt.prompt_length,
                )
                self._register(Generation(None, interventions), cache)
                return None
            frame.call = CallState(generation, past, "decode", plan=self._decode_plan(frame, generation))
            self._hold_layer_hooks(frame, reads_layer_input(frame.call.plan))
            return None
        generation = frame.generation
        if (cache is None and generation is not None and generation.prompt is not None and input_ids is not None
                and _extends(input_ids, generation.prompt.input_ids)):
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
        for intervention in frame.interventions:
            intervention.begin(prompt, self)
        return None

    def _new_prompt(self, frame: Frame, input_ids: torch.Tensor | None, kwargs: dict) -> PromptContext | None:
        """The prompt context of a call that starts a generation, or None (with one warning) when the call
        passes only embeddings that no ``generate`` input_ids describe."""
        embeds = kwargs.get("inputs_embeds")
        known_ids, known_mask = frame.known_prompt if frame.known_prompt is not None else (None, None)
        if input_ids is None and embeds is not None and known_ids is not None and tuple(known_ids.shape) == tuple(embeds.shape[:2]):
            input_ids = known_ids
        if input_ids is None:
            logger.warning(
                "vlm_guard needs input_ids to find image positions; this call passed only embeddings, so the plain "
                "model runs it (and the calls that continue its cache). Pass input_ids as well to run the methods."
            )
            return None
        attention_mask = _prompt_mask(kwargs.get("attention_mask"), input_ids)
        if attention_mask is None and known_ids is not None and known_mask is not None and known_ids.shape == input_ids.shape:
            attention_mask = known_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        spans = self.adapter.prompt_spans(input_ids, attention_mask)
        # the cache stays out: the generation holds it only by a weak reference
        model_inputs = {key: value for key, value in kwargs.items() if key not in ("cache", "past_key_values")}
        image_inputs = {key: model_inputs[key] for key in self.adapter.image_input_keys if model_inputs.get(key) is not None}
        if image_inputs.get("pixel_values") is None and known_ids is not None and tuple(known_ids.shape) == tuple(input_ids.shape):
            image_inputs = dict(frame.known_images)
        return PromptContext(input_ids=input_ids, attention_mask=attention_mask, spans=spans, model_inputs=model_inputs,
                             image_inputs=image_inputs)

    def _decode_plan(self, frame: Frame, generation: Generation) -> dict:
        """The layer plan of the calls after a prefill: each method at its :meth:`Intervention.decode_layers`
        (asked once per generation, when its prefill ends)."""
        if generation.decode_plan is None:
            generation.decode_plan = layer_plans(frame.interventions, lambda intervention: intervention.decode_layers(),
                                                 decoding=True)
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

    @staticmethod
    def _past_length(cache, kwargs: dict) -> int:
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

    def _make_layer_hook(self, layer_index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            frame = self._current()
            call = frame.call if frame is not None else None
            plan = call.plan.get(layer_index) if call is not None else None
            if plan is None or not plan.layer_input:
                return None
            hidden_states = kwargs.get("hidden_states", args[0] if args else None)
            query_length = hidden_states.shape[1]
            ctx = self._layer_context(call, layer_index, query_length, call.past_length + query_length)
            for intervention in plan.layer_input:
                intervention.on_layer_input(ctx, hidden_states)
            return None

        return hook

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
        )
        return ctx

    # ------------------------------------------------------------------ attention
    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The registered attention function: the base implementation while no methods run in any thread (what
        ``torch.compile`` traces into its graph), else :meth:`_guarded_attention`, run eagerly."""
        if not self._active_frames:
            return self._base_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        guarded = self._guarded_attention_eager if torch.compiler.is_compiling() else self._guarded_attention
        return guarded(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    def _guarded_attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The attention while methods run. ``query [B, H, Q, D]``, ``key/value [B, KVH, K, D]``;
        returns ``([B, Q, H, D], weights)`` like transformers' implementations.

        ``weights`` is what the base implementation returns: None for SDPA; for eager, the ``[B, H, Q, K]``
        post-softmax weights, with a method's edits in the rows it edited (PAI, VAR, GIFT edit weights or
        scores; VHR scales head outputs, so its layers report the unedited weights). So
        ``output_attentions=True`` on an eager model gives one map per decoder layer, in layer order.

        Hot path (a decoding step): layers without a method in the call's plan return the base implementation
        at once; in the others every method asks for every row (:data:`EVERY_ROW`), so nothing here reads a
        tensor's value (no host-device synchronisation).
        """
        base = self._base_attention
        frame = self._current()
        call = frame.call if frame is not None else None
        layer = self._layer_of.get(id(module))
        plan = call.plan.get(layer) if call is not None else None
        if plan is None:
            return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        # a sliding-window layer's cache holds only the window's keys: the explicit rows place them at their positions
        key_length = max(key.shape[2], call.past_length + query.shape[2])
        ctx = self._layer_context(call, layer, query.shape[2], key_length)
        prompt = ctx.prompt
        has_image = prompt.spans.has_image  # [B]

        # which rows each method needs explicitly
        requests: list[tuple[Intervention, object]] = []
        every_row = True  # every request is EVERY_ROW: decided without reading a tensor
        for intervention in plan.explicit:
            rows = intervention.rows(ctx)
            if rows is None:
                continue
            if rows is EVERY_ROW:
                requests.append((intervention, ctx.image_rows() if intervention.needs_image and not prompt.all_have_image else None))
                continue
            every_row = False
            if intervention.needs_image:
                rows = rows & has_image[:, None]
            if bool(rows.any()):  # a mask of prompt rows (prefill, a recomputation): read once per layer there
                requests.append((intervention, rows))
        output = None
        weights = None
        if requests:
            if every_row:  # the decode hot path: all Q rows; a mixed image / no-image batch keeps edits on image rows
                index = None
                # [B, Q] image rows when every request keeps its edits there (a mixed batch), else None: every row
                wanted = None if any(rows is None for _, rows in requests) else requests[0][1]
                selections = [(intervention, EVERY_ROW_SELECTION if rows is None else RowSelection(index=None, mask=rows), rows is None)
                              for intervention, rows in requests]
            else:
                masks = [(intervention, torch.ones(has_image.shape[0], query.shape[2], dtype=torch.bool, device=has_image.device)
                          if rows is None else rows) for intervention, rows in requests]
                wanted = masks[0][1]
                for _, rows in masks[1:]:
                    wanted = wanted | rows
                if bool(wanted.all()):
                    index, wanted = None, None
                else:
                    index = wanted.any(dim=0).nonzero().flatten()  # [R]
                selections = []
                for intervention, rows in masks:
                    mask = rows if index is None else rows[:, index]  # [B, R]
                    selections.append((intervention, RowSelection(index=index, mask=mask), index is None and bool(mask.all())))
            explicit, explicit_weights = self._explicit_chunks(ctx, module, query, key, value, attention_mask, scaling, index,
                                                               selections, kwargs.get("softcap"))
            # explicit [B, R, H, D], explicit_weights [B, H, R, K] (None when the base implementation returns no weights)
            if index is None and wanted is None:
                output = explicit.to(value.dtype).contiguous()  # [B, Q, H, D]
                if self._returns_weights:
                    weights = explicit_weights.to(query.dtype)
            else:
                output, weights = base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
                if index is None:  # every row, kept where an image is
                    output = torch.where(wanted[:, :, None, None], explicit.to(output.dtype), output)
                    if weights is not None:
                        weights = torch.where(wanted[:, None, :, None], explicit_weights.to(weights.dtype), weights)
                else:
                    keep = wanted[:, index][:, :, None, None]  # [B, R, 1, 1]
                    output[:, index] = torch.where(keep, explicit.to(output.dtype), output[:, index])
                    if weights is not None:
                        keep_weights = wanted[:, index][:, None, :, None]  # [B, 1, R, 1]
                        weights[:, :, index] = torch.where(keep_weights, explicit_weights.to(weights.dtype), weights[:, :, index])
        if output is None:
            output, weights = base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        for intervention in plan.head_output:
            edited = intervention.on_head_output(ctx, output)
            if intervention.needs_image and not prompt.all_have_image:
                edited = torch.where(has_image[:, None, None, None], edited, output)
            output = edited
        return output, weights

    def _chunk_rows(self, ctx, query, rows: int) -> int:
        """Rows per chunk of a prefill's explicit rows: one chunk's ``[B, H, rows, K]`` scores hold about as many
        elements as the call's hidden states ``[B, Q, M]`` (``EXPLICIT_CHUNK_RATIO``), at least ``MIN_CHUNK_ELEMENTS``."""
        batch, heads, query_length = query.shape[0], query.shape[1], query.shape[2]
        budget = max(MIN_CHUNK_ELEMENTS, int(EXPLICIT_CHUNK_RATIO * batch * query_length * self.geometry.hidden_size))
        return max(1, min(rows, budget // max(1, batch * heads * ctx.key_length)))

    def _explicit_chunks(self, ctx, module, query, key, value, attention_mask, scaling, index, selections, softcap=None):
        """:meth:`_explicit_rows` over the rows ``index`` (None: all ``Q`` rows) in chunks of :meth:`_chunk_rows`
        rows when the call holds prompt rows and every method accepts chunks (``Intervention.chunkable_rows``).
        Returns ``[B, R, H, D]`` and the weights ``[B, H, R, K]`` (None for a chunked call whose base
        implementation returns no weights: they are never held whole)."""
        rows = query.shape[2] if index is None else index.shape[0]
        chunk = rows
        if ctx.has_prompt_rows and all(intervention.chunkable_rows for intervention, _, _ in selections):
            chunk = self.chunk_rows if self.chunk_rows is not None else self._chunk_rows(ctx, query, rows)
        if chunk >= rows:
            return self._explicit_rows(ctx, module, query, key, value, attention_mask, scaling, index, selections,
                                       every_row=index is None, softcap=softcap)
        if index is None:
            index = torch.arange(rows, device=query.device)
        output = None
        weight_chunks = []
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            part = index[start:stop]  # [C]
            chunk_selections = [
                (intervention, RowSelection(index=part, mask=None if selection.mask is None else selection.mask[:, start:stop],
                                            first=start == 0, last=stop == rows), whole)
                for intervention, selection, whole in selections
            ]
            explicit, weights = self._explicit_rows(ctx, module, query, key, value, attention_mask, scaling, part,
                                                    chunk_selections, softcap=softcap)
            if output is None:
                output = explicit.new_empty(explicit.shape[0], rows, *explicit.shape[2:])  # [B, R, H, D]
            output[:, start:stop] = explicit
            if self._returns_weights:
                weight_chunks.append(weights)
        return output, (torch.cat(weight_chunks, dim=2) if weight_chunks else None)

    def _explicit_rows(self, ctx, module, query, key, value, attention_mask, scaling, index, selections, every_row=False,
                       softcap=None):
        """Explicit attention for rows ``index``; returns the per-head outputs ``[B, R, H, D]`` (the model's layout) and the
        (edited) weights ``[B, H, R, K]`` over the keys given, both fp32.

        ``selections``: ``(intervention, RowSelection, whole)`` per method; ``whole``: its rows are every row
        computed here (no masked merge of its edits).
        ``every_row``: all ``Q`` rows are wanted (``index`` is ``0..Q-1`` or None), so the row gather is skipped.
        ``softcap``: attention-logit soft-capping of the layer (Gemma 2 style, ``c * tanh(s / c)`` before the mask),
        as the model's eager attention applies it.
        When ``ctx.key_length`` exceeds the keys given (a sliding-window layer's cache holds only the last
        window while decoding), the keys are placed at their absolute positions and the missing ones masked,
        so that the methods' key masks (image, sinks, query span) index the right keys.
        """
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        missing = ctx.key_length - key.shape[2]
        if missing > 0:
            key, value, attention_mask = _place_window(key, value, attention_mask, missing, ctx.past_length, query.shape[2])
        rows_query = (query if every_row else query[:, :, index, :]).float()  # [B, H, R, D]
        zero = self._zeros.get(query.device)
        if zero is None:
            zero = self._zeros[query.device] = torch.zeros((), device=query.device)
        allowed = None
        if attention_mask is not None or query.shape[2] > 1 or key.shape[2] > ctx.past_length + query.shape[2]:
            allowed = self._allowed(attention_mask, None if every_row else index, ctx.past_length, key.shape[2],
                                    query.device, query.shape[2])
        product = _grouped_scores(rows_query, key.float(), scaling, zero)  # [B*KVH, G*R, K]
        shape = (rows_query.shape[0], rows_query.shape[1], rows_query.shape[2], product.shape[-1])  # [B, H, R, K]
        # no cap, mask or score edit (a decoding step): the weights are the softmax of the product itself, which the
        # output's matmul can take as it is; otherwise the scores are a view of it, and the product is let go here (a
        # prefill chunk's scores are large)
        plain_product = softcap is None and allowed is None and not any(i.uses_scores for i, _, _ in selections)
        if not plain_product:
            scores, product = product.view(shape), None
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if allowed is not None:
            if allowed.dtype == torch.bool:
                scores = scores.masked_fill(~allowed, float("-inf"))
            else:
                scores = scores + allowed.float()
        for intervention, selection, whole in selections:
            if intervention.uses_scores:
                edited = intervention.on_scores(ctx, scores, selection)
                scores = edited if whole else torch.where(selection.mask[:, None, :, None], edited, scores)
        grouped = None  # the weights as [B*KVH, G*R, K] while they are the softmax of the product itself
        if plain_product:
            grouped = torch.softmax(product, dim=-1)
            weights = grouped.view(shape)  # for the methods
            product = None
        else:
            weights = torch.softmax(scores, dim=-1)  # [B, H, R, K]
        if ctx.has_prompt_rows:  # a generated row always sees itself; prompt rows of padding see nothing
            weights, grouped = weights.nan_to_num(0.0), None
        viewed = weights
        for intervention, selection, whole in selections:
            if intervention.uses_weights:
                edited = intervention.on_weights(ctx, weights, selection)
                weights = edited if whole else torch.where(selection.mask[:, None, :, None], edited, weights)
        # methods that edit in place (a decoding step) return the same tensor: the product's layout is still valid
        output = _grouped_output(weights, value.float(), grouped if weights is viewed else None)
        return output, (weights[..., missing:] if missing > 0 else weights)

    @staticmethod
    def _allowed(attention_mask, index, past_length, key_length, device, query_length=None):
        """The mask of the selected rows (``index``; None: all ``query_length`` rows): bool ``[B|1, 1, R, K]``
        (True = attend) or an additive float mask.

        Without a mask, row ``i`` (absolute position ``past_length + i``) sees the keys up to its own
        position and never the empty slots of a static cache."""
        if attention_mask is not None:
            if attention_mask.ndim == 4:
                rows = attention_mask if index is None else attention_mask[:, :, index]
                return rows if rows.shape[-1] == key_length else rows[..., :key_length]
            return None
        if index is None:
            index = torch.arange(query_length, device=device)
        key_positions = torch.arange(key_length, device=device)
        return (key_positions[None, :] <= (index[:, None] + past_length))[None, None]  # [1, 1, R, K]


def _extends(input_ids: torch.Tensor, prompt_ids: torch.Tensor) -> bool:
    """Whether ``input_ids [B, S + n]`` is the prompt ``[B, S]`` followed by ``n >= 1`` more tokens."""
    if input_ids.ndim != 2 or input_ids.shape[0] != prompt_ids.shape[0] or input_ids.shape[1] <= prompt_ids.shape[1]:
        return False
    return bool(torch.equal(input_ids[:, : prompt_ids.shape[1]], prompt_ids.to(input_ids.device)))


def _prompt_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor | None:
    """``[B, S]`` validity of a prompt's positions from whatever mask the forward call got: a 2-D mask, a
    prepared 4-D mask (bool, or additive float) or a dict of them per layer type (the last row of a causal
    prompt mask sees every real position); None when there is none."""
    batch, seq = input_ids.shape
    if isinstance(attention_mask, dict):
        full = attention_mask.get("full_attention")
        attention_mask = full if full is not None else next((m for m in attention_mask.values() if isinstance(m, torch.Tensor)), None)
    if not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.ndim == 2 and attention_mask.shape == (batch, seq):
        return attention_mask
    if attention_mask.ndim == 4 and attention_mask.shape[-1] >= seq and attention_mask.shape[0] in (1, batch):
        last_row = attention_mask[:, 0, -1, :seq]  # [B|1, S]
        valid = last_row if last_row.dtype == torch.bool else last_row == 0
        return valid.expand(batch, seq).long()
    return None
