"""GIFT: gaze-shift guided attention; see :mod:`vlm_guard.methods.gift.intervention`."""

from __future__ import annotations

from vlm_guard.methods.gift.config import GIFTConfig
from vlm_guard.methods.registry import MethodUI, register_method

TUNING_ALPHAS = (0.5, 1.0, 2.0, 3.0, 5.0)


def layer_bands(
    num_layers: int, saliency_layer: int | None, head_map_layers: list[int] | None
) -> dict[str, list[int] | None]:
    """GIFT enhancement bands after the saliency layer l*: the head map's (or the released mapping's, None), the
    layer right after l*, the later half of the layers after l* and a single late layer (never the last layer)."""
    start = (saliency_layer if saliency_layer is not None else round(num_layers * 11 / 32)) + 1
    stop = max(start + 1, num_layers - 1)  # the last layer is left alone
    after = list(range(min(start, num_layers - 1), min(stop, num_layers)))
    bands: dict[str, list[int] | None] = {"released": None}
    seen = [list(head_map_layers or [])]
    candidates = [
        ("next to l*", after[:1]),
        ("late", after[len(after) // 2 :] if len(after) > 1 else after),
        ("single late", after[-1:]),
    ]
    for name, layers in candidates:
        if layers and layers not in seen:
            bands[name] = layers
            seen.append(layers)
    return bands


def tuning_grid(num_layers: int, head_map=None) -> list[tuple[dict, str]]:
    bands = layer_bands(
        num_layers, getattr(head_map, "gift_saliency_layer", None), getattr(head_map, "gift_enhance_layers", None)
    )
    return [
        ({"alpha": alpha, "enhance_layers": layers}, band) for band, layers in bands.items() for alpha in TUNING_ALPHAS
    ]


register_method(
    "gift",
    GIFTConfig,
    "vlm_guard.methods.gift.intervention:build",
    order=30,
    in_all=True,
    strength_field="alpha",
    ui=MethodUI("GIFT", 0.0, 10.0, 0.5, 5.0, "alpha: saliency multiplier exp(alpha * S)", shows=("saliency",)),
    tuning_grid=tuning_grid,
    bench_fields={},
    bench_decode_target=1.15,
)

__all__ = ["GIFTConfig", "TUNING_ALPHAS", "layer_bands", "tuning_grid"]
