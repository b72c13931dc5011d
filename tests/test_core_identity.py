"""With every method off, guarded generation is token-identical to model.generate, for every family."""

import pytest
import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

import vlm_guard
from vlm_guard.testing import FAMILY_NAMES, build_batch, family_available, tiny_model

ROWS = [(True, 5), (False, 3), (True, 9)]  # three prompts of different lengths, one without an image


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_model(request):
    reason = family_available(request.param)
    if reason:
        pytest.skip(reason)
    model = tiny_model(request.param)
    return request.param, model, build_batch(model, ROWS)


def _generate(model_like, inputs, **kwargs):
    return model_like.generate(**inputs, max_new_tokens=6, do_sample=False, **kwargs)


def test_off_disabled_and_unwrap_are_identical(family_model):
    family, model, inputs = family_model
    reference = _generate(model, inputs)
    assert (
        inputs["attention_mask"][:, 0].tolist() == [0, 0, 1] or inputs["attention_mask"].min() == 0
    )  # left padding present
    guarded = vlm_guard.wrap(model)
    assert guarded.adapter.family == family
    assert torch.equal(_generate(guarded, inputs), reference)
    guarded.set_config(vlm_guard.GuardConfig.from_methods("vhr"))
    assert not torch.equal(_generate(guarded, inputs), reference)  # the method does act
    with guarded.disabled():
        assert torch.equal(_generate(guarded, inputs), reference)
    name = guarded.engine.name
    text_config = guarded.adapter.attention_modules()[0].config
    assert text_config._attn_implementation == name
    restored = guarded.unwrap()
    assert restored is model
    assert text_config._attn_implementation == "sdpa"
    assert name not in AttentionInterface._global_mapping and name not in AttentionMaskInterface._global_mapping
    assert torch.equal(_generate(restored, inputs), reference)


def test_vision_tower_keeps_its_implementation():
    model = tiny_model("llava")
    guarded = vlm_guard.wrap(model)
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert guarded.adapter.attention_modules()[0].config._attn_implementation.startswith("vlm_guard_")
    guarded.unwrap()


def test_generate_options_pass_through():
    model = tiny_model("llava")
    inputs = build_batch(model, ROWS)
    guarded = vlm_guard.wrap(model)
    plain = model.generate(
        **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    wrapped = guarded.generate(
        **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    assert type(wrapped) is type(plain)
    assert torch.equal(wrapped.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(wrapped.scores, plain.scores))
    torch.manual_seed(3)
    sampled_plain = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
    torch.manual_seed(3)
    sampled_wrapped = guarded.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5)
    assert torch.equal(sampled_plain, sampled_wrapped)
    beams_plain = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    beams_wrapped = guarded.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(beams_plain, beams_wrapped)
    guarded.set_config(vlm_guard.GuardConfig.from_methods("vhr"))
    beams_vhr = guarded.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    assert beams_vhr.shape == beams_plain.shape


def test_streamer_receives_the_tokens():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    model = tiny_model("llava")
    inputs = build_batch(model, [(True, 5)])
    guarded = vlm_guard.wrap(model, config=vlm_guard.GuardConfig.from_methods("vhr"))
    streamer = Collect()
    output = guarded.generate(**inputs, max_new_tokens=3, do_sample=False, streamer=streamer)
    assert streamer.chunks[-1] is None
    streamed = torch.cat([chunk.reshape(-1) for chunk in streamer.chunks[1:-1]])
    assert torch.equal(streamed, output[0, inputs["input_ids"].shape[1] :])


def test_attributes_pass_through_and_repr():
    model = tiny_model("llava")
    guarded = vlm_guard.wrap(model)
    assert guarded.config is model.config
    assert guarded.device == model.device
    assert "llava" in repr(guarded)
    with pytest.raises(AttributeError):
        _ = guarded.no_such_attribute


def test_two_wrapped_models_do_not_interfere():
    model_a, model_b = tiny_model("llava", seed=0), tiny_model("llava", seed=0)
    inputs = build_batch(model_a, ROWS)
    reference = _generate(model_a, inputs)
    guarded_a = vlm_guard.wrap(model_a, config=vlm_guard.GuardConfig.from_methods("vhr"))
    guarded_b = vlm_guard.wrap(model_b)
    assert guarded_a.engine.name != guarded_b.engine.name
    assert torch.equal(_generate(guarded_b, inputs), reference)
    vhr_tokens = _generate(guarded_a, inputs)
    assert not torch.equal(vhr_tokens, reference)
    assert torch.equal(_generate(guarded_b, inputs), reference)
    guarded_a.unwrap()
    assert torch.equal(_generate(guarded_b, inputs), reference)


def test_wrapping_twice_is_refused():
    model = tiny_model("llava")
    vlm_guard.wrap(model)
    with pytest.raises(ValueError, match="already wrapped"):
        vlm_guard.wrap(model)


def test_eager_model_keeps_eager_path():
    model = tiny_model("llava", attn_implementation="eager")
    inputs = build_batch(model, ROWS)
    reference = _generate(model, inputs)
    guarded = vlm_guard.wrap(model)
    assert torch.equal(_generate(guarded, inputs), reference)
    guarded.unwrap()
    assert model.config.text_config._attn_implementation == "eager"
