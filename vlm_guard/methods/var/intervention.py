"""VAR: visual attention sink recycling (Kang et al., "See What You Are Told", ICLR 2025).

Some tokens (BOS, punctuation, a few image patches) carry massive activations in a handful of hidden
"sink" dimensions and soak up attention without contributing information. VAR finds them from the
residual stream and, in image-centric attention rows, moves a fraction ``p`` of the attention they
receive to the non-sink image tokens.

Per layer ``l`` in the VAR layers (default ``2 .. L-1`` as the released code; ``2 .. L-2`` with the
paper's last-layer exclusion, ``preset="paper"``):

1. Sinks (prefill only, reused while decoding; generated tokens are never sinks): the layer-input
   residual ``x`` of every prompt position, ``phi(x) = max_{d in D} |x_d| / rms(x) > tau``
   (:func:`vlm_guard.methods.var.sinks.sink_scores`). Exposed as :attr:`VARState.sink_mask`
   (``guarded.last_generation.states["var"].sink_mask``).
2. Image-centric rows, per (layer, head, query row), re-chosen at every step: visual mass
   ``sum_{j in V} A >= visual_threshold`` and non-sink visual ratio
   ``sum_{j in V \\ S} A / sum_{j in V} A >= rho``.
3. Redistribution in those rows: sink keys (text and visual) keep ``(1 - p)`` of their weight; the
   budget ``p * sum_{j in S} A`` goes to the non-sink image keys in proportion to their current
   weight; other keys are untouched, so each row still sums to 1. A row with no non-sink visual
   attention is left unchanged, and so (released code, ``require_visual_sink``) is every row of a
   layer whose sinks are all text tokens.

Rows edited: text positions after the image during the prefill and every generated token.
Everything is one batched computation over ``[B, H, R, K]``: no loop over heads or rows. The key
matrices of a layer are built once per prefill, over the prompt's keys (generated keys are never image
or sink keys, so the edit leaves them as they are); a layer whose sinks are all dropped (none, or text
only with ``require_visual_sink``) is the identity and is left out of the decoding steps. The edit itself, as a
plain formula and as the fast path run here: :mod:`vlm_guard.methods.var.kernel`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from vlm_guard.core.contract import EVERY_ROW, Intervention, LayerContext, PromptContext, RowSelection
from vlm_guard.methods.var.config import VARConfig
from vlm_guard.methods.var.kernel import RecyclingMatrices, recycle, recycle_sink_attention  # noqa: F401 (re-exported)
from vlm_guard.methods.var.sinks import sink_scores

logger = logging.getLogger(__name__)

FIRST_SINK_LAYER = 2


def drop_text_only_sinks(sink_keys: torch.Tensor, image_keys: torch.Tensor) -> torch.Tensor:
    """The released code's rule: a layer whose sinks are all text tokens is left untouched. Returns
    ``sink_keys`` with the rows (samples) that have no visual sink emptied (``[B, K]`` bool).

    Example:
        >>> image = torch.tensor([[False, True, True], [False, True, True]])
        >>> drop_text_only_sinks(torch.tensor([[True, False, False], [True, True, False]]), image)
        tensor([[False, False, False],
                [ True,  True, False]])
    """
    return sink_keys & (sink_keys & image_keys).any(dim=1, keepdim=True)


@dataclass
class VARState:
    """VAR's state for one generation (what :meth:`VAR.begin` returns; ``GuardedModel.last_generation.states["var"]``).

    Attributes:
        sink_mask: ``{layer: [B, S] bool}`` the sinks found at each VAR layer in the prefill (prompt positions).
        active: ``{layer: bool}`` some sample has a sink left at the layer (after ``require_visual_sink``) and
            ``p > 0``; the other layers are the identity (not edited, left out of the decoding steps).
        matrices: ``{layer: RecyclingMatrices}`` the key matrices of each layer's sinks over the prompt keys, built
            once per layer at its first edit.
        after_image: ``[B, S]`` the valid positions after each row's last image token (the prefill rows VAR edits).
    """

    after_image: torch.Tensor
    sink_mask: dict[int, torch.Tensor] = field(default_factory=dict)
    active: dict[int, bool] = field(default_factory=dict)
    matrices: dict[int, RecyclingMatrices] = field(default_factory=dict)


class VAR(Intervention):
    """Sink recycling in image-centric rows; the sinks a generation found are in its :class:`VARState`."""

    name = "var"
    uses_weights = True
    uses_layer_input = True
    layer_input_while_decoding = False  # sinks are read at the prefill only
    chunkable_rows = True  # each row's edit is its own

    def __init__(self, config: VARConfig, sink_dims: list[int], layers: list[int]):
        self.config = config
        self.sink_dims = list(sink_dims)
        self._layers = sorted(set(layers))

    def layers(self) -> set[int]:
        return set(self._layers)

    def decode_layers(self, state: VARState | None = None) -> set[int]:
        """The VAR layers with a sink left after the prefill (in any sample): the others are the identity."""
        active = state.active if state is not None else {}
        return {layer for layer in self._layers if active.get(layer, False)}

    def begin(self, prompt: PromptContext, engine) -> VARState:
        return VARState(after_image=prompt.spans.after_image)  # [B, S]

    def on_layer_input(self, ctx: LayerContext, hidden_states: torch.Tensor) -> None:
        if ctx.phase != "prefill":
            return
        state = ctx.state(self)
        valid = ctx.prompt.spans.valid  # [B, S]
        phi = sink_scores(hidden_states, self.sink_dims)  # [B, S]
        state.sink_mask[ctx.layer] = (phi > self.config.tau) & valid
        state.matrices.pop(ctx.layer, None)
        # a layer without a sink (after require_visual_sink) is the identity, and so is every layer at p = 0: read once
        # here, at the prefill
        state.active[ctx.layer] = self.config.p > 0 and bool(
            self._effective_sinks(state, ctx.layer, ctx.prompt.spans.image).any()
        )

    def rows(self, ctx: LayerContext) -> torch.Tensor | bool | None:
        state = ctx.state(self)
        if not state.active.get(ctx.layer, False):  # no sink at this layer (or no prefill seen): nothing to recycle
            return None
        if ctx.all_generated:
            return EVERY_ROW
        if ctx.phase == "prefill":
            return ctx.queries(state.after_image)
        return ctx.queries(state.after_image) | ctx.generated_rows()  # a step recomputed without cache

    def _effective_sinks(self, state: VARState, layer: int, image: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` the sinks the edit uses at ``layer`` (``require_visual_sink`` drops a sample's text-only sinks);
        ``image``: the prompt's ``[B, S]`` image positions."""
        sink = state.sink_mask.get(layer)
        if sink is None:
            return torch.zeros_like(image)
        return drop_text_only_sinks(sink, image) if self.config.require_visual_sink else sink

    def _matrices(self, ctx: LayerContext, device: torch.device) -> RecyclingMatrices:
        """:class:`RecyclingMatrices` of this layer's sinks over the prompt keys, built once per prefill and layer."""
        state = ctx.state(self)
        cached = state.matrices.get(ctx.layer)
        if cached is None or cached.sums.device != device:
            image = ctx.prompt.spans.image  # [B, S]
            cached = state.matrices[ctx.layer] = RecyclingMatrices.build(
                image.to(device),
                self._effective_sinks(state, ctx.layer, image).to(device),
                self.config.p,
                self.config.rho,
                self.config.visual_threshold,
            )
        return cached

    def on_weights(self, ctx: LayerContext, weights: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        return recycle(weights, self._matrices(ctx, weights.device), rows.may_edit_in_place)


def default_var_layers(num_layers: int, last_layer: bool = True) -> list[int]:
    """Layers ``2 .. L-1`` (released code), or ``2 .. L-2`` without the last layer (paper).

    Example:
        >>> default_var_layers(6), default_var_layers(6, last_layer=False)
        ([2, 3, 4, 5], [2, 3, 4])
    """
    return list(range(FIRST_SINK_LAYER, num_layers if last_layer else num_layers - 1))


def build(config: VARConfig, adapter, head_map) -> VAR | None:
    """The VAR intervention, or None (with one warning) when the model has no sink dimensions."""
    geometry = adapter.geometry
    if config.sink_dims is not None:
        sink_dims = list(config.sink_dims)
    else:
        sink_dims = list(getattr(head_map, "sink_dims", None) or [])
    if not sink_dims:
        source = "the head map lists none" if head_map is not None else "no head map was given"
        logger.warning(
            "VAR is switched off: it needs the model's sink dimensions and %s. Run `vlm-guard calibrate` to find "
            "them, or pass VARConfig(sink_dims=[...]). (VAR does not guess them from the largest activations.)",
            source,
        )
        return None
    bad = [d for d in sink_dims if d >= geometry.hidden_size]
    if bad:
        raise ValueError(
            f"VARConfig.sink_dims {bad} are out of range; the model's hidden size is {geometry.hidden_size}"
        )
    layers = config.layers if config.layers is not None else default_var_layers(geometry.num_layers, config.last_layer)
    bad = [layer for layer in layers if not 0 <= layer < geometry.num_layers]
    if bad:
        raise ValueError(f"VARConfig.layers {bad} are out of range; the model has layers 0..{geometry.num_layers - 1}")
    if not layers:
        logger.warning(
            "VAR has no layer to edit (the model has %d layers; VAR uses layers from 2 on)", geometry.num_layers
        )
    return VAR(config, sink_dims, layers)
