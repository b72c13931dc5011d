"""GIFT saliency layer l* and enhancement layers, found by calibration.

GIFT (Qi et al., 2025) takes its visual saliency map from the gaze shift at one layer l*: the layer
with the largest total positive gaze shift ``sum_{h, i in Q, j in V} max(A[h,i,j] - A[h,i-1,j], 0)``.
The released code fixes l* per model (LLaVA-1.5-7B 11, 13B 10, Qwen2-VL-7B 14, 0-indexed);
:class:`GazeShiftObserver` measures the per-layer total over a calibration set (the pure functions
are in :mod:`vlm_guard.methods.gift.gaze`) and :func:`choose_saliency_layer` picks l*.

Project rules (documented choices, not from the paper):

- Rows: every query-span row counts during calibration (the paper counts informative words only;
  calibration prompts are short descriptive requests where nearly every word is informative, and
  the layer ranking does not depend on a constant subset of rows).
- Candidates for l*: layers ``1 .. L-2``. Layer 0 attends before any contextual mixing and the last
  layer has no layer after it to enhance (models with fewer than 3 layers use every layer).
- Enhancement layers (:func:`enhancement_layers`): from ``l* + 1`` to the paper recipe's relative
  end, ``round(22 / 32 * L)`` (LLaVA-1.5-7B: 12..22 with l* = 11), inclusive; when l* is at or
  beyond that end, the single layer ``l* + 1``.
"""

from __future__ import annotations

import torch

from vlm_guard.core.contract import Intervention, LayerContext, RowSelection
from vlm_guard.methods.gift.gaze import saliency_layer, total_positive_gaze_shift

ENHANCE_END_FRACTION = 22 / 32
"""End of the enhancement band as a fraction of depth (paper recipe for LLaVA-1.5-7B: layers 12..22 of 32)."""


def candidate_layers(num_layers: int) -> list[int]:
    """Layers eligible as l*: ``1 .. L-2`` (all layers when ``L < 3``).

    Example:
        >>> candidate_layers(32)[0], candidate_layers(32)[-1], candidate_layers(2)
        (1, 30, [0, 1])
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    if num_layers < 3:
        return list(range(num_layers))
    return list(range(1, num_layers - 1))


def choose_saliency_layer(layer_shift: torch.Tensor | list[float], num_layers: int | None = None) -> int | None:
    """l*: the candidate layer with the largest mean total positive gaze shift.

    Args:
        layer_shift: ``[L]`` per-layer score (NaN where not measured).
        num_layers: L (default ``len(layer_shift)``).
    Returns:
        the layer, or None when no candidate has a finite positive score (e.g. no image or no query).

    Example:
        >>> choose_saliency_layer(torch.tensor([9.0, 1.0, 3.0, 2.0, 9.0]))
        2
    """
    scores = torch.as_tensor(layer_shift, dtype=torch.float32)
    num_layers = scores.numel() if num_layers is None else num_layers
    candidates = candidate_layers(num_layers)
    finite = {
        layer: float(scores[layer])
        for layer in candidates
        if torch.isfinite(scores[layer]) and float(scores[layer]) > 0
    }
    if not finite:
        return None
    return saliency_layer(finite)


def enhancement_layers(saliency_layer_index: int | None, num_layers: int) -> list[int]:
    """Suggested GIFT enhancement layers after l* (see the module rule).

    Example:
        >>> enhancement_layers(11, 32)
        [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
        >>> enhancement_layers(2, 4)
        [3]
    """
    if saliency_layer_index is None:
        return []
    if not 0 <= saliency_layer_index < num_layers:
        raise ValueError(f"saliency layer {saliency_layer_index} is outside 0..{num_layers - 1}")
    start = saliency_layer_index + 1
    if start >= num_layers:
        return []
    end = min(num_layers - 1, max(start, round(ENHANCE_END_FRACTION * num_layers)))
    return list(range(start, end + 1))


class GazeShiftObserver(Intervention):
    """Sums the total positive gaze shift (query rows vs image keys) per layer over prompts.

    After the calibration passes, :meth:`layer_means` is ``[L]``: the mean over prompts of
    ``sum_{h, i in Q, j in V} dA`` (NaN for layers not observed). Observation only.

    Args:
        layers: layers to observe.
    """

    name = "gaze_shift_observer"
    needs_image = True
    uses_weights = True

    def __init__(self, layers: list[int]):
        self._layers = sorted(set(layers))
        self._sums: dict[int, float] = {layer: 0.0 for layer in self._layers}
        self._prompts: dict[int, int] = {layer: 0 for layer in self._layers}

    def layers(self) -> set[int]:
        return set(self._layers)

    def rows(self, ctx: LayerContext) -> torch.Tensor | None:
        if ctx.phase != "prefill":
            return None
        query = ctx.queries(ctx.prompt.spans.query)  # [B, Q]
        previous = torch.zeros_like(query)
        previous[:, :-1] = query[:, 1:]  # the row just before each query row
        return query | previous

    def on_weights(self, ctx: LayerContext, weights: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        spans = ctx.prompt.spans
        query_rows = ctx.queries(spans.query)[:, rows.index]  # [B, R]
        per_head = total_positive_gaze_shift(weights, query_rows, ctx.keys(spans.image), rows.index)  # [B, H]
        counted = spans.has_image & spans.query.any(dim=1)  # [B]
        self._sums[ctx.layer] += float(per_head.sum(dim=1)[counted].sum())
        self._prompts[ctx.layer] += int(counted.sum())
        return weights

    def layer_means(self, num_layers: int) -> torch.Tensor:
        means = torch.full((num_layers,), float("nan"))
        for layer in self._layers:
            if self._prompts[layer] > 0:
                means[layer] = self._sums[layer] / self._prompts[layer]
        return means
