"""VCD baseline: visual contrastive decoding (Leng et al., CVPR 2024).

Next-token logits are contrasted with those of the same prompt on a noised image (by default only when
sampling, as the released code, which patches transformers' sampling loop; ``contrast_when="always"``
contrasts greedy decoding too):
``(1 + alpha) * logit(y | v) - alpha * logit(y | v')``, keeping only tokens with
``p(y | v) >= plausibility * max p(y | v)`` (the rest get ``-inf``). The noised image ``v'`` is the
forward-diffusion sample ``sqrt(abar_t) * x + sqrt(1 - abar_t) * eps`` at step ``noise_step`` of
``num_steps``, drawn with a seeded generator. The noised prompt is decoded in lockstep by a
:class:`~vlm_guard.methods.pai.intervention.ContrastStream` (its own KV cache, plain model): about 2x the
decoding cost. A ``generate`` call that continues a cache the wrapper started (the sequence so far
and the cache, no image tensors) contrasts as the one-shot call does: the noised stream is rebuilt from
the generation's prompt and image and fed the tokens generated since.

Beta schedule: the released VCD code (``vcd_utils/vcd_add_noise.py``) uses
``sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5`` (``beta_schedule="sigmoid"``, default); the
DDPM linear schedule ``linspace(1e-4, 0.02, 1000)`` is available as ``"linear"`` (much noisier at
step 500: ``abar`` about 0.08 instead of about 0.75).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from vlm_guard.core.contract import Intervention, PromptContext
from vlm_guard.core.forward_state import restore_forward_state, save_forward_state
from vlm_guard.methods.pai.intervention import ContrastStream, plausibility_cut, prefill_positions
from vlm_guard.methods.vcd.config import BETA_SCHEDULES, VCDConfig
from vlm_guard.models.compat import generate_prefill_positions

logger = logging.getLogger(__name__)


def diffusion_alpha_bar(noise_step: int, num_steps: int = 1000, beta_schedule: str = "sigmoid") -> float:
    """``abar_t = prod_{s <= t} (1 - beta_s)`` of the schedule.

    Example:
        >>> round(diffusion_alpha_bar(500), 3), round(diffusion_alpha_bar(500, beta_schedule="linear"), 3)
        (0.745, 0.078)
    """
    if beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    elif beta_schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not known; choose one of {list(BETA_SCHEDULES)}")
    return float(torch.cumprod(1.0 - betas, dim=0)[noise_step])


def add_diffusion_noise(
    pixel_values: torch.Tensor,
    noise_step: int,
    num_steps: int = 1000,
    beta_schedule: str = "sigmoid",
    seed: int = 0,
    image_grid_thw: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward-diffusion sample ``sqrt(abar) * x + sqrt(1 - abar) * eps`` (a new tensor).

    ``eps`` is drawn per image from ``seed`` (on the CPU, so identical on every device), so an image is
    noised the same way whatever batch it is in: one ``[C, H, W]`` pattern shared by every image / tile
    of a ``[..., C, H, W]`` tensor, or, for Qwen2-VL's flattened patches ``[N, D]`` with
    ``image_grid_thw``, one ``[n_i, D]`` pattern per image of ``n_i`` patches. Images that are all
    zeros (padding images of batched Idefics3 inputs) stay zero.

    Args:
        pixel_values: the processor's pixel tensor.
        noise_step / num_steps / beta_schedule: the schedule.
        seed: seed of ``eps``.
        image_grid_thw: ``[images, 3]`` patch grids (Qwen2-VL layout only).
    """
    alpha_bar = diffusion_alpha_bar(noise_step, num_steps, beta_schedule)

    def draw(shape) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)

    if pixel_values.ndim == 2 and image_grid_thw is not None:
        counts = image_grid_thw.prod(dim=-1).tolist()
        noise = torch.cat([draw((int(n), pixel_values.shape[1])) for n in counts], dim=0)
    elif pixel_values.ndim >= 4:
        noise = draw(pixel_values.shape[-3:]).expand(pixel_values.shape)
    else:
        noise = draw(pixel_values.shape)
    noise = noise.to(pixel_values.device)
    noised = (alpha_bar**0.5) * pixel_values.float() + ((1.0 - alpha_bar) ** 0.5) * noise
    if pixel_values.ndim == 5:  # [B, images, C, H, W]: keep padding images / tiles empty
        real = (pixel_values != 0).flatten(2).any(dim=-1)  # [B, images]
        noised = torch.where(real[:, :, None, None, None], noised, torch.zeros_like(noised))
    return noised.to(pixel_values.dtype)


def visual_contrast(
    logits: torch.Tensor, noised_logits: torch.Tensor, alpha: float, plausibility: float
) -> torch.Tensor:
    """``(1 + alpha) * logits - alpha * noised_logits`` with implausible tokens ``-inf`` (pure function).

    Example:
        >>> visual_contrast(torch.tensor([[2.0, 1.0, -5.0]]), torch.tensor([[2.0, 0.0, 0.0]]), 0.5, 0.1)
        tensor([[2.0000, 1.5000,   -inf]])
    """
    contrast = (1.0 + alpha) * logits.float() - alpha * noised_logits.float()
    return contrast.masked_fill(plausibility_cut(logits, plausibility), float("-inf"))


class VisualContrast(LogitsProcessor):
    """VCD's logits processor (returns a new tensor). Rows without an image pass through unchanged.

    It runs on the model's raw next-token logits, before ``generate``'s own processors (repetition penalty,
    n-gram blocking, minimum length ...) and warpers, as the released code does (``vcd_sample.py``: contrast,
    then ``logits_processor``, then ``logits_warper``); the wrapper moves it to the front of the list
    (:attr:`runs_first`).

    Args:
        config: the VCD settings.
        stream: the noised-image stream.
        has_image: ``[B]`` bool, rows whose prompt has an image.
    """

    runs_first = True  # before generate's own processors (see GuardedModel.generate)

    def __init__(self, config: VCDConfig, stream: ContrastStream | None, has_image: torch.Tensor):
        self.config = config
        self.stream = stream
        self.has_image = has_image

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        noised = self.stream.logits(input_ids) if self.stream is not None and self.config.alpha > 0 else scores
        contrast = visual_contrast(scores, noised, self.config.alpha, self.config.plausibility).to(scores.dtype)
        return torch.where(self.has_image.to(scores.device)[:, None], contrast, scores)


@dataclass
class VCDState:
    """VCD's state for one generation (what :meth:`VCD.begin` returns; ``GuardedModel.last_generation.states["vcd"]``).

    Attributes:
        prompt_position_ids: the position ids the main prefill was called with (``[B, S]``, or M-RoPE ``[N, B, S]``),
            None when the model computed its own: the noised stream reuses them.
    """

    prompt_position_ids: torch.Tensor | None = None


class VCD(Intervention):
    """No attention edit; contributes the noised-image contrast processor."""

    name = "vcd"

    def __init__(self, config: VCDConfig):
        self.config = config

    def begin(self, prompt: PromptContext, engine) -> VCDState:
        return VCDState(prompt_position_ids=prompt.model_inputs.get("position_ids"))

    def logits_processors(self, guarded, model_inputs: dict) -> list:
        if self.config.contrast_when == "sampling" and not will_sample(guarded, model_inputs):
            logger.info(
                "VCD contrasts sampled decoding only (contrast_when='sampling', the released code); this call "
                "does not sample, so it runs plain. Use VCDConfig(contrast_when='always') to contrast greedy decoding."
            )
            return []
        input_ids = model_inputs.get("input_ids")
        if input_ids is None:
            logger.info("VCD needs input_ids in generate(...); it is skipped for this call.")
            return []
        source, joined = model_inputs, None
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        if model_inputs.get("pixel_values") is None and cache is not None:
            # generate continuing a cache the wrapper started: the image is in the cache, its pixels in the generation
            prompt = guarded.engine.continued_prompt(cache, guarded.interventions)
            if prompt is None:
                return []  # a cache this wrapper did not start: the engine runs the call plain (one warning)
            if prompt.image_inputs.get("pixel_values") is not None:
                source, joined = prompt.image_inputs, prompt
        pixel_values = source.get("pixel_values")
        if pixel_values is None:
            has_image = guarded.adapter.prompt_spans(input_ids, model_inputs.get("attention_mask")).has_image
            if bool(has_image.any()) and joined is None and cache is None:
                raise ValueError(
                    "VCD contrasts with a noised copy of the image, but this generate call has image tokens "
                    "and no pixel_values (and continues no cache this wrapper started with them); pass "
                    "pixel_values, or switch VCD off for this call."
                )
            return []  # no row has an image: VCD leaves the call plain
        if joined is not None:  # the stream is the generation's prompt; its first call feeds the tokens generated since
            prompt_ids, attention_mask = joined.input_ids, joined.attention_mask
        else:
            prompt_ids, attention_mask = input_ids, model_inputs.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
        inputs = {key: value for key, value in source.items() if key in guarded.adapter.image_input_keys}
        inputs.update(input_ids=prompt_ids, attention_mask=attention_mask)
        inputs["pixel_values"] = add_diffusion_noise(
            pixel_values,
            self.config.noise_step,
            self.config.num_steps,
            self.config.beta_schedule,
            self.config.seed,
            source.get("image_grid_thw"),
        )
        has_image = guarded.adapter.prompt_spans(prompt_ids, attention_mask).has_image  # [B]
        stream = _NoisedStream(guarded.engine, inputs, self, joined)
        return [VisualContrast(self.config, stream, has_image)]


def will_sample(guarded, generate_kwargs: dict) -> bool:
    """Whether ``generate(**generate_kwargs)`` samples: ``do_sample`` from the call, else from its
    ``generation_config``, else from the model's generation config."""
    if generate_kwargs.get("do_sample") is not None:
        return bool(generate_kwargs["do_sample"])
    config = generate_kwargs.get("generation_config") or getattr(guarded.model, "generation_config", None)
    return bool(getattr(config, "do_sample", False))


class _NoisedStream(ContrastStream):
    """The noised prompt has the same tokens as the main one: it reuses the main prefill's positions."""

    def __init__(self, engine, inputs: dict, owner: VCD, joined: PromptContext | None = None):
        super().__init__(engine, inputs, main_prompt_length=None if joined is None else joined.prompt_length)
        self.owner = owner
        self.joined = joined  # the generation this stream joins midway (a continued cache), else None

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            positions = (
                prefill_positions(self.engine, self.owner)
                if self.joined is None
                else self.joined.model_inputs.get("position_ids")
            )
            if positions is None:  # the model placed the main prefill's positions (a direct call): place them alike
                positions = generation_positions(self.engine.model, self.inputs)
            if positions is not None:
                self.position_ids = positions
        return super().logits(input_ids)


def generation_positions(model, inputs: dict) -> torch.Tensor | None:
    """The position ids ``generate`` gives the prefill of the prompt ``inputs`` (``cumsum(mask) - 1``, or the
    multimodal RoPE positions that Qwen2-VL, Qwen3-VL and GLM-4.1V place from the image grid), None where ``generate``
    leaves them to the forward (:func:`~vlm_guard.models.compat.generate_prefill_positions`); the state the step caches
    on the model (``rope_deltas``) is restored. The noised prompt of a main prefill called without positions (a
    hand-written loop: the model placed them itself) runs at these: the positions the same prompt gets through
    ``generate``."""
    saved = save_forward_state(model)
    try:
        with torch.no_grad():
            return generate_prefill_positions(model, inputs)
    finally:
        restore_forward_state(saved)


def build(config: VCDConfig, adapter, head_map) -> VCD:
    return VCD(config)
