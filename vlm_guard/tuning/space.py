"""The search space of ``vlm-guard tune``: per method, a small grid over its strength and its layer band, registered
with the method (``tuning_grid`` in ``vlm_guard/methods/<name>/__init__.py``, read through :mod:`vlm_guard.methods.registry`).

Layer bands are built from the model's depth (and the head map's GIFT saliency layer), so the same code gives a
sensible grid for the 6-layer default model and for a 32-layer LLaVA-1.5-7B. Every grid holds the released
default strength (VCD's grid contrasts greedy decoding, ``contrast_when="always"``: at its released setting VCD
leaves greedy decoding plain, so there would be nothing to tune). The grids are small on purpose: successive halving
(:mod:`vlm_guard.tuning.search`) spends most of the budget on the few settings that survive the first cheap rung.

Example:
    >>> [c.label for c in method_candidates("pai", num_layers=6)][:2]
    ['pai alpha=0.05', 'pai alpha=0.1']
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from vlm_guard.methods import registry

TUNABLE_METHODS = registry.MethodNames(lambda spec: spec.tuning_grid is not None, "the methods with a tuning grid")
"""The methods ``vlm-guard tune`` can tune: the registered ones with a tuning grid (a live view, in run order)."""

STRENGTH_FIELD = registry.MethodFacts(lambda spec: spec.strength_field, "main strength field")
"""The field plotted on the x axis of each method's tuning curve (``{method: field}``, a live view)."""


@dataclass(frozen=True)
class Candidate:
    """One setting to try: the explicit fields of each enabled method.

    Attributes:
        methods: ``{method: {field: value}}`` (fields not given keep their released defaults).
        band: name of the layer band (for the plots and the table), ``""`` when the method has none.
    """

    methods: dict = field(hash=False)
    band: str = ""

    @property
    def key(self) -> str:
        """Canonical text identifying the setting (the key of its results in the tuning state)."""
        import json

        return json.dumps({name: self.methods[name] for name in sorted(self.methods)}, sort_keys=True)

    @property
    def label(self) -> str:
        parts = []
        for name in sorted(self.methods, key=_run_order):
            values = " ".join(f"{k}={_short(v)}" for k, v in self.methods[name].items())
            parts.append(f"{name} {values}".strip())
        return " + ".join(parts) or "greedy"

    def guard_config(self):
        """A :class:`~vlm_guard.config.GuardConfig` with every listed field explicit (so nothing is re-tuned)."""
        from vlm_guard.config import GuardConfig, _method_config_class

        configs = {}
        for name, values in self.methods.items():
            config_class = _method_config_class(name)
            # a preset chooses the defaults of the fields it governs (VAR's "paper": p 0.6 ...)
            defaults = config_class(**({"preset": values["preset"]} if "preset" in values else {})).to_dict()
            configs[name] = config_class(**{**defaults, **values})  # all fields explicit: exactly this setting
        return GuardConfig(**configs)


def _run_order(name: str) -> float:
    return registry.get_method(name).order


def _short(value: Any) -> str:
    if isinstance(value, list):
        return _band_text(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _band_text(layers: list[int]) -> str:
    if not layers:
        return "[]"
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ",".join(map(str, layers))


def vhr_bands(num_layers: int) -> dict[str, list[int] | None]:
    """VHR's target-layer bands (:func:`vlm_guard.methods.vhr.layer_bands`)."""
    from vlm_guard.methods.vhr import layer_bands

    return layer_bands(num_layers)


def gift_bands(
    num_layers: int, saliency_layer: int | None, head_map_layers: list[int] | None
) -> dict[str, list[int] | None]:
    """GIFT's enhancement bands after l* (:func:`vlm_guard.methods.gift.layer_bands`)."""
    from vlm_guard.methods.gift import layer_bands

    return layer_bands(num_layers, saliency_layer, head_map_layers)


def method_candidates(method: str, num_layers: int, head_map: Any = None) -> list[Candidate]:
    """The grid of one method (its registered ``tuning_grid``); the released default is always in it."""
    spec = registry.get_method(method) if registry.is_method(method) else None
    if spec is None or spec.tuning_grid is None:
        raise ValueError(f"unknown method {method!r}; tunable methods are {list(TUNABLE_METHODS)}")
    return [Candidate({method: fields}, band) for fields, band in spec.grid(num_layers, head_map)]


def combine(candidates: list[Candidate]) -> Candidate:
    """One candidate running several methods, each with its own tuned fields."""
    methods: dict[str, dict] = {}
    for candidate in candidates:
        methods.update(candidate.methods)
    return Candidate(methods, "+".join(c.band for c in candidates if c.band))


# ---------------------------------------------------------------------------------------------- task profiles
PAI_ATTENTION_ALPHAS = (0.1, 0.2, 0.4)
"""PAI's attention half alone (``gamma=1``: no image-free contrast pass, so one forward per token, 1x cost)."""


def profile_candidates(
    profile: str, num_layers: int, head_map: Any = None, methods: list[str] | tuple[str, ...] | None = None
) -> list[Candidate]:
    """The short, principled candidate list of one task profile (see :mod:`vlm_guard.tuning.profiles`).

    Each method enters at its released setting and as the parts and presets its papers ablate, plus the settings
    earlier searches on small models found (VHR at alpha 1.1 on the late half of the layers):

    - ``caption`` (free-form descriptions, judged by CHAIR_I with recall kept): PAI's attention half alone
      (``gamma=1``, alpha in :data:`PAI_ATTENTION_ALPHAS`), PAI released (attention + contrast), GIFT released
      (head-map layers), VHR alpha 1.1 on the late half, VAR's ``paper`` preset;
    - ``answer`` (short answers, judged by POPE accuracy with no split allowed to lose): PAI's contrast half alone
      (``alpha=0``), PAI's attention half at its mildest alpha, VCD contrasting greedy decoding, VHR alpha 1.1 on
      the late half, VAR's ``paper`` preset.

    ``methods`` (``vlm-guard tune --profiles caption --methods gift``) tunes those methods only: the profile's
    candidates that use no other method, plus each named method's strength ladder on its first (released) layer band
    of its registered tuning grid (GIFT alpha 0.5 .. 5 on its head-map layers, VHR alpha 1.1 .. 3 on its released
    layers, VAR p 0.2 .. 0.8 at the released rho and tau), so each method gets its own tuned setting.

    A method that builds no intervention on the model (VAR without sink dimensions) is left out by the tuner.

    Example:
        >>> [c.label for c in profile_candidates("caption", num_layers=30)][:2]
        ['pai alpha=0.1 gamma=1', 'pai alpha=0.2 gamma=1']
    """
    if methods is not None:
        wanted = list(dict.fromkeys(methods))
        unknown = [name for name in wanted if name not in TUNABLE_METHODS]
        if unknown or not wanted:
            raise ValueError(f"methods {wanted!r}: choose from {list(TUNABLE_METHODS)}")
        own = [c for c in profile_candidates(profile, num_layers, head_map) if set(c.methods) <= set(wanted)]
        for name in wanted:
            grid = method_candidates(name, num_layers, head_map)
            own.extend(c for c in grid if c.band == grid[0].band)
        unique: dict[str, Candidate] = {}  # one candidate per setting (the ladder repeats the released strength)
        for candidate in own:
            unique.setdefault(json.dumps(candidate.guard_config().to_dict(), sort_keys=True), candidate)
        return list(unique.values())
    late_half = list(range(num_layers - max(1, math.ceil(num_layers / 2)), num_layers))
    vhr_late = Candidate({"vhr": {"alpha": 1.1, "target_layers": late_half}}, "late half")
    var_paper = Candidate({"var": {"preset": "paper"}}, "paper preset")
    if profile == "caption":
        return [
            *(Candidate({"pai": {"alpha": alpha, "gamma": 1.0}}, "attention only") for alpha in PAI_ATTENTION_ALPHAS),
            Candidate({"pai": {"alpha": 0.2, "gamma": 1.1}}, "released"),
            Candidate({"gift": {"alpha": 5.0}}, "released"),
            vhr_late,
            var_paper,
        ]
    if profile == "answer":
        return [
            Candidate({"pai": {"alpha": 0.0, "gamma": 1.1}}, "contrast only"),
            Candidate({"pai": {"alpha": PAI_ATTENTION_ALPHAS[0], "gamma": 1.0}}, "attention only"),
            Candidate({"vcd": {"alpha": 1.0, "contrast_when": "always"}}, "greedy contrast"),
            vhr_late,
            var_paper,
        ]
    from vlm_guard.settings import PROFILES

    raise ValueError(f"unknown task profile {profile!r}; profiles are {list(PROFILES)}")


def forward_passes(candidate: Candidate) -> int:
    """Forward passes per generated token (the structural cost): 2 when a contrast stream runs (PAI with
    ``gamma != 1``, VCD contrasting), else 1 (each method's registered ``forward_passes``)."""
    return max([registry.get_method(name).passes(fields) for name, fields in candidate.methods.items()] or [1])


__all__ = [
    "TUNABLE_METHODS",
    "STRENGTH_FIELD",
    "Candidate",
    "vhr_bands",
    "gift_bands",
    "method_candidates",
    "combine",
    "PAI_ATTENTION_ALPHAS",
    "profile_candidates",
    "forward_passes",
]
