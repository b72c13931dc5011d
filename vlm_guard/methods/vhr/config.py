"""VHR settings (:class:`VHRConfig`); the method is in :mod:`vlm_guard.methods.vhr.intervention`."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm_guard.methods.base import MethodConfig, check_choice, check_layers, check_range, preset_field

DISTANCES = ("sq_l2", "l2", "cosine")
OUTLIER_FILTERS = ("released", "always", "off")


@dataclass
class VHRConfig(MethodConfig):
    """VHR settings.

    VHR's official code is not public here; "released" follows the behaviour reported for it (see
    ``docs/presets.md``), "paper" the paper's text where it differs.

    - ``alpha=2.0`` (both presets): multiplier of the selected heads' outputs.
    - ``target_layers=None`` (both): the paper's LLaVA-1.5-7B layers (1 and 18..31 of 32) mapped to the
      model's depth (layer 1 plus the last ~44 %).
    - ``selection="per_sample"`` (both, the paper's method); ``"head_map"`` uses calibrated heads.
    - ``distance="sq_l2"`` (both): squared L2 VHD in fp32.
    - ``outlier_filter``: released: ``"released"`` (filter only when the layer's VHD std exceeds 1);
      paper: ``"always"``.
    """

    method = "vhr"
    alpha: float = field(
        default=2.0, metadata={"help": "multiplier of the selected heads' outputs (both presets 2.0; 4 degenerates)"}
    )
    target_layers: list[int] | None = field(
        default=None, metadata={"help": "layers to reinforce; None = paper recipe mapped to depth (both presets)"}
    )
    selection: str = field(
        default="per_sample", metadata={"help": "'per_sample' (both presets; one image-free prefill) or 'head_map'"}
    )
    distance: str = field(default="sq_l2", metadata={"help": "VHD distance: sq_l2 (both presets), l2, cosine"})
    outlier_filter: str = preset_field(
        "'released' (only when std>1), 'always', 'off'", released="released", paper="always"
    )

    def validate(self) -> None:
        check_range("VHRConfig", "alpha", self.alpha, 0.0, 10.0, low_inclusive=False)
        check_layers("VHRConfig", "target_layers", self.target_layers)
        check_choice("VHRConfig", "selection", self.selection, ("per_sample", "head_map"))
        check_choice("VHRConfig", "distance", self.distance, DISTANCES)
        check_choice("VHRConfig", "outlier_filter", self.outlier_filter, OUTLIER_FILTERS)


__all__ = ["VHRConfig"]
