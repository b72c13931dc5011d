"""The adapter contract: what vlm_guard needs to know about one VLM family.

An adapter maps canonical names (text decoder layers, heads, image token, prompt spans) to one
model family's module paths and token conventions, in the spirit of TransformerLens' per-architecture
tables. Everything the interventions need about *positions* is derived from token ids, per row, never
from constant offsets, so left-padded batches and prompts without an image work.

Adding a family is one small file: subclass :class:`ModelAdapter`, fill in ``family``,
``model_classes`` and ``text_model_paths``; if the family frames its image tokens with marker tokens,
declare them as data (``image_marker_config_keys``, ``image_marker_tokens``, ``image_marker_pattern``,
``image_block_inner_texts``; see :meth:`ModelAdapter.image_span_mask`), then decorate it with
:func:`vlm_guard.models.register_adapter`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUERY_MARKER = "VLMGUARDQUERYMARKER"


@dataclass(frozen=True)
class TextGeometry:
    """Shape facts of the text backbone.

    Attributes:
        num_layers: decoder layers.
        num_heads: query heads per layer.
        num_kv_heads: key/value heads per layer (``num_heads`` unless grouped-query attention).
        head_dim: width of one head.
        hidden_size: residual width.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class PromptSpans:
    """Per-row position masks of one left-padded prompt batch, derived from token ids.

    All masks are bool tensors of shape ``[batch, seq]`` over the prompt positions.

    Attributes:
        valid: non-padding positions.
        image: image-token positions (the keys V of the methods).
        image_span: the tokens to delete to make the image-free prompt: every image block (image tokens
            plus the family's marker tokens around and between them); text between images is kept.
        query: the user-query span Q: the user's own words, from the text after the last image block
            (less the chat template's separator, e.g. llava-1.5-hf's newline) up to the assistant turn.
        has_image: ``[batch]`` rows with at least one image token.
    """

    valid: torch.Tensor
    image: torch.Tensor
    image_span: torch.Tensor
    query: torch.Tensor
    has_image: torch.Tensor

    @property
    def after_image(self) -> torch.Tensor:
        """``[batch, seq]`` valid positions after the last image token of the row (empty without image)."""
        seq = self.image.shape[1]
        positions = torch.arange(seq, device=self.image.device)
        last_image = torch.where(self.image, positions, torch.full_like(positions, -1)).amax(dim=1)  # [batch]
        return self.valid & (positions[None, :] > last_image[:, None]) & self.has_image[:, None]


class ModelAdapter:
    """Base adapter. Subclasses set the class attributes; most need nothing else.

    Args:
        model: the loaded ``...ForConditionalGeneration`` model.
        processor: its processor or tokenizer (optional; used to find the assistant-turn tokens of the
            chat template and, for some families, marker tokens).
    """

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    # attribute paths from the top-level model to the text backbone (first that exists wins)
    text_model_paths: ClassVar[tuple[str, ...]] = ("model.language_model", "language_model", "model.text_model")

    def __init__(self, model: nn.Module, processor=None):
        self.model = model
        self.processor = processor
        self._assistant_suffix: list[int] | None | bool = False  # False = not computed yet
        self._query_prefix: list[int] | None | bool = False

    # ------------------------------------------------------------------ model structure
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(base.__name__ in cls.model_classes for base in type(model).__mro__)

    @property
    def text_config(self):
        config = self.model.config
        return getattr(config, "text_config", None) or config

    @property
    def text_model(self) -> nn.Module:
        for path in self.text_model_paths:
            module = self.model
            for part in path.split("."):
                module = getattr(module, part, None)
                if module is None:
                    break
            if module is not None and hasattr(module, "layers"):
                return module
        raise ValueError(
            f"{type(self.model).__name__}: no text backbone found at any of {self.text_model_paths}; "
            f"this transformers version may lay the {self.family} model out differently."
        )

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model.layers

    def attention_modules(self) -> list[nn.Module]:
        """The self-attention module of every decoder layer, in layer order."""
        return [layer.self_attn for layer in self.decoder_layers]

    @property
    def geometry(self) -> TextGeometry:
        config = self.text_config
        num_heads = config.num_attention_heads
        hidden_size = config.hidden_size
        return TextGeometry(
            num_layers=len(self.decoder_layers),
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or hidden_size // num_heads,
            hidden_size=hidden_size,
        )

    # ------------------------------------------------------------------ tokens
    @property
    def image_token_id(self) -> int:
        config = self.model.config
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        tokenizer = self.tokenizer
        image_token = getattr(self.processor, "image_token", None)
        if tokenizer is not None and image_token:
            return tokenizer.convert_tokens_to_ids(image_token)
        raise ValueError(
            f"{type(self.model).__name__}: the config has no image_token_id and no processor with an image token "
            "was given; pass the processor to vlm_guard.wrap(model, processor)."
        )

    @property
    def tokenizer(self):
        if self.processor is None:
            return None
        return getattr(self.processor, "tokenizer", self.processor)

    # ------------------------------------------------------------------ image blocks (data, per family)
    # An image block is a run of image tokens and the family's marker tokens around and between them (one block
    # per image; Idefics3 tiles of one image form one block). The image-free prompt deletes the blocks and keeps
    # every other token, including the words between two images. A family declares its markers as data:
    #: config attributes (top-level or text config) holding marker token ids, e.g. Qwen2-VL's vision_start_token_id
    image_marker_config_keys: ClassVar[tuple[str, ...]] = ()
    #: marker tokens by their text, looked up in the processor's tokenizer (unknown ones are skipped)
    image_marker_tokens: ClassVar[tuple[str, ...]] = ()
    #: a regular expression: every vocabulary token matching it (whole token) is a marker, e.g. r"<row_\d+_col_\d+>"
    image_marker_pattern: ClassVar[str] = ""
    #: texts whose single-token ids belong to a block only *between* its image/marker tokens (Idefics3 ends each
    #: row of tiles with a newline); outside a block they are ordinary text
    image_block_inner_texts: ClassVar[tuple[str, ...]] = ()

    def marker_token_ids(self) -> set[int]:
        """Token ids that belong to an image block besides the image tokens, from the family's declared
        markers (config keys, token texts, vocabulary pattern); computed once."""
        cached = self.__dict__.get("_marker_ids")
        if cached is not None:
            return cached
        ids: set[int] = set()
        for config in (self.model.config, self.text_config):
            for key in self.image_marker_config_keys:
                value = getattr(config, key, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    ids.add(value)
        ids.update(self._token_ids(self.image_marker_tokens))
        tokenizer = self.tokenizer
        if self.image_marker_pattern and tokenizer is not None and hasattr(tokenizer, "get_vocab"):
            pattern = re.compile(self.image_marker_pattern)
            ids.update(index for token, index in tokenizer.get_vocab().items() if pattern.fullmatch(token))
        ids.discard(self._image_token_id_or_none())
        self.__dict__["_marker_ids"] = ids
        return ids

    def block_inner_token_ids(self) -> set[int]:
        """Ids of :attr:`image_block_inner_texts` (each text that is one token), computed once."""
        cached = self.__dict__.get("_inner_ids")
        if cached is not None:
            return cached
        ids: set[int] = set()
        tokenizer = self.tokenizer
        if tokenizer is not None:
            for text in self.image_block_inner_texts:
                try:
                    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
                except Exception:  # a tokenizer stub without __call__
                    continue
                if len(encoded) == 1:
                    ids.add(int(encoded[0]))
        self.__dict__["_inner_ids"] = ids
        return ids

    def _token_ids(self, tokens) -> set[int]:
        tokenizer = self.tokenizer
        if tokenizer is None or not tokens:
            return set()
        unknown = getattr(tokenizer, "unk_token_id", None)
        ids = set()
        for token in tokens:
            try:
                token_id = tokenizer.convert_tokens_to_ids(token)
            except Exception:
                continue
            if isinstance(token_id, int) and token_id != unknown and token_id >= 0:
                ids.add(token_id)
        return ids

    def _image_token_id_or_none(self) -> int | None:
        try:
            return self.image_token_id
        except ValueError:
            return None

    # ------------------------------------------------------------------ spans
    def image_span_mask(self, input_ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]`` the image blocks: maximal runs of image and marker tokens (inner texts allowed
        between them) that contain at least one image token. Text between two images is not part of a block."""
        batch, seq = input_ids.shape
        device = input_ids.device
        markers = self.marker_token_ids()
        inner = self.block_inner_token_ids() - markers
        core = image.clone()
        if markers:
            core |= torch.isin(input_ids, torch.tensor(sorted(markers), device=device))
        in_block = core
        if inner:
            filler = torch.isin(input_ids, torch.tensor(sorted(inner), device=device)) & ~core
            positions = torch.arange(seq, device=device).expand(batch, seq)
            previous_core = torch.where(core, positions, -1).cummax(dim=1).values  # [B, S] last core at or before
            next_core = torch.where(core, positions, seq).flip(1).cummin(dim=1).values.flip(1)  # first core at or after
            gaps = (~(core | filler)).long().cumsum(dim=1)  # other tokens seen so far
            gap_before = gaps.gather(1, previous_core.clamp_min(0))
            gap_after = gaps.gather(1, next_core.clamp_max(seq - 1))
            between = filler & (previous_core >= 0) & (next_core < seq) & (gap_before == gaps) & (gap_after == gaps)
            in_block = core | between
        starts = in_block.clone()
        starts[:, 1:] &= ~in_block[:, :-1]
        run = starts.long().cumsum(dim=1) * in_block  # [B, S] run number, 0 outside every run
        images_per_run = torch.zeros(batch, seq + 1, dtype=torch.long, device=device).scatter_add_(1, run, image.long())
        return in_block & (images_per_run.gather(1, run) > 0)

    def assistant_suffix_ids(self) -> list[int] | None:
        """Token ids the chat template puts after the user's text (end of user turn + assistant header).

        Found by rendering the processor's chat template around a marker word and tokenizing; None when
        the processor has no chat template.
        """
        if self._assistant_suffix is not False:
            return self._assistant_suffix  # type: ignore[return-value]
        self._assistant_suffix = None
        tokenizer = self.tokenizer
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else tokenizer
        if tokenizer is None or not getattr(template_owner, "chat_template", None):
            return None
        rendered = self._render_marker_turn(
            [{"type": "text", "text": QUERY_MARKER}], template_owner, "the assistant turn"
        )
        if rendered is None:
            return None
        text, encoded = rendered
        marker_end = text.find(QUERY_MARKER) + len(QUERY_MARKER)
        offsets = encoded["offset_mapping"]
        start = next((i for i, (begin, _) in enumerate(offsets) if begin >= marker_end), len(offsets))
        self._assistant_suffix = list(encoded["input_ids"][start:]) or None
        return self._assistant_suffix

    def _render_marker_turn(self, content: list[dict], template_owner, purpose: str):
        """``(text, encoding with offsets)`` of one user turn with ``content`` rendered by the chat template
        (generation prompt added), or None when the template cannot render it."""
        messages = [{"role": "user", "content": content}]
        try:
            text = template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if isinstance(text, list):
                text = text[0]
            return text, self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except Exception as error:  # a template that needs other content types
            logger.debug("could not render the chat template to find %s: %s", purpose, error)
            return None

    def query_prefix_ids(self) -> list[int] | None:
        """Token ids the chat template puts between the image and the user's text (llava-1.5-hf: the
        newline after ``<image>``), so that the query span starts at the user's own words.

        Found by rendering the chat template for an image followed by a marker word and tokenizing the
        text between the image token and the marker (the family's marker tokens, already in the image
        span, are left out); None when there is no chat template or nothing lies in between.
        """
        if self._query_prefix is not False:
            return self._query_prefix  # type: ignore[return-value]
        self._query_prefix = None
        tokenizer = self.tokenizer
        image_token = getattr(self.processor, "image_token", None)
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else tokenizer
        if tokenizer is None or not image_token or not getattr(template_owner, "chat_template", None):
            return None
        image_token = str(getattr(image_token, "content", image_token))
        rendered = self._render_marker_turn(
            [{"type": "image"}, {"type": "text", "text": QUERY_MARKER}], template_owner, "the query start"
        )
        if rendered is None:
            return None
        text, encoded = rendered
        marker_start = text.find(QUERY_MARKER)
        image_end = text.rfind(image_token, 0, max(marker_start, 0))
        if marker_start < 0 or image_end < 0:
            return None
        image_end += len(image_token)
        skip = {self.image_token_id, *self.marker_token_ids()}
        prefix = [
            token_id
            for token_id, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
            if begin >= image_end and end <= marker_start and token_id not in skip
        ]
        self._query_prefix = prefix or None
        return self._query_prefix

    def prompt_spans(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PromptSpans:
        """Position masks of a prompt batch (see :class:`PromptSpans`).

        The query span ends where the chat template's assistant suffix begins (found from token ids);
        without a chat template it runs to the end of the prompt.
        """
        batch, seq = input_ids.shape
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        image = (input_ids == self.image_token_id) & valid
        has_image = image.any(dim=1)
        image_span = self.image_span_mask(input_ids, image) & valid
        positions = torch.arange(seq, device=input_ids.device)
        span_end = torch.where(image_span, positions, torch.full_like(positions, -1)).amax(dim=1)  # [batch]
        query_end = torch.full((batch,), seq, dtype=torch.long, device=input_ids.device)
        suffix = self.assistant_suffix_ids()
        if suffix:
            suffix_tensor = torch.tensor(suffix, device=input_ids.device)
            n = len(suffix)
            for row in range(batch):
                if seq >= n and torch.equal(input_ids[row, seq - n :], suffix_tensor):
                    query_end[row] = seq - n
        query_start = span_end + 1  # [batch]
        prefix = self.query_prefix_ids()
        if prefix:
            prefix_tensor = torch.tensor(prefix, device=input_ids.device)
            n = len(prefix)
            for row in range(batch):
                start = int(query_start[row])
                if (
                    span_end[row] >= 0
                    and start + n <= seq
                    and torch.equal(input_ids[row, start : start + n], prefix_tensor)
                ):
                    query_start[row] = start + n
        query = valid & (positions[None, :] >= query_start[:, None]) & (positions[None, :] < query_end[:, None])
        query &= has_image[:, None]
        return PromptSpans(valid=valid, image=image, image_span=image_span, query=query, has_image=has_image)

    def remove_image(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image-free version of a prompt batch: each row's image span deleted, re-left-padded.

        Returns:
            ``(input_ids, attention_mask)`` of shape ``[batch, new_seq]``.
        """
        spans = self.prompt_spans(input_ids, attention_mask)
        keep = spans.valid & ~spans.image_span
        rows = [input_ids[row][keep[row]] for row in range(input_ids.shape[0])]
        width = max((len(row) for row in rows), default=0)
        if pad_token_id is None:
            pad_token_id = getattr(self.tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(self.text_config, "pad_token_id", None) or 0
        new_ids = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
        new_mask = torch.zeros((len(rows), width), dtype=torch.long, device=input_ids.device)
        for row, ids in enumerate(rows):
            if len(ids):
                new_ids[row, width - len(ids) :] = ids
                new_mask[row, width - len(ids) :] = 1
        return new_ids, new_mask

    # ------------------------------------------------------------------ model inputs
    # image tensors and per-token image markers (Qwen2-VL's mm_token_type_ids on transformers 5.x): all dropped
    # for the image-free prompt, whose length differs
    image_input_keys: ClassVar[tuple[str, ...]] = (
        "pixel_values",
        "image_sizes",
        "image_grid_thw",
        "pixel_attention_mask",
        "mm_token_type_ids",
    )

    def text_only_inputs(self, inputs: dict) -> dict:
        """Model inputs without any image tensor (for the image-free forward pass)."""
        return {key: value for key, value in inputs.items() if key not in self.image_input_keys}

    def describe(self) -> dict:
        """The model's fingerprint: family, class, name, text geometry, and the digests of its config and
        weights (:func:`vlm_guard.models.fingerprint.model_fingerprint`; a few thousand sampled numbers)."""
        import transformers

        from vlm_guard.models.fingerprint import config_digest, weights_digest, weights_dtype

        geometry = self.geometry
        return {
            "family": self.family,
            "model_class": type(self.model).__name__,
            "name_or_path": getattr(self.model.config, "_name_or_path", "") or "",
            "num_layers": geometry.num_layers,
            "num_heads": geometry.num_heads,
            "num_kv_heads": geometry.num_kv_heads,
            "head_dim": geometry.head_dim,
            "hidden_size": geometry.hidden_size,
            "config_digest": config_digest(self.model),
            "weights_digest": weights_digest(self.model),
            "weights_dtype": weights_dtype(self.model),
            "transformers_version": transformers.__version__,
        }
