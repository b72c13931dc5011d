"""GIFT gaze shift (Qi et al., 2025), as small pure functions.

The gaze shift of query position ``i`` on image token ``j`` in one layer is the positive part of the
change in attention from the previous position: ``dA[h, i, j] = max(A[h, i, j] - A[h, i-1, j], 0)``,
counted for query-span rows ``i`` and image keys ``j`` only. GIFT uses it twice:

- to choose its saliency layer l* (the layer with the largest total positive shift, see
  :func:`total_positive_gaze_shift` / :func:`saliency_layer`), once per model during calibration;
- to build the per-sample visual saliency map (:func:`gaze_saliency`, :func:`normalise_saliency`,
  :func:`saliency_multipliers`).

Shapes: ``B`` batch, ``H`` heads, ``R`` attention rows (query positions), ``K`` keys. Rows are absolute
prompt positions ``row_positions`` (default ``0..R-1``: a full ``[B, H, S, S]`` attention map); the
previous row of a query row must be present, as the row just before it.

Example:
    >>> A = torch.tensor([[[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]]]])  # [1, 1, 3, 3]
    >>> query = torch.tensor([[False, True, True]]); image = torch.tensor([[False, True, True]])
    >>> gaze_shift(A, query, image)[0, 0]
    tensor([[0.0000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.5000],
            [0.0000, 0.3000, 0.0000]])
"""

from __future__ import annotations

import torch

from vlm_guard.methods.gift.config import CLAMP_STDS  # noqa: F401  (defined beside the config)


def gaze_shift(
    weights: torch.Tensor, query_rows: torch.Tensor, image_keys: torch.Tensor, row_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Positive gaze shift ``dA``.

    Args:
        weights: ``[B, H, R, K]`` post-softmax attention of one layer.
        query_rows: ``[B, R]`` bool, the rows ``i`` that count (query-span positions).
        image_keys: ``[B, K]`` bool, the image keys ``j``.
        row_positions: ``[R]`` absolute positions of the rows (sorted, unique); default ``0..R-1``.
            Each counted row must have its predecessor (position - 1) as the row before it.
    Returns:
        ``[B, H, R, K]`` fp32, ``max(A[i] - A[i-1], 0)`` on (counted row, image key), zero elsewhere
        (a row without its predecessor, e.g. position 0, contributes zero).
    """
    A = weights.float()
    previous = torch.zeros_like(A)
    previous[:, :, 1:] = A[:, :, :-1]  # [B, H, R, K] the row before each row
    rows = weights.shape[2]
    if row_positions is None:
        row_positions = torch.arange(rows, device=weights.device)
    has_previous = torch.zeros(rows, dtype=torch.bool, device=weights.device)
    has_previous[1:] = row_positions[1:] == row_positions[:-1] + 1  # [R]
    counted = query_rows.bool() & has_previous[None, :]  # [B, R]
    shift = (A - previous).clamp_min(0.0)
    keep = counted[:, None, :, None] & image_keys.bool()[:, None, None, :]  # [B, 1, R, K]
    return shift * keep


def total_positive_gaze_shift(
    weights: torch.Tensor, query_rows: torch.Tensor, image_keys: torch.Tensor, row_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed positive gaze shift per head: ``sum_{i in query, j in V} dA[h, i, j]``.

    Args: as :func:`gaze_shift`.
    Returns:
        ``[B, H]`` fp32. Sum over heads (and average over samples) for a layer's score; the layer with
        the largest score is GIFT's saliency layer l* (see :func:`saliency_layer`).

    Example:
        >>> A = torch.tensor([[[[1.0, 0.0], [0.2, 0.8]]]])
        >>> total_positive_gaze_shift(A, torch.tensor([[False, True]]), torch.tensor([[False, True]]))
        tensor([[0.8000]])
    """
    return gaze_shift(weights, query_rows, image_keys, row_positions).sum(dim=(-1, -2))


def saliency_layer(layer_scores: dict[int, float] | torch.Tensor) -> int:
    """The layer with the largest total positive gaze shift.

    Args:
        layer_scores: ``{layer: score}`` or a ``[L]`` tensor of per-layer scores (e.g.
            ``total_positive_gaze_shift(...).sum(-1).mean()`` per layer, over calibration samples).
    Returns:
        the layer index (ties: the earliest).

    Example:
        >>> saliency_layer({3: 0.1, 4: 0.7, 5: 0.7})
        4
    """
    if isinstance(layer_scores, dict):
        if not layer_scores:
            raise ValueError("layer_scores is empty: score at least one layer")
        best = max(layer_scores.values())
        return min(layer for layer, score in layer_scores.items() if score == best)
    if layer_scores.numel() == 0:
        raise ValueError("layer_scores is empty: score at least one layer")
    return int(torch.argmax(layer_scores.float()).item())


def gaze_saliency(
    shift: torch.Tensor,
    informative_rows: torch.Tensor,
    query_rows: torch.Tensor | None = None,
    num_heads: int | None = None,
) -> torch.Tensor:
    """Raw saliency ``S_j``: mean of ``dA`` over the top heads and the informative query rows.

    Heads: the ``num_heads`` (default ``floor(H/2)``, at least 1) heads with the largest summed shift
    over the informative rows, chosen per sample. Rows: ``informative_rows``; a sample with no
    informative row falls back to all its ``query_rows`` (the released code divides by zero there);
    a sample with neither gets zeros.

    Args:
        shift: ``[B, H, R, K]`` from :func:`gaze_shift`.
        informative_rows: ``[B, R]`` bool.
        query_rows: ``[B, R]`` bool fallback rows (default: ``informative_rows``).
        num_heads: how many heads to average.
    Returns:
        ``[B, K]`` fp32, never NaN.
    """
    informative = informative_rows.bool()
    fallback = informative if query_rows is None else query_rows.bool()
    use_rows = torch.where(informative.any(dim=1, keepdim=True), informative, fallback)  # [B, R]
    return saliency_from_head_sums(gaze_head_sums(shift, use_rows), use_rows.sum(dim=1), num_heads)


def gaze_head_sums(shift: torch.Tensor, use_rows: torch.Tensor) -> torch.Tensor:
    """``[B, H, K]`` the gaze shift summed over the rows that count (``use_rows [B, R]``). Sums of disjoint row
    blocks add up, so a long prompt's rows can be taken in chunks (GIFT does)."""
    return (shift * use_rows[:, None, :, None]).sum(dim=2)


def saliency_from_head_sums(per_head: torch.Tensor, n_rows: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
    """The end of :func:`gaze_saliency`: the top heads of ``per_head [B, H, K]`` (summed over keys) averaged over
    those heads and the ``n_rows [B]`` rows that count. Returns ``[B, K]``."""
    heads = per_head.shape[1]
    k = max(1, heads // 2) if num_heads is None else max(1, min(num_heads, heads))
    top = per_head.sum(dim=-1).topk(k, dim=1).indices  # [B, k]
    chosen = per_head.gather(1, top[:, :, None].expand(-1, -1, per_head.shape[-1]))  # [B, k, K]
    return chosen.sum(dim=1) / (k * n_rows.clamp_min(1).float()[:, None])


def normalise_saliency(
    saliency: torch.Tensor, image_keys: torch.Tensor, clamp_stds: float = CLAMP_STDS
) -> torch.Tensor:
    """``S'``: clamp to mean +- ``clamp_stds`` std over the image keys, then min-max to [0, 1].

    Statistics use the unbiased std (``N - 1``, ``torch.std``'s default) over each sample's image keys,
    as the released GIFT code. A sample whose clamped saliency is constant (or that has fewer than two
    image keys) gets zeros, never NaN. Outside the image ``S'`` is zero.

    Args:
        saliency: ``[B, K]`` raw saliency.
        image_keys: ``[B, K]`` bool.
    Returns:
        ``[B, K]`` fp32 in [0, 1].

    Example:
        >>> normalise_saliency(torch.tensor([[9.0, 1.0, 2.0, 3.0]]), torch.tensor([[False, True, True, True]]))
        tensor([[0.0000, 0.0000, 0.5000, 1.0000]])
    """
    image = image_keys.bool()
    values = saliency.float()
    count = image.sum(dim=-1, keepdim=True).clamp_min(1).float()  # [B, 1]
    mean = (values * image).sum(dim=-1, keepdim=True) / count
    std = (((values - mean) ** 2) * image).sum(dim=-1, keepdim=True).div((count - 1).clamp_min(1)).sqrt()  # unbiased
    clamped = torch.minimum(torch.maximum(values, mean - clamp_stds * std), mean + clamp_stds * std)
    big = torch.finfo(torch.float32).max
    low = torch.where(image, clamped, big).amin(dim=-1, keepdim=True)
    high = torch.where(image, clamped, -big).amax(dim=-1, keepdim=True)
    span = high - low
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    normalised = torch.where(span > 0, (clamped - low) / safe_span, torch.zeros_like(clamped))
    return torch.where(image, normalised, torch.zeros_like(normalised))


def saliency_multipliers(normalised: torch.Tensor, alpha: float) -> torch.Tensor:
    """``M_j = exp(alpha * S'_j)`` (1 where ``S'`` is zero, i.e. outside the image)."""
    return torch.exp(alpha * normalised.float())
