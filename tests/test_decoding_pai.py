"""PAI: hand-computed score amplification and contrast, the image-free stream, generation."""

from __future__ import annotations

import pytest
import torch
from test_decoding_common import ROWS, assert_batch_matches_singles, image_rows_changed, matches_plain

import vlm_guard
from vlm_guard.config import GuardConfig
from vlm_guard.methods.pai.intervention import (
    ContrastStream,
    PAIConfig,
    amplify_image_scores,
    image_free_contrast,
    plausibility_cut,
)
from vlm_guard.testing import build_batch, tiny_model


def test_amplification_on_image_columns_only():
    scores = torch.tensor([[[[1.0, -2.0, 3.0, float("-inf"), float("-inf")]]]])
    image = torch.tensor(
        [[False, True, True, False, True]]
    )  # the last image column is masked (outside a sliding window)
    out = amplify_image_scores(scores, image, 0.2)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1.0, -2.0 + 0.4, 3.0 * 1.2, float("-inf"), float("-inf")]))


def test_contrast_formula_and_plausibility_cut():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    text_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    out = image_free_contrast(
        probs.log() + 3.0, text_probs.log() - 1.0, gamma=1.1, plausibility=0.2
    )  # logits = log p + const
    expected = 1.1 * probs.log() - 0.1 * text_probs.log()
    assert out[0, 3] == float("-inf")  # 0.05 < 0.2 * 0.5
    torch.testing.assert_close(out[0, :3], expected[0, :3])
    assert plausibility_cut(probs.log(), 0.0).sum() == 0
    # gamma = 1: plain log-probabilities
    torch.testing.assert_close(image_free_contrast(probs.log(), text_probs.log(), 1.0, 0.0), probs.log())


@pytest.mark.parametrize("field, value", [("alpha", -0.1), ("gamma", 0.9), ("plausibility", 1.5)])
def test_out_of_range_values_name_field_and_range(field, value):
    with pytest.raises(ValueError, match=rf"PAIConfig\.{field}=.*allowed range is"):
        PAIConfig(**{field: value})


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    return model, build_batch(model, ROWS)


def test_image_free_stream_matches_a_direct_forward(llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model)
    try:
        text_ids, text_mask = guarded.adapter.remove_image(inputs["input_ids"], inputs["attention_mask"])
        stream = ContrastStream(guarded.engine, {"input_ids": text_ids, "attention_mask": text_mask})
        first = stream.logits(inputs["input_ids"])
        next_token = first.argmax(-1)
        second = stream.logits(torch.cat([inputs["input_ids"], next_token[:, None]], dim=1))
        for row in range(3):
            ids = text_ids[row][text_mask[row].bool()][None]
            with torch.no_grad():
                direct = model(input_ids=ids).logits[0, -1]
                direct_next = model(input_ids=torch.cat([ids, next_token[row, None, None]], dim=1)).logits[0, -1]
            torch.testing.assert_close(first[row], direct, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(second[row], direct_next, atol=1e-4, rtol=1e-4)
    finally:
        guarded.unwrap()


def test_output_changes_and_identity_matches_plain(llava):
    model, inputs = llava
    # the tiny random model's attention scores are small (|a| ~ 0.1), so the paper's alpha=0.2 moves little:
    # a stronger setting shows the effect on tokens
    guarded = vlm_guard.wrap(model, config=GuardConfig(pai=PAIConfig(alpha=2.0, gamma=2.0)))
    try:
        assert image_rows_changed(guarded, inputs)
        guarded.set_config(GuardConfig(pai=PAIConfig(alpha=0.0, gamma=1.0, plausibility=0.0)))
        assert matches_plain(guarded, inputs)
    finally:
        guarded.unwrap()


def test_padded_batch_matches_rows_alone(llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig(pai=PAIConfig(alpha=2.0, gamma=2.0)))
    try:
        assert_batch_matches_singles(guarded, model, inputs, "pai")
    finally:
        guarded.unwrap()


def test_m_rope_family_padded_batch_matches_rows_alone():
    """Qwen2-VL: the image-free stream must use M-RoPE position ids and keep the model's rope_deltas."""
    model = tiny_model("qwen2_vl")
    inputs = build_batch(model, ROWS)
    guarded = vlm_guard.wrap(model, config=GuardConfig(pai=PAIConfig(alpha=2.0, gamma=2.0)))
    try:
        assert_batch_matches_singles(guarded, model, inputs, "pai qwen2_vl", new_tokens=3)
    finally:
        guarded.unwrap()


def test_rows_without_an_image_are_not_edited(llava):
    """Issue 17 item 13: the contrast (and its plausibility cut) leaves text-only rows exactly as plain."""
    model, inputs = llava  # rows: image, text only, image
    guarded = vlm_guard.wrap(model, config=GuardConfig(pai=PAIConfig(alpha=2.0, gamma=2.0, plausibility=0.5)))
    try:
        (processor,) = guarded.interventions[0].logits_processors(guarded, dict(inputs))
        scores = torch.randn(3, model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(0))
        edited = processor(inputs["input_ids"], scores)
        assert torch.equal(edited[1], scores[1])  # the text-only row: untouched, no cut
        assert not torch.equal(edited[0], scores[0]) and bool(
            torch.isinf(edited[0]).any()
        )  # image rows: contrast + cut
    finally:
        guarded.unwrap()


def test_sampled_text_only_rows_match_plain(llava):
    model, _ = llava
    text_only = build_batch(model, [(False, 4), (False, 7)], seed=3)
    guarded = vlm_guard.wrap(model, config=GuardConfig(pai=PAIConfig(alpha=2.0, gamma=1.1, plausibility=0.9)))
    try:
        torch.manual_seed(11)
        sampled = guarded.generate(**text_only, max_new_tokens=8, do_sample=True, top_k=0)
        torch.manual_seed(11)
        plain = model.generate(**text_only, max_new_tokens=8, do_sample=True, top_k=0)
        assert torch.equal(sampled, plain)
    finally:
        guarded.unwrap()
