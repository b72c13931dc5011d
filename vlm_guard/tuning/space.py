"""The search space of ``vlm-guard tune``: per method, a small grid over its strength and its layer band.

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

import math
from dataclasses import dataclass, field
from typing import Any

TUNABLE_METHODS: tuple[str, ...] = ("vhr", "var", "gift", "pai", "vcd")

VHR_ALPHAS = (1.1, 1.25, 1.5, 2.0, 3.0)  # small models break at the 7B default 2.0: the grid reaches down
GIFT_ALPHAS = (0.5, 1.0, 2.0, 3.0, 5.0)
VAR_PS = (0.2, 0.4, 0.6, 0.8)
VAR_RHOS = (0.5, 0.8)
VAR_TAUS = (20.0, 10.0, 5.0)
"""Sink thresholds: the released 20 finds no visual sinks on small models (their phi stays lower), so VAR would edit
nothing; lower thresholds are tried with the released rho."""
PAI_ALPHAS = (0.05, 0.1, 0.2, 0.4, 0.8)
VCD_ALPHAS = (0.25, 0.5, 1.0, 1.5)

STRENGTH_FIELD = {"vhr": "alpha", "var": "p", "gift": "alpha", "pai": "alpha", "vcd": "alpha"}
"""The field plotted on the x axis of each method's tuning curve."""


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
        for name in sorted(self.methods, key=TUNABLE_METHODS.index):
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


def gift_bands(num_layers: int, saliency_layer: int | None, head_map_layers: list[int] | None) -> dict[str, list[int] | None]:
    """GIFT enhancement bands after the saliency layer l*: the head map's (or the released mapping's, None), the
    layer right after l*, the later half of the layers after l* and a single late layer (never the last layer)."""
    start = (saliency_layer if saliency_layer is not None else round(num_layers * 11 / 32)) + 1
    stop = max(start + 1, num_layers - 1)  # the last layer is left alone
    after = list(range(min(start, num_layers - 1), min(stop, num_layers)))
    bands: dict[str, list[int] | None] = {"released": None}
    seen = [list(head_map_layers or [])]
    candidates = [
        ("next to l*", after[:1]),
        ("late", after[len(after) // 2:] if len(after) > 1 else after),
        ("single late", after[-1:]),
    ]
    for name, layers in candidates:
        if layers and layers not in seen:
            bands[name] = layers
            seen.append(layers)
    return bands


def method_candidates(method: str, num_layers: int, head_map: Any = None) -> list[Candidate]:
    """The grid of one method (see the module constants); the released default is always in it."""
    if method == "vhr":
        return [Candidate({"vhr": {"alpha": alpha, "target_layers": layers}}, band)
                for band, layers in vhr_bands(num_layers).items() for alpha in VHR_ALPHAS]
    if method == "gift":
        bands = gift_bands(num_layers, getattr(head_map, "gift_saliency_layer", None),
                           getattr(head_map, "gift_enhance_layers", None))
        return [Candidate({"gift": {"alpha": alpha, "enhance_layers": layers}}, band)
                for band, layers in bands.items() for alpha in GIFT_ALPHAS]
    if method == "var":
        bands = [(rho, VAR_TAUS[0]) for rho in VAR_RHOS] + [(VAR_RHOS[0], tau) for tau in VAR_TAUS[1:]]
        return [Candidate({"var": {"p": p, "rho": rho, "tau": tau}}, f"rho={rho:g} tau={tau:g}")
                for rho, tau in bands for p in VAR_PS]
    if method == "pai":
        return [Candidate({"pai": {"alpha": alpha}}) for alpha in PAI_ALPHAS]
    if method == "vcd":
        # the released VCD contrasts sampled decoding only; tuning scores greedy decoding, so the contrast is on
        return [Candidate({"vcd": {"alpha": alpha, "contrast_when": "always"}}) for alpha in VCD_ALPHAS]
    raise ValueError(f"unknown method {method!r}; tunable methods are {list(TUNABLE_METHODS)}")


def combine(candidates: list[Candidate]) -> Candidate:
    """One candidate running several methods, each with its own tuned fields."""
    methods: dict[str, dict] = {}
    for candidate in candidates:
        methods.update(candidate.methods)
    return Candidate(methods, "+".join(c.band for c in candidates if c.band))


# ---------------------------------------------------------------------------------------------- task profiles
PAI_ATTENTION_ALPHAS = (0.1, 0.2, 0.4)
"""PAI's attention half alone (``gamma=1``: no image-free contrast pass, so one forward per token, 1x cost)."""


def profile_candidates(profile: str, num_layers: int, head_map: Any = None) -> list[Candidate]:
    """The short, principled candidate list of one task profile (see :mod:`vlm_guard.tuning.profiles`).

    Each method enters at its released setting and as the parts and presets its papers ablate, plus the settings
    earlier searches on small models found (VHR at alpha 1.1 on the late half of the layers):

    - ``caption`` (free-form descriptions, judged by CHAIR_I with recall kept): PAI's attention half alone
      (``gamma=1``, alpha in :data:`PAI_ATTENTION_ALPHAS`), PAI released (attention + contrast), GIFT released
      (head-map layers), VHR alpha 1.1 on the late half, VAR's ``paper`` preset;
    - ``answer`` (short answers, judged by POPE accuracy with no split allowed to lose): PAI's contrast half alone
      (``alpha=0``), PAI's attention half at its mildest alpha, VCD contrasting greedy decoding, VHR alpha 1.1 on
      the late half, VAR's ``paper`` preset.

    A method that builds no intervention on the model (VAR without sink dimensions) is left out by the tuner.

    Example:
        >>> [c.label for c in profile_candidates("caption", num_layers=30)][:2]
        ['pai alpha=0.1 gamma=1', 'pai alpha=0.2 gamma=1']
    """
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
    ``gamma != 1``, VCD contrasting), else 1."""
    pai = candidate.methods.get("pai")
    vcd = candidate.methods.get("vcd")
    contrast = (pai is not None and float(pai.get("gamma", 1.1)) != 1.0) or (
        vcd is not None and vcd.get("contrast_when", "sampling") == "always")
    return 2 if contrast else 1


__all__ = ["TUNABLE_METHODS", "STRENGTH_FIELD", "Candidate", "vhr_bands", "gift_bands", "method_candidates", "combine",
           "PAI_ATTENTION_ALPHAS", "profile_candidates", "forward_passes"]
