"""Default model v3's shape: the v2 LLaVA assembly (:mod:`vlm_guard.synthetic.everyday.model`) with 16-pixel
patches, so each object of the 4x4 grid spans 2x2 image tokens (64 per 128-pixel image; 144 at 192 pixels),
and low-rank adapters on all four attention projections (the language side learns the long descriptions and
the co-occurrence prior while the vision side stays frozen).

Example (not run: loads the language model)::

    lm, lm_tokenizer = load_language_model()
    processor = build_processor(lm_tokenizer, V3Spec())
    model = build_model(V3Spec(), lm, processor.tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm_guard.synthetic.everyday.model import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    LoRALinear,
    V2Spec,
    add_lora,
    build_config,
    build_model,
    build_processor,
    merge_lora,
)
from vlm_guard.synthetic.everyday_v3.world import CELL, GRID

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "LoRALinear",
    "V3Spec",
    "add_lora",
    "build_config",
    "build_model",
    "build_processor",
    "merge_lora",
]


@dataclass
class V3Spec(V2Spec):
    """Sizes of the v3 vision side and adapters (the LM is SmolLM2-135M-Instruct, as in v2)."""

    image_size: int = field(default=GRID * CELL, metadata={"help": "input image side in pixels (4 grid cells)"})
    patch_size: int = field(default=16, metadata={"help": "vision patch side; image tokens = (image/patch)^2"})
    lora_targets: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata={"help": "adapted projections"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.image_size % GRID:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the grid ({GRID} cells)")
        if (self.image_size // GRID) % self.patch_size:
            raise ValueError(
                f"a grid cell ({self.image_size // GRID} px) must hold whole patches of "
                f"{self.patch_size} px; choose image_size = {GRID} * k * patch_size"
            )

    @property
    def cell(self) -> int:
        """Pixels per grid cell."""
        return self.image_size // GRID

    @property
    def patches_per_cell(self) -> int:
        """Patches along one side of a grid cell."""
        return self.cell // self.patch_size
