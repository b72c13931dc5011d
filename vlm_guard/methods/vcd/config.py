"""VCD settings (:class:`VCDConfig`); the method is in :mod:`vlm_guard.methods.vcd.intervention`."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlm_guard.methods.base import MethodConfig, check_choice, check_range, preset_field

BETA_SCHEDULES = ("sigmoid", "linear")
CONTRAST_WHEN = ("sampling", "always")
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


@dataclass
class VCDConfig(MethodConfig):
    """VCD settings.

    Defaults by preset (``preset="released"``, the default, reproduces the released code; ``"paper"``
    the paper's text where it differs):

    - ``contrast_when``: ``"sampling"`` applies the contrast only when ``generate`` samples
      (``do_sample=True``); greedy and beam decoding are left plain, as in the released code, which
      patches transformers' sampling loop only. ``"always"`` also contrasts greedy decoding (the
      paper's contrastive distribution, argmax'd). released: ``"sampling"``; paper: ``"always"``.
    - ``alpha=1.0`` (both presets): contrast strength (the released evaluation scripts pass
      ``cd_alpha=1``, the paper uses 1; the sampling loop's own fallback is 0.5).
    - ``plausibility=0.1`` (both): adaptive plausibility cut-off ``cd_beta`` (evaluation script
      default and paper; the released POPE shell script passes 0.2).
    - ``noise_step=500`` of ``num_steps=1000`` (both, released code), ``beta_schedule="sigmoid"``
      (both, released code; ``"linear"`` is the DDPM schedule).
    - ``seed=0`` (both): seed of the image noise (this project: reproducible outputs).
    """

    method = "vcd"
    alpha: float = field(
        default=1.0, metadata={"help": "contrast strength: (1+a)*logit(v) - a*logit(v') (both presets 1.0)"}
    )
    plausibility: float = field(
        default=0.1, metadata={"help": "plausibility cut-off, fraction of the max probability (both presets 0.1)"}
    )
    noise_step: int = field(default=500, metadata={"help": "diffusion step of the noised image (both presets 500)"})
    num_steps: int = field(default=1000, metadata={"help": "diffusion steps of the schedule (both presets 1000)"})
    beta_schedule: str = field(
        default="sigmoid",
        metadata={"help": "'sigmoid' (both presets, released VCD code) or 'linear' (DDPM 1e-4..0.02)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the image noise (both presets 0)"})
    contrast_when: str = preset_field(
        "'sampling' (contrast only when do_sample=True) or 'always' (greedy too)", released="sampling", paper="always"
    )

    def validate(self) -> None:
        check_range("VCDConfig", "alpha", self.alpha, 0.0, 10.0)
        check_range("VCDConfig", "plausibility", self.plausibility, 0.0, 1.0)
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool):
            raise ValueError(f"VCDConfig.num_steps must be an int, got {self.num_steps!r}")
        check_range("VCDConfig", "num_steps", self.num_steps, 1, 100000)
        if not isinstance(self.noise_step, int) or isinstance(self.noise_step, bool):
            raise ValueError(f"VCDConfig.noise_step must be an int, got {self.noise_step!r}")
        check_range("VCDConfig", "noise_step", self.noise_step, 0, self.num_steps - 1)
        check_choice("VCDConfig", "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("VCDConfig", "contrast_when", self.contrast_when, CONTRAST_WHEN)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"VCDConfig.seed must be an int, got {self.seed!r}")
        check_range("VCDConfig", "seed", self.seed, 0, MAX_SEED)


__all__ = ["VCDConfig", "BETA_SCHEDULES", "CONTRAST_WHEN", "MAX_SEED"]
