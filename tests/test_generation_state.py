"""Per-generation state: each method's ``begin`` returns its state for one generation, the generation holds it and
the hooks read it back (``ctx.state(self)``); the method objects keep only what ``build`` computed, and
``GuardedModel.last_generation`` shows the latest generation's states by method name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_decoding_common import planted_sink_model, tiny_var_config

import vlm_guard
from vlm_guard.config import GuardConfig
from vlm_guard.core.contract import Intervention
from vlm_guard.methods.gift.intervention import GIFTConfig, GIFTState
from vlm_guard.methods.pai.intervention import PAIConfig, PAIState
from vlm_guard.methods.var.intervention import VARState
from vlm_guard.methods.vcd.intervention import VCDConfig, VCDState
from vlm_guard.methods.vhr.intervention import VHRConfig, VHRState
from vlm_guard.methods.vhr.vhd import HeadOutputRecorder
from vlm_guard.models.compat import cache_kwargs, output_cache
from vlm_guard.testing import build_batch

NEW_TOKENS = 3
STATE_CLASSES = {"vhr": VHRState, "var": VARState, "gift": GIFTState, "pai": PAIState, "vcd": VCDState}


def _every_method() -> GuardConfig:
    # GIFT's l* inside the enhancement layers: its saliency comes from a side pass (the state is given to its recorder)
    return GuardConfig(
        vhr=VHRConfig(target_layers=[1, 3]),
        var=tiny_var_config(),
        gift=GIFTConfig(saliency_layer=1, enhance_layers=[1, 2, 3]),
        pai=PAIConfig(),
        vcd=VCDConfig(contrast_when="always"),
    )


@pytest.fixture(scope="module")
def model():
    return planted_sink_model("llava")


def _generate(guarded, inputs):
    return guarded.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


def _snapshot(value):
    """A deep copy of a state's tensors (and the dicts / tuples / dataclasses that hold them)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _snapshot(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_snapshot(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _snapshot(getattr(value, field.name)) for field in dataclasses.fields(value)}
    return value


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a is b or a == b)


def test_two_generations_have_their_own_states_and_the_first_is_left_as_it_was(model):
    first_inputs = build_batch(model, [(True, 5), (False, 3), (True, 9)])
    second_inputs = build_batch(model, [(True, 7), (True, 4)])  # another batch size and prompt length
    guarded = vlm_guard.wrap(model, config=_every_method())
    try:
        _generate(guarded, first_inputs)
        first = guarded.last_generation
        assert list(first.states) == ["vhr", "var", "gift", "pai", "vcd"]  # the run order
        for name, state in first.states.items():
            assert isinstance(state, STATE_CLASSES[name])
        assert torch.equal(first.prompt.input_ids, first_inputs["input_ids"])
        # the prefill filled them: sinks at the VAR layers, a saliency, VHR's heads at its layers
        assert sorted(first.states["var"].sink_mask) == [2, 3]
        assert bool((first.states["gift"].saliency > 0).any())
        assert sorted(first.states["vhr"].selected) == [1, 3]
        saved = _snapshot(dict(first.states))

        _generate(guarded, second_inputs)
        second = guarded.last_generation
        assert second is not first
        for name in first.states:
            assert second.states[name] is not first.states[name], f"{name}: one state object for two generations"
        assert second.states["var"].sink_mask[2].shape == second_inputs["input_ids"].shape
        assert second.states["gift"].saliency.shape == second_inputs["input_ids"].shape
        # the first generation's states are exactly as the first generation left them
        assert _same(_snapshot(dict(first.states)), saved)
        assert first.states["var"].sink_mask[2].shape == first_inputs["input_ids"].shape
    finally:
        guarded.unwrap()


def test_method_objects_keep_no_per_generation_attribute(model):
    inputs = build_batch(model, [(True, 5), (False, 3), (True, 9)])
    guarded = vlm_guard.wrap(model, config=_every_method())
    try:
        methods = list(guarded.interventions)
        assert [m.name for m in methods] == ["vhr", "var", "gift", "pai", "vcd"]
        before = {m.name: dict(vars(m)) for m in methods}
        _generate(guarded, inputs)
        with torch.no_grad():
            guarded(**inputs)  # a forward too
        for method in methods:
            after = vars(method)
            assert after.keys() == before[method.name].keys(), (
                f"{method.name}: {sorted(after.keys() - before[method.name].keys())} set by a generation"
            )
            for key, value in before[method.name].items():
                assert after[key] is value, f"{method.name}.{key} was replaced by a generation"
    finally:
        guarded.unwrap()


def test_last_generation_is_set_by_guarded_calls_only(model):
    inputs = build_batch(model, [(True, 5), (True, 9)])
    other = build_batch(model, [(True, 6)])
    guarded = vlm_guard.wrap(model, config=_every_method())
    try:
        assert guarded.last_generation is None  # before any call
        _generate(guarded, inputs)
        record = guarded.last_generation
        assert record is not None
        # VHR's and GIFT's side passes (image-free prompt, the saliency pass) and PAI's / VCD's contrast streams ran
        # during that generate: the record is the main prompt's, with its image tokens
        assert torch.equal(record.prompt.input_ids, inputs["input_ids"])
        assert bool(record.prompt.spans.has_image.all())
        with guarded.disabled():
            _generate(guarded, other)
            with torch.no_grad():
                guarded(**other)
        assert guarded.last_generation is record
        # an explicit side pass, and a block of extra interventions (a profiler's recorder), do not replace it either
        recorder = HeadOutputRecorder([1])
        guarded.engine.side_pass(
            [recorder], {"input_ids": other["input_ids"], "attention_mask": other["attention_mask"]}
        )
        assert recorder.outputs, "the side pass ran its recorder"
        with torch.no_grad(), guarded.interventions_active([HeadOutputRecorder([1])]):
            model(**other)
        assert guarded.last_generation is record
        # an observer joins the methods' generation without being one of them
        with guarded.observing(HeadOutputRecorder([1])), torch.no_grad():
            guarded(**other)
        assert guarded.last_generation is not record
        assert list(guarded.last_generation.states) == ["vhr", "var", "gift", "pai", "vcd"]
        assert torch.equal(guarded.last_generation.prompt.input_ids, other["input_ids"])
        with pytest.raises(TypeError):
            guarded.last_generation.states["var"] = None  # a read-only view
        with pytest.raises(dataclasses.FrozenInstanceError):
            guarded.last_generation.prompt = None
    finally:
        guarded.unwrap()


def test_last_generation_repr_shows_shapes_not_values(model):
    inputs = build_batch(model, [(True, 5), (True, 9)])
    guarded = vlm_guard.wrap(model, config=_every_method())
    try:
        _generate(guarded, inputs)
        text = repr(guarded.last_generation)
    finally:
        guarded.unwrap()
    assert text.startswith("GenerationRecord(prompt=PromptContext(")
    for name, state_class in STATE_CLASSES.items():
        assert f"'{name}': {state_class.__name__}(" in text
    seq = inputs["input_ids"].shape[1]
    assert f"after_image=Tensor[2, {seq}] bool" in text  # VAR's mask as its shape and dtype
    assert "tensor(" not in text  # no tensor values (PAI's image keys are a tuple holding one)
    assert len(text) < 4000, len(text)


def test_a_call_that_continues_the_cache_keeps_the_generation(model):
    inputs = build_batch(model, [(True, 5), (True, 9)])
    guarded = vlm_guard.wrap(model, config=GuardConfig(var=tiny_var_config()))
    try:
        with torch.no_grad():
            prefill = guarded(**inputs, use_cache=True)
            record = guarded.last_generation
            token = prefill.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
            guarded(
                input_ids=token,
                attention_mask=mask,
                position_ids=mask.cumsum(-1)[:, -1:] - 1,
                use_cache=True,
                **cache_kwargs(model, output_cache(prefill)),
            )
        assert guarded.last_generation is record
    finally:
        guarded.unwrap()


class _Counter(Intervention):
    """A stateful method defined outside the library: counts its post-softmax calls per generation in its state
    (``began``: the test's log of the states it made)."""

    name = "counter"
    uses_weights = True

    @dataclasses.dataclass
    class State:
        calls: int = 0

    def __init__(self):
        self.began = []

    def layers(self) -> set[int]:
        return {1}

    def begin(self, prompt, engine):
        state = self.State()
        self.began.append(state)
        return state

    def rows(self, ctx):
        return True

    def on_weights(self, ctx, weights, rows):
        ctx.state(self).calls += 1
        return weights


def test_a_hook_reads_the_state_its_begin_returned(model):
    inputs = build_batch(model, [(True, 5)])
    counter = _Counter()
    guarded = vlm_guard.wrap(model, config=GuardConfig())
    try:
        for _ in range(2):
            with guarded.interventions_active([counter]):
                guarded.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        first, second = counter.began
        assert first is not second
        assert [first.calls, second.calls] == [
            NEW_TOKENS,
            NEW_TOKENS,
        ]  # the prefill and each later step, per generation
    finally:
        guarded.unwrap()
