"""VHR: vision-aware head reinforcement (He et al., ACL 2025).

Heads whose output changes most when the image is removed (high VHD) are amplified: their per-head
output before ``o_proj`` is multiplied by ``alpha`` at every prompt position during the prefill and at
every decoding step. Attention weights are untouched.

Head selection:
- ``"per_sample"`` (the paper): one extra forward of the image-free prompt (short: no image tokens)
  records the head outputs at the last position; during the image prefill each target layer picks
  its heads from VHD, layer by layer, so later layers see the reinforced earlier ones. The choice is
  reused for every generated token. A row made of image tokens only has an empty image-free prompt:
  its VHD is undefined, so no head is reinforced there (one warning per generation).
- ``"head_map"``: the heads stored in a calibrated head map (``vlm-guard calibrate``), averaged over
  many images; no extra pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from vlm_guard.core.contract import Intervention, LayerContext, PromptContext
from vlm_guard.methods.vhr.config import VHRConfig
from vlm_guard.methods.vhr.vhd import HeadOutputRecorder, default_target_layers, head_divergence, select_vhr_heads

logger = logging.getLogger(__name__)


@dataclass
class VHRState:
    """VHR's state for one generation (what :meth:`VHR.begin` returns; ``GuardedModel.last_generation.states["vhr"]``).

    Attributes:
        selected: ``{layer: [B, H] bool}`` the heads reinforced at each target layer, chosen at the prefill (from VHD
            per sample, or the head map's heads) and reused at every decoding step.
        text_only: ``{layer: [B, H, D]}`` the head outputs of the image-free prompt at its last position (the side
            pass); empty in ``"head_map"`` mode or when no row has an image and text to compare.
        compared: ``[B]`` bool rows with an image and a non-empty image-free prompt (None in ``"head_map"`` mode).
        scales: ``{layer: [B, 1, H, 1]}`` ``alpha`` on the selected heads and 1 elsewhere, built once per layer (one
            multiplication per decoding step).
    """

    selected: dict[int, torch.Tensor] = field(default_factory=dict)
    text_only: dict[int, torch.Tensor] = field(default_factory=dict)
    compared: torch.Tensor | None = None
    scales: dict[int, torch.Tensor] = field(default_factory=dict)


class VHR(Intervention):
    """Scales the selected heads' outputs by ``alpha`` in the target layers.

    ``head_mask`` (optional, ``{layer: [H] bool}``) fixes the heads for every sample (``"head_map"`` mode
    or tests); otherwise heads are chosen per sample. The heads chosen in a generation are in its
    :class:`VHRState`.
    """

    name = "vhr"
    uses_head_output = True

    def __init__(
        self, config: VHRConfig, num_layers: int, num_heads: int, head_mask: dict[int, torch.Tensor] | None = None
    ):
        self.config = config
        layers = config.target_layers if config.target_layers is not None else default_target_layers(num_layers)
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(
                f"VHRConfig.target_layers {bad} are out of range; the model has layers 0..{num_layers - 1}"
            )
        self.target_layers = sorted(set(layers))
        self.num_heads = num_heads
        self.static_mask = head_mask

    def decode_layers(self, state: VHRState | None = None) -> set[int]:
        """The target layers where some sample has a chosen head (the others would multiply by 1)."""
        selected = state.selected if state is not None else {}
        layers = [layer for layer in self.target_layers if layer in selected]
        if not layers:
            return set()
        chosen = torch.stack([selected[layer].any(dim=-1) for layer in layers]).any(dim=-1).tolist()  # one read
        return {layer for layer, any_head in zip(layers, chosen) if any_head}

    def layers(self) -> set[int]:
        return set(self.target_layers)

    def begin(self, prompt: PromptContext, engine) -> VHRState:
        state = VHRState()
        if self.static_mask is not None:
            return state
        input_ids, attention_mask = engine.adapter.remove_image(prompt.input_ids, prompt.attention_mask)
        has_text = attention_mask.bool().any(dim=1)  # [B] rows whose image-free prompt keeps a token
        compared = has_text & prompt.spans.has_image
        if not bool((compared | ~prompt.spans.has_image).all()):
            logger.warning(
                "VHR: prompt rows %s are made of image tokens only, so the image-free prompt that VHR compares with is "
                "empty; no head is reinforced in those rows (add text, e.g. a BOS token or a question, to run VHR there).",
                (prompt.spans.has_image & ~has_text).nonzero().flatten().tolist(),
            )
        state.compared = compared
        if not bool(compared.any()):
            return state  # nothing to compare with: no side pass, no head chosen
        recorder = HeadOutputRecorder(self.target_layers)
        engine.side_pass([recorder], {"input_ids": input_ids, "attention_mask": attention_mask})
        state.text_only = recorder.outputs  # layer -> [B, H, D]
        return state

    def head_mask_for(self, state: VHRState, ctx: LayerContext, head_output: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` bool heads to reinforce at this layer (chosen at prefill, reused while decoding), kept in
        ``state.selected``."""
        if ctx.layer in state.selected:
            return state.selected[ctx.layer]
        batch = head_output.shape[0]
        if self.static_mask is not None:
            mask = self.static_mask.get(ctx.layer)
            if mask is None:
                mask = torch.zeros(self.num_heads, dtype=torch.bool)
            mask = mask.to(head_output.device).bool()[None].expand(batch, -1)
        elif ctx.phase == "prefill" and ctx.layer in state.text_only:
            without_image = state.text_only[ctx.layer].to(head_output.device)  # [B, H, D]
            vhd = head_divergence(head_output[:, -1], without_image, self.config.distance)  # [B, H]
            text_activation = (without_image**2).sum(dim=-1)  # [B, H]
            mask = select_vhr_heads(vhd, text_activation, self.config.outlier_filter)
            if state.compared is not None:  # rows whose image-free prompt is empty: VHD undefined, no head
                mask = mask & state.compared.to(mask.device)[:, None]
        else:
            mask = torch.zeros(batch, self.num_heads, dtype=torch.bool, device=head_output.device)
        state.selected[ctx.layer] = mask
        return mask

    def on_head_output(self, ctx: LayerContext, head_output: torch.Tensor) -> torch.Tensor:
        state = ctx.state(self)
        scale = state.scales.get(ctx.layer)  # built at the prefill, one multiplication per decoding step
        if (
            scale is None
            or scale.dtype != head_output.dtype
            or scale.device != head_output.device
            or scale.shape[0] != head_output.shape[0]
        ):
            mask = self.head_mask_for(state, ctx, head_output)  # [B, H]
            scale = torch.where(mask, self.config.alpha, 1.0).to(head_output.dtype)[:, None, :, None]  # [B, 1, H, 1]
            state.scales[ctx.layer] = scale
        return head_output * scale


def build(config: VHRConfig, adapter, head_map) -> VHR:
    geometry = adapter.geometry
    head_mask = None
    if config.selection == "head_map":
        if head_map is None:
            raise ValueError(
                "VHRConfig.selection='head_map' needs a head map: run `vlm-guard calibrate` and pass head_map=..., "
                "or use selection='per_sample'."
            )
        head_mask = head_map.vhr_head_masks()
    return VHR(config, geometry.num_layers, geometry.num_heads, head_mask)
