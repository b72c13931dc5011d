"""PAI settings (:class:`PAIConfig`); the method is in :mod:`vlm_guard.methods.pai.intervention`."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm_guard.methods.base import MethodConfig, check_layers, check_range


@dataclass
class PAIConfig(MethodConfig):
    """PAI settings.

    Both presets (``"released"``, the default, and ``"paper"``) give the same values: the paper and
    its released code agree. Defaults and sources (LLaVA-1.5): ``alpha=0.2`` image-attention
    amplification; ``gamma=1.1`` image-free contrast weight (``gamma=1`` switches the contrast off and
    skips its extra forward); ``plausibility=0.1`` cut-off (tokens below ``0.1 * max`` probability are
    dropped; 0 disables the cut); ``layers=None`` = layers ``2 .. L-1``.
    """

    method = "pai"
    alpha: float = field(
        default=0.2, metadata={"help": "pre-softmax image-score amplification a + alpha*|a| (paper 0.2)"}
    )
    gamma: float = field(default=1.1, metadata={"help": "image-free contrast weight (paper 1.1; 1 = off)"})
    plausibility: float = field(
        default=0.1, metadata={"help": "plausibility cut-off as a fraction of the max probability (paper 0.1)"}
    )
    layers: list[int] | None = field(default=None, metadata={"help": "layers to amplify; None = 2..L-1 (paper)"})

    def validate(self) -> None:
        check_range("PAIConfig", "alpha", self.alpha, 0.0, 5.0)
        check_range("PAIConfig", "gamma", self.gamma, 1.0, 5.0)
        check_range("PAIConfig", "plausibility", self.plausibility, 0.0, 1.0)
        check_layers("PAIConfig", "layers", self.layers)


__all__ = ["PAIConfig"]
