"""GIFT's edit of the attention weights: the plain formula, and the fast path the decoding steps run.

The edit of one layer's attention rows (per query row ``i``, over the ``H`` heads; ``V`` the image keys with
multipliers ``M_j = exp(alpha * S'_j)`` from the saliency, ``Q`` the query-span keys, ``top = max(1, floor(H / 2))``):

1. visual heads ``H_V``: the ``top`` heads with the most attention to ``V`` in this row; in them
   ``A'[h, j] = A[h, j] * M_j`` for ``j`` in ``V``;
2. ``r = sum_{h in H_V, j in V} A'[h, j] / sum_{h in H_V, j in V} A[h, j]`` (1 when the denominator is 0);
3. query heads ``H_Q``: the ``top`` heads with the most attention to ``Q``; in them ``A'[h, j] = A[h, j] * beta * r``
   for ``j`` in ``Q`` (after step 1, a head in both sets gets both);
4. every row renormalised to sum 1 (a row with no weight, padding, stays zero).

:func:`enhance_reference` states it so, for any float dtype (float64 for tests), without in-place writes.
:func:`enhance` is what :class:`~vlm_guard.methods.gift.intervention.GIFT` runs: everything that does not depend on
the rows is built once per prefill (:class:`FusionMatrices`, over the prompt's keys), the head sums of a block of rows
are one batched matmul, both head selections one ``topk``, and the key factors a second matmul; in a step without
gradients it writes into the weights it is given. ``tests/test_kernels.py`` checks that the two agree on random
shapes, masks and parameters, in place and under autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlm_guard.core.contract import prompt_key_rows


def top_heads(score: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, H, R]`` scores -> bool mask of the top ``k`` heads per (batch, row)."""
    index = score.topk(k, dim=1).indices  # [B, k, R]
    return torch.zeros_like(score, dtype=torch.bool).scatter(1, index, True)


def enhance_reference(
    weights: torch.Tensor, image_gain: torch.Tensor, image_keys: torch.Tensor, query_keys: torch.Tensor, beta: float
) -> torch.Tensor:
    """GIFT's edit as stated in the module docstring (a new tensor; gradients flow through it).

    Args:
        weights: ``[B, H, R, K]`` post-softmax attention, any float dtype.
        image_gain: ``[B, K]`` ``M_j - 1`` on the image keys (zero elsewhere).
        image_keys: ``[B, K]`` bool, image keys ``V``.
        query_keys: ``[B, K]`` bool, query-span keys ``Q``.
        beta: query-head scale factor.
    Returns:
        ``[B, H, R, K]`` the edited weights, each row renormalised.

    Example:
        >>> A = torch.tensor([[[[0.5, 0.25, 0.25]], [[0.8, 0.1, 0.1]]]])  # 2 heads; keys: text, image, query
        >>> gain = torch.tensor([[0.0, 1.0, 0.0]])  # M = 2 on the image token
        >>> enhance_reference(A, gain, torch.tensor([[False, True, False]]), torch.tensor([[False, False, True]]), 1.0)
        tensor([[[[0.3333, 0.3333, 0.3333]],
        <BLANKLINE>
                 [[0.8000, 0.1000, 0.1000]]]])
    """
    heads = weights.shape[1]
    top = max(1, heads // 2)
    zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
    image = image_keys[:, None, None, :]  # [B, 1, 1, K]
    query = query_keys[:, None, None, :]
    multiplier = 1.0 + image_gain.to(weights.dtype)[:, None, None, :]  # M_j
    visual_heads = top_heads(torch.where(image, weights, zero).sum(dim=-1), top)[..., None]  # [B, H, R, 1]
    query_heads = top_heads(torch.where(query, weights, zero).sum(dim=-1), top)[..., None]
    boosted_keys = visual_heads & image  # [B, H, R, K]
    boosted = torch.where(boosted_keys, weights * multiplier, weights)
    before = torch.where(boosted_keys, weights, zero).sum(dim=(1, 3), keepdim=True)  # [B, 1, R, 1]
    after = torch.where(boosted_keys, boosted, zero).sum(dim=(1, 3), keepdim=True)
    has_visual = before > 0
    r = torch.where(
        has_visual, after / torch.where(has_visual, before, torch.ones_like(before)), torch.ones_like(before)
    )
    scaled = torch.where(query_heads & query, boosted * (beta * r), boosted)
    total = scaled.sum(dim=-1, keepdim=True)
    has_weight = total > 0
    return torch.where(has_weight, scaled / torch.where(has_weight, total, torch.ones_like(total)), scaled)


@dataclass(frozen=True)
class FusionMatrices:
    """Everything :func:`enhance` needs that does not depend on the attention rows, built once per prefill over the
    prompt's ``S`` keys (later keys are neither image nor query keys: only the renormalisation touches them).

    One matmul of the rows with ``sums [B, S, 3]`` plus ``bias`` gives, per (head, row), the columns

    0. ``sum_V A + tiny``            the visual mass (never 0: it divides)
    1. ``beta * sum_V A (M - 1)``    the visual mass the image multipliers add, times ``beta``
    2. ``sum_Q A``                   the attention to the query span

    Summed over the visual heads ``H_V`` and divided by column 0 they give ``[1, beta (r - 1), ..]``; plus
    ``offset = (0, beta - 1)``, the coefficients ``[1, beta r - 1]`` of the edit's rows ``edit [B, 2, S] = [M - 1, Q]``
    in the visual heads (first) and the query heads (second).

    Attributes:
        sums: ``[B, S, 3]``; edit: ``[B, 2, S]``; bias: ``[3]`` ``(tiny, 0, 0)``; one: ``[1]`` ones.
        offset: ``[2]`` ``(0, beta - 1)``, or None when ``beta == 1``.
    """

    sums: torch.Tensor
    edit: torch.Tensor
    bias: torch.Tensor
    one: torch.Tensor
    offset: torch.Tensor | None
    zeros: dict = field(
        default_factory=dict, compare=False
    )  # shape -> zeros the top heads are scattered into (never written)

    @classmethod
    def build(
        cls,
        image_gain: torch.Tensor,
        image_keys: torch.Tensor,
        query_keys: torch.Tensor,
        beta: float,
        dtype=torch.float32,
    ) -> FusionMatrices:
        """From ``[B, S]`` image multipliers minus one (zero outside the image), image keys and query keys."""
        gain = image_gain.to(dtype)
        query = query_keys.to(dtype)
        device = gain.device
        sums = torch.stack((image_keys.to(dtype), beta * gain, query), dim=-1)
        bias = torch.tensor([torch.finfo(dtype).tiny, 0.0, 0.0], dtype=dtype, device=device)
        offset = None if beta == 1.0 else torch.tensor([0.0, beta - 1.0], dtype=dtype, device=device)
        return cls(sums, torch.stack((gain, query), dim=1), bias, torch.ones(1, dtype=dtype, device=device), offset)


def enhance(weights: torch.Tensor, matrices: FusionMatrices, in_place: bool = False) -> torch.Tensor:
    """The edit with :class:`FusionMatrices` over the first ``S`` keys (``S <= K``; when ``S > K``, the first ``K`` of
    them). ``in_place``: edit ``weights`` itself (contiguous; the caller reads only the result), else a copy."""
    batch, heads, rows, keys = weights.shape
    top = max(1, heads // 2)
    sums_matrix, edit_matrix = matrices.sums, matrices.edit
    covered = sums_matrix.shape[1]
    if covered > keys:
        sums_matrix, edit_matrix, covered = sums_matrix[:, :keys], edit_matrix[..., :keys], keys
    if not (in_place and weights.is_contiguous()):
        weights = weights.clone(memory_format=torch.contiguous_format)
    head = prompt_key_rows(weights, covered)  # [B, H*R, S]
    sums = torch.baddbmm(matrices.bias, head, sums_matrix)  # [B, H*R, 3]
    by_head = sums if rows == 1 else sums.view(batch, heads, rows, 3)  # heads on dim 1: [B, H, (R,) 3]
    # the top heads of each column in one pass: column 0 the visual heads H_V, column 2 the query heads H_Q
    zeros = matrices.zeros.get(by_head.shape)
    if zeros is None:  # one per shape (a decoding step's is the same at every step and layer)
        zeros = matrices.zeros[by_head.shape] = torch.zeros_like(by_head)
    leads = zeros.scatter(1, by_head.topk(top, dim=1).indices, 1.0)
    over_visual = (by_head * leads[..., :1]).sum(dim=1, keepdim=True)  # [B, 1, (R,) 3] summed over H_V
    # [1, beta (r - 1)] (+ (0, beta - 1)) = [1, beta r - 1]: r = 1 + gained / before (1 where before is 0: then every
    # H_V weight on V is 0, and so is the gain)
    if weights.requires_grad:
        # under autograd, no division by the bias alone (no H_V weight on V: the gain is 0 there too, r = 1), whose
        # gradient ``1 / tiny`` overflows; column 0 is 1 everywhere
        visual = over_visual[..., :1]
        gained = over_visual[..., 1:2] / torch.where(
            visual > top * torch.finfo(weights.dtype).tiny, visual, matrices.one
        )
        scale = torch.cat((torch.ones_like(gained), gained), dim=-1)
    else:
        scale = (over_visual / over_visual[..., :1])[..., :2]
    if matrices.offset is not None:
        scale = scale + matrices.offset
    coefficients = leads[..., ::2] * scale  # [B, H, (R,) 2]: (in H_V, in H_Q * (beta r - 1))
    # factor = 1 + hv * (M_j - 1) + (beta r - 1) * hq * q_j, per (row, key)
    factor = torch.baddbmm(
        matrices.one, coefficients if rows == 1 else coefficients.view(batch, heads * rows, 2), edit_matrix
    )
    head.mul_(factor)
    # rows renormalised; a row with no weight (padding) stays zero: 0 / tiny
    return weights.div_(weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny))


def enhance_fusion(
    weights: torch.Tensor, image_gain: torch.Tensor, image_keys: torch.Tensor, query_keys: torch.Tensor, beta: float
) -> torch.Tensor:
    """The GIFT edit of a block of attention rows by the fast path (pure function; ``weights`` is not modified).

    Args:
        weights: ``[B, H, R, K]`` post-softmax attention (fp32).
        image_gain: ``[B, K]`` ``M_j - 1`` (zero outside the image).
        image_keys: ``[B, K]`` bool, image keys V.
        query_keys: ``[B, K]`` bool, query-span keys Q.
        beta: query-head scale factor.
    Returns:
        ``[B, H, R, K]`` edited weights, each row renormalised to sum 1.

    Example:
        >>> A = torch.tensor([[[[0.5, 0.25, 0.25]], [[0.8, 0.1, 0.1]]]])  # 2 heads; keys: text, image, query
        >>> gain = torch.tensor([[0.0, 1.0, 0.0]])  # M = 2 on the image token
        >>> # head 0 leads both: image 0.25 -> 0.5, r = 2, query 0.25 -> 0.5, then / 1.5; head 1 untouched
        >>> enhance_fusion(A, gain, torch.tensor([[False, True, False]]), torch.tensor([[False, False, True]]), 1.0)
        tensor([[[[0.3333, 0.3333, 0.3333]],
        <BLANKLINE>
                 [[0.8000, 0.1000, 0.1000]]]])
    """
    return enhance(weights, FusionMatrices.build(image_gain, image_keys, query_keys, beta, weights.dtype))
