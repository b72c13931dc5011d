"""VAR: visual attention sink recycling; see :mod:`vlm_guard.methods.var.intervention`."""

from __future__ import annotations

from vlm_guard.methods.registry import MethodUI, register_method
from vlm_guard.methods.var.config import VARConfig

TUNING_PS = (0.2, 0.4, 0.6, 0.8)
TUNING_RHOS = (0.5, 0.8)
TUNING_TAUS = (20.0, 10.0, 5.0)
"""Sink thresholds: the released 20 finds no visual sinks on small models (their phi stays lower), so VAR would edit
nothing; lower thresholds are tried with the released rho."""


def tuning_grid(num_layers: int, head_map=None) -> list[tuple[dict, str]]:
    bands = [(rho, TUNING_TAUS[0]) for rho in TUNING_RHOS] + [(TUNING_RHOS[0], tau) for tau in TUNING_TAUS[1:]]
    return [({"p": p, "rho": rho, "tau": tau}, f"rho={rho:g} tau={tau:g}") for rho, tau in bands for p in TUNING_PS]


register_method(
    "var",
    VARConfig,
    "vlm_guard.methods.var.intervention:build",
    order=20,
    in_all=True,
    strength_field="p",
    ui=MethodUI(
        "VAR",
        0.0,
        1.0,
        0.05,
        0.6,
        "p: fraction of sink attention moved to image tokens",
        shows=("sink_mask",),
        switched_off_hint="It needs the model's sink dimensions: run `vlm-guard calibrate` and pass --head-map DIR.",
    ),
    tuning_grid=tuning_grid,
    bench_fields={},
    bench_decode_target=1.15,
)

__all__ = ["VARConfig", "TUNING_PS", "TUNING_RHOS", "TUNING_TAUS", "tuning_grid"]
