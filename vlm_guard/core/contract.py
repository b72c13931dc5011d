"""The intervention contract shared by every decoding method.

The engine (:mod:`vlm_guard.core.engine`) calls an :class:`Intervention` at named points of the
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
method's edits to the rows it asked for: whatever a hook returns for other rows is discarded. A method
that wants every row of a call returns ``True`` (:data:`EVERY_ROW`) instead of a mask: the engine then
decides without reading a tensor, so a decoding step never waits on the device (no host-device
synchronisation). Long prefills are computed in chunks of rows (:attr:`RowSelection.first` /
:attr:`RowSelection.last` mark a layer's first and last chunk), so their extra memory stays bounded.

Hot path: the layers a method acts on while decoding are asked once per generation, after its prefill
(:meth:`Intervention.decode_layers`); every other layer runs the model's own attention and costs nothing.

Order when several methods are active (fixed, documented): pre-softmax hooks (PAI) -> softmax ->
post-softmax hooks in registration order VAR, then GIFT -> ``weights @ v`` -> head-output hooks (VHR)
-> ``o_proj``. Logits: VCD's noised-image contrast runs on the raw logits, before ``generate``'s own
processors (repetition penalty ...), as its released code does; PAI's image-free contrast runs after them
(its released code passes it to ``generate`` as a custom processor), so with both on, VCD's runs first.
VAR reads the layer input (its sinks) before the layer's attention; GIFT reads its saliency at l*
in the same prefill when l* precedes its enhancement layers.

Per-generation state: what a method computes for one generation (VHR's chosen heads, VAR's sinks and key matrices,
GIFT's saliency ...) lives in a state object that :meth:`Intervention.begin` returns (any object; by convention a
dataclass ``<Method>State`` beside the method, with documented fields; None for a method that keeps nothing). The
engine's generation holds it and hands it back to every hook through :meth:`LayerContext.state` (``state =
ctx.state(self)``, a dictionary lookup) and to :meth:`Intervention.decode_layers`; the method object keeps only what
its ``build`` computed (config, layers, static masks, tokenizer), so two generations never share state and a finished
generation's state stays as it was. ``GuardedModel.last_generation.states`` reads the states of the latest generation
by method name.

Side passes run in their own frame, without the other methods: VHR's image-free prefill, GIFT's
saliency prefill (:meth:`GuardEngine.side_pass`, stopped right after l*), and the contrast streams of
PAI and VCD (plain model, ``engine.suspended()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vlm_guard.models.base import PromptSpans

if TYPE_CHECKING:  # pragma: no cover
    from vlm_guard.core.engine import GuardEngine


@dataclass
class PromptContext:
    """One prompt batch seen at prefill; shared by all layers of all forward calls of one generation.

    Attributes:
        input_ids: ``[B, S]`` the prompt (left padded).
        attention_mask: ``[B, S]`` 1 for real tokens.
        spans: position masks from the adapter (image, query, ...), each ``[B, S]``.
        model_inputs: the keyword arguments of the prefill forward call (pixel values etc.), for
            methods that need a side pass.
        image_inputs: the prompt's image tensors (``pixel_values``, ``image_sizes`` ...: the adapter's
            ``image_input_keys``) from the prefill call, else from the ``generate`` call that started it
            (transformers 5 may prefill with precomputed image features instead of pixels); what a
            contrast pass needs to join the generation when ``generate`` continues its cache.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    spans: PromptSpans
    model_inputs: dict = field(default_factory=dict)
    image_inputs: dict = field(default_factory=dict)
    all_have_image: bool | None = None  # every row has an image (read once at prefill; None: not known yet)

    def __post_init__(self) -> None:
        if self.all_have_image is None:
            self.all_have_image = bool(self.spans.has_image.all())

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1]


@dataclass
class LayerContext:
    """Where the engine is: one layer of one forward call.

    Rows are placed by absolute position (``past_length + 0 .. Q-1``), not by the shape of the call:
    positions ``< S`` (the prompt length) are prompt rows, later ones generated rows. One call may hold
    both (a ``use_cache=False`` step recomputes the whole sequence), or several generated rows (a
    manual loop feeding a chunk).

    Attributes:
        layer: decoder layer index (0-based).
        phase: ``"prefill"`` (the call that starts the generation: its cache was empty) or ``"decode"``
            (any later call of the same generation).
        step: 0 during prefill, else the number of generated tokens up to this call's last row.
        prompt: the prompt context of this generation.
        query_length: Q, rows in this call.
        key_length: K, keys in this call (past + Q, or a static cache's length).
        num_heads / num_kv_heads: attention geometry of the layer.
        past_length: absolute position of the first query row (tokens already in the cache).
        states: ``{id(intervention): state}`` the generation's per-generation states (what each intervention's
            :meth:`Intervention.begin` returned); read them with :meth:`state`. Empty by default (a hook then gets None).
    """

    layer: int
    phase: str
    step: int
    prompt: PromptContext
    query_length: int
    key_length: int
    num_heads: int
    num_kv_heads: int
    past_length: int = 0
    _cache: dict = field(default_factory=dict, repr=False)  # shared by the layers of one forward call
    states: dict = field(default_factory=dict, repr=False)  # {id(intervention): state}, shared by the whole generation

    def state(self, intervention: Intervention) -> Any:
        """The state ``intervention`` returned from :meth:`Intervention.begin` for this generation (None when it
        returned none, or did not begin in it)."""
        return self.states.get(id(intervention))

    @property
    def query_offset(self) -> int:
        """Absolute position of the first query row."""
        return self.past_length

    def keys(self, prompt_mask: torch.Tensor) -> torch.Tensor:
        """A ``[B, S]`` prompt mask extended to the keys: ``[B, K]`` (generated keys False)."""
        key = ("keys", id(prompt_mask), self.key_length)
        cached = self._cache.get(key)
        if cached is None or cached[0] is not prompt_mask:  # the entry holds the mask, so its id is not reused
            batch, seq = prompt_mask.shape
            if seq >= self.key_length:
                extended = prompt_mask[:, : self.key_length]
            else:
                pad = torch.zeros(batch, self.key_length - seq, dtype=prompt_mask.dtype, device=prompt_mask.device)
                extended = torch.cat([prompt_mask, pad], dim=1)
            cached = self._cache[key] = (prompt_mask, extended)
        return cached[1]

    def queries(self, prompt_mask: torch.Tensor) -> torch.Tensor:
        """A ``[B, S]`` prompt mask at this call's query rows: ``[B, Q]`` (False at generated rows)."""
        key = ("queries", id(prompt_mask))
        cached = self._cache.get(key)
        if cached is None or cached[0] is not prompt_mask:
            batch, seq = prompt_mask.shape
            start, stop = self.past_length, self.past_length + self.query_length
            rows = prompt_mask[:, min(start, seq) : min(stop, seq)]
            if rows.shape[1] < self.query_length:
                pad = torch.zeros(
                    batch, self.query_length - rows.shape[1], dtype=prompt_mask.dtype, device=prompt_mask.device
                )
                rows = torch.cat([rows, pad], dim=1)
            cached = self._cache[key] = (prompt_mask, rows)
        return cached[1]

    def _positions(self) -> torch.Tensor:
        """``[Q]`` absolute positions of the query rows."""
        if "positions" not in self._cache:
            device = self.prompt.input_ids.device
            self._cache["positions"] = torch.arange(
                self.past_length, self.past_length + self.query_length, device=device
            )
        return self._cache["positions"]

    def generated_rows(self) -> torch.Tensor:
        """``[B, Q]`` True for rows that are generated tokens (positions at or after the prompt's end)."""
        if "generated" not in self._cache:
            rows = self._positions() >= self.prompt.prompt_length  # [Q]
            self._cache["generated"] = rows[None, :].expand(self.prompt.batch_size, -1)
        return self._cache["generated"]

    def last_prompt_row(self) -> torch.Tensor:
        """``[B, Q]`` the last prompt position (it predicts the first token; left padding puts it at the end)."""
        if "last_prompt" not in self._cache:
            rows = self._positions() == self.prompt.prompt_length - 1  # [Q]
            self._cache["last_prompt"] = rows[None, :].expand(self.prompt.batch_size, -1)
        return self._cache["last_prompt"]

    def predicting_rows(self) -> torch.Tensor:
        """``[B, Q]`` rows whose output predicts a generated token: the last prompt row and every generated row."""
        if "predicting" not in self._cache:
            self._cache["predicting"] = self.last_prompt_row() | self.generated_rows()
        return self._cache["predicting"]

    def image_rows(self) -> torch.Tensor:
        """``[B, Q]`` True in the rows of samples whose prompt has an image."""
        if "image_rows" not in self._cache:
            self._cache["image_rows"] = self.prompt.spans.has_image[:, None].expand(-1, self.query_length)
        return self._cache["image_rows"]

    @property
    def has_prompt_rows(self) -> bool:
        """Whether this call holds prompt rows (the prefill, or a recomputation without cache)."""
        return self.past_length < self.prompt.prompt_length

    @property
    def all_generated(self) -> bool:
        """Whether every row of this call is a generated token (a decoding step): known without reading tensors."""
        return self.past_length >= self.prompt.prompt_length


@dataclass(frozen=True)
class RowSelection:
    """The explicitly computed rows of one layer call.

    Attributes:
        index: ``[R]`` row indices into the Q rows of this call; None: every row ``0 .. Q-1`` (a decoding step).
        mask: ``[B, R]`` the rows this intervention asked for (its edits are kept there only); None: every
            row of every sample.
        first / last: whether these rows are the first / last chunk of this layer call (a long prefill's rows
            come in chunks, in row order; a method that combines rows, like GIFT's gaze shift, accumulates
            over the chunks of one layer call).
    """

    index: torch.Tensor | None
    mask: torch.Tensor | None
    first: bool = True
    last: bool = True

    @property
    def may_edit_in_place(self) -> bool:
        """Whether a weights hook may edit the tensor it is given in place: these rows are every row of every sample
        (no masked merge reads the unedited weights afterwards) and no gradient is recorded (autograd keeps them)."""
        return self.mask is None and not torch.is_grad_enabled()


def prompt_key_rows(weights: torch.Tensor, covered: int) -> torch.Tensor:
    """``[B, H*R, S]``: contiguous weights ``[B, H, R, K]`` on their first ``S = covered`` keys, as one view (what the
    methods' per-prefill key matrices multiply; an in-place edit of it edits ``weights``)."""
    batch, heads, rows, keys = weights.shape
    return weights.as_strided((batch, heads * rows, covered), (heads * rows * keys, keys, 1), weights.storage_offset())


EVERY_ROW = True
"""What :meth:`Intervention.rows` returns for "every row of this call" (e.g. every decoding step)."""


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
    # whether ``on_layer_input`` is still needed after a generation's prefill (VAR reads its sinks at the prefill only:
    # the engine then removes the layer-input hooks for the decoding steps, so those layers take torch's fast call path)
    layer_input_while_decoding: ClassVar[bool] = True
    # whether the method takes a long prefill's explicit rows in chunks (each row's edit on its own, or
    # accumulated over the chunks of a layer call, see RowSelection.first/last); others get all rows at once
    chunkable_rows: ClassVar[bool] = False

    def layers(self) -> set[int]:
        """Decoder layers where any hook of this method acts."""
        return set()

    def decode_layers(self, state: Any = None) -> set[int]:
        """Decoder layers where this method still acts after the current prefill (asked once per generation,
        right after its prefill, with the generation's ``state`` from :meth:`begin`): a layer whose edit is the
        identity for this sample (no head chosen, no sink) can be left out, so it runs the plain attention at every
        step. Default: :meth:`layers`."""
        return self.layers()

    def begin(self, prompt: PromptContext, engine: GuardEngine) -> Any:
        """Called when a generation starts (its first forward call, the cache empty), before layer 0: make this
        generation's state, run side passes (through :meth:`GuardEngine.side_pass`, which leaves the model's state as
        it found it).

        Returns:
            the method's state for this generation (conventionally a ``<Method>State`` dataclass), which the hooks
            read back with ``ctx.state(self)`` and :meth:`decode_layers` gets; None for a method that keeps none.
            Anything computed per generation goes there, never on the method object (which later generations share).
        """
        return None

    def rows(self, ctx: LayerContext) -> torch.Tensor | bool | None:
        """``[B, Q]`` bool: the query rows whose explicit weights this method needs at this layer; ``True``
        (:data:`EVERY_ROW`) for every row of the call (cheaper: no mask to read); or None."""
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
