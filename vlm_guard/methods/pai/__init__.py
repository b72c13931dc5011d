"""PAI baseline: "Paying More Attention to Image"; see :mod:`vlm_guard.methods.pai.intervention`."""

from __future__ import annotations

from vlm_guard.methods.pai.config import PAIConfig
from vlm_guard.methods.registry import MethodUI, register_method

TUNING_ALPHAS = (0.05, 0.1, 0.2, 0.4, 0.8)


def tuning_grid(num_layers: int, head_map=None) -> list[dict]:
    return [{"alpha": alpha} for alpha in TUNING_ALPHAS]


def forward_passes(fields: dict) -> int:
    """2 while the image-free contrast runs (``gamma != 1``), else 1."""
    return 2 if float(fields.get("gamma", PAIConfig().gamma)) != 1.0 else 1


register_method(
    "pai",
    PAIConfig,
    "vlm_guard.methods.pai.intervention:build",
    order=40,
    contrastive=True,
    strength_field="alpha",
    ui=MethodUI("PAI", 0.0, 1.0, 0.05, 0.2, "alpha: image-attention boost a + alpha*|a|"),
    tuning_grid=tuning_grid,
    forward_passes=forward_passes,
    bench_fields={},
)

__all__ = ["PAIConfig", "TUNING_ALPHAS", "tuning_grid", "forward_passes"]
