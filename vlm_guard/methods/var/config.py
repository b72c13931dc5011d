"""VAR settings (:class:`VARConfig`); the method is in :mod:`vlm_guard.methods.var.intervention`."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm_guard.methods.base import MethodConfig, check_layers, check_range, preset_field

SINK_THRESHOLD = 20.0
"""The sink threshold tau on phi (released code and paper)."""


@dataclass
class VARConfig(MethodConfig):
    """VAR settings.

    Defaults by preset (``preset="released"``, the default, reproduces the released code that produced
    the paper's numbers; ``preset="paper"`` follows the paper's text where it differs):

    - ``p``: fraction of the sink attention moved to the non-sink image tokens. released: 0.4 (the code
      multiplies sink weights by 0.6 and moves the remaining 0.4); paper: 0.6 (its equation, "sinks keep
      ``1 - p``", with ``p = 0.6``).
    - ``last_layer``: whether the last decoder layer is edited. released: True (the code has an
      exclusion flag, but it is never read: the last layer is edited); paper: False (excluded).
    - ``require_visual_sink``: a layer whose sinks are all text tokens (BOS, punctuation) is left
      untouched. released: True (the code selects heads only when the layer has a visual sink);
      paper: False (its equations recycle text-sink mass in any image-centric row).
    - ``rho=0.5`` (both presets): minimum non-sink share of the visual attention (paper: 0.5 for
      hallucination benchmarks, 0.8 general, 0.9 vision-centric; the released code stores ``1 - rho``).
    - ``visual_threshold=0.2`` (both): minimum visual attention mass of a row.
    - ``tau=20`` (both): sink threshold on ``phi``.
    - ``sink_dims=None`` (both): the head map's sink dimensions (found by calibration); a list overrides
      them (released code hard-codes e.g. ``[2533, 1415]`` for LLaVA-1.5-7B).
    - ``layers=None`` (both): layers from 2 on, the last one per ``last_layer``; a list overrides both.

    Where both presets differ from the released code on purpose: sinks are recomputed at every prefill
    (the released code keeps the first sample's sinks, a bug), batches and padding are supported, and a row
    with no non-sink visual attention is left unchanged (the released code divides by zero there).
    """

    method = "var"
    p: float = preset_field("fraction of sink attention moved to non-sink image tokens", released=0.4, paper=0.6)
    rho: float = field(
        default=0.5, metadata={"help": "min non-sink share of visual attention (both presets 0.5; paper: 0.8 general)"}
    )
    visual_threshold: float = field(
        default=0.2, metadata={"help": "min visual attention mass of an image-centric row (both presets 0.2)"}
    )
    tau: float = field(default=SINK_THRESHOLD, metadata={"help": "sink threshold on phi (both presets 20)"})
    sink_dims: list[int] | None = field(
        default=None, metadata={"help": "sink hidden dimensions; None = from the head map (both presets)"}
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "layers to edit; None = 2.. with the last per last_layer (both presets)"}
    )
    last_layer: bool = preset_field("edit the last decoder layer (when layers is None)", released=True, paper=False)
    require_visual_sink: bool = preset_field(
        "leave layers whose sinks are all text tokens untouched", released=True, paper=False
    )

    def validate(self) -> None:
        check_range("VARConfig", "p", self.p, 0.0, 1.0)
        check_range("VARConfig", "rho", self.rho, 0.0, 1.0)
        check_range("VARConfig", "visual_threshold", self.visual_threshold, 0.0, 1.0)
        check_range("VARConfig", "tau", self.tau, 0.0, None, low_inclusive=False)
        if self.sink_dims is not None and (
            not isinstance(self.sink_dims, (list, tuple))
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in self.sink_dims)
        ):
            raise ValueError(
                f"VARConfig.sink_dims must be a list of non-negative hidden-dimension indices or None, got {self.sink_dims!r}"
            )
        check_layers("VARConfig", "layers", self.layers)
        for name in ("last_layer", "require_visual_sink"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"VARConfig.{name} must be True or False, got {getattr(self, name)!r}")


__all__ = ["VARConfig"]
