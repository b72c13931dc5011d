"""VHR: vision-aware head reinforcement (He et al., ACL 2025); see :mod:`vlm_guard.methods.vhr.intervention`."""

from __future__ import annotations

import math

from vlm_guard.methods.registry import MethodUI, register_method
from vlm_guard.methods.vhr.config import VHRConfig

TUNING_ALPHAS = (1.1, 1.25, 1.5, 2.0, 3.0)  # small models break at the 7B default 2.0: the grid reaches down


def layer_bands(num_layers: int) -> dict[str, list[int] | None]:
    """VHR target-layer bands: the paper's recipe mapped to depth (None), the last half, the last third and the
    middle third (duplicates dropped)."""
    from vlm_guard.methods.vhr.vhd import default_target_layers

    late_half = list(range(num_layers - max(1, math.ceil(num_layers / 2)), num_layers))
    last_third = list(range(num_layers - max(1, math.ceil(num_layers / 3)), num_layers))
    middle = list(range(num_layers // 3, max(num_layers // 3 + 1, (2 * num_layers) // 3)))
    bands: dict[str, list[int] | None] = {"released": None}
    seen = [default_target_layers(num_layers)]
    for name, layers in (("late half", late_half), ("last third", last_third), ("middle third", middle)):
        if layers not in seen:
            bands[name] = layers
            seen.append(layers)
    return bands


def tuning_grid(num_layers: int, head_map=None) -> list[tuple[dict, str]]:
    return [
        ({"alpha": alpha, "target_layers": layers}, band)
        for band, layers in layer_bands(num_layers).items()
        for alpha in TUNING_ALPHAS
    ]


register_method(
    "vhr",
    VHRConfig,
    "vlm_guard.methods.vhr.intervention:build",
    order=10,
    in_all=True,
    strength_field="alpha",
    ui=MethodUI("VHR", 1.0, 4.0, 0.1, 2.0, "alpha: multiplier of vision-aware heads (paper 2; 4 degenerates)"),
    tuning_grid=tuning_grid,
    bench_fields={},
    bench_decode_target=1.15,
)

__all__ = ["VHRConfig", "TUNING_ALPHAS", "layer_bands", "tuning_grid"]
