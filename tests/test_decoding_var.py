"""VAR: hand-computed redistribution, config validation, switch-off without sink dims, generation."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from test_decoding_common import (
    ROWS,
    assert_batch_matches_singles,
    image_rows_changed,
    matches_plain,
    planted_sink_model,
    tiny_var_config,
)

import vlm_guard
import vlm_guard.methods.var.intervention as var_module
from vlm_guard.config import GuardConfig
from vlm_guard.methods.var.intervention import VARConfig, recycle_sink_attention
from vlm_guard.models import get_adapter
from vlm_guard.testing import build_batch

# keys: BOS (text sink), text, visual sink, image, image, text
IMAGE = torch.tensor([[False, False, True, True, True, False]])
SINK = torch.tensor([[True, False, True, False, False, False]])


def test_moves_exactly_p_of_the_sink_mass_in_proportion():
    row = torch.tensor([0.30, 0.10, 0.10, 0.30, 0.10, 0.10])
    out = recycle_sink_attention(row[None, None, None], IMAGE, SINK, p=0.5, rho=0.5, visual_threshold=0.2)[0, 0, 0]
    # sink mass 0.4 -> 0.2 moved; non-sink image 0.3 : 0.1 gets 0.15 : 0.05
    expected = torch.tensor([0.15, 0.10, 0.05, 0.45, 0.15, 0.10])
    torch.testing.assert_close(out, expected)
    assert abs(out.sum().item() - 1.0) < 1e-6
    moved = (row - out)[SINK[0]].sum()
    assert abs(moved.item() - 0.5 * 0.4) < 1e-6


def test_selection_per_head_and_row_is_vectorised():
    selected = torch.tensor([0.30, 0.10, 0.10, 0.30, 0.10, 0.10])
    low_visual = torch.tensor([0.50, 0.35, 0.05, 0.05, 0.04, 0.01])  # visual mass 0.14 < 0.2
    sink_heavy = torch.tensor([0.10, 0.10, 0.50, 0.10, 0.10, 0.10])  # non-sink visual share 0.2/0.7 < rho
    no_free = torch.tensor([0.50, 0.20, 0.30, 0.0, 0.0, 0.0])  # no non-sink visual attention
    weights = torch.stack([torch.stack([selected, low_visual]), torch.stack([sink_heavy, no_free])])[
        None
    ]  # [1, 2, 2, 6]
    out = recycle_sink_attention(weights, IMAGE, SINK, p=0.6, rho=0.5, visual_threshold=0.2)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 2, 2))
    torch.testing.assert_close(out[0, 0, 1], low_visual)
    torch.testing.assert_close(out[0, 1, 0], sink_heavy)
    torch.testing.assert_close(out[0, 1, 1], no_free)
    assert not torch.allclose(out[0, 0, 0], selected)
    # rho=0.2 admits the sink-heavy row: p of its 0.6 sink mass moves to the two free image tokens equally
    out = recycle_sink_attention(weights, IMAGE, SINK, p=0.5, rho=0.2, visual_threshold=0.2)
    torch.testing.assert_close(out[0, 1, 0], torch.tensor([0.05, 0.10, 0.25, 0.25, 0.25, 0.10]))


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("p", 1.5, "[0.0, 1.0]"),
        ("rho", -0.1, "[0.0, 1.0]"),
        ("visual_threshold", 2.0, "[0.0, 1.0]"),
        ("tau", 0.0, "(0.0, inf]"),
    ],
)
def test_out_of_range_values_name_field_and_range(field, value, allowed):
    with pytest.raises(ValueError) as error:
        VARConfig(**{field: value})
    assert f"VARConfig.{field}" in str(error.value) and allowed in str(error.value)


def test_bad_sink_dims_are_rejected():
    with pytest.raises(ValueError, match="VARConfig.sink_dims"):
        VARConfig(sink_dims=[-1])


@pytest.fixture(scope="module")
def llava():
    model = planted_sink_model("llava")
    return model, build_batch(model, ROWS)


def test_no_sink_dims_switches_var_off_with_one_warning(llava, caplog):
    model, inputs = llava
    adapter = get_adapter(model)
    with caplog.at_level(logging.WARNING, logger="vlm_guard.methods.var.intervention"):
        assert var_module.build(VARConfig(), adapter, None) is None
        assert var_module.build(VARConfig(), adapter, SimpleNamespace(sink_dims=[])) is None
    assert len([r for r in caplog.records if "VAR is switched off" in r.message]) == 2  # one per build
    built = var_module.build(VARConfig(), adapter, SimpleNamespace(sink_dims=[5]))
    assert built is not None and built.sink_dims == [5]
    with pytest.raises(ValueError, match="hidden size"):
        var_module.build(VARConfig(sink_dims=[64]), adapter, None)
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("var"))
    try:
        assert guarded.interventions == []
    finally:
        guarded.unwrap()


def test_sinks_found_output_changes_and_p0_matches_plain(llava):
    model, inputs = llava
    # p=1 (all sink attention moved): the tiny random model's sink draws little attention, so the
    # default p=0.6 changes its 4 greedy tokens only barely; p=1 gives a clear margin
    guarded = vlm_guard.wrap(model, config=GuardConfig(var=tiny_var_config(p=1.0)))
    try:
        assert image_rows_changed(guarded, inputs)
        var = guarded.last_generation.states["var"]
        assert sorted(var.sink_mask) == [2, 3]  # released layers 2..L-1 of 4
        sinks = var.sink_mask[2]
        assert sinks.shape == inputs["input_ids"].shape
        first = inputs["attention_mask"].argmax(dim=1)
        assert bool(sinks[torch.arange(3), first].all()), "BOS (planted activation) must be a sink in every row"
        assert not bool(sinks[~inputs["attention_mask"].bool()].any()), "padding is never a sink"
        guarded.set_config(GuardConfig(var=tiny_var_config(p=0.0)))
        assert matches_plain(guarded, inputs)
    finally:
        guarded.unwrap()


def test_padded_batch_matches_rows_alone(llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig(var=tiny_var_config(p=1.0)))
    try:
        assert_batch_matches_singles(guarded, model, inputs, "var")
    finally:
        guarded.unwrap()


def test_released_preset_leaves_layers_without_a_visual_sink_untouched():
    # keys: BOS (text sink), text, image, image, text; one image-centric row (visual mass 0.6)
    weights = torch.tensor([[[[0.3, 0.1, 0.4, 0.2, 0.0]]]])
    image = torch.tensor([[False, False, True, True, False]])
    text_sink_only = torch.tensor([[True, False, False, False, False]])
    kept = var_module.drop_text_only_sinks(text_sink_only, image)
    assert not kept.any()
    torch.testing.assert_close(
        recycle_sink_attention(weights, image, kept, p=0.4, rho=0.5, visual_threshold=0.2), weights
    )
    # the paper's equations recycle the BOS mass anyway: 0.4 * 0.3 = 0.12 moved to the image, 2:1
    paper = recycle_sink_attention(weights, image, text_sink_only, p=0.4, rho=0.5, visual_threshold=0.2)
    torch.testing.assert_close(paper, torch.tensor([[[[0.18, 0.1, 0.48, 0.24, 0.0]]]]))
    # with a visual sink the layer is edited and the text sink's mass moves too
    with_visual = torch.tensor([[True, False, False, True, False]])
    assert torch.equal(var_module.drop_text_only_sinks(with_visual, image), with_visual)


def test_presets_set_released_and_paper_defaults():
    released, paper = VARConfig(), VARConfig(preset="paper")
    assert (released.p, released.last_layer, released.require_visual_sink) == (0.4, True, True)
    assert (paper.p, paper.last_layer, paper.require_visual_sink) == (0.6, False, False)
    assert VARConfig(preset="paper", p=0.5).p == 0.5  # an explicit value wins over the preset
    assert var_module.default_var_layers(6) == [2, 3, 4, 5]  # released: the last layer is edited
    assert var_module.default_var_layers(6, last_layer=False) == [2, 3, 4]
    with pytest.raises(ValueError, match="preset"):
        VARConfig(preset="typo")
    assert VARConfig.from_dict(paper.to_dict()) == paper


def test_released_var_on_a_text_sink_only_model_is_plain(llava):
    # the planted model's only sink is BOS (a text sink): the released code edits nothing
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig(var=tiny_var_config(p=1.0, require_visual_sink=True)))
    try:
        assert matches_plain(guarded, inputs)
        guarded.set_config(GuardConfig(var=tiny_var_config(p=1.0, require_visual_sink=False)))
        assert image_rows_changed(guarded, inputs)
    finally:
        guarded.unwrap()
