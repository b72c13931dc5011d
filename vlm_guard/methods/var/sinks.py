"""VAR sink measures (Kang et al., ICLR 2025): massive activations in a few hidden dimensions mark
attention-sink tokens.

``phi(x) = max_{d in D} |x_d| / sqrt(mean(x^2) + 1e-6)`` on the residual stream entering a layer
(before its norm, fp32); tokens with ``phi > tau`` (tau = 20) are sinks.

Sink dimensions D are found automatically (:func:`find_sink_dims`) from the first token of the prompt
(BOS, or whatever the chat template starts with). Under causal attention that token sees only itself,
so its hidden states do not depend on the image: one image-free prompt is enough to find D. A
dimension is a sink dimension when its magnitude ratio ``|x_d| / rms(x)`` on that token, taken as
the median over the middle layers (:func:`middle_layers`), is *near* tau, defined as
``ratio >= tau / 2`` (:data:`SINK_DIM_MIN_RATIO`, 10 for tau 20). LLaVA-1.5-7B's dims 2533 and 1415
sit far above that (tens); a model without massive activations has ratios of a few units everywhere
and gets **no** sink dimensions (never "the largest dims anyway"), which switches VAR off.

Note the ceiling: a vector whose energy is all in one dimension has ratio ``sqrt(hidden_size)``, so
ratios >= 20 need ``hidden_size >= 400``; small models cannot have massive activations in this sense.

This module also holds the two observers of the calibration pass (:class:`FirstTokenRecorder`,
:class:`ImageCentricObserver`) and the pure per-row image-centric test (:func:`image_centric_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlm_guard.core.contract import Intervention, LayerContext, RowSelection
from vlm_guard.methods.var.config import SINK_THRESHOLD  # defined beside the config

EPSILON = 1e-6
SINK_DIM_MIN_RATIO = SINK_THRESHOLD / 2
"""Default "near tau" rule for sink dimensions: median first-token ratio over the middle layers >= tau / 2."""
MAX_SINK_DIMS = 8
VISUAL_MASS_THRESHOLD = 0.2
"""Image-centric heads: total attention of a row to the image tokens must be at least this (paper)."""
DEFAULT_RHO = 0.8
"""Image-centric heads: visual non-sink ratio threshold (paper: 0.8 general, 0.5 hallucination, 0.9 vision-centric)."""
FIRST_SINK_LAYER = 2
"""VAR acts (and sinks are measured) from layer 2 on, as in the paper."""


def sink_scores(hidden_states: torch.Tensor, sink_dims: list[int] | torch.Tensor) -> torch.Tensor:
    """phi per token.

    Args:
        hidden_states: ``[..., M]`` residual stream (any dtype; computed in fp32).
        sink_dims: the sink dimensions D (non-empty).
    Returns:
        ``[...]`` fp32 scores.

    Example:
        >>> x = torch.ones(1, 2, 4); x[0, 0, 3] = 40.0
        >>> sink_scores(x, [3]).round()
        tensor([[2., 1.]])
    """
    if len(sink_dims) == 0:
        raise ValueError(
            "sink_dims is empty: this model has no sink dimensions (VAR cannot run); calibrate it or pass sink_dims"
        )
    x = hidden_states.float()
    rms = torch.sqrt(x.pow(2).mean(dim=-1) + EPSILON)  # [...]
    index = torch.as_tensor(sink_dims, device=x.device, dtype=torch.long)
    return x.index_select(-1, index).abs().amax(dim=-1) / rms


def sink_mask(hidden_states: torch.Tensor, sink_dims: list[int], threshold: float = SINK_THRESHOLD) -> torch.Tensor:
    """Sink tokens: ``phi > threshold``. ``[..., M] -> [...]`` bool; all False when ``sink_dims`` is empty.

    Example:
        >>> x = torch.ones(1, 3, 1000); x[0, 0, 7] = 900.0
        >>> sink_mask(x, [7])
        tensor([[ True, False, False]])
    """
    if len(sink_dims) == 0:
        return torch.zeros(hidden_states.shape[:-1], dtype=torch.bool, device=hidden_states.device)
    return sink_scores(hidden_states, sink_dims) > threshold


def massive_activation_ratios(hidden_states: torch.Tensor) -> torch.Tensor:
    """``|x_d| / rms(x)`` for every dimension: ``[..., M] -> [..., M]`` fp32."""
    x = hidden_states.float()
    return x.abs() / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPSILON)


def middle_layers(num_layers: int) -> list[int]:
    """The layers whose first-token states decide the sink dimensions: ``[L // 4, ceil(3 L / 4))``
    (8..23 of 32), at least one layer. Massive activations appear after the first few layers and
    persist to the last ones; the middle band avoids both ends.

    Example:
        >>> middle_layers(32)[0], middle_layers(32)[-1], middle_layers(4)
        (8, 23, [1, 2])
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    start = num_layers // 4
    stop = max(start + 1, math.ceil(3 * num_layers / 4))
    return list(range(start, min(stop, num_layers)))


@dataclass
class SinkDimensions:
    """The outcome of :func:`find_sink_dims`.

    Attributes:
        dims: sink dimensions, strongest first (empty: the model has no massive activations).
        ratios: their magnitude ratios ``|x_d| / rms`` (median over ``layers``), same order.
        profile: ``[M]`` the ratio of every dimension (for plots and reports).
        layers: the layers the median ran over.
        min_ratio: the threshold a dimension had to reach.
    """

    dims: list[int]
    ratios: list[float]
    profile: torch.Tensor
    layers: list[int]
    min_ratio: float


def find_sink_dims(
    first_token_states: torch.Tensor,
    layers: list[int] | None = None,
    min_ratio: float = SINK_DIM_MIN_RATIO,
    max_dims: int = MAX_SINK_DIMS,
) -> SinkDimensions:
    """Sink dimensions from the first token's layer inputs.

    Args:
        first_token_states: ``[N, L, M]`` (or ``[L, M]``) the residual stream entering each layer at
            the first prompt token of N prompts.
        layers: layers to use (default :func:`middle_layers`).
        min_ratio: a dimension qualifies when its median ratio over ``layers`` (mean over the N
            prompts) is ``>= min_ratio`` (default tau / 2 = 10).
        max_dims: keep at most this many, strongest first.
    Returns:
        a :class:`SinkDimensions`; ``dims`` is empty when no dimension qualifies.

    Example:
        >>> states = torch.randn(2, 8, 1000) * 0.1; states[:, :, 42] = 50.0
        >>> find_sink_dims(states).dims
        [42]
    """
    if first_token_states.ndim == 2:
        first_token_states = first_token_states[None]
    if first_token_states.ndim != 3:
        raise ValueError(f"first_token_states must be [N, L, M] or [L, M], got shape {tuple(first_token_states.shape)}")
    num_layers = first_token_states.shape[1]
    layers = middle_layers(num_layers) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad or not layers:
        raise ValueError(f"layers {layers} must be a non-empty list within 0..{num_layers - 1}")
    if min_ratio <= 0:
        raise ValueError(f"min_ratio={min_ratio} must be > 0 (default tau/2 = {SINK_DIM_MIN_RATIO})")
    ratios = massive_activation_ratios(first_token_states[:, layers])  # [N, L', M]
    profile = ratios.mean(dim=0).median(dim=0).values  # [M]
    order = torch.argsort(profile, descending=True)
    dims = [int(d) for d in order[:max_dims] if float(profile[d]) >= min_ratio]
    return SinkDimensions(
        dims=dims, ratios=[float(profile[d]) for d in dims], profile=profile, layers=layers, min_ratio=float(min_ratio)
    )


@dataclass
class ImageCentricRows:
    """Per (batch, head, row) image-centric measures; every tensor ``[B, H, R]``.

    Attributes:
        visual_mass: ``sum_{j in V} A``.
        non_sink_ratio: ``sum_{j in V \\ S} A / sum_{j in V} A`` (0 where the visual mass is 0).
        image_centric: ``visual_mass >= mass_threshold`` and ``non_sink_ratio >= rho``.
    """

    visual_mass: torch.Tensor
    non_sink_ratio: torch.Tensor
    image_centric: torch.Tensor


def image_centric_rows(
    weights: torch.Tensor,
    image_keys: torch.Tensor,
    sink_keys: torch.Tensor,
    mass_threshold: float = VISUAL_MASS_THRESHOLD,
    rho: float = DEFAULT_RHO,
) -> ImageCentricRows:
    """The VAR image-centric head test for each (head, query row).

    Args:
        weights: ``[B, H, R, K]`` post-softmax attention.
        image_keys: ``[B, K]`` bool, image-token keys V.
        sink_keys: ``[B, K]`` bool, sink keys S (text and visual).
        mass_threshold: minimum visual mass (paper 0.2).
        rho: minimum visual non-sink ratio (paper 0.8 general).
    Returns:
        an :class:`ImageCentricRows`.

    Example:
        >>> w = torch.tensor([[[[0.1, 0.5, 0.4]]]])  # keys: text, image sink, image
        >>> rows = image_centric_rows(w, torch.tensor([[False, True, True]]), torch.tensor([[False, True, False]]))
        >>> round(rows.visual_mass.item(), 3), round(rows.non_sink_ratio.item(), 3), rows.image_centric.item()
        (0.9, 0.444, False)
    """
    weights = weights.float()
    image = image_keys[:, None, None, :].to(weights.dtype)  # [B, 1, 1, K]
    non_sink_image = (image_keys & ~sink_keys)[:, None, None, :].to(weights.dtype)
    visual_mass = (weights * image).sum(dim=-1)  # [B, H, R]
    non_sink_mass = (weights * non_sink_image).sum(dim=-1)  # [B, H, R]
    ratio = torch.where(visual_mass > 0, non_sink_mass / visual_mass.clamp_min(1e-12), torch.zeros_like(visual_mass))
    centric = (visual_mass >= mass_threshold) & (ratio >= rho)
    return ImageCentricRows(visual_mass=visual_mass, non_sink_ratio=ratio, image_centric=centric)


class FirstTokenRecorder(Intervention):
    """Records the layer input at the first real (non-padding) prompt token of every row.

    After a forward call, ``states`` is ``[B, L', M]`` fp32 over ``layers`` (in sorted order).
    """

    name = "first_token_recorder"
    needs_image = False
    uses_layer_input = True

    def __init__(self, layers: list[int]):
        self._layers = sorted(set(layers))
        self._by_layer: dict[int, torch.Tensor] = {}

    def layers(self) -> set[int]:
        return set(self._layers)

    def on_layer_input(self, ctx: LayerContext, hidden_states: torch.Tensor) -> None:
        if ctx.phase != "prefill":
            return
        first = ctx.prompt.attention_mask.long().argmax(dim=1)  # [B] first real position (left padding)
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        self._by_layer[ctx.layer] = hidden_states[rows, first.to(hidden_states.device)].detach().float()  # [B, M]

    @property
    def states(self) -> torch.Tensor:
        missing = [layer for layer in self._layers if layer not in self._by_layer]
        if missing:
            raise RuntimeError(f"FirstTokenRecorder saw no forward for layers {missing}")
        return torch.stack([self._by_layer[layer] for layer in self._layers], dim=1)  # [B, L', M]


@dataclass
class _LayerTotals:
    pairs: float = 0.0
    centric: float = 0.0
    massive: float = 0.0  # pairs with visual mass >= threshold
    visual_mass: float = 0.0
    non_sink_ratio: float = 0.0  # summed over pairs with visual mass > 0
    with_mass: float = 0.0
    visual_sinks: float = 0.0
    text_sinks: float = 0.0
    prompts: float = 0.0


class ImageCentricObserver(Intervention):
    """Accumulates VAR image-centric statistics over prompts (observation only; weights unchanged).

    At each layer in ``layers`` the sinks S are recomputed from the layer input (``phi > tau`` over
    ``sink_dims``); the rows examined are the text positions after the image (the rows VAR edits
    during prefill). Per layer it sums, over (head, text row) pairs: image-centric pairs, pairs with
    visual mass >= threshold, the visual mass and the non-sink ratio; and per prompt the number of
    visual and text sinks. ``head_centric[layer]`` is ``[H]``, image-centric pairs per head.

    Args:
        layers: layers to observe (VAR: 2..L-2, the last layer is excluded).
        sink_dims: sink dimensions (empty: no sinks, the ratio is 1 wherever there is visual mass).
        threshold: tau.
        mass_threshold / rho: the image-centric test.
    """

    name = "image_centric_observer"
    needs_image = True
    uses_layer_input = True
    uses_weights = True

    def __init__(
        self,
        layers: list[int],
        sink_dims: list[int],
        threshold: float = SINK_THRESHOLD,
        mass_threshold: float = VISUAL_MASS_THRESHOLD,
        rho: float = DEFAULT_RHO,
    ):
        self._layers = sorted(set(layers))
        self.sink_dims = list(sink_dims)
        self.threshold = threshold
        self.mass_threshold = mass_threshold
        self.rho = rho
        self.totals: dict[int, _LayerTotals] = {layer: _LayerTotals() for layer in self._layers}
        self.head_centric: dict[int, torch.Tensor] = {}
        self.head_pairs: dict[int, torch.Tensor] = {}
        self._sinks: dict[int, torch.Tensor] = {}

    def layers(self) -> set[int]:
        return set(self._layers)

    def on_layer_input(self, ctx: LayerContext, hidden_states: torch.Tensor) -> None:
        if ctx.phase == "prefill":
            self._sinks[ctx.layer] = (
                sink_mask(hidden_states, self.sink_dims, self.threshold) & ctx.prompt.spans.valid
            )  # [B, S]

    def rows(self, ctx: LayerContext) -> torch.Tensor | None:
        if ctx.phase != "prefill":
            return None
        return ctx.queries(ctx.prompt.spans.after_image)  # [B, Q]

    def on_weights(self, ctx: LayerContext, weights: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        spans = ctx.prompt.spans
        image = ctx.keys(spans.image)  # [B, K]
        sinks = self._sinks.get(ctx.layer)
        if sinks is None:
            sinks = torch.zeros_like(spans.image)
        sinks = ctx.keys(sinks)
        measures = image_centric_rows(weights, image, sinks, self.mass_threshold, self.rho)  # [B, H, R]
        pair = rows.mask[:, None, :].expand_as(measures.visual_mass)  # [B, H, R]
        pair = pair & spans.has_image[:, None, None]
        totals = self.totals[ctx.layer]
        centric = measures.image_centric & pair
        totals.pairs += float(pair.sum())
        totals.centric += float(centric.sum())
        totals.massive += float(((measures.visual_mass >= self.mass_threshold) & pair).sum())
        totals.visual_mass += float(measures.visual_mass[pair].sum())
        with_mass = pair & (measures.visual_mass > 0)
        totals.with_mass += float(with_mass.sum())
        totals.non_sink_ratio += float(measures.non_sink_ratio[with_mass].sum())
        images = spans.has_image
        totals.visual_sinks += float((sinks & image)[images].sum())
        totals.text_sinks += float((sinks & ~image & ctx.keys(spans.valid))[images].sum())
        totals.prompts += float(images.sum())
        per_head = centric.sum(dim=(0, 2)).float().cpu()  # [H]
        pairs_per_head = pair.sum(dim=(0, 2)).float().cpu()  # [H]
        self.head_centric[ctx.layer] = self.head_centric.get(ctx.layer, torch.zeros_like(per_head)) + per_head
        self.head_pairs[ctx.layer] = self.head_pairs.get(ctx.layer, torch.zeros_like(pairs_per_head)) + pairs_per_head
        return weights

    def statistics(self, num_layers: int, num_heads: int) -> dict:
        """Per-layer lists (``nan`` where a layer was not observed) and the ``[L, H]`` per-head fraction.

        Returns:
            dict with ``layers``, ``centric_fraction``, ``massive_fraction``, ``visual_mass_mean``,
            ``non_sink_ratio_mean``, ``visual_sinks_mean``, ``text_sinks_mean`` (each a list of L
            floats) and ``head_fraction`` (``[L, H]`` tensor).
        """
        nan = float("nan")
        out = {
            key: [nan] * num_layers
            for key in (
                "centric_fraction",
                "massive_fraction",
                "visual_mass_mean",
                "non_sink_ratio_mean",
                "visual_sinks_mean",
                "text_sinks_mean",
            )
        }
        head_fraction = torch.full((num_layers, num_heads), nan)
        for layer, totals in self.totals.items():
            if totals.pairs > 0:
                out["centric_fraction"][layer] = totals.centric / totals.pairs
                out["massive_fraction"][layer] = totals.massive / totals.pairs
                out["visual_mass_mean"][layer] = totals.visual_mass / totals.pairs
            if totals.with_mass > 0:
                out["non_sink_ratio_mean"][layer] = totals.non_sink_ratio / totals.with_mass
            if totals.prompts > 0:
                out["visual_sinks_mean"][layer] = totals.visual_sinks / totals.prompts
                out["text_sinks_mean"][layer] = totals.text_sinks / totals.prompts
            if layer in self.head_pairs:
                head_fraction[layer] = self.head_centric[layer] / self.head_pairs[layer].clamp_min(1)
        out["layers"] = list(self._layers)
        out["head_fraction"] = head_fraction
        return out
