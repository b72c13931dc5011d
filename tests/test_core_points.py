"""Each named intervention point changes the output, and only for the rows it targets."""

import logging

import pytest
import torch

import vlm_guard
from vlm_guard.core.contract import Intervention
from vlm_guard.testing import assert_close_scaled, build_batch, forward_reduction, tiny_model

ROWS = [(True, 5), (False, 3), (True, 9)]
LAYER = 1


class ScaleHead(Intervention):
    """Per-head output point: scale head 0 of one layer by 2, for batch rows in ``targets``."""

    name = "scale_head"
    uses_head_output = True
    needs_image = False

    def __init__(self, targets):
        self.targets = targets

    def layers(self):
        return {LAYER}

    def on_head_output(self, ctx, head_output):  # [B, Q, H, D]
        assert head_output.ndim == 4 and head_output.shape[2] == ctx.num_heads
        scaled = head_output.clone()
        scaled[self.targets, :, 0] *= 2.0
        return scaled


class RowEdit(Intervention):
    """Pre- or post-softmax point: flatten the weights (or scores) of the last prompt row and generated rows of
    batch row 0, and record what it saw."""

    name = "row_edit"
    needs_image = False

    def __init__(self, point):
        self.point = point
        self.seen = []

    @property
    def uses_scores(self):
        return self.point == "scores"

    @property
    def uses_weights(self):
        return self.point == "weights"

    def layers(self):
        return {LAYER}

    def rows(self, ctx):
        rows = ctx.last_prompt_row() | ctx.generated_rows()
        rows[1:] = False  # batch row 0 only
        return rows

    def on_scores(self, ctx, scores, rows):
        self.seen.append(("scores", tuple(scores.shape), ctx.phase))
        return torch.zeros_like(scores).masked_fill(torch.isinf(scores), float("-inf"))

    def on_weights(self, ctx, weights, rows):
        self.seen.append(("weights", tuple(weights.shape), ctx.phase))
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
        uniform = (weights > 0).float()
        return uniform / uniform.sum(-1, keepdim=True)


class LayerInputProbe(Intervention):
    name = "layer_input_probe"
    uses_layer_input = True
    needs_image = False

    def __init__(self):
        self.captured = {}

    def layers(self):
        return {LAYER}

    def on_layer_input(self, ctx, hidden_states):
        if ctx.phase == "prefill":
            self.captured[ctx.layer] = hidden_states.detach().clone()


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llava")
    inputs = build_batch(model, ROWS)
    with torch.no_grad():
        plain_logits = model(**inputs).logits
    guarded = vlm_guard.wrap(model)
    return model, guarded, inputs, plain_logits


def _logits(guarded, inputs, intervention):
    with torch.no_grad(), guarded.interventions_active([intervention]):
        return guarded.model(**inputs).logits


def test_head_output_point_targets_rows(setup):
    model, guarded, inputs, plain = setup
    logits = _logits(guarded, inputs, ScaleHead(targets=[2]))
    assert not torch.allclose(logits[2], plain[2])
    assert torch.equal(logits[0], plain[0]) and torch.equal(logits[1], plain[1])


@pytest.mark.parametrize("point", ["scores", "weights"])
def test_attention_points_change_only_selected_rows(setup, point):
    model, guarded, inputs, plain = setup
    edit = RowEdit(point)
    logits = _logits(guarded, inputs, edit)
    assert edit.seen and edit.seen[0][0] == point
    batch, heads = 3, model.config.text_config.num_attention_heads
    assert edit.seen[0][1] == (batch, heads, 1, inputs["input_ids"].shape[1])  # [B, H, R, K], one selected row
    assert not torch.allclose(logits[0, -1], plain[0, -1])  # targeted row changed
    assert torch.equal(logits[0, :-1], plain[0, :-1])  # earlier positions untouched
    assert torch.equal(logits[1:], plain[1:])  # other batch rows untouched


def test_attention_points_while_decoding(setup):
    model, guarded, inputs, _ = setup
    edit = RowEdit("weights")
    with guarded.interventions_active([edit]):
        guarded.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    phases = [phase for _, _, phase in edit.seen]
    assert phases == ["prefill", "decode", "decode"]
    assert edit.seen[1][1][2] == 1  # one row while decoding


def test_layer_input_point_matches_hidden_states(setup):
    model, guarded, inputs, _ = setup
    probe = LayerInputProbe()
    with torch.no_grad(), guarded.interventions_active([probe]):
        outputs = guarded.model(**inputs, output_hidden_states=True)
    assert torch.allclose(probe.captured[LAYER], outputs.hidden_states[LAYER])


def test_row_without_image_is_skipped_with_one_warning(setup, caplog):
    model, guarded, inputs, plain = setup

    class ImageScale(ScaleHead):
        needs_image = True

    with caplog.at_level(logging.WARNING, logger="vlm_guard"):
        with guarded.interventions_active([ImageScale(targets=[0, 1, 2])]):
            with torch.no_grad():
                logits = guarded.model(**inputs).logits
            guarded.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    warnings = [r for r in caplog.records if "contain no image token" in r.getMessage()]
    assert len(warnings) == 1
    assert torch.equal(logits[1], plain[1])  # row 1 has no image: untouched
    assert not torch.allclose(logits[0], plain[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows(dtype):
    model = tiny_model("llava", dtype=dtype)
    inputs = build_batch(model, ROWS)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    guarded = vlm_guard.wrap(model)
    edit = RowEdit("weights")
    with torch.no_grad(), guarded.interventions_active([edit]):
        logits = guarded.model(**inputs).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_grouped_query_attention_rows_match_sdpa():
    """An identity edit on explicit rows reproduces SDPA's output (GQA: 4 heads, 2 key/value heads)."""

    class Identity(RowEdit):
        def on_weights(self, ctx, weights, rows):
            return weights * 1.0

    model = tiny_model("llava")
    assert model.config.text_config.num_key_value_heads == 2
    inputs = build_batch(model, ROWS)
    with torch.no_grad():
        plain = model(**inputs).logits
    guarded = vlm_guard.wrap(model)
    with torch.no_grad(), guarded.interventions_active([Identity("weights")]):
        logits = guarded.model(**inputs).logits
    assert_close_scaled(logits, plain, reduction=forward_reduction(model))
