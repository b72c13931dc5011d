"""PAI baseline: "Paying More Attention to Image" (Liu et al., ECCV 2024).

Two parts:

1. Attention: in layers ``2 .. L-1``, the pre-softmax scores of the last prompt row (prefill) and of
   every generated row towards the image keys are amplified, ``a <- a + alpha * |a|``.
2. Image-free contrast on log-probabilities:
   ``gamma * logp(y | image, text) - (gamma - 1) * logp(y | text)``, keeping only tokens with
   ``logp(y | image, text) >= log(plausibility) + max logp`` (the rest get ``-inf``). The image-free
   prompt (the image span deleted, re-left-padded) is decoded in lockstep by a
   :class:`ContrastStream` with its own KV cache, on the plain model (``engine.suspended()``).

A ``generate`` call that continues a cache the wrapper started (the sequence so far and the cache) contrasts as the
one-shot call does: the rows with an image and the image-free prompt are the generation's prompt's, and the stream
feeds the tokens generated since as text (a generated token equal to the image token included); a cache the wrapper
did not start runs plain, as the engine runs it.

Rows whose prompt has no image run exactly as the plain model: no amplification and no contrast or
plausibility cut (so sampled text-only rows match plain sampling). Rows made of image tokens only (an
empty image-free prompt) get the amplification and the plausibility cut without the contrast, as with
``gamma=1`` (one warning).

:class:`ContrastStream` is shared with the VCD baseline (:mod:`vlm_guard.methods.vcd.intervention`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from vlm_guard.core.contract import EVERY_ROW, Intervention, LayerContext, PromptContext, RowSelection
from vlm_guard.core.forward_state import restore_forward_state, save_forward_state
from vlm_guard.core.generations import past_length
from vlm_guard.methods.pai.config import PAIConfig
from vlm_guard.models.compat import cache_kwargs, output_cache

logger = logging.getLogger(__name__)

FIRST_PAI_LAYER = 2


def amplify_image_scores(scores: torch.Tensor, image_keys: torch.Tensor, alpha: float) -> torch.Tensor:
    """``a + alpha * |a|`` on the image columns of pre-softmax scores (pure function).

    Args:
        scores: ``[B, H, R, K]`` fp32 pre-softmax scores (``-inf`` where masked).
        image_keys: ``[B, K]`` bool.
        alpha: amplification.
    Returns:
        ``[B, H, R, K]``.

    Example:
        >>> scores = torch.tensor([[[[1.0, -2.0, 3.0, -float("inf")]]]])          # [B, H, Q, K]
        >>> amplify_image_scores(scores, torch.tensor([[False, True, True, True]]), 0.5)
        tensor([[[[ 1.0000, -1.0000,  4.5000,    -inf]]]])
    """
    # masked keys stay masked (-inf + alpha * inf would be NaN): an image column outside a sliding window, say
    return torch.where(image_keys[:, None, None, :] & torch.isfinite(scores), scores + alpha * scores.abs(), scores)


def plausibility_cut(reference: torch.Tensor, plausibility: float) -> torch.Tensor:
    """``[B, V]`` bool: tokens whose log-probability (from ``reference`` logits) is below
    ``log(plausibility) + max``; all False when ``plausibility`` is 0."""
    if plausibility <= 0:
        return torch.zeros_like(reference, dtype=torch.bool)
    logp = torch.log_softmax(reference.float(), dim=-1)
    return logp < math.log(plausibility) + logp.amax(dim=-1, keepdim=True)


def image_free_contrast(
    logits: torch.Tensor, text_logits: torch.Tensor, gamma: float, plausibility: float
) -> torch.Tensor:
    """PAI's contrast: ``gamma * logp(y|img,txt) - (gamma-1) * logp(y|txt)``, implausible tokens ``-inf``.

    Args:
        logits: ``[B, V]`` next-token logits with the image.
        text_logits: ``[B, V]`` next-token logits of the image-free prompt.
    Returns:
        ``[B, V]`` fp32 scores (log-probability scale).

    Example:
        >>> logits = torch.log(torch.tensor([[0.6, 0.35, 0.05]])); text = torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
        >>> image_free_contrast(logits, text, gamma=2.0, plausibility=0.1).exp()  # 0.6^2/0.9, 0.35^2/0.05, cut
        tensor([[0.4000, 2.4500, 0.0000]])
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    if gamma != 1.0:
        logp_text = torch.log_softmax(text_logits.float(), dim=-1)
        contrast = gamma * logp - (gamma - 1.0) * logp_text
    else:
        contrast = logp
    return contrast.masked_fill(plausibility_cut(logits, plausibility), float("-inf"))


class ContrastStream:
    """A second version of the prompt decoded in lockstep with ``generate`` on the plain model.

    Each call feeds the tokens ``generate`` appended since the previous call (the whole prompt on the
    first call) and returns the next-token logits. The stream keeps its own KV cache, runs inside
    ``engine.suspended()`` (no intervention), and restores state a forward may cache on the model
    (Qwen2-VL's ``rope_deltas``). Left padding: its attention mask is the prompt's, extended by ones;
    positions continue from the prompt's last position, as ``generate`` does.

    Args:
        engine: the wrapper's :class:`~vlm_guard.core.engine.GuardEngine`.
        inputs: forward arguments of the stream's prompt: ``input_ids`` ``[B, S']``, ``attention_mask``
            and optional image tensors.
        position_ids: the prompt's positions, ``[B, S']`` or M-RoPE ``[N, B, S']``; None = ``cumsum(mask) - 1``.
        main_prompt_length: the length of the main sequence that ``inputs`` stand for; None: the length of the
            first call's ``input_ids``. A stream that joins a generation midway (``generate`` continuing a cache
            the wrapper started) is given the generation's prompt and its length: its first call then prefills
            the prompt and feeds the tokens generated since, as the one-shot stream had.
    """

    def __init__(
        self, engine, inputs: dict, position_ids: torch.Tensor | None = None, main_prompt_length: int | None = None
    ):
        self.engine = engine
        self.inputs = dict(inputs)
        self.attention_mask = inputs["attention_mask"]
        if position_ids is None:
            position_ids = text_positions(self.attention_mask)
        self.position_ids = position_ids
        self.cache = None
        self.main_prompt_length: int | None = main_prompt_length
        self.fed = 0  # generated tokens already fed

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, V]`` fp32 after the tokens of ``input_ids`` (generate's ``[B, S + n]``)."""
        batch = self.attention_mask.shape[0]
        if input_ids.shape[0] != batch:
            raise ValueError(
                f"the contrast pass has {batch} rows but generate passed {input_ids.shape[0]}; "
                "num_return_sequences > 1 and beam search are not supported with PAI/VCD."
            )
        saved = save_forward_state(self.engine.model)
        try:
            with torch.no_grad(), self.engine.suspended():
                output = None
                if self.cache is None:
                    if self.main_prompt_length is None:
                        self.main_prompt_length = input_ids.shape[1]
                    if input_ids.shape[1] < self.main_prompt_length:
                        raise ValueError(
                            f"generate passed {input_ids.shape[1]} tokens, fewer than the {self.main_prompt_length} "
                            "of the prompt this contrast pass stands for; build a new processor per generate call"
                        )
                    output = self.engine.model(
                        **self.inputs, position_ids=self.position_ids, use_cache=True, logits_to_keep=1
                    )
                    self.cache = output_cache(output)
                new = input_ids.shape[1] - self.main_prompt_length - self.fed
                if output is None or new > 0:  # a later step, or a stream that joined a generation midway
                    if new <= 0:
                        raise ValueError(
                            "the contrast pass was called twice for the same step; build a new processor per generate call"
                        )
                    steps = torch.arange(self.fed + 1, self.fed + new + 1, device=input_ids.device)
                    positions = self.position_ids[..., -1:] + steps  # [..., B, new]
                    self.fed += new
                    mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(batch, self.fed)], dim=1)
                    output = self.engine.model(
                        input_ids=input_ids[:, -new:],
                        attention_mask=mask,
                        position_ids=positions,
                        use_cache=True,
                        logits_to_keep=1,
                        **cache_kwargs(self.engine.model, self.cache),
                    )
                    self.cache = output_cache(output)
        finally:
            restore_forward_state(saved)
        return output.logits[:, -1].float()


def text_positions(attention_mask: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of a left-padded text prompt, ``cumsum(mask) - 1`` (0 on padding), ``[B, S]``; in the
    layout of ``like`` (e.g. Qwen2-VL's ``[4, B, S]``) when given."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # [B, S]
    if like is not None and like.ndim == 3:
        positions = positions[None].expand(like.shape[0], -1, -1).contiguous()
    return positions


class ImageFreeContrast(LogitsProcessor):
    """PAI's logits processor (a new tensor is returned; ``scores`` is not edited). Rows without an image
    pass through unchanged (no contrast, no plausibility cut), as in the plain model.

    Args:
        config: the PAI settings.
        stream: the image-free stream (None: no contrast, only the cut).
        has_image: ``[B]`` bool, rows whose prompt has an image; None = every row.
        has_text: ``[B]`` bool, rows whose image-free prompt is not empty (the others are contrasted with
            nothing: log-probabilities and the cut only, as with ``gamma=1``); None = every row.
    """

    def __init__(
        self,
        config: PAIConfig,
        stream: ContrastStream | None,
        has_image: torch.Tensor | None = None,
        has_text: torch.Tensor | None = None,
    ):
        self.config = config
        self.stream = stream
        self.has_image = has_image
        self.has_text = has_text

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        text_logits = self.stream.logits(input_ids) if self.stream is not None else scores
        if (
            self.stream is not None and self.has_text is not None
        ):  # an empty image-free row: logp(y|txt) := logp(y|img,txt)
            text_logits = torch.where(self.has_text.to(scores.device)[:, None], text_logits, scores.float())
        contrast = image_free_contrast(scores, text_logits, self.config.gamma, self.config.plausibility).to(
            scores.dtype
        )
        if self.has_image is None:
            return contrast
        return torch.where(self.has_image.to(scores.device)[:, None], contrast, scores)


@dataclass
class PAIState:
    """PAI's state for one generation (what :meth:`PAI.begin` returns; ``GuardedModel.last_generation.states["pai"]``).

    Attributes:
        prompt_position_ids: the position ids the main prefill was called with (``[B, S]``, or M-RoPE ``[N, B, S]``),
            None when the model computed its own: the image-free stream takes their layout.
        image_keys: ``(K, [B, K] bool)`` the image keys at the last key length seen (one mask shared by the layers).
    """

    prompt_position_ids: torch.Tensor | None = None
    image_keys: tuple[int, torch.Tensor] | None = None


class PAI(Intervention):
    """Image-score amplification in the attention plus the image-free contrast processor."""

    name = "pai"
    uses_scores = True

    def __init__(self, config: PAIConfig, layers: list[int]):
        self.config = config
        self._layers = sorted(set(layers))

    def layers(self) -> set[int]:
        return set(self._layers)

    def begin(self, prompt: PromptContext, engine) -> PAIState:
        return PAIState(prompt_position_ids=prompt.model_inputs.get("position_ids"))

    chunkable_rows = True  # each row's edit is its own

    def rows(self, ctx: LayerContext) -> torch.Tensor | bool | None:
        return EVERY_ROW if ctx.all_generated else ctx.predicting_rows()

    def on_scores(self, ctx: LayerContext, scores: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        state = ctx.state(self)
        if state.image_keys is None or state.image_keys[0] != ctx.key_length:
            state.image_keys = (ctx.key_length, ctx.keys(ctx.prompt.spans.image))
        return amplify_image_scores(scores, state.image_keys[1], self.config.alpha)

    def logits_processors(self, guarded, model_inputs: dict) -> list:
        input_ids = model_inputs.get("input_ids")
        attention_mask = model_inputs.get("attention_mask")
        main_prompt_length = None
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        if input_ids is not None and cache is not None and past_length(cache, model_inputs) > 0:
            # generate continuing a cache: its input_ids are the prompt and the tokens generated since, and a generated
            # token may equal an image token. The rows with an image and the image-free prompt are the generation's
            # prompt's; the stream feeds the generated tokens as text, as in the one-shot call
            prompt = guarded.engine.continued_prompt(cache, guarded.interventions)
            if prompt is None:
                return []  # a cache this wrapper did not start: the engine runs the call plain (one warning)
            input_ids, attention_mask = prompt.input_ids, prompt.attention_mask
            main_prompt_length = prompt.prompt_length
        has_image = None
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            has_image = guarded.adapter.prompt_spans(input_ids, attention_mask).has_image  # [B]
            if not bool(has_image.any()):
                return []  # no row has an image: PAI leaves the call plain (no image-free pass either)
        stream = None
        has_text = None
        if self.config.gamma != 1.0:
            if input_ids is None:
                raise ValueError(
                    "PAI's image-free contrast needs input_ids in generate(...); set PAIConfig(gamma=1.0) to use embeddings"
                )
            text_ids, text_mask = guarded.adapter.remove_image(input_ids, attention_mask)
            has_text = text_mask.bool().any(dim=1)  # [B] rows whose image-free prompt keeps a token
            if has_image is not None and not bool((has_text | ~has_image).all()):
                logger.warning(
                    "PAI: prompt rows %s are made of image tokens only, so their image-free prompt is empty; those rows "
                    "get PAI's attention edit and plausibility cut without the image-free contrast (as with gamma=1).",
                    (has_image & ~has_text).nonzero().flatten().tolist(),
                )
            if bool(has_text.any()):
                stream = _LazyPositions(
                    guarded.engine, {"input_ids": text_ids, "attention_mask": text_mask}, self, main_prompt_length
                )
        return [ImageFreeContrast(self.config, stream, has_image, has_text)]


def prefill_positions(engine, owner: Intervention) -> torch.Tensor | None:
    """The position ids of the main prefill that ``owner`` ran in last (its state's ``prompt_position_ids``: the
    engine's latest recorded generation, the one ``generate`` or a hand-written loop decodes); None when the model
    computed its own, or ``owner`` did not run in it."""
    generation = engine.last_started
    state = generation.state_of(owner) if generation is not None else None
    return getattr(state, "prompt_position_ids", None)


class _LazyPositions(ContrastStream):
    """A stream whose position layout (2-D or M-RoPE) is read from the main prefill at its first call (the
    processors are built before ``generate`` prefills)."""

    def __init__(self, engine, inputs: dict, owner: PAI, main_prompt_length: int | None = None):
        super().__init__(engine, inputs, main_prompt_length=main_prompt_length)
        self.owner = owner

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.position_ids = text_positions(self.attention_mask, prefill_positions(self.engine, self.owner))
        return super().logits(input_ids)


def default_pai_layers(num_layers: int) -> list[int]:
    """Layers ``2 .. L-1`` (released code: ``start_layer=2, end_layer=32`` for 32 layers)."""
    return list(range(min(FIRST_PAI_LAYER, num_layers - 1), num_layers))


def build(config: PAIConfig, adapter, head_map) -> PAI:
    geometry = adapter.geometry
    layers = config.layers if config.layers is not None else default_pai_layers(geometry.num_layers)
    bad = [layer for layer in layers if not 0 <= layer < geometry.num_layers]
    if bad:
        raise ValueError(f"PAIConfig.layers {bad} are out of range; the model has layers 0..{geometry.num_layers - 1}")
    return PAI(config, layers)
