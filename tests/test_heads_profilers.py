"""Head profilers find what was planted in tiny random models: a vision-sensitive head (VHD), a
massive-activation dimension (VAR sink dims), the gaze-shift layer (GIFT); T-VHD agrees with VHD."""

import logging

import pytest
import torch

from vlm_guard.calibration.calibrate import HeadProfiler
from vlm_guard.calibration.tvhd import token_vhd
from vlm_guard.methods.gift.layer import choose_saliency_layer, enhancement_layers
from vlm_guard.methods.var.sinks import find_sink_dims, image_centric_rows, sink_mask
from vlm_guard.testing import BOS, build_batch, tiny_model

ROWS = [(True, 5), (True, 9), (True, 7)]


def _profile(model, batches, **options):
    with HeadProfiler.open(model, **options) as profiler:
        for inputs in batches:
            profiler.profile(inputs)
        return profiler.head_map()


def _attention(model, layer):
    return model.model.language_model.layers[layer].self_attn


# ---------------------------------------------------------------------- VHD
def _vision_head_model(layer, head):
    """Every head's values are a constant bias plus a 100x shrunk input term, so its output barely moves
    when the image tokens disappear; one head keeps its input-dependent values and loses the bias. That
    head's text-only activation stays below the others', so the outlier filter keeps it."""
    model = tiny_model("llava", text_overrides={"num_key_value_heads": 4, "attention_bias": True})
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    target = slice(head * head_dim, (head + 1) * head_dim)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for index in range(model.config.text_config.num_hidden_layers):
            values = _attention(model, index).v_proj
            weight = values.weight.clone()
            values.weight.mul_(0.01)
            values.bias.copy_(torch.randn(values.bias.shape, generator=generator))
            if index == layer:
                values.weight[target] = weight[target] * 3.0
                values.bias[target] = 0.0
    return model


def test_vhd_finds_the_planted_vision_head():
    model = _vision_head_model(layer=2, head=1)
    head_map = _profile(model, [build_batch(model, ROWS), build_batch(model, ROWS[:2], seed=1)])
    vhd = head_map.vhd_mean
    assert vhd.shape == (4, 4)
    assert divmod(int(vhd.argmax()), 4) == (2, 1)
    others = vhd.clone()
    others[2, 1] = 0
    assert vhd[2, 1] > 100 * others.max()
    assert head_map.vhr_heads[2, 1]
    assert head_map.vhd_std.shape == (4, 4) and bool((head_map.vhd_std >= 0).all())
    assert head_map.calibration["n_images"] == 5
    assert head_map.vhd_selection_frequency[2, 1] == 1.0


def test_vhd_ignores_rows_without_image_and_needs_left_padding():
    model = _vision_head_model(layer=1, head=3)
    with HeadProfiler.open(model) as profiler:
        assert profiler.profile(build_batch(model, [(True, 5), (False, 4)])) == 1
        right_padded = build_batch(model, [(True, 5), (True, 9)])
        right_padded["attention_mask"] = right_padded["attention_mask"].flip(1)
        with pytest.raises(ValueError, match="left"):
            profiler.profile(right_padded)
        head_map = profiler.head_map()
    assert head_map.calibration["n_images"] == 1
    assert divmod(int(head_map.vhd_mean.argmax()), 4) == (1, 3)


def test_profiler_restores_the_model():
    model = tiny_model("llava")
    inputs = build_batch(model, ROWS)
    with torch.no_grad():
        before = model(**inputs).logits
    _profile(model, [inputs])
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert model.config.text_config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------- sinks
def _massive_model(dim, value=300.0):
    model = tiny_model(
        "llava",
        text_overrides={
            "hidden_size": 768,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
    )
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[BOS, dim] = value
    return model


def test_sink_dims_find_the_planted_massive_activation():
    model = _massive_model(dim=123)
    head_map = _profile(model, [build_batch(model, ROWS)])
    assert head_map.sink_dims == [123]
    assert head_map.sink_dim_ratios[0] > 20
    assert head_map.sink_dims_source == "auto"
    assert head_map.sink_dim_profile.shape == (768,)
    second = head_map.sink_dim_profile.clone()
    second[123] = 0
    assert float(second.max()) < 5  # nothing else is near tau
    stats = head_map.image_centric
    assert stats.layers == [2]
    assert stats.text_sinks_mean[2] == pytest.approx(1.0)  # the first token, in every prompt
    assert stats.visual_sinks_mean[2] == 0.0


def test_no_massive_activation_gives_no_sink_dims_and_one_warning(caplog):
    model = tiny_model("llava")
    with caplog.at_level(logging.WARNING, logger="vlm_guard.calibration.calibrate"):
        head_map = _profile(model, [build_batch(model, ROWS), build_batch(model, ROWS, seed=2)])
    assert head_map.sink_dims == [] and head_map.sink_dim_ratios == []
    warnings = [r for r in caplog.records if "no massive activations" in r.getMessage()]
    assert len(warnings) == 1 and "VAR stays off" in warnings[0].getMessage()
    assert "none" in head_map.summary()


def test_sink_dims_override():
    model = tiny_model("llava")
    head_map = _profile(model, [build_batch(model, ROWS)], sink_dims=[5, 7])
    assert head_map.sink_dims == [5, 7] and head_map.sink_dims_source == "override"
    assert len(head_map.sink_dim_ratios) == 2
    with pytest.raises(ValueError, match="sink_dims"):
        _profile(model, [build_batch(model, ROWS)], sink_dims=[64])


def test_find_sink_dims_rule_is_near_tau_not_largest():
    states = torch.randn(3, 8, 1000) * 0.05
    states[:, :, 10] = 0.4  # the largest dim, ratio ~ 8: below tau/2, so not a sink dim
    found = find_sink_dims(states)
    assert found.dims == [] and int(found.profile.argmax()) == 10 and 5 < float(found.profile.max()) < 10
    states[:, 2:, 500] = 60.0  # massive in the middle layers
    found = find_sink_dims(states)
    assert found.dims == [500] and found.ratios[0] > 20
    assert sink_mask(states[0], found.dims).tolist() == [False, False] + [True] * 6


def test_image_centric_rows_by_hand():
    weights = torch.tensor([[[[0.1, 0.1, 0.8], [0.7, 0.2, 0.1], [0.0, 0.5, 0.5]]]])  # [1, 1, 3, 3]
    image = torch.tensor([[False, True, True]])
    sinks = torch.tensor([[False, True, False]])
    rows = image_centric_rows(weights, image, sinks, mass_threshold=0.2, rho=0.8)
    assert rows.visual_mass[0, 0].tolist() == pytest.approx([0.9, 0.3, 1.0])
    assert rows.non_sink_ratio[0, 0].tolist() == pytest.approx([0.8 / 0.9, 0.1 / 0.3, 0.5])
    assert rows.image_centric[0, 0].tolist() == [True, False, False]


# ---------------------------------------------------------------------- GIFT
def test_gift_layer_is_the_only_layer_with_gaze_shift():
    """Zero queries give uniform causal attention, whose rows only lose mass: no positive shift anywhere
    but the one layer that keeps (sharpened) random queries."""
    model = tiny_model("llava", text_overrides={"num_hidden_layers": 6})
    with torch.no_grad():
        for index in range(6):
            query = _attention(model, index).q_proj.weight
            query.mul_(30.0) if index == 3 else query.zero_()
    head_map = _profile(model, [build_batch(model, ROWS)])
    shift = torch.tensor(head_map.gift_layer_shift)
    assert head_map.gift_saliency_layer == 3
    assert head_map.gift_enhance_layers == [4]
    assert shift[3] > 0 and float(shift[[1, 2, 4]].abs().max()) < 1e-6
    assert torch.isnan(shift[[0, 5]]).all()  # not candidates


def test_gift_layer_rules():
    assert choose_saliency_layer(torch.zeros(6)) is None
    assert enhancement_layers(None, 32) == []
    assert enhancement_layers(11, 32) == list(range(12, 23))
    assert enhancement_layers(25, 32) == [26]
    assert choose_saliency_layer([float("nan"), 1.0, 4.0, 2.0, 9.0]) == 2  # the last layer is no candidate


# ---------------------------------------------------------------------- T-VHD
def test_token_vhd_matches_the_calibrated_vhd_at_the_last_prompt_position():
    model = tiny_model("llava")
    inputs = build_batch(model, [(True, 6)])
    head_map = _profile(model, [inputs])
    expected = head_map.vhd_mean.topk(2, dim=1).values.sum()
    scores = token_vhd(model, None, inputs, torch.tensor([[42]]), top_k=2)
    assert scores.shape == (1, 1)
    assert float(scores[0, 0]) == pytest.approx(float(expected), rel=1e-4)


def test_token_vhd_batched_equals_single_rows_and_accepts_generate_output():
    model = tiny_model("llava")
    rows = [(True, 4), (True, 9)]
    inputs = build_batch(model, rows)
    generated = torch.tensor([[11, 12, 13], [21, 22, 23]])
    batched = token_vhd(model, None, inputs, generated)
    assert batched.shape == (2, 3) and bool((batched > 0).all())
    full = torch.cat([inputs["input_ids"], generated], dim=1)
    assert torch.allclose(token_vhd(model, None, inputs, full), batched)
    for row in range(2):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        single_ids, single_mask = single["input_ids"], single["attention_mask"]
        keep = single_mask[0].bool()
        single = {
            "input_ids": single_ids[:, keep],
            "attention_mask": single_mask[:, keep],
            "pixel_values": single["pixel_values"],
        }
        alone = token_vhd(model, None, single, generated[row : row + 1])
        assert torch.allclose(alone, batched[row : row + 1], rtol=1e-3, atol=1e-6)


def test_a_wrapped_model_is_profiled_with_its_methods_off():
    import vlm_guard

    model = tiny_model("llava")
    inputs = build_batch(model, ROWS)
    plain = _profile(model, [inputs])
    guarded = vlm_guard.wrap(model, config=vlm_guard.GuardConfig.from_methods("vhr"))
    try:
        wrapped = _profile(guarded, [inputs])
        with guarded.disabled():
            _profile(guarded, [inputs])
            assert guarded.engine.enabled is False  # restored after profiling
    finally:
        guarded.unwrap()
    assert torch.allclose(wrapped.vhd_mean, plain.vhd_mean, rtol=1e-4, atol=1e-7)
    assert wrapped.gift_saliency_layer == plain.gift_saliency_layer


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "llava_next"])
def test_other_families_profile_and_score_tokens(family):
    from vlm_guard.testing import IMAGE

    model = tiny_model(family)
    inputs = build_batch(model, [(True, 4), (True, 7)])
    if family == "qwen2_vl":  # the processor returns these in transformers 5; build_batch does not
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).int()
    head_map = _profile(model, [inputs])
    assert head_map.vhd_mean.shape == (4, 4) and bool((head_map.vhd_mean > 0).any())
    scores = token_vhd(model, None, inputs, torch.tensor([[11, 12], [13, 14]]))
    assert scores.shape == (2, 2) and bool(torch.isfinite(scores).all())
