"""The registered attention function: plan lookup, explicit rows where a method asks, merge into the base output.

The engine registers one attention function in transformers' ``AttentionInterface`` (:meth:`GuardedAttention._attention`).
While no method runs in any thread it is the model's own implementation (SDPA or eager), called with the original
arguments, so the outputs are bit-identical to the plain model (and ``torch.compile`` traces it inline). While
methods run (:meth:`GuardedAttention._guarded_attention`, eagerly):

1. plan lookup: the layer's :class:`~vlm_guard.core.generations.LayerPlan` in the current call; a layer without one
   returns the base implementation at once;
2. row requests: each method that reads scores or weights says which query rows it needs
   (:meth:`Intervention.rows`); rows of samples without an image are dropped for image-dependent methods;
3. explicit rows (:mod:`vlm_guard.core.explicit_rows`) for those rows, with the methods' hooks, in chunks for a long
   prefill;
4. merge: when the explicit rows are every row of the call they are the output; otherwise the base implementation
   runs and the explicit rows replace its rows where a method asked;
5. head-output hooks (VHR) on the merged per-head outputs.

The decoding step has a function of its own (:meth:`GuardedAttention._decode_step`): every method asks for every row
(:data:`~vlm_guard.core.contract.EVERY_ROW`), so nothing is read from a tensor (no host-device synchronisation) and
no row index is built; other calls (a prefill, a recomputation without cache) take
:meth:`GuardedAttention._selected_rows`.

:class:`GuardedAttention` is mixed into :class:`~vlm_guard.core.engine.GuardEngine`, whose ``__init__`` and
``install`` set the attributes used here (``_base_attention``, ``_returns_weights``, ``_layer_of``,
``_active_frames``, ``_zeros``, ``chunk_rows``, ``geometry``) and which provides ``_current`` and ``_layer_context``
(:class:`~vlm_guard.core.generations.GenerationTracking`).
"""

from __future__ import annotations

import torch

from vlm_guard.core.contract import EVERY_ROW, Intervention, RowSelection
from vlm_guard.core.explicit_rows import chunk_length, explicit_chunks, explicit_rows

EVERY_ROW_SELECTION = RowSelection(index=None, mask=None)  # every row of every sample (a decoding step), shared


class GuardedAttention:
    """The attention function the engine registers, and its explicit rows (see the module docstring)."""

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The registered attention function: the base implementation while no methods run in any thread (what
        ``torch.compile`` traces into its graph), else :meth:`_guarded_attention`, run eagerly."""
        if not self._active_frames:
            return self._base_attention(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        guarded = self._guarded_attention_eager if torch.compiler.is_compiling() else self._guarded_attention
        return guarded(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    def _guarded_attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The attention while methods run. ``query [B, H, Q, D]``, ``key/value [B, KVH, K, D]``;
        returns ``([B, Q, H, D], weights)`` like transformers' implementations.

        ``weights`` is what the base implementation returns: None for SDPA; for eager, the ``[B, H, Q, K]``
        post-softmax weights, with a method's edits in the rows it edited (PAI, VAR, GIFT edit weights or
        scores; VHR scales head outputs, so its layers report the unedited weights). So
        ``output_attentions=True`` on an eager model gives one map per decoder layer, in layer order.

        Hot path (a decoding step): layers without a method in the call's plan return the base implementation
        at once; in the others every method asks for every row (:data:`EVERY_ROW`), so nothing here reads a
        tensor's value (no host-device synchronisation).
        """
        base = self._base_attention
        frame = self._current()
        call = frame.call if frame is not None else None
        layer = self._layer_of.get(id(module))
        plan = call.plan.get(layer) if call is not None else None
        if plan is None:
            return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        # a sliding-window layer's cache holds only the window's keys: the explicit rows place them at their positions
        key_length = max(key.shape[2], call.past_length + query.shape[2])
        ctx = self._layer_context(call, layer, query.shape[2], key_length)
        prompt = ctx.prompt
        has_image = prompt.spans.has_image  # [B]

        # which rows each method needs explicitly
        requests: list[tuple[Intervention, object]] = []
        every_row = True  # every request is EVERY_ROW: decided without reading a tensor
        for intervention in plan.explicit:
            rows = intervention.rows(ctx)
            if rows is None:
                continue
            if rows is EVERY_ROW:
                requests.append(
                    (intervention, ctx.image_rows() if intervention.needs_image and not prompt.all_have_image else None)
                )
                continue
            every_row = False
            if intervention.needs_image:
                rows = rows & has_image[:, None]
            if bool(rows.any()):  # a mask of prompt rows (prefill, a recomputation): read once per layer there
                requests.append((intervention, rows))
        attention = (module, query, key, value, attention_mask, scaling, dropout, kwargs)
        if not requests:
            output, weights = base(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        elif every_row:
            output, weights = self._decode_step(ctx, attention, requests)
        else:
            output, weights = self._selected_rows(ctx, attention, requests)
        for intervention in plan.head_output:
            edited = intervention.on_head_output(ctx, output)
            if intervention.needs_image and not prompt.all_have_image:
                edited = torch.where(has_image[:, None, None, None], edited, output)
            output = edited
        return output, weights

    def _decode_step(self, ctx, attention: tuple, requests: list):
        """The explicit rows of a call where every method asks for every row (a decoding step): all ``Q`` rows, no
        row index, nothing read from a tensor. ``attention``: the attention function's arguments ``(module, query,
        key, value, attention_mask, scaling, dropout, kwargs)``. ``requests``: ``(intervention, rows)`` with ``rows`` None (every row of
        every sample) or the ``[B, Q]`` image rows (an image-dependent method in a batch where some sample has no image:
        its edits are kept on the image rows only). Returns the per-head output ``[B, Q, H, D]`` and the weights."""
        module, query, key, value, attention_mask, scaling, dropout, kwargs = attention
        # [B, Q] image rows when every request keeps its edits there (a mixed batch), else None: every row
        wanted = None if any(rows is None for _, rows in requests) else requests[0][1]
        selections = [
            (intervention, EVERY_ROW_SELECTION if rows is None else RowSelection(index=None, mask=rows), rows is None)
            for intervention, rows in requests
        ]
        explicit, explicit_weights = self._explicit_chunks(
            ctx, module, query, key, value, attention_mask, scaling, None, selections, kwargs.get("softcap")
        )
        # explicit [B, Q, H, D], explicit_weights [B, H, Q, K] (None when the base implementation returns no weights)
        if wanted is None:
            output = explicit.to(value.dtype).contiguous()  # [B, Q, H, D]
            weights = explicit_weights.to(query.dtype) if self._returns_weights else None
            return output, weights
        output, weights = self._base_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        output = torch.where(wanted[:, :, None, None], explicit.to(output.dtype), output)  # kept where an image is
        if weights is not None:
            weights = torch.where(wanted[:, None, :, None], explicit_weights.to(weights.dtype), weights)
        return output, weights

    def _selected_rows(self, ctx, attention: tuple, requests: list):
        """The explicit rows of a call whose methods ask for rows by mask (a prefill, a recomputation without cache):
        the union of the masks, gathered by index unless it is every row, then merged into the base output.
        ``requests``: ``(intervention, rows)`` with ``rows`` None (every row) or a ``[B, Q]`` mask."""
        module, query, key, value, attention_mask, scaling, dropout, kwargs = attention
        has_image = ctx.prompt.spans.has_image  # [B]
        masks = [
            (
                intervention,
                torch.ones(has_image.shape[0], query.shape[2], dtype=torch.bool, device=has_image.device)
                if rows is None
                else rows,
            )
            for intervention, rows in requests
        ]
        wanted = masks[0][1]
        for _, rows in masks[1:]:
            wanted = wanted | rows
        if bool(wanted.all()):
            index = None
        else:
            index = wanted.any(dim=0).nonzero().flatten()  # [R]
        selections = []
        for intervention, rows in masks:
            mask = rows if index is None else rows[:, index]  # [B, R]
            selections.append((intervention, RowSelection(index=index, mask=mask), index is None and bool(mask.all())))
        explicit, explicit_weights = self._explicit_chunks(
            ctx, module, query, key, value, attention_mask, scaling, index, selections, kwargs.get("softcap")
        )
        # explicit [B, R, H, D], explicit_weights [B, H, R, K] (None when the base implementation returns no weights)
        if index is None:
            output = explicit.to(value.dtype).contiguous()  # [B, Q, H, D]
            weights = explicit_weights.to(query.dtype) if self._returns_weights else None
            return output, weights
        output, weights = self._base_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        keep = wanted[:, index][:, :, None, None]  # [B, R, 1, 1]
        output[:, index] = torch.where(keep, explicit.to(output.dtype), output[:, index])
        if weights is not None:
            keep_weights = wanted[:, index][:, None, :, None]  # [B, 1, R, 1]
            weights[:, :, index] = torch.where(keep_weights, explicit_weights.to(weights.dtype), weights[:, :, index])
        return output, weights

    # ------------------------------------------------------------------ explicit rows of this engine
    def _chunk_rows(self, ctx, query, rows: int) -> int:
        """Rows per chunk of a prefill's explicit rows for this model (:func:`~vlm_guard.core.explicit_rows.chunk_length`)."""
        return chunk_length(ctx.key_length, query, rows, self.geometry.hidden_size)

    def _zero(self, device) -> torch.Tensor:
        """A 0-d fp32 zero on ``device``, made once (the unread input of the scores' ``baddbmm``)."""
        zero = self._zeros.get(device)
        if zero is None:
            zero = self._zeros[device] = torch.zeros((), device=device)
        return zero

    def _explicit_chunks(
        self, ctx, module, query, key, value, attention_mask, scaling, index, selections, softcap=None
    ):
        """:func:`~vlm_guard.core.explicit_rows.explicit_chunks` with this engine's chunk size (``chunk_rows``, else
        from the memory budget); the weights are kept whole only when the base implementation returns weights."""
        return explicit_chunks(
            ctx,
            query,
            key,
            value,
            attention_mask,
            scaling,
            index,
            selections,
            softcap,
            hidden_size=self.geometry.hidden_size,
            chunk_rows=self.chunk_rows,
            keep_weights=self._returns_weights,
            zero=self._zero(query.device),
        )

    def _explicit_rows(
        self, ctx, module, query, key, value, attention_mask, scaling, index, selections, every_row=False, softcap=None
    ):
        """:func:`~vlm_guard.core.explicit_rows.explicit_rows` on this engine's device zeros (``module`` is unused:
        the signature of the attention functions)."""
        return explicit_rows(
            ctx,
            query,
            key,
            value,
            attention_mask,
            scaling,
            index,
            selections,
            every_row=every_row,
            softcap=softcap,
            zero=self._zero(query.device),
        )
