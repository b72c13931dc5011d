"""Explicit fp32 attention rows: the kernels of the guarded attention.

Where a method reads or edits scores or weights, the engine computes the attention of the query rows it asks
for explicitly, in fp32, and the methods' hooks run on them (:mod:`vlm_guard.core.attention` merges the result
into the model's own output). This module holds that computation and knows no method by name:

- grouped-query attention without repeated keys: the scores ``q k^T`` and the output ``weights @ v`` of ``H``
  query heads over ``KVH`` key/value heads, one batched matmul each (:func:`grouped_scores`,
  :func:`grouped_output`);
- the mask of the selected rows (:func:`allowed_rows`: the model's 4-D mask, bool or additive, or causal from the
  cache position), and the keys of a sliding-window cache placed at their absolute positions
  (:func:`place_window`), so that the methods' key masks index the right keys;
- the rows themselves (:func:`explicit_rows`), with the layer's logit soft-capping when it has one, and the methods'
  ``on_scores`` / ``on_weights`` hooks in order;
- chunks: a prefill's explicit rows are computed a chunk of rows at a time (:func:`explicit_chunks`), so that one
  chunk's fp32 scores ``[B, H, rows, K]`` hold about as many elements as the prompt's hidden states ``[B, S, M]``
  (:data:`EXPLICIT_CHUNK_RATIO`, :func:`chunk_length`); each row's result is the same as computed whole.

A decoding step (every row, no mask, no score edit) takes the shortest path: the weights are the softmax of the
grouped product itself, and the output's matmul reads them in that layout.
"""

from __future__ import annotations

import torch

from vlm_guard.core.contract import LayerContext, RowSelection

# elements of one chunk of explicit prefill scores ``[B, H, rows, K]`` per element of the prompt's hidden states
# ``[B, S, M]``: a chunk of rows is then no larger than one hidden-state tensor of the prompt (the model holds
# many of those), so the explicit rows of a long prompt add little to the plain model's peak memory
EXPLICIT_CHUNK_RATIO = 1.0
MIN_CHUNK_ELEMENTS = 1 << 16


def grouped_scores(
    query: torch.Tensor, key: torch.Tensor, scaling: float = 1.0, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """``scaling * q k^T`` without materialising repeated keys (one ``baddbmm`` over views).

    Args:
        query: ``[B, H, R, D]`` fp32.
        key: ``[B, KVH, K, D]`` fp32.
        scaling: the factor of the product.
        zero: a 0-d fp32 zero on the device (the unread input of ``baddbmm``), to save allocating one.
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
        scores = torch.baddbmm(
            zero if zero is not None else grouped.new_zeros(()), grouped, keys_t, beta=0.0, alpha=scaling
        )
    return scores  # [B*KVH, groups*R, K]


def grouped_output(weights: torch.Tensor, value: torch.Tensor, grouped: torch.Tensor | None = None) -> torch.Tensor:
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


def place_window(key, value, attention_mask, missing: int, past_length: int, query_length: int):
    """Keys ``[B, KVH, K, D]`` of a sliding-window cache (the last ``K`` positions) padded on the left by ``missing``
    masked positions, so that key ``j`` is absolute position ``j``; the mask (bool, additive float, or None: causal
    from ``past_length``) likewise."""
    key = torch.nn.functional.pad(key, (0, 0, missing, 0))
    value = torch.nn.functional.pad(value, (0, 0, missing, 0))
    if attention_mask is not None and attention_mask.ndim == 4:
        fill = False if attention_mask.dtype == torch.bool else torch.finfo(attention_mask.dtype).min
        attention_mask = torch.nn.functional.pad(
            attention_mask[..., : key.shape[2] - missing], (missing, 0), value=fill
        )
    else:
        key_positions = torch.arange(key.shape[2], device=key.device)
        rows = torch.arange(query_length, device=key.device)[:, None] + past_length  # absolute position of each row
        attention_mask = ((key_positions[None, :] <= rows) & (key_positions[None, :] >= missing))[
            None, None
        ]  # [1, 1, Q, K]
    return key, value, attention_mask


def allowed_rows(attention_mask, index, past_length, key_length, device, query_length=None):
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


def chunk_length(key_length: int, query: torch.Tensor, rows: int, hidden_size: int) -> int:
    """Rows per chunk of a prefill's explicit rows: one chunk's ``[B, H, rows, K]`` scores hold about as many
    elements as the call's hidden states ``[B, Q, M]`` (:data:`EXPLICIT_CHUNK_RATIO`), at least
    :data:`MIN_CHUNK_ELEMENTS`."""
    batch, heads, query_length = query.shape[0], query.shape[1], query.shape[2]
    budget = max(MIN_CHUNK_ELEMENTS, int(EXPLICIT_CHUNK_RATIO * batch * query_length * hidden_size))
    return max(1, min(rows, budget // max(1, batch * heads * key_length)))


def explicit_rows(
    ctx: LayerContext,
    query,
    key,
    value,
    attention_mask,
    scaling,
    index,
    selections,
    every_row=False,
    softcap=None,
    zero: torch.Tensor | None = None,
):
    """Explicit attention for rows ``index``; returns the per-head outputs ``[B, R, H, D]`` (the model's layout) and the
    (edited) weights ``[B, H, R, K]`` over the keys given, both fp32.

    ``query [B, H, Q, D]``, ``key/value [B, KVH, K, D]``, ``attention_mask`` as the model's attention function gets it.
    ``selections``: ``(intervention, RowSelection, whole)`` per method; ``whole``: its rows are every row
    computed here (no masked merge of its edits).
    ``every_row``: all ``Q`` rows are wanted (``index`` is ``0..Q-1`` or None), so the row gather is skipped.
    ``softcap``: attention-logit soft-capping of the layer (Gemma 2 style, ``c * tanh(s / c)`` before the mask),
    as the model's eager attention applies it.
    ``zero``: a 0-d fp32 zero on the query's device (see :func:`grouped_scores`).
    When ``ctx.key_length`` exceeds the keys given (a sliding-window layer's cache holds only the last
    window while decoding), the keys are placed at their absolute positions and the missing ones masked,
    so that the methods' key masks (image, sinks, query span) index the right keys.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    missing = ctx.key_length - key.shape[2]
    if missing > 0:
        key, value, attention_mask = place_window(key, value, attention_mask, missing, ctx.past_length, query.shape[2])
    rows_query = (query if every_row else query[:, :, index, :]).float()  # [B, H, R, D]
    allowed = None
    if attention_mask is not None or query.shape[2] > 1 or key.shape[2] > ctx.past_length + query.shape[2]:
        allowed = allowed_rows(
            attention_mask, None if every_row else index, ctx.past_length, key.shape[2], query.device, query.shape[2]
        )
    product = grouped_scores(rows_query, key.float(), scaling, zero)  # [B*KVH, G*R, K]
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
    output = grouped_output(weights, value.float(), grouped if weights is viewed else None)
    return output, (weights[..., missing:] if missing > 0 else weights)


def explicit_chunks(
    ctx: LayerContext,
    query,
    key,
    value,
    attention_mask,
    scaling,
    index,
    selections,
    softcap=None,
    *,
    hidden_size: int,
    chunk_rows: int | None = None,
    keep_weights: bool = True,
    zero: torch.Tensor | None = None,
):
    """:func:`explicit_rows` over the rows ``index`` (None: all ``Q`` rows) in chunks of rows when the call holds
    prompt rows and every method accepts chunks (``Intervention.chunkable_rows``): ``chunk_rows`` rows each, or
    :func:`chunk_length`'s for a model of width ``hidden_size`` when None. Returns ``[B, R, H, D]`` and the weights
    ``[B, H, R, K]`` (None for a chunked call without ``keep_weights``: they are never held whole)."""
    rows = query.shape[2] if index is None else index.shape[0]
    chunk = rows
    if ctx.has_prompt_rows and all(intervention.chunkable_rows for intervention, _, _ in selections):
        chunk = chunk_rows if chunk_rows is not None else chunk_length(ctx.key_length, query, rows, hidden_size)
    if chunk >= rows:
        return explicit_rows(
            ctx,
            query,
            key,
            value,
            attention_mask,
            scaling,
            index,
            selections,
            every_row=index is None,
            softcap=softcap,
            zero=zero,
        )
    if index is None:
        index = torch.arange(rows, device=query.device)
    output = None
    weight_chunks = []
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        part = index[start:stop]  # [C]
        chunk_selections = [
            (
                intervention,
                RowSelection(
                    index=part,
                    mask=None if selection.mask is None else selection.mask[:, start:stop],
                    first=start == 0,
                    last=stop == rows,
                ),
                whole,
            )
            for intervention, selection, whole in selections
        ]
        explicit, weights = explicit_rows(
            ctx, query, key, value, attention_mask, scaling, part, chunk_selections, softcap=softcap, zero=zero
        )
        if output is None:
            output = explicit.new_empty(explicit.shape[0], rows, *explicit.shape[2:])  # [B, R, H, D]
        output[:, start:stop] = explicit
        if keep_weights:
            weight_chunks.append(weights)
    return output, (torch.cat(weight_chunks, dim=2) if weight_chunks else None)
