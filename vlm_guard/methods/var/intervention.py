"""VAR: visual attention sink recycling (Kang et al., "See What You Are Told", ICLR 2025).

Some tokens (BOS, punctuation, a few image patches) carry massive activations in a handful of hidden
"sink" dimensions and soak up attention without contributing information. VAR finds them from the
residual stream and, in image-centric attention rows, moves a fraction ``p`` of the attention they
receive to the non-sink image tokens.

Per layer ``l`` in the VAR layers (default ``2 .. L-1`` as the released code; ``2 .. L-2`` with the
paper's last-layer exclusion, ``preset="paper"``):

1. Sinks (prefill only, reused while decoding; generated tokens are never sinks): the layer-input
   residual ``x`` of every prompt position, ``phi(x) = max_{d in D} |x_d| / rms(x) > tau``
   (:func:`vlm_guard.methods.var.sinks.sink_scores`). Exposed as :attr:`VAR.sink_mask`.
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
only with ``require_visual_sink``) is the identity and is left out of the decoding steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch


from vlm_guard.config import MethodConfig, check_layers, check_range, preset_field
from vlm_guard.methods.var.sinks import SINK_THRESHOLD, sink_scores
from vlm_guard.core.contract import EVERY_ROW, Intervention, LayerContext, PromptContext, RowSelection, prompt_key_rows
from vlm_guard.methods.registry import register_method

logger = logging.getLogger(__name__)

FIRST_SINK_LAYER = 2


@dataclass
class VARConfig(MethodConfig):
    """VAR settings.

    Defaults by preset (``preset="released"``, the default, reproduces the released code that produced
    the paper's numbers; ``preset="paper"`` follows the paper's text where it differs):

    - ``p``: fraction of the sink attention moved to the non-sink image tokens. released: 0.4 (the code
      multiplies sink weights by 0.6 and moves the remaining 0.4); paper: 0.6 (its equation, "sinks keep
      ``1 - p``", with ``p = 0.6``).
    - ``last_layer``: whether the last decoder layer is edited. released: True (the code has an
      exclusion flag, but it is never read: the last layer is edited); paper: False (excluded).
    - ``require_visual_sink``: a layer whose sinks are all text tokens (BOS, punctuation) is left
      untouched. released: True (the code selects heads only when the layer has a visual sink);
      paper: False (its equations recycle text-sink mass in any image-centric row).
    - ``rho=0.5`` (both presets): minimum non-sink share of the visual attention (paper: 0.5 for
      hallucination benchmarks, 0.8 general, 0.9 vision-centric; the released code stores ``1 - rho``).
    - ``visual_threshold=0.2`` (both): minimum visual attention mass of a row.
    - ``tau=20`` (both): sink threshold on ``phi``.
    - ``sink_dims=None`` (both): the head map's sink dimensions (found by calibration); a list overrides
      them (released code hard-codes e.g. ``[2533, 1415]`` for LLaVA-1.5-7B).
    - ``layers=None`` (both): layers from 2 on, the last one per ``last_layer``; a list overrides both.

    Where both presets differ from the released code on purpose: sinks are recomputed at every prefill
    (the released code keeps the first sample's sinks, a bug), batches and padding are supported, and a row
    with no non-sink visual attention is left unchanged (the released code divides by zero there).
    """

    method = "var"
    p: float = preset_field("fraction of sink attention moved to non-sink image tokens", released=0.4, paper=0.6)
    rho: float = field(default=0.5, metadata={"help": "min non-sink share of visual attention (both presets 0.5; paper: 0.8 general)"})
    visual_threshold: float = field(default=0.2, metadata={"help": "min visual attention mass of an image-centric row (both presets 0.2)"})
    tau: float = field(default=SINK_THRESHOLD, metadata={"help": "sink threshold on phi (both presets 20)"})
    sink_dims: list[int] | None = field(default=None, metadata={"help": "sink hidden dimensions; None = from the head map (both presets)"})
    layers: list[int] | None = field(default=None, metadata={"help": "layers to edit; None = 2.. with the last per last_layer (both presets)"})
    last_layer: bool = preset_field("edit the last decoder layer (when layers is None)", released=True, paper=False)
    require_visual_sink: bool = preset_field("leave layers whose sinks are all text tokens untouched", released=True, paper=False)

    def validate(self) -> None:
        check_range("VARConfig", "p", self.p, 0.0, 1.0)
        check_range("VARConfig", "rho", self.rho, 0.0, 1.0)
        check_range("VARConfig", "visual_threshold", self.visual_threshold, 0.0, 1.0)
        check_range("VARConfig", "tau", self.tau, 0.0, None, low_inclusive=False)
        if self.sink_dims is not None and (
            not isinstance(self.sink_dims, (list, tuple))
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in self.sink_dims)
        ):
            raise ValueError(f"VARConfig.sink_dims must be a list of non-negative hidden-dimension indices or None, got {self.sink_dims!r}")
        check_layers("VARConfig", "layers", self.layers)
        for name in ("last_layer", "require_visual_sink"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VARConfig.{name} must be True or False, got {getattr(self, name)!r}")


def recycle_sink_attention(weights: torch.Tensor, image_keys: torch.Tensor, sink_keys: torch.Tensor, p: float,
                           rho: float, visual_threshold: float) -> torch.Tensor:
    """The VAR edit of a block of attention rows (pure function; ``weights`` is not modified).

    Args:
        weights: ``[B, H, R, K]`` post-softmax attention (fp32).
        image_keys: ``[B, K]`` bool, image-token keys V.
        sink_keys: ``[B, K]`` bool, sink keys S (text and visual).
        p: fraction of the sink attention moved.
        rho: min non-sink share of visual attention for a row to be edited.
        visual_threshold: min visual mass for a row to be edited.
    Returns:
        ``[B, H, R, K]`` edited weights; unselected rows unchanged; each edited row keeps its sum.

    Example:
        >>> A = torch.tensor([[[[0.5, 0.1, 0.3, 0.1]]]])  # sink BOS, visual sink, two image tokens
        >>> image = torch.tensor([[False, True, True, True]]); sink = torch.tensor([[True, True, False, False]])
        >>> recycle_sink_attention(A, image, sink, p=0.5, rho=0.5, visual_threshold=0.2)
        tensor([[[[0.2500, 0.0500, 0.5250, 0.1750]]]])
    """
    if p == 0:
        return weights.clone()
    return _recycle(weights, RecyclingMatrices.build(image_keys, sink_keys, p, rho, visual_threshold, weights.dtype))


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


@dataclass(frozen=True)
class RecyclingMatrices:
    """Everything :func:`_recycle` needs that does not depend on the attention rows, built once per prefill and layer
    over the prompt's ``S`` keys (later keys are neither image nor sink keys: the edit leaves them as they are).

    With ``I`` the image keys, ``Sk`` the sinks and ``F = I and not Sk`` the non-sink image keys, one matmul of the
    rows with ``sums [B, S, 4]`` gives, per row, the columns

    0. ``sum_I A``                   (>= visual_threshold: enough visual mass)
    1. ``sum_F A - rho * sum_I A``   (>= 0: enough of it on non-sink image keys)
    2. ``sum_F A / p``               (the divisor: > 0 in every image-centric row)
    3. ``sum_Sk A``                  (the sink mass)

    so a row is image-centric exactly when every column is ``>= lower = (visual_threshold, 0, tiny, 0)`` (column 2 at
    least the smallest normal float: some non-sink visual weight, which with ``rho`` and ``visual_threshold`` above 0
    every row that clears the first two has anyway). Divided by column 2 they become ``[.., .., 1, p * sink / free]``
    (each at most ``1 / tiny``, finite): the coefficients of the edit's rows ``edit [B, 4, S] = [0, 0, -p Sk, F]``, and
    ``1 + coefficients @ edit`` is the factor of each key: sinks keep ``1 - p``, non-sink image keys gain
    ``p * sink / free`` of their weight (other rows: coefficients 0).

    Attributes:
        sums: ``[B, S, 4]`` the columns above.
        edit: ``[B, 4, S]``.
        lower: ``[4]`` ``(visual_threshold, 0, tiny, 0)``.
        zero: ``[]`` a 0-d zero (the coefficients of the other rows).
        one: ``[1]`` a one (the factor's base, on the path that records gradients).
    """

    sums: torch.Tensor
    edit: torch.Tensor
    lower: torch.Tensor
    zero: torch.Tensor
    one: torch.Tensor

    @classmethod
    def build(cls, image_keys: torch.Tensor, sink_keys: torch.Tensor, p: float, rho: float, visual_threshold: float,
              dtype=torch.float32) -> "RecyclingMatrices":
        """From ``[B, S]`` bool image and sink keys; ``p > 0``."""
        image = image_keys.to(dtype)
        sink = sink_keys.to(dtype)
        free = image * (1.0 - sink)  # [B, S] non-sink image keys
        zeros = torch.zeros_like(image)
        sums = torch.stack((image, free - rho * image, free / p, sink), dim=-1)
        edit = torch.stack((zeros, zeros, -p * sink, free), dim=1)
        lower = torch.tensor([visual_threshold, 0.0, torch.finfo(dtype).tiny, 0.0], dtype=dtype, device=image.device)
        zero = torch.zeros((), dtype=dtype, device=image.device)
        return cls(sums, edit, lower, zero, torch.ones(1, dtype=dtype, device=image.device))


def _recycle(weights: torch.Tensor, matrices: RecyclingMatrices, in_place: bool = False) -> torch.Tensor:
    """The edit with :class:`RecyclingMatrices` over the first ``S`` keys (``S <= K``; when ``S > K``, the first ``K``
    of them). ``in_place``: edit ``weights`` itself (contiguous, no gradient recorded; the caller reads only the
    result), else a new tensor (gradients flow through it).

    In place, a decoding step costs nine tensor operations here (two views, two matmuls, five element-wise ones);
    batched matmuls without an added input (``bmm``), which are faster than ``baddbmm`` on small blocks.
    """
    batch, heads, rows, keys = weights.shape
    sums_matrix, edit_matrix = matrices.sums, matrices.edit
    covered = sums_matrix.shape[1]
    if covered > keys:
        sums_matrix, edit_matrix, covered = sums_matrix[:, :keys], edit_matrix[..., :keys], keys
    if in_place and weights.is_contiguous():
        head = prompt_key_rows(weights, covered)  # [B, H*R, S]
        # one batched matmul for the four row sums: [B, H*R, S] @ [B, S, 4] -> [B, H*R, 4]
        sums = torch.bmm(head, sums_matrix)
        selected = (sums >= matrices.lower).all(dim=-1, keepdim=True)  # [B, H*R, 1] image-centric rows
        # coefficients [.., .., 1, p * sink / free] in the selected rows (free >= tiny there), 0 elsewhere
        coefficients = torch.where(selected, sums / sums[..., 2:3], matrices.zero)
        head.addcmul_(head, torch.bmm(coefficients, edit_matrix))  # weights * (1 + coefficients @ edit)
        return weights
    # the same edit without writing into any input: every intermediate stays as autograd needs it, and the divisor is
    # never zero (a 0 / 0 in a row that is not selected would still give a NaN gradient through ``where``)
    flat = weights.reshape(batch, heads * rows, keys)
    head = flat[..., :covered]
    sums = torch.bmm(head, sums_matrix)
    selected = (sums >= matrices.lower).all(dim=-1, keepdim=True)
    coefficients = torch.where(selected, sums / sums[..., 2:3].clamp_min(matrices.lower[2]), matrices.zero)
    edited = head * torch.baddbmm(matrices.one, coefficients, edit_matrix)
    if covered < keys:
        edited = torch.cat([edited, flat[..., covered:]], dim=-1)
    return edited.view(batch, heads, rows, keys)


class VAR(Intervention):
    """Sink recycling in image-centric rows.

    Attributes:
        sink_mask: ``{layer: [B, S] bool}`` the sinks found in the last prefill (prompt positions).
    """

    name = "var"
    uses_weights = True
    uses_layer_input = True
    layer_input_while_decoding = False  # sinks are read at the prefill only
    chunkable_rows = True  # each row's edit is its own

    def __init__(self, config: VARConfig, sink_dims: list[int], layers: list[int]):
        self.config = config
        self.sink_dims = list(sink_dims)
        self._layers = sorted(set(layers))
        self.sink_mask: dict[int, torch.Tensor] = {}
        self._active: dict[int, bool] = {}  # layer -> some sample has a sink there (set at the prefill)
        self._keys: dict[int, RecyclingMatrices] = {}  # layer -> matrices over the prompt keys (built at the prefill)

    def layers(self) -> set[int]:
        return set(self._layers)

    def decode_layers(self) -> set[int]:
        """The VAR layers with a sink left after the prefill (in any sample): the others are the identity."""
        return {layer for layer in self._layers if self._active.get(layer, False)}

    def begin(self, prompt: PromptContext, engine) -> None:
        self.sink_mask = {}
        self._active = {}
        self._keys = {}
        self._image = prompt.spans.image  # [B, S]
        self._after_image = prompt.spans.after_image  # [B, S]

    def on_layer_input(self, ctx: LayerContext, hidden_states: torch.Tensor) -> None:
        if ctx.phase != "prefill":
            return
        valid = ctx.prompt.spans.valid  # [B, S]
        phi = sink_scores(hidden_states, self.sink_dims)  # [B, S]
        self.sink_mask[ctx.layer] = (phi > self.config.tau) & valid
        self._keys.pop(ctx.layer, None)
        # a layer without a sink (after require_visual_sink) is the identity, and so is every layer at p = 0: read once
        # here, at the prefill
        self._active[ctx.layer] = self.config.p > 0 and bool(self._effective_sinks(ctx.layer).any())

    def rows(self, ctx: LayerContext) -> torch.Tensor | bool | None:
        if not self._active.get(ctx.layer, False):  # no sink at this layer (or no prefill seen): nothing to recycle
            return None
        if ctx.all_generated:
            return EVERY_ROW
        if ctx.phase == "prefill":
            return ctx.queries(self._after_image)
        return ctx.queries(self._after_image) | ctx.generated_rows()  # a step recomputed without cache

    def _effective_sinks(self, layer: int) -> torch.Tensor:
        """``[B, S]`` the sinks the edit uses at ``layer`` (``require_visual_sink`` drops a sample's text-only sinks)."""
        sink = self.sink_mask.get(layer)
        if sink is None:
            return torch.zeros_like(self._image)
        return drop_text_only_sinks(sink, self._image) if self.config.require_visual_sink else sink

    def _matrices(self, layer: int, device: torch.device) -> RecyclingMatrices:
        """:class:`RecyclingMatrices` of this layer's sinks over the prompt keys, built once per prefill and layer."""
        cached = self._keys.get(layer)
        if cached is None or cached.sums.device != device:
            cached = self._keys[layer] = RecyclingMatrices.build(
                self._image.to(device), self._effective_sinks(layer).to(device), self.config.p, self.config.rho,
                self.config.visual_threshold)
        return cached

    def on_weights(self, ctx: LayerContext, weights: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        return _recycle(weights, self._matrices(ctx.layer, weights.device), rows.may_edit_in_place)


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
        raise ValueError(f"VARConfig.sink_dims {bad} are out of range; the model's hidden size is {geometry.hidden_size}")
    layers = config.layers if config.layers is not None else default_var_layers(geometry.num_layers, config.last_layer)
    bad = [layer for layer in layers if not 0 <= layer < geometry.num_layers]
    if bad:
        raise ValueError(f"VARConfig.layers {bad} are out of range; the model has layers 0..{geometry.num_layers - 1}")
    if not layers:
        logger.warning("VAR has no layer to edit (the model has %d layers; VAR uses layers from 2 on)", geometry.num_layers)
    return VAR(config, sink_dims, layers)


register_method("var", VARConfig, build)
