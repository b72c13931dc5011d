"""GIFT: gaze-shift-guided cross-modal fusion enhancement (Qi et al., 2025).

1. Saliency (once per sample, at the prefill): at the saliency layer l*, the positive gaze shift
   ``dA = max(A[i] - A[i-1], 0)`` of the query-span rows on the image keys
   (:mod:`vlm_guard.methods.gift.gaze`), averaged over the top ``floor(H/2)`` heads and the informative query
   words, clamped to mean +- 3 std over the image, min-max normalised to ``S'`` in [0, 1], and turned
   into multipliers ``M_j = exp(alpha * S'_j)``. When l* precedes every enhancement layer the
   saliency is read inside the same prefill (only the query rows of l* are computed explicitly);
   otherwise one extra prefill runs and stops right after l*.
2. Enhancement, post-softmax, on the last prompt row at prefill and every generated row, in the
   enhancement layers:
   - visual heads ``H_V`` = top ``floor(H/2)`` heads by attention to the image (re-chosen every step
     and row): ``A'[h, j] = A[h, j] * M_j`` on image keys;
   - ``r = sum_{H_V, V} A' / sum_{H_V, V} A`` (one scalar per row and layer);
   - query heads ``H_Q`` = top ``floor(H/2)`` heads by attention to the query span:
     ``A'[h, j] = A[h, j] * beta * r`` on query keys;
   - rows renormalised to sum 1.

Informative words: the released code keeps spaCy NOUN/PROPN/VERB/ADJ/ADV/NUM words. Here a stop-word
list decides by default (no dependency); ``use_spacy=True`` uses spaCy when installed. Words are aligned
to tokens by character offsets, as the released code (:func:`informative_query_counts`), the same for
every tokenizer kind; without a tokenizer every query token counts. A query with no informative word
falls back to all its tokens (the released code returns NaN).

The enhancement itself, as a plain formula and as the fast path run here: :mod:`vlm_guard.methods.gift.kernel`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch

from vlm_guard.core.contract import EVERY_ROW, Intervention, LayerContext, PromptContext, RowSelection
from vlm_guard.methods.gift.config import GIFTConfig
from vlm_guard.methods.gift.gaze import (
    gaze_head_sums,
    gaze_shift,
    normalise_saliency,
    saliency_from_head_sums,
    saliency_multipliers,
)
from vlm_guard.methods.gift.kernel import FusionMatrices, enhance, enhance_fusion  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

# LLaVA-1.5-7B recipe of the released code (0-indexed, 32 layers)
REFERENCE_LAYERS = 32
REFERENCE_SALIENCY_LAYER = 11
REFERENCE_ENHANCE_LAYERS = (12, 22)
SPACY_INFORMATIVE_POS = ("NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM")


STOP_WORDS = frozenset(
    """a about above after again against all am an and any are aren't as at be because been before being below
    between both but by can could did do does doing don't down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is isn't it it's its itself just let me more
    most my myself no nor not of off on once only or other our ours ourselves out over own please same she should
    so some such than that that's the their theirs them themselves then there there's these they this those through
    to too under until up very was we were what what's when where which while who whom why will with would you
    your yours yourself yourselves s t
    don doesn didn isn aren wasn weren haven hasn hadn won wouldn shouldn couldn mustn needn ain ll re ve d m o y""".split()
)
"""Stop words, with the pieces of contractions a tokenizer or a decoder may split off (``don ' t``, ``it ' s``)."""


def default_gift_layers(num_layers: int) -> tuple[int, list[int]]:
    """The released LLaVA-1.5-7B recipe (l* = 11, enhancement 12..22 of 32) mapped to ``num_layers``.

    Example:
        >>> default_gift_layers(32)
        (11, [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22])
        >>> default_gift_layers(4)
        (1, [2, 3])
    """
    scale = num_layers / REFERENCE_LAYERS
    first = min(num_layers - 1, max(1, math.floor(REFERENCE_ENHANCE_LAYERS[0] * scale + 0.5)))
    last = min(num_layers - 1, max(first, math.floor(REFERENCE_ENHANCE_LAYERS[1] * scale + 0.5)))
    saliency = min(first - 1, math.floor(REFERENCE_SALIENCY_LAYER * scale + 0.5))
    return max(0, saliency), list(range(first, last + 1))


def informative_query_mask(
    input_ids: torch.Tensor,
    query: torch.Tensor,
    tokenizer=None,
    use_spacy: bool = False,
    texts: list[str | None] | None = None,
) -> torch.Tensor:
    """``[B, S]`` bool: query tokens that belong to informative words (:func:`informative_query_counts` > 0).

    Example:
        >>> from vlm_guard.testing import word_level_tokenizer
        >>> tokenizer = word_level_tokenizer(["is there a house ?"])
        >>> ids = torch.tensor([tokenizer("is there a house ?")["input_ids"]])
        >>> informative_query_mask(ids, torch.ones_like(ids, dtype=torch.bool), tokenizer).int().tolist()
        [[0, 0, 0, 1, 0]]
    """
    if tokenizer is None:
        return query.clone()
    return informative_query_counts(input_ids, query, tokenizer, use_spacy, texts) > 0


def informative_query_counts(
    input_ids: torch.Tensor,
    query: torch.Tensor,
    tokenizer=None,
    use_spacy: bool = False,
    texts: list[str | None] | None = None,
) -> torch.Tensor:
    """``[B, S]`` float: how many informative words each query token overlaps, by character offsets.

    The released code aligns words to tokens by character offsets: spaCy's content words of the question
    text, each word's tokens those whose ``(start, end)`` span overlaps the word's, listed once per word
    (a token spanning two content words counts twice in the saliency's sums and mean). The same here,
    for every tokenizer kind:

    - ``texts[b]`` (the query's own text, when the caller has it): the text is tokenised with offsets
      and, when that gives the row's query ids, aligned exactly as the released code (a word the
      vocabulary does not know keeps its ``<unk>`` token when the word is informative).
    - otherwise the query tokens are decoded and aligned to their decoded text
      (:func:`token_char_spans`): pieces of one word, byte-level pieces of one character, leading
      spaces and tokens spanning two words all follow from the offsets. An unknown token's text is lost
      there (it decodes to the unknown-token string), so each one counts as one informative word of its
      own: the words a vocabulary lacks are, in practice, content words.

    A word is informative when it is not a stop word (or, with ``use_spacy``, when spaCy tags it NOUN,
    PROPN, VERB, ADJ, ADV or NUM, as the released code). Punctuation, whitespace and special tokens
    other than the unknown token are never informative. Without a tokenizer every query token counts
    once. A word repeated in the query counts at each occurrence (the released code keys its word list
    by the word's text, so only the last occurrence of a repeated word counts there: a collision, not a
    rule).

    Example:
        >>> from vlm_guard.testing import word_level_tokenizer
        >>> tokenizer = word_level_tokenizer(["is there a house ?"])
        >>> ids = torch.tensor([tokenizer("is there a red car ?")["input_ids"]])  # red, car: unknown words
        >>> informative_query_counts(ids, torch.ones_like(ids, dtype=torch.bool), tokenizer).tolist()
        [[0.0, 0.0, 0.0, 1.0, 1.0, 0.0]]
    """
    if tokenizer is None:
        return query.float()
    nlp = _spacy_pipeline() if use_spacy else None
    counts = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for row in range(input_ids.shape[0]):
        positions = query[row].nonzero().flatten().tolist()
        if not positions:
            continue
        token_ids = input_ids[row, positions].tolist()
        text = texts[row] if texts is not None else None
        row_counts = _counts_from_text(tokenizer, token_ids, text, nlp) if text is not None else None
        if row_counts is None:
            row_counts = token_word_counts(tokenizer, token_ids, nlp)
        counts[row, positions] = torch.tensor(row_counts, dtype=torch.float32, device=query.device)
    return counts


_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")  # letters/digits, with inner apostrophes (don't)
_WORD_PART = re.compile(
    r"[^\W_]+"
)  # letters/digits: "dog's" -> dog, s and "don't" -> don, t (as spaCy's dog, 's / do, n't)


def informative_word_spans(text: str, nlp=None) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the informative words of ``text``: runs of letters and digits
    (split at apostrophes, so a possessive or contraction piece is a stop word of its own, as spaCy's ``'s``
    and ``n't`` are no content words) that are not stop words, or with a spaCy pipeline ``nlp`` its tokens
    tagged NOUN, PROPN, VERB, ADJ, ADV or NUM (the released code's rule).

    Example:
        >>> informative_word_spans("is there a red car?")
        [(11, 14), (15, 18)]
    """
    if nlp is not None:
        return [(token.idx, token.idx + len(token.text)) for token in nlp(text) if token.pos_ in SPACY_INFORMATIVE_POS]
    return [match.span() for match in _WORD_PART.finditer(text) if match.group().lower() not in STOP_WORDS]


def overlap_counts(spans: list[tuple[int, int]], words: list[tuple[int, int]]) -> list[int]:
    """Per token span, how many word spans it overlaps (the released code's test: not ``end <= word start`` and
    not ``start >= word end``; an empty span overlaps nothing).

    Example:
        >>> overlap_counts([(0, 3), (3, 7), (7, 7), (7, 12)], [(1, 5), (8, 9)])
        [1, 1, 0, 1]
    """
    return [
        sum(1 for first, last in words if start < last and end > first) if end > start else 0 for start, end in spans
    ]


def token_word_counts(tokenizer, token_ids: list[int], nlp=None) -> list[int]:
    """Per token of ``token_ids``, how many informative words of its decoded text it overlaps; an unknown token
    counts as one word (see :func:`informative_query_counts`); other special tokens count zero."""
    text, spans = token_char_spans(tokenizer, token_ids)
    unknown = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", None) or []) - {unknown}
    # special tokens' characters are no words of the query; an unknown token's ("<unk>") stand for letters of a word
    # (a whole unknown word, or a piece inside one: "s<unk>ateboard" stays one word)
    chars = list(text)
    for token, (start, end) in zip(token_ids, spans):
        if token in special or token == unknown:
            chars[start:end] = ("x" if token == unknown else " ") * (end - start)
    counts = overlap_counts(spans, informative_word_spans("".join(chars), nlp))
    return [
        0 if token in special else (max(1, count) if token == unknown else count)
        for token, count in zip(token_ids, counts)
    ]


def _counts_from_text(tokenizer, token_ids: list[int], text: str, nlp=None) -> list[int] | None:
    """The released alignment on the query's own ``text``, or None when ``text`` does not tokenise to ``token_ids``
    (or the tokenizer gives no offsets)."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer: no offsets
        return None
    if list(encoded["input_ids"]) != list(token_ids):
        logger.debug("GIFT: the query text does not tokenise to the query's ids; aligning the decoded ids instead")
        return None
    special = set(getattr(tokenizer, "all_special_ids", None) or []) - {getattr(tokenizer, "unk_token_id", None)}
    counts = overlap_counts([tuple(span) for span in encoded["offset_mapping"]], informative_word_spans(text, nlp))
    return [0 if token in special else count for token, count in zip(token_ids, counts)]


def token_char_spans(tokenizer, token_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``token_ids`` and each token's ``(start, end)`` character span in it.

    Fast tokenizers: the text is re-encoded with ``return_offsets_mapping``; when that gives back the
    same ids, its offsets are used. Otherwise (slow tokenizers, context-dependent merges) each token's
    span comes from decoding growing prefixes; a token whose prefix ends inside a character (one byte of
    a multi-byte character) shares the span of the token that completes the character.
    """
    text = tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if getattr(tokenizer, "is_fast", False):
        try:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except Exception:  # pragma: no cover - a tokenizer without offsets
            encoded = None
        if encoded is not None and list(encoded["input_ids"]) == list(token_ids):
            return text, [tuple(span) for span in encoded["offset_mapping"]]
    spans: list[tuple[int, int]] = []
    previous = 0
    pending: list[int] = []  # tokens whose prefix ended inside a character: they get the completing token's span
    for count in range(1, len(token_ids) + 1):
        prefix = tokenizer.decode(token_ids[:count], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        complete = text.startswith(prefix) and not prefix.endswith("\ufffd")
        spans.append((previous, previous))
        if not complete:
            pending.append(count - 1)
            continue
        end = max(previous, len(prefix))
        for index in [*pending, count - 1]:
            spans[index] = (previous, end)
        pending = []
        previous = end
    return text, spans


def query_words(tokenizer, token_ids: list[int]) -> list[tuple[str, list[int]]]:
    """Group tokens into words: ``[(word, [token indices])]`` in text order.

    A word is a maximal run of letters and digits (inner apostrophes included) in the decoded text; a
    token belongs to every word its character span overlaps.

    Example:
        >>> from vlm_guard.testing import word_level_tokenizer
        >>> tokenizer = word_level_tokenizer(["describe the image ."])
        >>> query_words(tokenizer, tokenizer("describe the image .")["input_ids"])
        [('describe', [0]), ('the', [1]), ('image', [2])]
    """
    text, spans = token_char_spans(tokenizer, token_ids)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    words = []
    for match in _WORD.finditer(text):
        start, end = match.span()
        members = [
            i
            for i, (begin, finish) in enumerate(spans)
            if begin < end and finish > start and token_ids[i] not in special
        ]
        if members:
            words.append((match.group(), members))
    return words


_SPACY = {"loaded": False, "nlp": None}


def _spacy_pipeline():
    if not _SPACY["loaded"]:
        _SPACY["loaded"] = True
        try:
            import spacy

            _SPACY["nlp"] = spacy.load("en_core_web_sm")
        except (ImportError, OSError) as error:
            logger.warning(
                "GIFT use_spacy=True but spaCy/en_core_web_sm is unavailable (%s); using the stop-word list.", error
            )
    return _SPACY["nlp"]


@dataclass
class GIFTState:
    """GIFT's state for one generation (what :meth:`GIFT.begin` returns; ``GuardedModel.last_generation.states["gift"]``).

    Attributes:
        saliency: ``[B, S]`` fp32 normalised saliency ``S'`` over the prompt positions (zero outside the image, and
            zero until layer l* has been read in the prefill or its side pass).
        gain: ``[B, S]`` ``M - 1`` the saliency's multipliers less one (zero outside the image).
        saliency_rows: ``[B, S]`` fp32 the query rows the saliency averages, each weighted by the informative words it
            overlaps (every query token of a sample with none).
        matrices: ``{device: FusionMatrices}`` the enhancement's matrices over the prompt keys, built once per device
            and shared by the enhancement layers.
        gaze: the gaze shift accumulated over the chunks of l* in a long prefill (sum per head ``[B, H, S]``, the
            chunk's last row), None outside them.
    """

    saliency: torch.Tensor
    gain: torch.Tensor
    saliency_rows: torch.Tensor
    matrices: dict = field(default_factory=dict)
    gaze: tuple | None = None


class GazeRecorder(Intervention):
    """Observes layer l*'s query rows during a side pass and computes GIFT's saliency into ``state`` (no edit)."""

    name = "gift_gaze"
    uses_weights = True
    chunkable_rows = True  # the saliency accumulates over the chunks of l*

    def __init__(self, layer: int, owner: GIFT, state: GIFTState):
        self.layer = layer
        self.owner = owner
        self.state = state  # the generation's GIFT state, which this side pass fills

    def layers(self) -> set[int]:
        return {self.layer}

    def rows(self, ctx: LayerContext) -> torch.Tensor | None:
        return self.owner.saliency_rows(ctx) if ctx.phase == "prefill" else None

    def on_weights(self, ctx: LayerContext, weights: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        self.owner.record_saliency(self.state, ctx, weights, rows)
        return weights


class GIFT(Intervention):
    """Gaze-shift saliency and cross-modal fusion enhancement; a generation's saliency is in its :class:`GIFTState`."""

    name = "gift"
    uses_weights = True
    chunkable_rows = True  # each enhanced row on its own; the saliency accumulates over the chunks of l*

    def __init__(self, config: GIFTConfig, saliency_layer: int, enhance_layers: list[int], tokenizer=None):
        self.config = config
        self.saliency_layer = saliency_layer
        self.enhance_layers = sorted(set(enhance_layers))
        self.in_prefill = bool(self.enhance_layers) and saliency_layer < self.enhance_layers[0]
        self.tokenizer = tokenizer

    def layers(self) -> set[int]:
        layers = set(self.enhance_layers)
        if self.in_prefill:
            layers.add(self.saliency_layer)
        return layers

    # ------------------------------------------------------------------ saliency
    def begin(self, prompt: PromptContext, engine) -> GIFTState:
        spans = prompt.spans
        informative = informative_query_counts(prompt.input_ids, spans.query, self.tokenizer, self.config.use_spacy)
        # the rows the saliency averages, each weighted by how many informative words it overlaps (the released code
        # lists a token once per word): the informative query tokens, or every query token when a sample has none
        saliency_rows = torch.where(
            (informative > 0).any(dim=1, keepdim=True), informative, spans.query.float()
        )  # [B, S]
        saliency = torch.zeros(prompt.input_ids.shape, dtype=torch.float32, device=prompt.input_ids.device)
        state = GIFTState(saliency=saliency, gain=torch.zeros_like(saliency), saliency_rows=saliency_rows)
        if not self.in_prefill and bool(spans.has_image.any()):
            inputs = {
                k: v
                for k, v in prompt.model_inputs.items()
                if k not in ("cache", "past_key_values", "use_cache", "logits_to_keep", "cache_position")
            }
            recorder = GazeRecorder(self.saliency_layer, self, state)
            engine.side_pass([recorder], inputs, stop_after_layer=self.saliency_layer)
        return state

    def saliency_rows(self, ctx: LayerContext) -> torch.Tensor:
        """``[B, Q]`` query rows and the row just before each (the gaze shift needs ``A[i-1]``)."""
        query = ctx.prompt.spans.query
        before = torch.zeros_like(query)
        before[:, :-1] = query[:, 1:]
        return ctx.queries(query | before)

    def record_saliency(self, state: GIFTState, ctx: LayerContext, weights: torch.Tensor, rows: RowSelection) -> None:
        """Saliency from layer l*'s explicit rows ``[B, H, R, K]`` (prompt positions ``rows.index``) into ``state``,
        accumulated over the chunks of a long prefill (the last row of a chunk is kept: the next chunk's first row needs
        it)."""
        spans = ctx.prompt.spans
        seq = spans.query.shape[1]
        image_keys = ctx.keys(spans.image)[:, :seq]  # [B, S]
        weights = weights[..., :seq]
        index = rows.index
        if rows.first:
            state.gaze = None
        head_sums, previous = state.gaze if state.gaze is not None else (None, None)
        if previous is not None:  # the previous chunk's last row, for the gaze shift of this chunk's first row
            weights = torch.cat([previous[0], weights], dim=2)
            index = torch.cat([previous[1], index])
        shift = gaze_shift(weights, spans.query[:, index], image_keys, index)  # [B, H, R, S]
        part = gaze_head_sums(shift, state.saliency_rows[:, index])  # [B, H, S]
        head_sums = part if head_sums is None else head_sums + part
        state.gaze = (head_sums, (weights[:, :, -1:], index[-1:]))
        if not rows.last:
            return
        state.gaze = None
        raw = saliency_from_head_sums(head_sums, state.saliency_rows.sum(dim=1))  # [B, S]
        normalised = normalise_saliency(raw, image_keys, self.config.clamp_stds)
        normalised = torch.where(spans.has_image[:, None], normalised, torch.zeros_like(normalised))
        state.saliency = normalised
        state.gain = saliency_multipliers(normalised, self.config.alpha) - 1.0
        state.matrices = {}

    # ------------------------------------------------------------------ enhancement
    def rows(self, ctx: LayerContext) -> torch.Tensor | bool | None:
        if ctx.layer == self.saliency_layer and self.in_prefill:
            return self.saliency_rows(ctx) if ctx.phase == "prefill" else None
        return EVERY_ROW if ctx.all_generated else ctx.predicting_rows()

    def decode_layers(self, state: GIFTState | None = None) -> set[int]:
        return set(self.enhance_layers)

    def _matrices(self, state: GIFTState, ctx: LayerContext, device: torch.device) -> FusionMatrices:
        """:class:`FusionMatrices` over the prompt keys, built once per prefill and shared by the layers."""
        cached = state.matrices.get(device)
        if cached is None:
            spans = ctx.prompt.spans
            cached = state.matrices[device] = FusionMatrices.build(
                state.gain.to(device), spans.image.to(device), spans.query.to(device), self.config.beta
            )
        return cached

    def on_weights(self, ctx: LayerContext, weights: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        state = ctx.state(self)
        if ctx.layer == self.saliency_layer and self.in_prefill:
            self.record_saliency(state, ctx, weights, rows)
            return weights
        return enhance(weights, self._matrices(state, ctx, weights.device), rows.may_edit_in_place)


def build(config: GIFTConfig, adapter, head_map) -> GIFT:
    geometry = adapter.geometry
    mapped_saliency, mapped_layers = default_gift_layers(geometry.num_layers)
    saliency_layer = config.saliency_layer
    if saliency_layer is None:
        saliency_layer = getattr(head_map, "gift_saliency_layer", None)
    if saliency_layer is None:
        saliency_layer = mapped_saliency
    layers = config.enhance_layers
    if layers is None:
        layers = list(getattr(head_map, "gift_enhance_layers", None) or []) or mapped_layers
    bad = [layer for layer in [saliency_layer, *layers] if not 0 <= layer < geometry.num_layers]
    if bad:
        raise ValueError(f"GIFT layers {bad} are out of range; the model has layers 0..{geometry.num_layers - 1}")
    return GIFT(config, saliency_layer, layers, getattr(adapter, "tokenizer", None))
