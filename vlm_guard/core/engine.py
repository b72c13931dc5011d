"""The guarded attention engine: install and uninstall, active scopes, hooks, side passes, observers.

One attention function (and its mask function) is registered in transformers' ``AttentionInterface``
under a name unique to this engine, and set on the text backbone's config only: the vision tower keeps
its own implementation. Layers where no intervention is active call the model's original
implementation (SDPA or eager) with the original arguments, so with every method off the outputs are
bit-identical to the plain model. Intervening layers compute explicit fp32 weights only for the query
rows an intervention asks for, and splice them into the original output.

The engine in parts:

- this module: :class:`GuardEngine` (install / uninstall, :meth:`GuardEngine.activate`, the model's and the
  layers' hooks, registered only while a frame needs them and counted by their users, side passes, observers);
- :mod:`vlm_guard.core.generations`: what a forward call is, by cache position (a generation's prefill, a
  continuation, a call that runs plain), the active scope (:class:`~vlm_guard.core.generations.Frame`) and each
  layer's context;
- :mod:`vlm_guard.core.attention`: the registered attention function (plan lookup, row requests, the decoding
  step, the merge into the base output);
- :mod:`vlm_guard.core.explicit_rows`: the explicit fp32 rows (grouped-query scores and output, masks, window
  placement, chunks).

Hot path (a decoding step). What can be decided once is: which layers each method acts on is sorted
into a :class:`~vlm_guard.core.generations.LayerPlan` once per frame, and again once per generation right after
its prefill (:meth:`Intervention.decode_layers`: a layer whose edit is the identity for this sample, such as VHR
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

Observers: an intervention that only reads (a recorder, a profiler) can ride along with whatever methods run,
without being one of them: :meth:`GuardEngine.add_observer` / :meth:`GuardEngine.remove_observer` (or the
:meth:`GuardEngine.observing` block). An observer joins every frame that runs methods, after them (so it sees
their edited weights), and no side pass or contrast pass; it is not part of a generation's identity (adding one
does not end the generation a cache continues; it starts with the next generation).

Per-generation state: each method's :meth:`~vlm_guard.core.contract.Intervention.begin` returns its state for the
generation (VAR's sinks, GIFT's saliency ...); the :class:`~vlm_guard.core.generations.Generation` holds it and every
layer's context hands it back to the hooks (``ctx.state(self)``, a dictionary lookup: no operation on the hot path).
:attr:`GuardEngine.last_started` is the latest generation started by the wrapper's own calls (``record=True``; not a
side pass, a contrast pass or an ``interventions_active`` block); ``GuardedModel.last_generation`` is its read view.

All state lives on the engine (and so on the wrapper that owns it): two engines on two models do not
interfere, and :meth:`GuardEngine.uninstall` restores the model exactly (implementation name, hooks,
registry entries).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from vlm_guard.core.attention import EVERY_ROW_SELECTION, GuardedAttention
from vlm_guard.core.contract import Intervention
from vlm_guard.core.explicit_rows import (
    EXPLICIT_CHUNK_RATIO,
    MIN_CHUNK_ELEMENTS,
    allowed_rows,
    grouped_output,
    grouped_scores,
    place_window,
)
from vlm_guard.core.forward_state import FORWARD_STATE_ATTRIBUTES, restore_forward_state, save_forward_state
from vlm_guard.core.generations import (
    CallState,
    Frame,
    Generation,
    GenerationRecord,
    GenerationTracking,
    LayerPlan,
    extends,
    layer_plans,
    past_length,
    prompt_mask,
    reads_layer_input,
)
from vlm_guard.models.base import ModelAdapter

logger = logging.getLogger(__name__)

SUPPORTED_BASE_IMPLEMENTATIONS = ("sdpa", "eager")


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


class GuardEngine(GenerationTracking, GuardedAttention):
    """Installs the guarded attention on one model and runs interventions inside :meth:`activate`.

    The decisions about calls come from :class:`~vlm_guard.core.generations.GenerationTracking`, the attention
    function from :class:`~vlm_guard.core.attention.GuardedAttention`.

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
        self._generation: Generation | None = None  # the latest generation that owns a cache (what a call continues)
        # the latest generation started in a recorded frame (the wrapper's generate / forward; not a side pass): its
        # states are what GuardedModel.last_generation shows and what PAI's / VCD's contrast streams read
        self.last_started: Generation | None = None
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
        self._observers: tuple = ()  # read-only interventions that join every frame with methods (add_observer)
        self.installed = False
        self.geometry = adapter.geometry

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
            raise ValueError(
                f"text backbone layers use several attention implementations: {sorted(map(str, implementations))}"
            )
        original = implementations.pop() or "eager"
        if any(getattr(config, "_vlm_guard_engine", None) for config in configs.values()) or str(original).startswith(
            "vlm_guard_"
        ):
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
    def activate(
        self,
        interventions: list[Intervention],
        known_prompt: tuple | None = None,
        known_images: dict | None = None,
        observed: bool = True,
        record: bool = False,
    ) -> Iterator[Frame]:
        """Run the enclosed forward / generate calls with ``interventions`` (nested calls allowed:
        an intervention's side pass runs inside its own frame).

        Args:
            interventions: the methods.
            known_prompt: ``(input_ids [B, S], attention_mask [B, S] or None)`` of a ``generate`` call, used
                when its prefill passes only embeddings or prepared (4-D / per-layer-type) masks.
            known_images: the image tensors of that ``generate`` call (kept with the generation it starts).
            observed: whether the engine's observers join (after the methods) when there are methods.
            record: whether a generation started inside becomes :attr:`last_started` (the wrapper's own calls).
        """
        methods = list(interventions)
        observers = list(self._observers) if observed and methods else []
        frame = Frame(
            [*methods, *observers],
            methods=tuple(methods),
            known_prompt=known_prompt,
            known_images=dict(known_images or {}),
            record=record,
        )
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
                        handles = [
                            self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True),
                            self.model.register_forward_hook(self._model_post_hook, with_kwargs=True),
                        ]
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

    # ------------------------------------------------------------------ observers
    @property
    def observers(self) -> tuple:
        """The observers added with :meth:`add_observer`, in the order they run."""
        return self._observers

    def add_observer(self, observer: Intervention) -> None:
        """Let ``observer`` (an :class:`Intervention` that reads and never edits: a recorder, a profiler) run in every
        frame that runs methods, after the methods, until :meth:`remove_observer`; from the next :meth:`activate` on.

        It gets the hooks it declares (``uses_weights`` ...) at its :meth:`Intervention.layers`, its
        :meth:`Intervention.begin` at each prefill and :meth:`Intervention.end` when a frame ends; side passes
        (:meth:`side_pass`), contrast passes (:meth:`suspended`) and calls with no method run without it. Observers are
        not part of a generation's identity: adding or removing one between the calls of a generation does not end it,
        and an observer added then starts with the next generation (the layers a generation's decoding steps run are
        fixed at its prefill). Shared by every thread of the engine."""
        if observer not in self._observers:
            self._observers = (*self._observers, observer)

    def remove_observer(self, observer: Intervention) -> None:
        """Stop running ``observer`` (from the next :meth:`activate` on); one not added is ignored."""
        self._observers = tuple(o for o in self._observers if o is not observer)

    @contextlib.contextmanager
    def observing(self, *observers: Intervention) -> Iterator[None]:
        """:meth:`add_observer` for the block; removed in ``finally``."""
        for observer in observers:
            self.add_observer(observer)
        try:
            yield
        finally:
            for observer in observers:
                self.remove_observer(observer)

    # ------------------------------------------------------------------ side passes
    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Plain model inside (used for contrast passes of the baselines)."""
        with self.activate([]):
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
            with torch.no_grad(), self.activate(interventions, observed=False):
                try:
                    return self.model(**model_inputs, use_cache=False)
                except StopForward:
                    return None
        finally:
            if hook is not None:
                hook.remove()
            restore_forward_state(saved)

    # ------------------------------------------------------------------ layer hooks
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


# names kept importable from this module (they live in the modules of the engine's parts)
_extends = extends
_prompt_mask = prompt_mask
_past_length = past_length
_grouped_scores = grouped_scores
_grouped_output = grouped_output
_place_window = place_window
_allowed = allowed_rows
_FORWARD_STATE_ATTRIBUTES = FORWARD_STATE_ATTRIBUTES

__all__ = [
    "COMPILE_REASON",
    "EVERY_ROW_SELECTION",
    "EXPLICIT_CHUNK_RATIO",
    "MIN_CHUNK_ELEMENTS",
    "SUPPORTED_BASE_IMPLEMENTATIONS",
    "CallState",
    "Frame",
    "Generation",
    "GenerationRecord",
    "GuardEngine",
    "LayerPlan",
    "StopForward",
    "layer_plans",
    "reads_layer_input",
    "restore_forward_state",
    "save_forward_state",
]
