"""The guarded attention engine.

One attention function (and its mask function) is registered in transformers' ``AttentionInterface``
under a name unique to this engine, and set on the text backbone's config only: the vision tower keeps
its own implementation. Layers where no intervention is active call the model's original
implementation (SDPA or eager) with the original arguments, so with every method off the outputs are
bit-identical to the plain model. Intervening layers compute explicit fp32 weights only for the query
rows an intervention asks for, and splice them into the original output.

All state lives on the engine (and so on the wrapper that owns it): two engines on two models do not
interfere, and :meth:`GuardEngine.uninstall` restores the model exactly (implementation name, hooks,
registry entries).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..models.base import ModelAdapter
from .base import Intervention, LayerContext, PromptContext, RowSelection

logger = logging.getLogger(__name__)

SUPPORTED_BASE_IMPLEMENTATIONS = ("sdpa", "eager")
# model attributes that a forward call may overwrite as a side effect (Qwen2-VL caches its M-RoPE deltas)
_FORWARD_STATE_ATTRIBUTES = ("rope_deltas",)


class StopForward(Exception):
    """Raised by :meth:`GuardEngine.side_pass` to end a forward call right after a given decoder layer."""


@dataclass
class Frame:
    """The interventions of one (possibly nested) forward or generate call and their prompt state."""

    interventions: list[Intervention]
    prompt: PromptContext | None = None
    step: int = 0
    by_layer: dict[int, list[Intervention]] = field(default_factory=dict)
    warned_no_image: bool = False

    def __post_init__(self) -> None:
        for intervention in self.interventions:
            for layer in intervention.layers():
                self.by_layer.setdefault(layer, []).append(intervention)


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


def _grouped_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``q k^T`` without materialising repeated keys.

    Args:
        query: ``[B, H, R, D]`` fp32.
        key: ``[B, KVH, K, D]`` fp32.
    Returns:
        ``[B, H, R, K]``.
    """
    batch, num_heads, rows, dim = query.shape
    num_kv_heads = key.shape[1]
    groups = num_heads // num_kv_heads
    grouped = query.reshape(batch, num_kv_heads, groups * rows, dim)
    scores = grouped @ key.transpose(-1, -2)  # [B, KVH, groups*R, K]
    return scores.reshape(batch, num_heads, rows, key.shape[2])


def _grouped_output(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``weights @ v`` for grouped heads: ``[B, H, R, K] x [B, KVH, K, D] -> [B, H, R, D]``."""
    batch, num_heads, rows, keys = weights.shape
    num_kv_heads = value.shape[1]
    grouped = weights.reshape(batch, num_kv_heads, (num_heads // num_kv_heads) * rows, keys)
    return (grouped @ value).reshape(batch, num_heads, rows, value.shape[-1])


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
        self._original_implementations: list[tuple[object, str]] = []
        self._layer_of: dict[int, int] = {}
        self._base_attention = None
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
        else:
            self._base_attention = ALL_ATTENTION_FUNCTIONS[base_implementation]
        AttentionInterface.register(self.name, self._attention)
        AttentionMaskInterface.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS[base_implementation])
        for config in configs.values():
            self._original_implementations.append((config, original))
            config._attn_implementation = self.name
        self._hooks.append(self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        for index, layer in enumerate(self.adapter.decoder_layers):
            self._hooks.append(layer.register_forward_pre_hook(self._make_layer_hook(index), with_kwargs=True))
        self.installed = True

    def uninstall(self) -> None:
        """Undo :meth:`install`, also a partial one that raised midway (everything installed is recorded as it goes)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for config, original in self._original_implementations:
            config._attn_implementation = original
        self._original_implementations.clear()
        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)
        self.installed = False

    # ------------------------------------------------------------------ frames
    @contextlib.contextmanager
    def activate(self, interventions: list[Intervention]) -> Iterator[Frame]:
        """Run the enclosed forward / generate calls with ``interventions`` (nested calls allowed:
        an intervention's side pass runs inside its own frame)."""
        frame = Frame(list(interventions))
        self._frames.append(frame)
        try:
            yield frame
        finally:
            self._frames.pop()
            for intervention in frame.interventions:
                intervention.end()

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

        State a forward call caches on the model (Qwen2-VL's ``rope_deltas``) is restored afterwards.
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

    def _current(self) -> Frame | None:
        if not self.enabled or not self._frames:
            return None
        frame = self._frames[-1]
        return frame if frame.interventions else None

    # ------------------------------------------------------------------ hooks
    def _on_model_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        frame = self._current()
        if frame is None:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past_length = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past_length = int(cache.get_seq_length())
        if past_length > 0 and frame.prompt is not None:
            frame.step += 1
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            logger.warning("vlm_guard needs input_ids to find image positions; this call passed only embeddings, so no intervention runs.")
            frame.prompt = None
            return None
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None or attention_mask.ndim != 2:
            attention_mask = torch.ones_like(input_ids)
        spans = self.adapter.prompt_spans(input_ids, attention_mask)
        frame.prompt = PromptContext(input_ids=input_ids, attention_mask=attention_mask, spans=spans, model_inputs=dict(kwargs))
        frame.step = 0
        if not bool(spans.has_image.all()) and any(i.needs_image for i in frame.interventions) and not frame.warned_no_image:
            missing = (~spans.has_image).nonzero().flatten().tolist()
            logger.warning(
                "prompt rows %s contain no image token (id %d): image-dependent interventions are skipped for them.",
                missing,
                self.adapter.image_token_id,
            )
            frame.warned_no_image = True
        for intervention in frame.interventions:
            intervention.begin(frame.prompt, self)
        return None

    def _make_layer_hook(self, layer_index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            frame = self._current()
            if frame is None or frame.prompt is None or layer_index not in frame.by_layer:
                return None
            users = [i for i in frame.by_layer[layer_index] if i.uses_layer_input]
            if not users:
                return None
            hidden_states = kwargs.get("hidden_states", args[0] if args else None)
            ctx = self._layer_context(frame, layer_index, hidden_states.shape[1], hidden_states.shape[1] + self._past(frame, hidden_states))
            for intervention in users:
                intervention.on_layer_input(ctx, hidden_states)
            return None

        return hook

    @staticmethod
    def _past(frame: Frame, hidden_states: torch.Tensor) -> int:
        if frame.step == 0:
            return 0
        return frame.prompt.prompt_length + frame.step - 1

    def _layer_context(self, frame: Frame, layer: int, query_length: int, key_length: int) -> LayerContext:
        return LayerContext(
            layer=layer,
            phase="prefill" if frame.step == 0 else "decode",
            step=frame.step,
            prompt=frame.prompt,
            query_length=query_length,
            key_length=key_length,
            num_heads=self.geometry.num_heads,
            num_kv_heads=self.geometry.num_kv_heads,
        )

    # ------------------------------------------------------------------ attention
    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The registered attention function. ``query [B, H, Q, D]``, ``key/value [B, KVH, K, D]``;
        returns ``([B, Q, H, D], None)`` like transformers' implementations."""
        base = self._base_attention
        frame = self._current()
        layer = self._layer_of.get(id(module))
        if frame is None or frame.prompt is None or layer is None or layer not in frame.by_layer:
            return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        interventions = frame.by_layer[layer]
        ctx = self._layer_context(frame, layer, query.shape[2], key.shape[2])
        has_image = frame.prompt.spans.has_image  # [B]

        # which rows each method needs explicitly
        requests: list[tuple[Intervention, torch.Tensor]] = []
        for intervention in interventions:
            if intervention.uses_scores or intervention.uses_weights:
                rows = intervention.rows(ctx)
                if rows is not None:
                    if intervention.needs_image:
                        rows = rows & has_image[:, None]
                    if bool(rows.any()):
                        requests.append((intervention, rows))
        output = None
        if requests:
            wanted = torch.zeros_like(requests[0][1])
            for _, rows in requests:
                wanted = wanted | rows
            every_row = bool(wanted.all())  # the decode hot path: one row, asked for in every batch row
            if every_row:
                index = torch.arange(query.shape[2], device=query.device)  # [R = Q]
            else:
                index = wanted.any(dim=0).nonzero().flatten()  # [R]
            explicit = self._explicit_rows(ctx, module, query, key, value, attention_mask, scaling, index, requests, every_row)
            # [B, R, H, D]
            if every_row:
                output = explicit.transpose(1, 2).to(value.dtype).contiguous()  # [B, Q, H, D]
            else:
                output, _ = base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
                keep = wanted[:, index][:, :, None, None]  # [B, R, 1, 1]
                output[:, index] = torch.where(keep, explicit.transpose(1, 2).to(output.dtype), output[:, index])
        if output is None:
            output, _ = base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        for intervention in interventions:
            if intervention.uses_head_output:
                edited = intervention.on_head_output(ctx, output)
                if intervention.needs_image and not bool(has_image.all()):
                    edited = torch.where(has_image[:, None, None, None], edited, output)
                output = edited
        return output, None

    def _explicit_rows(self, ctx, module, query, key, value, attention_mask, scaling, index, requests, every_row=False):
        """Explicit attention for rows ``index``; returns the per-head outputs ``[B, H, R, D]`` (fp32).

        ``every_row``: all ``Q`` rows are wanted in every batch row (``index`` is ``0..Q-1``), so the row
        gather is skipped; a request covering every row then needs no masked merge either.
        """
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        rows_query = (query if every_row else query[:, :, index, :]).float()  # [B, H, R, D]
        scores = _grouped_scores(rows_query * scaling, key.float())  # [B, H, R, K]
        allowed = None
        if attention_mask is not None or query.shape[2] > 1:  # one row without a mask sees every key
            allowed = self._allowed(attention_mask, index, query.shape[2], key.shape[2], scores.device)
        if allowed is not None:
            if allowed.dtype == torch.bool:
                scores = scores.masked_fill(~allowed, float("-inf"))
            else:
                scores = scores + allowed.float()
        selections = []
        for intervention, rows in requests:
            mask = rows if every_row else rows[:, index]  # [B, R]
            selections.append((intervention, RowSelection(index=index, mask=mask), every_row and bool(mask.all())))
        for intervention, selection, whole in selections:
            if intervention.uses_scores:
                edited = intervention.on_scores(ctx, scores, selection)
                scores = edited if whole else torch.where(selection.mask[:, None, :, None], edited, scores)
        weights = torch.softmax(scores, dim=-1)  # [B, H, R, K]
        if ctx.phase != "decode":  # a generated row always sees itself; prompt rows of padding see nothing
            weights = weights.nan_to_num(0.0)
        for intervention, selection, whole in selections:
            if intervention.uses_weights:
                edited = intervention.on_weights(ctx, weights, selection)
                weights = edited if whole else torch.where(selection.mask[:, None, :, None], edited, weights)
        return _grouped_output(weights, value.float())

    @staticmethod
    def _allowed(attention_mask, index, query_length, key_length, device):
        """The mask of the selected rows: bool ``[B|1, 1, R, K]`` (True = attend) or an additive float mask."""
        if attention_mask is not None:
            if attention_mask.ndim == 4:
                return attention_mask[:, :, index, :key_length]
            return None
        offset = key_length - query_length
        key_positions = torch.arange(key_length, device=device)
        return (key_positions[None, :] <= (index[:, None] + offset))[None, None]  # [1, 1, R, K]
