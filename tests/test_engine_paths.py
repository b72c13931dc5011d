"""Every way transformers drives a model, through the wrapper: the generation is tracked by cache
position, not by the shape of a call."""

import copy
import logging

import pytest
import torch
import transformers

import vlm_guard
from vlm_guard import GuardConfig
from vlm_guard.core.explicit_rows import allowed_rows
from vlm_guard.methods.var.intervention import VARConfig
from vlm_guard.methods.vcd.intervention import VCDConfig
from vlm_guard.methods.vhr.intervention import VHRConfig
from vlm_guard.models.compat import cache_kwargs, output_cache
from vlm_guard.testing import assert_close_scaled, build_batch, forward_reduction, greedy_loop, tiny_model

TRANSFORMERS_4 = transformers.__version__.startswith("4.")
ATTENTION_METHODS = "vhr,gift,pai"  # each edits a different point (head output, weights, scores) + PAI's contrast


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("vlm_guard")]


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    return model, build_batch(model, [(True, 4), (False, 3)])


def _greedy(model, inputs, n=3, **kwargs):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)


# ---------------------------------------------------------------------- embeddings
def test_inputs_embeds_only_runs_the_plain_model_with_one_warning(caplog):
    model = tiny_model("llava")
    inputs = build_batch(model, [(False, 5), (False, 8)])  # left padded
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    plain = model.generate(
        inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=4, do_sample=False
    )
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr"))
    with caplog.at_level(logging.WARNING):
        out = guarded.generate(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=4, do_sample=False
        )
    assert out.tolist() == plain.tolist()
    if not TRANSFORMERS_4:  # the expected values (random weights differ between the two majors)
        assert plain.tolist() == [[115, 18, 18, 18], [4, 34, 34, 34]]
    messages = _warnings(caplog)
    assert len(messages) == 1 and "embeddings" in messages[0]
    # the same through a hand-written loop: one warning at the prefill, the continuations run plain silently
    caplog.clear()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        output = guarded(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=True)
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        output = guarded(
            input_ids=token,
            attention_mask=mask,
            position_ids=mask.cumsum(-1)[:, -1:] - 1,
            use_cache=True,
            **cache_kwargs(model, output_cache(output)),
        )
    assert output.logits[:, -1].argmax(-1).tolist() == plain[:, 1].tolist()
    assert len(_warnings(caplog)) == 1
    guarded.unwrap()


def test_inputs_embeds_with_input_ids_runs_the_methods(llava):
    model, inputs = llava
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods(ATTENTION_METHODS))
    try:
        by_ids = _greedy(guarded, inputs)
        by_embeds = _greedy(guarded, dict(inputs, inputs_embeds=embeds))
        with guarded.disabled():
            plain = _greedy(guarded, inputs)
    finally:
        guarded.unwrap()
    assert torch.equal(by_embeds, by_ids)
    assert not torch.equal(by_ids, plain)  # the methods ran


# ---------------------------------------------------------------------- argument spellings
def test_generate_inputs_keyword_and_positional_input_ids(llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods(ATTENTION_METHODS))
    try:
        reference = _greedy(guarded, inputs)
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}
        by_inputs = guarded.generate(inputs=inputs["input_ids"], **rest, max_new_tokens=3, do_sample=False)
        positional = guarded.generate(inputs["input_ids"], **rest, max_new_tokens=3, do_sample=False)
    finally:
        guarded.unwrap()
    assert torch.equal(by_inputs, reference) and torch.equal(positional, reference)


# ---------------------------------------------------------------------- cache continuation
def test_generate_continues_a_prefix_cache_started_through_the_wrapper(llava, caplog):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods(ATTENTION_METHODS))
    try:
        reference = _greedy(guarded, inputs, n=4)
        with torch.no_grad():
            prefill = guarded(**inputs, use_cache=True)  # the prompt's cache, built by the guarded model
        first = prefill.logits[:, -1].float()
        first = guarded.logits_processor(**inputs)(inputs["input_ids"], first).argmax(-1, keepdim=True)
        sequence = torch.cat([inputs["input_ids"], first], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            continued = guarded.generate(
                input_ids=sequence,
                attention_mask=mask,
                max_new_tokens=3,
                do_sample=False,
                **cache_kwargs(model, output_cache(prefill)),
            )
    finally:
        guarded.unwrap()
    assert torch.equal(continued, reference)
    assert _warnings(caplog) == []  # the prompt context is the cache's: no false "row has no image"


def test_generate_on_a_cache_the_wrapper_did_not_start_warns_once_and_runs_plain(llava, caplog):
    model, inputs = llava
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)  # built by the plain model
    first = prefill.logits[:, -1].argmax(-1, keepdim=True)
    sequence = torch.cat([inputs["input_ids"], first], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
    plain = _greedy(model, inputs, n=4)
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr,gift"))
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING):
            continued = guarded.generate(
                input_ids=sequence,
                attention_mask=mask,
                max_new_tokens=3,
                do_sample=False,
                **cache_kwargs(model, output_cache(prefill)),
            )
    finally:
        guarded.unwrap()
    assert torch.equal(continued, plain)
    messages = _warnings(caplog)
    assert len(messages) == 1 and "did not start" in messages[0]
    assert not any("no image" in m for m in messages)


def test_a_chunk_of_tokens_continues_like_one_token_at_a_time(llava):
    """Several tokens in one call extend the cache exactly as the same tokens fed one by one."""
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr,gift,pai"))
    forced = torch.tensor([[20, 21, 22], [30, 31, 32]])
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], dim=1)
    positions = mask.cumsum(-1) - 1
    try:
        with torch.no_grad():
            cache = output_cache(guarded(**inputs, use_cache=True))
            chunk = guarded(
                input_ids=forced,
                attention_mask=mask,
                position_ids=positions[:, -3:],
                use_cache=True,
                **cache_kwargs(model, cache),
            ).logits[:, -1]
            cache = output_cache(guarded(**inputs, use_cache=True))
            for i in range(3):
                width = inputs["input_ids"].shape[1] + i + 1
                step = guarded(
                    input_ids=forced[:, i : i + 1],
                    attention_mask=mask[:, :width],
                    position_ids=positions[:, width - 1 : width],
                    use_cache=True,
                    **cache_kwargs(model, cache),
                ).logits[:, -1]
            with guarded.disabled():
                cache = output_cache(guarded(**inputs, use_cache=True))
                plain = guarded(
                    input_ids=forced,
                    attention_mask=mask,
                    position_ids=positions[:, -3:],
                    use_cache=True,
                    **cache_kwargs(model, cache),
                ).logits[:, -1]
    finally:
        guarded.unwrap()
    assert_close_scaled(chunk, step, reduction=forward_reduction(model))
    assert not torch.allclose(chunk, plain, atol=1e-4)  # the methods ran on the chunk


def test_a_cache_from_an_older_generation_runs_plain_with_one_warning(llava, caplog):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr"))
    token = torch.tensor([[20], [30]])
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
    step = dict(input_ids=token, attention_mask=mask, position_ids=mask.cumsum(-1)[:, -1:] - 1, use_cache=True)
    try:
        with torch.no_grad():
            first_cache = output_cache(guarded(**inputs, use_cache=True))
            untouched = copy.deepcopy(first_cache)
            guarded(**inputs, use_cache=True)  # a second generation replaces the methods' per-sample state
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                stale = guarded(**step, **cache_kwargs(model, first_cache)).logits
                again = guarded(**dict(step, input_ids=token + 1), **cache_kwargs(model, first_cache)).logits
            with guarded.disabled():
                plain = guarded(**step, **cache_kwargs(model, untouched)).logits
    finally:
        guarded.unwrap()
    messages = _warnings(caplog)
    assert len(messages) == 1 and "did not start" in messages[0]  # once per cache, not per call
    torch.testing.assert_close(stale, plain)
    assert again.shape == stale.shape


def test_use_cache_false_gives_the_cached_tokens():
    model = tiny_model("qwen2_vl")
    inputs = build_batch(model, [(True, 5), (False, 3)])
    assert torch.equal(_greedy(model, inputs, use_cache=False), _greedy(model, inputs))  # the plain model does not care
    config = GuardConfig.from_methods("vhr,gift,pai")
    config.var = VARConfig(sink_dims=[0, 1], tau=1.5)
    config.vcd = VCDConfig(contrast_when="always")
    guarded = vlm_guard.wrap(model, config=config)
    try:
        assert torch.equal(_greedy(guarded, inputs, use_cache=False), _greedy(guarded, inputs))
    finally:
        guarded.unwrap()


# ---------------------------------------------------------------------- static cache
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_static_cache_with_a_method_gives_the_dynamic_tokens(family):
    model = tiny_model(family)
    inputs = build_batch(model, [(True, 5), (False, 3)])
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr"))
    try:
        dynamic = _greedy(guarded, inputs)
        static = _greedy(guarded, inputs, cache_implementation="static")
    finally:
        guarded.unwrap()
    assert torch.equal(static, dynamic)
    if TRANSFORMERS_4:
        return
    expected = {"qwen2_vl": [[123, 97, 125], [47, 69, 84]], "qwen2_5_vl": [[28, 28, 28], [3, 52, 3]]}[family]
    assert dynamic[:, -3:].tolist() == expected


def test_eager_static_cache_prefill_ignores_the_empty_slots():
    model = tiny_model("llava", attn_implementation="eager")
    inputs = build_batch(model, [(True, 4), (False, 3)])
    config = GuardConfig.from_methods("vhr,gift,pai")
    guarded = vlm_guard.wrap(model, config=config)
    try:
        assert torch.equal(_greedy(guarded, inputs, cache_implementation="static"), _greedy(guarded, inputs))
    finally:
        guarded.unwrap()


def test_explicit_rows_without_a_mask_see_only_keys_up_to_their_position():
    # a prefill of 3 rows into a static cache of 6 slots: row i sees keys 0..i, never the empty slots 3..5
    allowed = allowed_rows(None, torch.arange(3), past_length=0, key_length=6, device="cpu")
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    # one decode row at position 4 of the same cache
    allowed = allowed_rows(None, torch.arange(1), past_length=4, key_length=6, device="cpu")
    assert allowed[0, 0].int().tolist() == [[1, 1, 1, 1, 1, 0]]


# ---------------------------------------------------------------------- refused / adjusted calls
def test_assisted_generation_is_refused_with_methods_on(llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr"))
    try:
        with pytest.raises(ValueError, match="assisted generation is not supported"):
            _greedy(guarded, inputs, assistant_model=tiny_model("llava", seed=1))
        with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
            _greedy(guarded, inputs, prompt_lookup_num_tokens=2)
    finally:
        guarded.unwrap()


def test_prefill_chunk_size_prefills_in_one_pass_with_a_warning(llava, caplog):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods(ATTENTION_METHODS))
    try:
        reference = _greedy(guarded, inputs)
        with caplog.at_level(logging.WARNING):
            chunked = _greedy(guarded, inputs, prefill_chunk_size=4)
    finally:
        guarded.unwrap()
    assert torch.equal(chunked, reference)
    assert any("prefill_chunk_size is ignored" in m for m in _warnings(caplog))


# ---------------------------------------------------------------------- output_attentions
@pytest.mark.parametrize("methods", ["pai", "vhr", "gift"])
def test_output_attentions_one_map_per_layer_in_layer_order(methods):
    model = tiny_model("llava", attn_implementation="eager")
    inputs = build_batch(model, [(True, 5)])
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True).attentions
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods(methods))
    try:
        first_edited = min(min(i.layers()) for i in guarded.interventions)
        with torch.no_grad():
            attentions = guarded(**inputs, output_attentions=True).attentions
            steps = guarded.generate(
                **inputs, max_new_tokens=2, do_sample=False, output_attentions=True, return_dict_in_generate=True
            ).attentions
    finally:
        guarded.unwrap()
    assert len(attentions) == len(reference) == 4
    for layer, (mine, plain) in enumerate(zip(attentions, reference)):
        assert mine.shape == plain.shape  # [B, H, Q, K]
        torch.testing.assert_close(mine.sum(-1), torch.ones_like(mine.sum(-1)), rtol=1e-4, atol=1e-4)
        if layer < first_edited:
            torch.testing.assert_close(mine, plain)
    if methods == "pai":  # layer 2's last row is the edited (amplified) one, the other rows are the plain ones
        image = inputs["input_ids"][0] == vlm_guard.testing.IMAGE
        torch.testing.assert_close(attentions[2][..., :-1, :], reference[2][..., :-1, :])
        assert bool((attentions[2][0, :, -1, image].sum(-1) > reference[2][0, :, -1, image].sum(-1)).all())
    assert [len(step) for step in steps] == [4, 4]
    assert steps[1][3].shape[-2:] == (1, inputs["input_ids"].shape[1] + 1)


# ---------------------------------------------------------------------- side passes leave the model as found
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_side_passes_leave_qwen_rope_deltas_as_found(family):
    model = tiny_model(family)
    inputs = build_batch(model, [(True, 5), (False, 3), (True, 9)])
    settings = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain = model.generate(**inputs, **settings)
    plain_deltas = model.model.rope_deltas.flatten().tolist()
    guarded = vlm_guard.wrap(
        model, config=GuardConfig(vhr=VHRConfig(alpha=1.0))
    )  # a no-op scale, one image-free side pass
    try:
        out = guarded.generate(**inputs, **settings)
        deltas = model.model.rope_deltas.flatten().tolist()
    finally:
        guarded.unwrap()
    assert deltas == plain_deltas
    if TRANSFORMERS_4:  # 4.57 derives the decode positions from them
        assert plain_deltas == [-6, -12, -2]
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, plain.scores)) == 0.0


def test_loop_helper_matches_generate_for_the_plain_model(llava):
    model, inputs = llava
    assert torch.equal(greedy_loop(model, inputs, 3), _greedy(model, inputs))


def test_prompt_validity_is_read_from_prepared_masks():
    """Qwen2-VL's static-cache prefill passes a dict of prepared 4-D masks instead of the 2-D one."""
    from vlm_guard.core.engine import _prompt_mask

    ids = torch.ones(2, 4, dtype=torch.long)
    valid = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    allowed = (
        torch.tril(torch.ones(4, 6, dtype=torch.bool))[None, None]
        & torch.cat([valid, torch.zeros(2, 2, dtype=torch.long)], 1).bool()[:, None, None, :]
    )
    assert _prompt_mask(valid, ids).tolist() == valid.tolist()
    assert _prompt_mask(allowed, ids).tolist() == valid.tolist()  # bool [B, 1, Q, K], K a static cache's length
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    assert (
        _prompt_mask({"sliding_attention": additive[:, :, :, :1], "full_attention": additive}, ids).tolist()
        == valid.tolist()
    )
    assert _prompt_mask(None, ids) is None
