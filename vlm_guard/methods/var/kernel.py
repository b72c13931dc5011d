"""VAR's edit of the attention weights: the plain formula, and the fast path the decoding steps run.

The edit, per attention row ``A`` (one layer, head and query row; ``A`` sums to 1 over the keys), with ``I`` the
image keys, ``Sk`` the sink keys (text and visual) and ``F = I \\ Sk`` the non-sink image keys:

- the row is image-centric when ``sum_I A >= visual_threshold`` and ``sum_F A >= rho * sum_I A`` and
  ``sum_F A > 0``; other rows are left as they are;
- in an image-centric row, sink keys keep ``(1 - p)`` of their weight, and the budget ``p * sum_Sk A`` goes to the
  non-sink image keys in proportion to their weight: ``A_j * (1 + p * sum_Sk A / sum_F A)`` for ``j`` in ``F``;
  every other key is unchanged, so the row still sums to 1.

:func:`recycle_reference` states it so, for any float dtype (float64 for tests), without in-place writes.
:func:`recycle` is what :class:`~vlm_guard.methods.var.intervention.VAR` runs: everything that does not depend on the
rows is built once per prefill and layer (:class:`RecyclingMatrices`, over the prompt's keys), and a block of rows
costs two batched matmuls and a few element-wise operations; in a step without gradients it writes into the weights
it is given. ``tests/test_kernels.py`` checks that the two agree on random shapes, masks and parameters, in place
and under autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlm_guard.core.contract import prompt_key_rows


def recycle_reference(
    weights: torch.Tensor,
    image_keys: torch.Tensor,
    sink_keys: torch.Tensor,
    p: float,
    rho: float,
    visual_threshold: float,
) -> torch.Tensor:
    """VAR's edit as stated in the module docstring (a new tensor; gradients flow through it).

    Args:
        weights: ``[B, H, R, K]`` post-softmax attention, any float dtype.
        image_keys: ``[B, K]`` bool, image keys ``I``.
        sink_keys: ``[B, K]`` bool, sink keys ``Sk``.
        p: fraction of the sink attention moved, in ``[0, 1]``.
        rho: min share of the visual attention on non-sink image keys.
        visual_threshold: min visual attention of an edited row.
    Returns:
        ``[B, H, R, K]`` the edited weights.

    Example:
        >>> A = torch.tensor([[[[0.5, 0.1, 0.3, 0.1]]]])  # sink BOS, visual sink, two image tokens
        >>> image = torch.tensor([[False, True, True, True]]); sink = torch.tensor([[True, True, False, False]])
        >>> recycle_reference(A, image, sink, p=0.5, rho=0.5, visual_threshold=0.2)
        tensor([[[[0.2500, 0.0500, 0.5250, 0.1750]]]])
    """
    image = image_keys[:, None, None, :]  # [B, 1, 1, K]
    sink = sink_keys[:, None, None, :]
    free = image & ~sink
    zero = torch.zeros((), dtype=weights.dtype, device=weights.device)
    visual_mass = torch.where(image, weights, zero).sum(dim=-1, keepdim=True)  # [B, H, R, 1]
    free_mass = torch.where(free, weights, zero).sum(dim=-1, keepdim=True)
    sink_mass = torch.where(sink, weights, zero).sum(dim=-1, keepdim=True)
    image_centric = (visual_mass >= visual_threshold) & (free_mass >= rho * visual_mass) & (free_mass > 0)
    # a row that is not edited divides by 1 (no 0 / 0, whose gradient would be NaN even where it is not used)
    divisor = torch.where(image_centric, free_mass, torch.ones_like(free_mass))
    gained = weights * (p * sink_mass / divisor)  # each non-sink image key's share of the budget
    edited = torch.where(sink, weights * (1.0 - p), torch.where(free, weights + gained, weights))
    return torch.where(image_centric, edited, weights)


@dataclass(frozen=True)
class RecyclingMatrices:
    """Everything :func:`recycle` needs that does not depend on the attention rows, built once per prefill and layer
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
    def build(
        cls,
        image_keys: torch.Tensor,
        sink_keys: torch.Tensor,
        p: float,
        rho: float,
        visual_threshold: float,
        dtype=torch.float32,
    ) -> RecyclingMatrices:
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


def recycle(weights: torch.Tensor, matrices: RecyclingMatrices, in_place: bool = False) -> torch.Tensor:
    """The edit with :class:`RecyclingMatrices` over the first ``S`` keys (``S <= K``; when ``S > K``, the first ``K``
    of them). ``in_place``: edit ``weights`` itself (contiguous, no gradient recorded; the caller reads only the
    result), else a new tensor (gradients flow through it).

    In place, the rows are edited through one view of their prompt keys, with batched matmuls without an added
    input (``bmm``, faster than ``baddbmm`` on small blocks).
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


def recycle_sink_attention(
    weights: torch.Tensor,
    image_keys: torch.Tensor,
    sink_keys: torch.Tensor,
    p: float,
    rho: float,
    visual_threshold: float,
) -> torch.Tensor:
    """The VAR edit of a block of attention rows by the fast path (pure function; ``weights`` is not modified).

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
    return recycle(weights, RecyclingMatrices.build(image_keys, sink_keys, p, rho, visual_threshold, weights.dtype))
