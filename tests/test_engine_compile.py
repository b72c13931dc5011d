"""torch.compile with the methods on. The methods run outside compiled graphs: with
``fullgraph=False`` (the default) generate's compiled static-cache decoding gives the eager tokens and compiles once
(no recompilation between steps or calls after the warm-up); ``fullgraph=True`` is refused before any work in
``generate`` and, for a model compiled by hand, by the compiler with vlm_guard's reason; with the methods off the
wrapped model compiles whole. CPU runs use the aot_eager backend (the graph capture is what is tested)."""

import pytest
import torch
import torch._dynamo
from transformers import CompileConfig, StaticCache

import vlm_guard
from vlm_guard import GuardConfig
from vlm_guard.core.engine import COMPILE_REASON
from vlm_guard.methods.var.intervention import VARConfig
from vlm_guard.methods.vcd.intervention import VCDConfig
from vlm_guard.models.compat import cache_kwargs
from vlm_guard.testing import build_batch, tiny_model

pytestmark = pytest.mark.slow  # torch.compile

CACHE_LENGTH = 48


def _every_method() -> GuardConfig:
    config = GuardConfig.from_methods("vhr,gift,pai")
    config.var = VARConfig(sink_dims=[0, 1], tau=1.5)
    config.vcd = VCDConfig(contrast_when="always", beta_schedule="linear")
    return config


def _compile_config(fullgraph: bool) -> CompileConfig:
    config = CompileConfig(fullgraph=fullgraph, backend="aot_eager", dynamic=False)
    config._compile_all_devices = True  # what generate does on a GPU by default, here on the CPU
    return config


def _generate(guarded, model, inputs, tokens, compiled: bool):
    cache = StaticCache(config=model.config, max_cache_len=CACHE_LENGTH)  # one cache length: one set of shapes
    extra = {"compile_config": _compile_config(False)} if compiled else {}
    return guarded.generate(**inputs, max_new_tokens=tokens, do_sample=False, **cache_kwargs(model, cache), **extra)


def test_compiled_decoding_with_every_method_gives_the_eager_tokens_and_compiles_once():
    model = tiny_model("llava")
    first, second = build_batch(model, [(True, 5)], seed=0), build_batch(model, [(True, 5)], seed=1)
    guarded = vlm_guard.wrap(model, config=_every_method())
    try:
        eager = [_generate(guarded, model, inputs, 6, compiled=False) for inputs in (first, second)]
        with guarded.disabled():
            assert not torch.equal(_generate(guarded, model, second, 6, compiled=False), eager[1])  # the methods act
        torch._dynamo.reset()
        try:
            _generate(guarded, model, first, 2, compiled=True)  # warm-up: the prefill and one compiled decoding step
            with torch._dynamo.config.patch(error_on_recompile=True):  # later steps and calls reuse its graphs
                compiled = [_generate(guarded, model, inputs, 6, compiled=True) for inputs in (first, second)]
        finally:
            torch._dynamo.reset()
    finally:
        guarded.unwrap()
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def test_fullgraph_is_refused_before_any_work_in_generate():
    model = tiny_model("llava")
    inputs = build_batch(model, [(True, 5)])
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr"))
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(
            ValueError,
            match=r"compile_config.fullgraph=True cannot compile vlm_guard methods \['vhr'\].*fullgraph=False",
        ):
            guarded.generate(
                **inputs,
                max_new_tokens=2,
                do_sample=False,
                cache_implementation="static",
                compile_config=_compile_config(True),
            )
    finally:
        handle.remove()
        guarded.unwrap()
    assert calls == []


def test_a_model_compiled_by_hand_with_fullgraph_names_the_reason_and_compiles_whole_with_methods_off():
    model = tiny_model("llava")
    inputs = build_batch(model, [(True, 5)])
    with torch.no_grad():
        plain = model(**inputs).logits
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("vhr"))
    model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
    try:
        with pytest.raises(Exception) as error, torch.no_grad():
            guarded(**inputs)
        assert COMPILE_REASON in str(error.value)
        torch._dynamo.reset()
        if not _plain_llava_compiles_whole():
            return  # transformers 4.57's own LLaVA forward has a data-dependent check that fullgraph cannot trace
        with guarded.disabled(), torch.no_grad():  # methods off: the wrapped model compiles as one graph
            torch.testing.assert_close(guarded(**inputs).logits, plain)
    finally:
        del model.forward
        torch._dynamo.reset()
        guarded.unwrap()


def _plain_llava_compiles_whole() -> bool:
    """Whether transformers' own LLaVA forward compiles with ``fullgraph=True``: 5.x yes; 4.57 no (its
    ``get_placeholder_mask`` compares a data-dependent ``numel``), so there the test asks the wrapper for no more
    than the plain model gives."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5
