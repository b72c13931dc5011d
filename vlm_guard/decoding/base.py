"""The intervention contract shared by every decoding method.

The engine (:mod:`vlm_guard.decoding.engine`) calls an :class:`Intervention` at named points of the
text backbone's attention, each with a documented shape (``B`` batch, ``H`` query heads, ``Q`` query
rows of this forward call, ``R`` explicitly computed rows, ``K`` keys, ``D`` head width,
``M`` model width):

==================  =====================  ==========================================================
point               hook                   tensor
==================  =====================  ==========================================================
layer input         ``on_layer_input``     residual stream entering the layer, ``[B, Q, M]``, read only
pre-softmax scores  ``on_scores``          ``q k^T * scale`` (+ mask, ``-inf`` where masked), fp32,
                                           ``[B, H, R, K]``, selected rows only
post-softmax        ``on_weights``         attention weights, fp32, ``[B, H, R, K]``, selected rows only
per-head output     ``on_head_output``     ``softmax(...) v`` before ``o_proj``, ``[B, Q, H, D]``
logits              ``logits_processors``  ``transformers.LogitsProcessor`` objects for ``generate``
==================  =====================  ==========================================================

Rows: explicit weights are computed only for the query rows some intervention asks for through
:meth:`Intervention.rows` (text rows during prefill, the new row while decoding). The engine keeps a
method's edits to the rows it asked for: whatever a hook returns for other rows is discarded.

Order when several methods are active (fixed, documented): pre-softmax hooks (PAI) -> softmax ->
post-softmax hooks in registration order VAR, then GIFT -> ``weights @ v`` -> head-output hooks (VHR)
-> ``o_proj``. Logits processors run PAI's image-free contrast before VCD's noised-image contrast.
VAR reads the layer input (its sinks) before the layer's attention; GIFT reads its saliency at l*
in the same prefill when l* precedes its enhancement layers.

Side passes run in their own frame, without the other methods: VHR's image-free prefill, GIFT's
saliency prefill (:meth:`GuardEngine.side_pass`, stopped right after l*), and the contrast streams of
PAI and VCD (plain model, ``engine.suspended()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..models.base import PromptSpans

if TYPE_CHECKING:  # pragma: no cover
    from .engine import GuardEngine


@dataclass
class PromptContext:
    """One prompt batch seen at prefill; shared by all layers of all forward calls of one generation.

    Attributes:
        input_ids: ``[B, S]`` the prompt (left padded).
        attention_mask: ``[B, S]`` 1 for real tokens.
        spans: position masks from the adapter (image, query, ...), each ``[B, S]``.
        model_inputs: the keyword arguments of the prefill forward call (pixel values etc.), for
            methods that need a side pass.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    spans: PromptSpans
    model_inputs: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1]


@dataclass
class LayerContext:
    """Where the engine is: one layer of one forward call.

    Attributes:
        layer: decoder layer index (0-based).
        phase: ``"prefill"`` (the prompt forward) or ``"decode"`` (one new token per row).
        step: 0 during prefill, n for the n-th generated token.
        prompt: the prompt context of this generation.
        query_length: Q, rows in this call.
        key_length: K, keys in this call (prompt + generated so far, or a static cache length).
        num_heads / num_kv_heads: attention geometry of the layer.
    """

    layer: int
    phase: str
    step: int
    prompt: PromptContext
    query_length: int
    key_length: int
    num_heads: int
    num_kv_heads: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def query_offset(self) -> int:
        """Absolute position of the first query row."""
        return self.key_length - self.query_length if self.phase == "decode" else 0

    def keys(self, prompt_mask: torch.Tensor) -> torch.Tensor:
        """A ``[B, S]`` prompt mask extended to the keys: ``[B, K]`` (generated keys False)."""
        key = ("keys", id(prompt_mask))
        if key not in self._cache:
            batch, seq = prompt_mask.shape
            if seq >= self.key_length:
                extended = prompt_mask[:, : self.key_length]
            else:
                pad = torch.zeros(batch, self.key_length - seq, dtype=prompt_mask.dtype, device=prompt_mask.device)
                extended = torch.cat([prompt_mask, pad], dim=1)
            self._cache[key] = extended
        return self._cache[key]

    def queries(self, prompt_mask: torch.Tensor) -> torch.Tensor:
        """A ``[B, S]`` prompt mask restricted to this call's query rows: ``[B, Q]`` (all False while
        decoding, since generated tokens belong to no prompt span)."""
        if self.phase == "prefill":
            return prompt_mask[:, : self.query_length]
        return torch.zeros(prompt_mask.shape[0], self.query_length, dtype=torch.bool, device=prompt_mask.device)

    def generated_rows(self) -> torch.Tensor:
        """``[B, Q]`` True for rows that are generated tokens (every row while decoding)."""
        value = self.phase == "decode"
        device = self.prompt.input_ids.device
        return torch.full((self.prompt.batch_size, self.query_length), value, dtype=torch.bool, device=device)

    def last_prompt_row(self) -> torch.Tensor:
        """``[B, Q]`` the last prompt position during prefill (left padding puts it at the end)."""
        rows = torch.zeros(self.prompt.batch_size, self.query_length, dtype=torch.bool, device=self.prompt.input_ids.device)
        if self.phase == "prefill":
            rows[:, -1] = True
        return rows


@dataclass
class RowSelection:
    """The explicitly computed rows of one layer call.

    Attributes:
        index: ``[R]`` row indices into the Q rows of this call.
        mask: ``[B, R]`` the rows this intervention asked for (its edits are kept there only).
    """

    index: torch.Tensor
    mask: torch.Tensor


class Intervention:
    """Base class of a decoding method; override only the hooks the method uses.

    Attributes:
        name: registry name (``"vhr"``, ``"var"`` ...).
        needs_image: whether the method depends on image positions; rows without an image token are
            then skipped (with one warning per generation).
    """

    name: ClassVar[str] = ""
    needs_image: ClassVar[bool] = True
    # which hooks the engine should call (saves work on the hot path)
    uses_scores: ClassVar[bool] = False
    uses_weights: ClassVar[bool] = False
    uses_head_output: ClassVar[bool] = False
    uses_layer_input: ClassVar[bool] = False

    def layers(self) -> set[int]:
        """Decoder layers where any hook of this method acts."""
        return set()

    def begin(self, prompt: PromptContext, engine: "GuardEngine") -> None:
        """Called at every prefill, before layer 0: reset per-sample state, run side passes."""

    def rows(self, ctx: LayerContext) -> torch.Tensor | None:
        """``[B, Q]`` bool: the query rows whose explicit weights this method needs at this layer, or None."""
        return None

    def on_layer_input(self, ctx: LayerContext, hidden_states: torch.Tensor) -> None:
        """Residual stream entering layer ``ctx.layer``: ``[B, Q, M]``."""

    def on_scores(self, ctx: LayerContext, scores: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        """Pre-softmax scores ``[B, H, R, K]`` fp32; return the new scores."""
        return scores

    def on_weights(self, ctx: LayerContext, weights: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        """Post-softmax weights ``[B, H, R, K]`` fp32; return the new weights."""
        return weights

    def on_head_output(self, ctx: LayerContext, head_output: torch.Tensor) -> torch.Tensor:
        """Per-head outputs before ``o_proj``: ``[B, Q, H, D]``; return the new outputs."""
        return head_output

    def logits_processors(self, guarded: Any, model_inputs: dict) -> list:
        """Logits processors to add to ``generate`` (contrastive baselines)."""
        return []

    def end(self) -> None:
        """Called when a generation (or forward call) through the wrapper finishes."""
