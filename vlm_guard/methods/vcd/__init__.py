"""VCD baseline: visual contrastive decoding; see :mod:`vlm_guard.methods.vcd.intervention`."""

from __future__ import annotations

from vlm_guard.methods.registry import MethodUI, register_method
from vlm_guard.methods.vcd.config import VCDConfig

TUNING_ALPHAS = (0.25, 0.5, 1.0, 1.5)


def tuning_grid(num_layers: int, head_map=None) -> list[dict]:
    # the released VCD contrasts sampled decoding only; tuning scores greedy decoding, so the contrast is on
    return [{"alpha": alpha, "contrast_when": "always"} for alpha in TUNING_ALPHAS]


def forward_passes(fields: dict) -> int:
    """2 when greedy decoding is contrasted too (``contrast_when="always"``): tuning and the benchmark decode greedily."""
    return 2 if fields.get("contrast_when", "sampling") == "always" else 1


register_method(
    "vcd",
    VCDConfig,
    "vlm_guard.methods.vcd.intervention:build",
    order=50,
    contrastive=True,
    strength_field="alpha",
    ui=MethodUI("VCD", 0.0, 3.0, 0.1, 0.5, "alpha: contrast with a noised image"),
    tuning_grid=tuning_grid,
    forward_passes=forward_passes,
    # VCD contrasts sampled decoding only by default (released code); the benchmark decodes greedily
    bench_fields={"contrast_when": "always"},
)

__all__ = ["VCDConfig", "TUNING_ALPHAS", "tuning_grid", "forward_passes"]
