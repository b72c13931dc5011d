"""VHR: only the selected heads are scaled, by exactly alpha."""

from __future__ import annotations

import torch

from vlm_guard.core.contract import LayerContext, PromptContext
from vlm_guard.methods.vhr.intervention import VHR, VHRConfig
from vlm_guard.models.base import PromptSpans


def _prompt(batch: int = 2, seq: int = 3) -> PromptContext:
    mask = torch.ones(batch, seq, dtype=torch.bool)
    spans = PromptSpans(
        valid=mask, image=mask, image_span=mask, query=mask, has_image=torch.ones(batch, dtype=torch.bool)
    )
    return PromptContext(input_ids=torch.ones(batch, seq, dtype=torch.long), attention_mask=mask.long(), spans=spans)


def _context(layer: int, vhr: VHR, prompt: PromptContext, state) -> LayerContext:
    """Layer ``layer``'s prefill context of a generation in which ``vhr`` began with ``state``."""
    seq = prompt.prompt_length
    return LayerContext(
        layer=layer,
        phase="prefill",
        step=0,
        prompt=prompt,
        query_length=seq,
        key_length=seq,
        num_heads=4,
        num_kv_heads=4,
        states={id(vhr): state},
    )


def _generation(vhr: VHR):
    """A prompt and the state ``vhr.begin`` makes for it (head-map mode: no side pass, so no engine)."""
    prompt = _prompt()
    return prompt, vhr.begin(prompt, engine=None)


def test_only_selected_heads_are_scaled_by_alpha():
    head_mask = {1: torch.tensor([True, False, False, True]), 3: torch.tensor([False, True, False, False])}
    vhr = VHR(
        VHRConfig(alpha=2.0, target_layers=[1, 3], selection="head_map"), num_layers=4, num_heads=4, head_mask=head_mask
    )
    prompt, state = _generation(vhr)
    head_output = torch.randn(2, 3, 4, 5)  # [B, Q, H, D]
    out = vhr.on_head_output(_context(1, vhr, prompt, state), head_output)
    torch.testing.assert_close(out[:, :, [0, 3]], 2.0 * head_output[:, :, [0, 3]])
    assert torch.equal(out[:, :, [1, 2]], head_output[:, :, [1, 2]])
    out = vhr.on_head_output(_context(3, vhr, prompt, state), head_output)
    torch.testing.assert_close(out[:, :, 1], 2.0 * head_output[:, :, 1])
    assert torch.equal(out[:, :, [0, 2, 3]], head_output[:, :, [0, 2, 3]])
    assert vhr.layers() == {1, 3}
    # the heads chosen for this generation are in its state (not on the method object), and decide the decode layers
    assert sorted(state.selected) == [1, 3] and state.selected[1][0].tolist() == [True, False, False, True]
    assert vhr.decode_layers(state) == {1, 3} and vhr.decode_layers(None) == set()


def test_alpha_one_is_the_identity():
    vhr = VHR(VHRConfig(alpha=1.0, target_layers=[1], selection="head_map"), 4, 4, {1: torch.ones(4, dtype=torch.bool)})
    prompt, state = _generation(vhr)
    head_output = torch.randn(2, 3, 4, 5)
    assert torch.equal(vhr.on_head_output(_context(1, vhr, prompt, state), head_output), head_output)
