"""The wrapper under misuse: atomic wrap, threads, configs edited after construction, use after unwrap,
head maps given as folders (issue 17, items 1, 3, 15, 16)."""

import math
import threading

import pytest
import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

import vlm_guard
from vlm_guard import GuardConfig
from vlm_guard.calibration.calibrate import HeadProfiler
from vlm_guard.methods.vcd.intervention import VCDConfig
from vlm_guard.methods.vhr.intervention import VHRConfig
from vlm_guard.testing import build_batch, tiny_model

ROWS = [(True, 5), (False, 3), (True, 9)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava")


@pytest.fixture(scope="module")
def inputs(model):
    return build_batch(model, ROWS)


def _generate(model_like, inputs, tokens=6):
    return model_like.generate(**inputs, max_new_tokens=tokens, do_sample=False)


def _registered() -> set[str]:
    return {
        name
        for name in [*AttentionInterface._global_mapping, *AttentionMaskInterface._global_mapping]
        if name.startswith("vlm_guard_")
    }


@pytest.fixture(autouse=True)
def _registry_before():
    """The vlm_guard registry entries that exist before a test (other tests' wrappers may still be installed)."""
    global REGISTERED_BEFORE
    REGISTERED_BEFORE = _registered()
    yield


REGISTERED_BEFORE: set[str] = set()


def _assert_untouched(model):
    """No trace of a wrapper: original implementation, no hooks, no new registry entries."""
    text_config = model.config.text_config
    assert text_config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
    assert _registered() - REGISTERED_BEFORE == set()


# ---------------------------------------------------------------- item 1: atomic wrap
@pytest.mark.parametrize(
    "config",
    [
        GuardConfig(vhr=VHRConfig(target_layers=[1, 99])),  # bad layer index
        GuardConfig(vhr=VHRConfig(target_layers=[-1])),  # negative layer index
        GuardConfig(vhr=VHRConfig(selection="head_map")),  # needs a head map, none given
        "no_such_method",  # a method list naming an unknown method ("vhr" or "auto" are accepted)
        42,  # neither a GuardConfig nor a method list
    ],
)
def test_failed_wrap_leaves_the_model_untouched_and_wrappable(model, inputs, config):
    reference = _generate(model, inputs)
    with pytest.raises(ValueError):
        vlm_guard.wrap(model, config=config)
    _assert_untouched(model)
    assert torch.equal(_generate(model, inputs), reference)
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr"))  # can be wrapped again
    guarded.unwrap()
    _assert_untouched(model)


def test_error_midway_through_install_is_undone(model, monkeypatch):
    # the mask function is registered after the attention function: a failure there leaves one registration to undo
    from transformers.masking_utils import AttentionMaskInterface

    def broken(*args, **kwargs):
        raise RuntimeError("hook registration failed")

    monkeypatch.setattr(AttentionMaskInterface, "register", broken)
    with pytest.raises(RuntimeError, match="hook registration failed"):
        vlm_guard.wrap(model)
    monkeypatch.undo()
    _assert_untouched(model)
    vlm_guard.wrap(model).unwrap()


# ---------------------------------------------------------------- item 3: threads
def test_disabled_in_one_thread_does_not_switch_another_off(model, inputs):
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr"))
    try:
        expected = _generate(guarded, inputs)
        plain = _generate(model, inputs)
        assert not torch.equal(expected, plain)
        inside, release = threading.Event(), threading.Event()

        def hold_disabled():
            with guarded.disabled():
                inside.set()
                release.wait(60)

        thread = threading.Thread(target=hold_disabled)
        thread.start()
        assert inside.wait(60)
        try:
            assert torch.equal(_generate(guarded, inputs), expected)  # this thread still runs the methods
        finally:
            release.set()
            thread.join()
    finally:
        guarded.unwrap()


def test_one_wrapper_from_two_threads_gives_each_its_own_answer(model):
    first, second = build_batch(model, ROWS, seed=1), build_batch(model, [(True, 7), (True, 4)], seed=2)
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr"))
    try:
        expected = {"guarded-1": _generate(guarded, first), "guarded-2": _generate(guarded, second)}
        with guarded.disabled():
            expected["plain-1"] = _generate(guarded, first)
            expected["plain-2"] = _generate(guarded, second)
        assert not torch.equal(expected["guarded-1"], expected["plain-1"])
        results, errors = [], []
        barrier = threading.Barrier(4)

        def worker(kind, batch_name, batch):
            try:
                barrier.wait(60)
                for _ in range(3):
                    if kind == "plain":
                        with guarded.disabled():
                            output = _generate(guarded, batch)
                    else:
                        output = _generate(guarded, batch)
                    results.append((f"{kind}-{batch_name}", output))
            except Exception as error:  # collected: a crash in a thread must fail the test
                errors.append(repr(error))

        threads = [
            threading.Thread(target=worker, args=(kind, name, batch))
            for kind in ("guarded", "plain")
            for name, batch in (("1", first), ("2", second))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert errors == []
        assert len(results) == 12
        wrong = [key for key, output in results if not torch.equal(output, expected[key])]
        assert wrong == []
    finally:
        guarded.unwrap()


# ---------------------------------------------------------------- item 15: configs after construction, unwrap
def test_assignment_is_validated_and_keeps_the_old_value():
    config = GuardConfig.from_methods("vhr,vcd")
    with pytest.raises(ValueError, match=r"VHRConfig\.alpha must be a number, got nan"):
        config.vhr.alpha = math.nan
    assert config.vhr.alpha == 2.0
    with pytest.raises(ValueError, match="VHRConfig.selection"):
        config.vhr.selection = "sometimes"
    with pytest.raises(AttributeError, match="has no field 'alpah'"):
        config.vhr.alpah = 3.0
    with pytest.raises(ValueError, match="GuardConfig.vhr must be a VHRConfig"):
        config.vhr = "strong"
    with pytest.raises(AttributeError, match="no method 'vhd'"):
        config.vhd = VHRConfig()
    with pytest.raises(ValueError, match="preset is fixed at construction"):
        config.vhr.preset = "paper"
    config.vhr = {"alpha": 3.0}
    assert config.vhr == VHRConfig(alpha=3.0)
    config.vhr.alpha = 2.5
    assert config.vhr.alpha == 2.5


def test_config_edited_in_place_is_validated_at_generate(model, inputs):
    guarded = vlm_guard.wrap(model, config=GuardConfig(vhr=VHRConfig(target_layers=[1, 2])))
    try:
        guarded.guard_config.vhr.target_layers.append(99)  # in place: no assignment to validate
        with pytest.raises(ValueError, match=r"target_layers \[99\]"):
            _generate(guarded, inputs)
        guarded.guard_config.vhr.target_layers.pop()
        changed = _generate(guarded, inputs)
        built = guarded.interventions
        guarded.guard_config.vhr.alpha = (
            4.0  # a valid change: validated on assignment, methods rebuilt at the next call
        )
        assert _generate(guarded, inputs).shape == changed.shape
        assert guarded.interventions is not built and guarded.guard_config.vhr.alpha == 4.0
    finally:
        guarded.unwrap()


def test_from_dict_of_none_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="GuardConfig.from_dict needs a dict.*got NoneType"):
        GuardConfig.from_dict(None)
    with pytest.raises(ValueError, match="VHRConfig.from_dict needs a dict"):
        VHRConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="GuardConfig.vhr must be a VHRConfig, a dict of its fields, or None"):
        GuardConfig.from_dict({"vhr": "on"})
    (tmp_path / "null.json").write_text("null")
    with pytest.raises(ValueError, match="GuardConfig.from_dict needs a dict"):
        GuardConfig.load(tmp_path / "null.json")


@pytest.mark.parametrize("seed", [2**64, 10**30, -1])
def test_huge_or_negative_seed_is_refused_up_front(seed):
    with pytest.raises(ValueError, match=r"VCDConfig\.seed"):
        VCDConfig(seed=seed)
    config = VCDConfig()
    with pytest.raises(ValueError, match=r"VCDConfig\.seed"):
        config.seed = seed
    assert VCDConfig(seed=2**64 - 1).seed == 2**64 - 1


def test_wrapper_used_after_unwrap_is_a_clear_error(model, inputs):
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr"))
    assert guarded.unwrap() is model
    for call in (
        lambda: _generate(guarded, inputs),
        lambda: guarded(**inputs),
        lambda: guarded.disabled().__enter__(),
        lambda: guarded.set_config(GuardConfig()),
    ):
        with pytest.raises(RuntimeError, match="unwrapped.*wrap the model again"):
            call()
    assert guarded.unwrap() is model  # harmless twice
    assert "unwrapped" in repr(guarded)
    _assert_untouched(model)


# ---------------------------------------------------------------- item 16: a head-map folder for wrap()
def test_wrap_accepts_a_head_map_folder(model, inputs, tmp_path):
    with HeadProfiler.open(model) as profiler:
        profiler.profile(build_batch(model, [(True, 5)]))
        head_map = profiler.head_map({"prompts": ["describe"], "n_skipped": 0})
    folder = head_map.save_pretrained(tmp_path / "map")
    config = GuardConfig(vhr=VHRConfig(selection="head_map"))
    for given in (folder, str(folder)):
        guarded = vlm_guard.wrap(model, config=config, head_map=given)
        try:
            assert guarded.head_map == head_map
            _generate(guarded, inputs)
        finally:
            guarded.unwrap()
    with pytest.raises(FileNotFoundError, match="vlm-guard calibrate"):
        vlm_guard.wrap(model, head_map=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="HeadMap.from_pretrained"):
        vlm_guard.wrap(model, head_map={"vhr_heads": []})
    _assert_untouched(model)


# ---------------------------------------------------------------- issue 23 item 7: one check for one-row-per-prompt
@pytest.mark.parametrize("methods", ["pai", "vcd"])
@pytest.mark.parametrize("setting", ["num_beams", "num_return_sequences"])
def test_beams_or_several_sequences_with_a_contrast_are_refused_before_any_work(model, inputs, methods, setting):
    """PAI and VCD keep one contrast cache per prompt row: beam search and num_return_sequences > 1 are refused with
    one message, whether they come as keywords or in a generation_config object, before any forward runs."""
    from transformers import GenerationConfig

    config = GuardConfig.from_methods("pai") if methods == "pai" else GuardConfig(vcd=VCDConfig(contrast_when="always"))
    guarded = vlm_guard.wrap(model, config=config)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    sample = setting == "num_return_sequences"  # several sequences of one prompt need sampling (or beams)
    try:
        messages = []
        for spelling in ("keyword", "generation_config"):
            settings = {setting: 2, "do_sample": sample}
            if spelling == "generation_config":
                settings = {"generation_config": GenerationConfig(max_new_tokens=2, pad_token_id=0, **settings)}
            with pytest.raises(ValueError) as error:
                guarded.generate(**inputs, max_new_tokens=2, **settings)
            messages.append(str(error.value))
    finally:
        handle.remove()
        guarded.unwrap()
    assert calls == []  # refused before the first forward
    assert messages[0] == messages[1]
    assert f"{setting}=2 is not supported with ['{methods}']" in messages[0]
