"""Shared helpers of the decoding tests, and the composition tests (all methods in one GuardConfig).

Robustness by construction: batch-vs-single comparisons run greedy decoding on fp32 tiny models and
first check that every step's winning score leads the runner-up by a clear margin (``MIN_MARGIN``,
far above fp32 noise), so equal tokens are a real check and a near-tie cannot flip them silently.
"""

from __future__ import annotations

import pytest
import torch

import vlm_guard
from vlm_guard.config import GuardConfig
from vlm_guard.methods.gift.intervention import GIFTConfig
from vlm_guard.methods.pai.intervention import PAIConfig
from vlm_guard.methods.registry import method_names
from vlm_guard.methods.var.intervention import VARConfig
from vlm_guard.methods.vcd.intervention import VCDConfig
from vlm_guard.methods.vhr.intervention import VHRConfig
from vlm_guard.testing import BOS, FAMILY_REGISTRY, IMAGE, build_batch, tiny_model
from vlm_guard.testing import split_row as tiny_split_row

ROWS = [(True, 5), (False, 3), (True, 9)]
NEW_TOKENS = 4
MIN_MARGIN = 1e-3
SINK_DIM = 5
# the tiny models are 64 wide, so phi <= sqrt(64) = 8 < the paper's tau = 20: tests plant a massive
# activation in SINK_DIM on the BOS embedding and use tau = 5
TINY_TAU = 5.0


def planted_sink_model(family: str = "llava", seed: int = 0):
    """A tiny model whose BOS token carries a massive activation in ``SINK_DIM``."""
    model = tiny_model(family, seed=seed)
    with torch.no_grad():
        model.get_input_embeddings().weight[BOS, SINK_DIM] = 200.0
    return model


def tiny_var_config(**changes) -> VARConfig:
    """VAR on the planted model, whose only sink is BOS (a text sink): the released code would leave it
    untouched (``require_visual_sink``), so these generic tests recycle text-sink mass as the paper does."""
    return VARConfig(**{"sink_dims": [SINK_DIM], "tau": TINY_TAU, "require_visual_sink": False, **changes})


def greedy(guarded, inputs: dict, new_tokens: int = NEW_TOKENS):
    return guarded.generate(
        **inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True
    )


def split_row(model, inputs: dict, row: int) -> dict:
    """Row ``row`` of a left-padded batch as its own unpadded batch of one (with its image tensors)."""
    if vlm_guard.models.get_adapter(model).family in FAMILY_REGISTRY:
        return tiny_split_row(model, inputs, row)
    valid = inputs["attention_mask"][row].bool()
    input_ids = inputs["input_ids"][row][valid][None]
    single = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if "mm_token_type_ids" in inputs:  # per-token image markers (Qwen2-VL on transformers 5.x)
        single["mm_token_type_ids"] = inputs["mm_token_type_ids"][row][valid][None]
    has_image = (inputs["input_ids"] == IMAGE).any(dim=1)
    if not bool(has_image[row]):
        return single
    image_index = int(has_image[:row].sum())
    family = vlm_guard.models.get_adapter(model).family
    if family in ("qwen2_vl", "qwen2_5_vl"):
        counts = inputs["image_grid_thw"].prod(dim=-1)
        start = int(counts[:image_index].sum())
        single["pixel_values"] = inputs["pixel_values"][start : start + int(counts[image_index])]
        single["image_grid_thw"] = inputs["image_grid_thw"][image_index : image_index + 1]
    elif family == "idefics3":
        single["pixel_values"] = inputs["pixel_values"][row : row + 1]
        single["pixel_attention_mask"] = inputs["pixel_attention_mask"][row : row + 1]
    else:
        single["pixel_values"] = inputs["pixel_values"][image_index : image_index + 1]
        if "image_sizes" in inputs:
            single["image_sizes"] = inputs["image_sizes"][image_index : image_index + 1]
    return single


def assert_clear_margins(scores: list[torch.Tensor], label: str) -> None:
    for step, step_scores in enumerate(scores):
        top = step_scores.float().topk(2, dim=-1).values  # [B, 2]
        margin = (top[:, 0] - top[:, 1]).min().item()
        assert margin > MIN_MARGIN, f"{label}: near tie at step {step} (margin {margin:.2e}); choose other seeds"


def assert_batch_matches_singles(guarded, model, inputs: dict, label: str, new_tokens: int = NEW_TOKENS) -> None:
    """Padded batch == each row alone: same tokens, and the same scores up to fp32 noise."""
    batch = greedy(guarded, inputs, new_tokens)
    assert_clear_margins(batch.scores, label)
    for row in range(inputs["input_ids"].shape[0]):
        single = greedy(guarded, split_row(model, inputs, row), new_tokens)
        batch_tokens = batch.sequences[row, -new_tokens:]
        single_tokens = single.sequences[0, -new_tokens:]
        assert torch.equal(batch_tokens, single_tokens), (
            f"{label}: row {row} batch {batch_tokens.tolist()} != alone {single_tokens.tolist()}"
        )
        for step, (batch_scores, single_scores) in enumerate(zip(batch.scores, single.scores)):
            a, b = batch_scores[row].float(), single_scores[0].float()
            assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{label}: row {row} step {step}: different cut-offs"
            finite = torch.isfinite(a)
            torch.testing.assert_close(
                a[finite], b[finite], atol=2e-4, rtol=1e-4, msg=f"{label}: row {row} step {step}"
            )


def image_rows_changed(guarded, inputs: dict, new_tokens: int = NEW_TOKENS) -> bool:
    output = guarded.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    with guarded.disabled():
        plain = guarded.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return not torch.equal(output, plain)


def matches_plain(guarded, inputs: dict, new_tokens: int = NEW_TOKENS) -> bool:
    output = guarded.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    with guarded.disabled():
        plain = guarded.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return torch.equal(output, plain)


# ---------------------------------------------------------------------- composition tests
@pytest.fixture(scope="module")
def llava():
    model = planted_sink_model("llava")
    return model, build_batch(model, ROWS)


def all_methods_config(identity: bool = False) -> GuardConfig:
    if identity:
        return GuardConfig(
            vhr=VHRConfig(alpha=1.0),
            var=tiny_var_config(p=0.0),
            gift=GIFTConfig(alpha=0.0),
            pai=PAIConfig(alpha=0.0, gamma=1.0, plausibility=0.0),
            vcd=VCDConfig(alpha=0.0, plausibility=0.0),
        )
    config = GuardConfig.from_methods(list(method_names()))
    return config.replace(var=tiny_var_config())


def test_from_methods_builds_every_method_in_the_documented_order(llava):
    model, _ = llava
    guarded = vlm_guard.wrap(model, config=all_methods_config())
    try:
        assert [i.name for i in guarded.interventions] == list(method_names())
    finally:
        guarded.unwrap()


def test_hooks_run_in_the_documented_order(llava):
    """At a layer where all four attention methods act: PAI scores -> VAR -> GIFT weights -> VHR outputs;
    logits: PAI's contrast before VCD's."""
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=all_methods_config())
    calls: list[str] = []
    by_name = {i.name: i for i in guarded.interventions}
    for name, hook in (("pai", "on_scores"), ("var", "on_weights"), ("gift", "on_weights"), ("vhr", "on_head_output")):
        intervention = by_name[name]
        original = getattr(intervention, hook)

        def spy(ctx, *args, _original=original, _name=name):
            if ctx.layer == 2 and ctx.phase == "decode":
                calls.append(_name)
            return _original(ctx, *args)

        setattr(intervention, hook, spy)
    processor_names = [
        type(p).__name__
        for i in guarded.interventions
        for p in i.logits_processors(guarded, dict(inputs, do_sample=True))
    ]
    try:
        guarded.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        guarded.unwrap()
    assert calls == ["pai", "var", "gift", "vhr"]
    assert processor_names == ["ImageFreeContrast", "VisualContrast"]


def test_all_methods_change_output_and_identity_settings_match_plain(llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=all_methods_config())
    try:
        assert image_rows_changed(guarded, inputs)
        guarded.set_config(all_methods_config(identity=True))
        assert matches_plain(guarded, inputs)
    finally:
        guarded.unwrap()


def test_all_methods_padded_batch_matches_rows_alone(llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=all_methods_config())
    try:
        assert_batch_matches_singles(guarded, model, inputs, "vhr+var+gift+pai+vcd")
    finally:
        guarded.unwrap()
