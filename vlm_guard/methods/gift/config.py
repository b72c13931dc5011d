"""GIFT settings (:class:`GIFTConfig`); the method is in :mod:`vlm_guard.methods.gift.intervention`."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm_guard.methods.base import MethodConfig, check_layers, check_range

CLAMP_STDS = 3.0
"""Saliency clamp width in unbiased standard deviations over the image (released code)."""


@dataclass
class GIFTConfig(MethodConfig):
    """GIFT settings.

    The released code and the paper agree on every setting below, so both presets (``"released"``,
    the default, and ``"paper"``) give the same values:

    - ``alpha=5.0``: saliency sharpness in ``M = exp(alpha * S')`` (released code: 5 for LLaVA-1.5-7B/13B,
      4 for Qwen2-VL-7B).
    - ``beta=1.0``: query-head scale factor.
    - ``saliency_layer=None``: the head map's ``gift_saliency_layer``, else the released LLaVA-1.5-7B
      layer 11 of 32 mapped to the model's depth.
    - ``enhance_layers=None``: the head map's ``gift_enhance_layers``, else the released LLaVA-1.5-7B
      layers 12..22 of 32 mapped to depth.
    - ``use_spacy=False``: informative query words from a stop-word list (no dependency; on the usual
      prompts it keeps the same words as spaCy's NOUN/PROPN/VERB/ADJ/ADV/NUM tags); ``True`` uses spaCy
      as the released code (only if spaCy and ``en_core_web_sm`` are installed).
    - ``clamp_stds=3.0``: saliency clamp at mean +- 3 unbiased std (``N - 1``, as ``torch.std`` in the
      released code) over the image.

    Query span: the user's own words (the chat template's separator after the image, e.g. llava-1.5-hf's
    newline, is left out), as the released code's question span.
    """

    method = "gift"
    alpha: float = field(
        default=5.0,
        metadata={"help": "saliency sharpness, M = exp(alpha*S') (both presets 5; released: 5 LLaVA, 4 Qwen2-VL)"},
    )
    beta: float = field(default=1.0, metadata={"help": "query-head scale factor (both presets 1.0)"})
    saliency_layer: int | None = field(
        default=None, metadata={"help": "l*; None = head map, else 11/32 of depth (both presets)"}
    )
    enhance_layers: list[int] | None = field(
        default=None, metadata={"help": "layers to enhance; None = head map, else 12..22 of 32 mapped (both presets)"}
    )
    use_spacy: bool = field(
        default=False,
        metadata={
            "help": "informative words by spaCy POS (as the released code) instead of stop words (both presets False)"
        },
    )
    clamp_stds: float = field(
        default=CLAMP_STDS, metadata={"help": "saliency clamp width in unbiased std over the image (both presets 3)"}
    )

    def validate(self) -> None:
        check_range("GIFTConfig", "alpha", self.alpha, 0.0, 20.0)
        check_range("GIFTConfig", "beta", self.beta, 0.0, 10.0)
        if self.saliency_layer is not None and (
            not isinstance(self.saliency_layer, int) or isinstance(self.saliency_layer, bool) or self.saliency_layer < 0
        ):
            raise ValueError(
                f"GIFTConfig.saliency_layer must be a non-negative layer index or None, got {self.saliency_layer!r}"
            )
        check_layers("GIFTConfig", "enhance_layers", self.enhance_layers)
        if not isinstance(self.use_spacy, bool):
            raise ValueError(f"GIFTConfig.use_spacy must be True or False, got {self.use_spacy!r}")
        check_range("GIFTConfig", "clamp_stds", self.clamp_stds, 0.0, None, low_inclusive=False)


__all__ = ["GIFTConfig"]
