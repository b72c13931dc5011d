"""Every family of ``vlm_guard.testing.FAMILY_NAMES`` on its tiny random-weight model: spans and image-free prompts
from token ids, each method acting on image rows only, padded batches equal to rows alone, two images in one prompt,
calibration. Methods-off identity for every family is in test_core_identity. Families whose class this transformers
version lacks are skipped with the reason. Fast tier: every family with all methods together; each method alone is
marked slow."""

from __future__ import annotations

import types

import pytest
import torch
from test_decoding_common import MIN_MARGIN, ROWS, SINK_DIM, assert_batch_matches_singles, greedy, tiny_var_config

import vlm_guard
from vlm_guard.calibration import HeadMap
from vlm_guard.calibration.calibrate import HeadProfiler
from vlm_guard.config import GuardConfig
from vlm_guard.core.contract import Intervention
from vlm_guard.methods.gift.intervention import GIFTConfig
from vlm_guard.methods.pai.intervention import PAIConfig
from vlm_guard.methods.registry import method_names
from vlm_guard.methods.vcd.intervention import VCDConfig
from vlm_guard.methods.vhr.intervention import VHRConfig
from vlm_guard.models import get_adapter
from vlm_guard.testing import (
    BOS,
    FAKE,
    FAMILY_NAMES,
    IMAGE,
    IMG_BREAK,
    IMG_END,
    PAD,
    VISION_END,
    VISION_START,
    build_batch,
    family_available,
    tiny_model,
    tiny_tokenizer,
)

NEW_TOKENS = 3
CHANGE_TOKENS = 6  # the change test decodes longer: weak methods on a random model flip a token within a few steps
MARKERS = {VISION_START, VISION_END, IMG_BREAK, IMG_END, FAKE}
# the marker tokens of one image block in its image span, per family (Mistral 3's 2x2 tokens: one [IMG_BREAK] after the
# first row, then [IMG_END]; LLaVA-NeXT and LLaVA-OneVision: none, their newline features are image tokens; Idefics3:
# none, its <fake_token_around_image> markers stay outside the span)
SPAN_MARKERS = {
    "llava": 0,
    "llava_next": 0,
    "qwen2_vl": 2,
    "qwen2_5_vl": 2,
    "idefics3": 0,
    "qwen3_vl": 2,
    "qwen3_vl_moe": 2,
    "glm4v": 2,
    "gemma3": 2,
    "internvl": 2,
    "mistral3": 2,
    "llava_onevision": 0,
}
# each method alone is slow-tier; all of them together runs in the fast tier
METHODS = [*(pytest.param(name, marks=pytest.mark.slow) for name in method_names()), "all"]
# (family, method) pairs whose method changes no score of that family's tiny random model (max |change| ~1e-7)
NO_EFFECT_ON_TINY_MODEL = {("qwen2_5_vl", "gift")}


def method_configs() -> dict[str, GuardConfig]:
    """Each method at a strength that acts visibly on a tiny model, and all of them together."""
    single = {
        "vhr": GuardConfig(vhr=VHRConfig(alpha=3.5)),
        "var": GuardConfig(var=tiny_var_config(p=1.0, rho=0.0, visual_threshold=0.0, layers=[0, 1, 2, 3])),
        "gift": GuardConfig(gift=GIFTConfig(alpha=15.0)),
        "pai": GuardConfig(pai=PAIConfig(alpha=2.0, gamma=2.0)),
        "vcd": GuardConfig(vcd=VCDConfig(alpha=5.0, contrast_when="always")),  # the tests decode greedily
    }
    for name in method_names():  # a method without a tiny-model setting here runs its defaults
        single.setdefault(name, GuardConfig.from_methods(name))
    together = GuardConfig.from_methods(list(method_names())).replace(
        var=tiny_var_config(), vcd=VCDConfig(contrast_when="always")
    )
    return {**single, "all": together}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    reason = family_available(request.param)
    if reason:
        pytest.skip(reason)
    model = tiny_model(request.param)
    embeddings = model.get_input_embeddings()
    with torch.no_grad():  # a massive activation on BOS, so that VAR finds sinks (Gemma 3 scales embeddings up)
        embeddings.weight[BOS, SINK_DIM] = 200.0 / float(getattr(embeddings, "embed_scale", 1.0))
    return request.param, model, build_batch(model, ROWS)


def _image_free_oracle(name: str, input_ids: torch.Tensor) -> list[list[int]]:
    """The image-free rows by construction: every token of build_batch below 100 (BOS and text) is text. Idefics3's
    <fake_token_around_image> markers lie outside its image span and stay in its image-free prompt."""
    kept = {FAKE} if name == "idefics3" else set()
    return [[token for token in row.tolist() if token != PAD and (token < IMAGE or token in kept)] for row in input_ids]


def test_spans_cover_image_tokens_and_markers(family):
    name, model, inputs = family
    adapter = get_adapter(model, tiny_tokenizer())
    spans = adapter.prompt_spans(inputs["input_ids"], inputs["attention_mask"])
    image = inputs["input_ids"] == IMAGE
    assert torch.equal(spans.image, image)
    assert spans.has_image.tolist() == [True, False, True]
    per_row = (spans.image_span & ~spans.image).sum(dim=1).tolist()
    assert per_row == [SPAN_MARKERS[name], 0, SPAN_MARKERS[name]]
    assert bool(
        (spans.image_span & ~spans.image <= torch.isin(inputs["input_ids"], torch.tensor(sorted(MARKERS)))).all()
    )
    # the query span: the text after the image block
    assert (
        not bool((spans.query & spans.image_span).any())
        and bool(spans.query[0].any())
        and not bool(spans.query[1].any())
    )


def test_image_free_prompt(family):
    """Image blocks and their marker tokens removed, every text token kept (one image, two images, none)."""
    name, model, _ = family
    adapter = get_adapter(model, tiny_tokenizer())
    inputs = build_batch(model, [(True, 5), (False, 3), (2, 9)], seed=1)
    free_ids, free_mask = adapter.remove_image(inputs["input_ids"], inputs["attention_mask"])
    expected = _image_free_oracle(name, inputs["input_ids"])
    assert [row[mask.bool()].tolist() for row, mask in zip(free_ids, free_mask)] == expected
    assert free_mask[:, -1].all()  # still left padded
    assert set(adapter.text_only_inputs(inputs)) == {"input_ids", "attention_mask"}


def test_without_processor_markers_from_config_or_image_tokens_only(family):
    """InternVL and Mistral 3 name their markers only in the tokenizer: without a processor the blocks are the image
    tokens alone; the other families read theirs from the config."""
    name, model, inputs = family
    spans = get_adapter(model).prompt_spans(inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(spans.image, inputs["input_ids"] == IMAGE)
    expected = 0 if name in ("internvl", "mistral3") else SPAN_MARKERS[name]
    assert (spans.image_span & ~spans.image).sum(dim=1).tolist() == [expected, 0, expected]


@pytest.mark.parametrize("method", METHODS)
def test_method_changes_image_rows_only(family, method):
    name, model, inputs = family
    guarded = vlm_guard.wrap(model, tiny_tokenizer(), config=method_configs()[method])
    try:
        output = _greedy_scores(guarded, inputs, CHANGE_TOKENS)
        with guarded.disabled():
            plain = _greedy_scores(guarded, inputs, CHANGE_TOKENS)
    finally:
        guarded.unwrap()
    assert torch.equal(output[0][1], plain[0][1]), f"{name} {method}: the row without an image changed"
    # a changed token, or else a changed first-step score (a weak method on a random model may flip no token)
    changed = [
        not torch.equal(output[0][row], plain[0][row])
        or float((output[1][0, row] - plain[1][0, row]).nan_to_num(posinf=0.0, neginf=0.0).abs().max()) > 1e-3
        for row in (0, 2)
    ]
    if not any(changed) and (name, method) in NO_EFFECT_ON_TINY_MODEL:
        pytest.xfail(f"{method} changes nothing on the tiny random {name} model")
    assert any(changed), f"{name} {method}: no image row changed"


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_matches_rows_alone(family, method):
    name, model, _ = family
    guarded = vlm_guard.wrap(model, tiny_tokenizer(), config=method_configs()[method])
    try:
        inputs = _batch_without_near_ties(guarded, model)
        assert_batch_matches_singles(guarded, model, inputs, f"{name} {method}", new_tokens=NEW_TOKENS)
    finally:
        guarded.unwrap()


def _batch_without_near_ties(guarded, model, rows=ROWS, seeds=range(4)) -> dict:
    """The ``rows`` batch with the first text seed whose guarded greedy steps all have a clear winner (random weights
    differ between transformers versions, and a near tie could flip between batch and single for fp32 noise)."""
    for seed in seeds:
        inputs = build_batch(model, rows, seed=seed)
        scores = torch.stack(greedy(guarded, inputs, NEW_TOKENS).scores).float()  # [steps, B, V]
        top = scores.topk(2, dim=-1).values
        if bool(((top[..., 0] - top[..., 1]) > MIN_MARGIN).all()):
            return inputs
    pytest.fail(f"every batch seed in {list(seeds)} has a near tie; choose other seeds")


def test_two_images_in_one_prompt(family):
    """A prompt with two images (text before, between and after them) beside a one-image and an image-free prompt:
    methods off give model.generate's tokens; all five methods together give each row's tokens alone."""
    name, model, _ = family
    rows = [(2, 9), (False, 3), (True, 5)]
    reference = model.generate(**build_batch(model, rows), max_new_tokens=NEW_TOKENS, do_sample=False)
    guarded = vlm_guard.wrap(model, tiny_tokenizer())
    try:
        assert torch.equal(
            guarded.generate(**build_batch(model, rows), max_new_tokens=NEW_TOKENS, do_sample=False), reference
        )
        guarded.set_config(method_configs()["all"])
        inputs = _batch_without_near_ties(guarded, model, rows)
        assert inputs["input_ids"][0].eq(IMAGE).sum() == 2 * inputs["input_ids"][2].eq(IMAGE).sum()
        assert_batch_matches_singles(guarded, model, inputs, f"{name} two images", new_tokens=NEW_TOKENS)
    finally:
        guarded.unwrap()


def test_calibration_writes_a_head_map(family, tmp_path):
    name, model, inputs = family
    with HeadProfiler.open(model, tiny_tokenizer(), sink_dims=[SINK_DIM], sink_threshold=5.0) as profiler:
        assert profiler.profile(inputs) == 2  # the two rows with an image
        head_map = profiler.head_map()
    folder = head_map.save_pretrained(tmp_path / name)
    loaded = HeadMap.from_pretrained(folder)
    geometry = get_adapter(model).geometry
    assert loaded.vhd_mean.shape == (geometry.num_layers, geometry.num_heads)
    assert bool((loaded.vhd_mean > 0).any()) and bool(torch.isfinite(loaded.vhd_mean).all())
    guarded = vlm_guard.wrap(
        model, tiny_tokenizer(), config=GuardConfig(vhr=VHRConfig(selection="head_map", alpha=3.0)), head_map=loaded
    )
    try:
        guarded.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        guarded.unwrap()


# ---------------------------------------------------------------------- Gemma 3: local layers and soft-capping
class _Probe(Intervention):
    """Asks for explicit weights of every row at the given layers, records them, edits nothing."""

    name = "probe"
    uses_weights = True
    needs_image = False

    def __init__(self, layers):
        self._layers = set(layers)
        self.seen = []  # (layer, phase, step, key_length, weights [B, H, R, K])

    def layers(self):
        return self._layers

    def rows(self, ctx):
        return torch.ones(ctx.prompt.batch_size, ctx.query_length, dtype=torch.bool)

    def on_weights(self, ctx, weights, rows):
        self.seen.append((ctx.layer, ctx.phase, ctx.step, ctx.key_length, weights.clone()))
        return weights


def _greedy_scores(model_like, inputs, new_tokens=4):
    output = model_like.generate(
        **inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    return output.sequences, torch.stack(output.scores)


@pytest.mark.skipif(family_available("gemma3") is not None, reason=str(family_available("gemma3")))
def test_sliding_window_keys_sit_at_their_absolute_positions():
    """Gemma 3's local layers keep only the last `sliding_window` keys in their cache while decoding. The explicit
    rows place them at their absolute positions: a generated token at position p attends, in a local layer, to the
    valid keys p-5..p only (window 6), in a global layer to every valid key; and the output equals the plain model."""
    model = tiny_model("gemma3")
    inputs = build_batch(model, ROWS)
    plain_tokens, plain_scores = _greedy_scores(model, inputs)
    layer_types = model.config.text_config.layer_types
    local = [index for index, kind in enumerate(layer_types) if kind == "sliding_attention"]
    global_ = [index for index, kind in enumerate(layer_types) if kind == "full_attention"]
    window = model.config.text_config.sliding_window
    probe = _Probe(local + global_)
    guarded = vlm_guard.wrap(model)
    try:
        with guarded.engine.activate([probe]):
            tokens, scores = _greedy_scores(model, inputs)
    finally:
        guarded.unwrap()
    assert torch.equal(tokens, plain_tokens)
    vlm_guard.testing.assert_close_scaled(scores, plain_scores, reduction=vlm_guard.testing.forward_reduction(model))
    prompt_length = inputs["input_ids"].shape[1]
    valid = inputs["attention_mask"].bool()
    decode = [entry for entry in probe.seen if entry[1] == "decode"]
    assert {entry[0] for entry in decode} == set(local + global_)
    for layer, _, step, key_length, weights in decode:
        position = prompt_length + step - 1  # the query row's absolute position
        assert key_length == position + 1 and weights.shape[-1] == key_length
        keys = torch.cat([valid, torch.ones(valid.shape[0], step, dtype=torch.bool)], dim=1)  # [B, K]
        if layer in local:
            keys[:, : position - window + 1] = False
        attended = weights[:, :, 0, :] > 0  # [B, H, K]
        assert torch.equal(attended, keys[:, None, :].expand_as(attended)), f"layer {layer} step {step}"
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


def test_attention_softcapping_is_reproduced_by_the_explicit_rows():
    """A layer that passes ``softcap`` to its attention function (Gemma 2-style backbones; transformers' Gemma 3
    keeps ``attn_logit_softcapping`` in its config but does not pass it) gets the same per-head outputs from the
    explicit rows as from transformers' own eager attention with the cap; the cap is strong enough to matter."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    from vlm_guard.core.contract import LayerContext
    from vlm_guard.core.engine import GuardEngine

    model = tiny_model("llava", attn_implementation="eager")
    adapter = get_adapter(model)
    module = adapter.attention_modules()[0]  # eager_attention_forward reads num_key_value_groups and training
    engine = GuardEngine(model, adapter)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 5, 16, generator=generator) * 3.0  # [B, H, Q, D], large enough for tanh to bend
    key, value = torch.randn(2, 2, 5, 16, generator=generator) * 3.0, torch.randn(2, 2, 5, 16, generator=generator)
    mask = torch.ones(5, 5).tril().bool()[None, None].expand(2, 1, 5, 5).clone()
    mask[1, :, :, :2] = False  # row 1 left padded by two
    mask[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # padding rows see themselves (no NaN in the reference)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    prompt = types.SimpleNamespace(prompt_length=5)  # only its length is read: every row is a prompt row
    ctx = LayerContext(
        layer=0, phase="prefill", step=0, prompt=prompt, query_length=5, key_length=5, num_heads=4, num_kv_heads=2
    )
    outputs = {}
    for softcap in (2.0, None):
        reference, _ = eager_attention_forward(
            module, query, key, value, additive, dropout=0.0, scaling=0.25, softcap=softcap
        )
        explicit, _ = engine._explicit_rows(
            ctx, module, query, key, value, mask, 0.25, torch.arange(5), [], every_row=True, softcap=softcap
        )  # [B, R, H, D], the model's layout
        torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)
        outputs[softcap] = reference
    assert (outputs[2.0] - outputs[None]).abs().max() > 1e-2
