"""The generation-path matrix: family x {dynamic, static cache} x {each method, all together} x
{generate, hand-written loop}.

- methods off: ``guarded.generate`` and a hand-written loop through ``guarded(...)`` are token-identical to
  the plain ``model.generate``;
- methods on: the hand-written loop (with ``guarded.logits_processor`` for PAI/VCD's contrasts) gives the
  tokens of the same call through ``guarded.generate``, and the static cache gives the dynamic cache's tokens
  (the plain model's tokens do not depend on the cache kind either; checked first).

One model per family (every family of ``vlm_guard.testing.FAMILY_NAMES``), two prompt rows (one with an image, one
without), two new tokens (the prefill and one decode step). The dynamic cache of every family is in the fast tier, the
static cache is marked slow.
"""

import functools

import pytest
import torch
import transformers
from transformers import StaticCache

import vlm_guard
from vlm_guard import GuardConfig
from vlm_guard.methods.var.intervention import VARConfig
from vlm_guard.methods.vcd.intervention import VCDConfig
from vlm_guard.testing import (
    FAMILY_NAMES,
    build_batch,
    family_available,
    family_spec,
    greedy_loop,
    image_token_count,
    tiny_model,
)

NEW_TOKENS = 2


def _method_configs() -> dict[str, GuardConfig]:
    var = VARConfig(
        sink_dims=[0, 1], tau=1.5
    )  # the random models have no massive activations: a low threshold makes sinks
    vcd = VCDConfig(
        contrast_when="always"
    )  # the released preset contrasts sampled decoding only; these runs are greedy
    configs = {name: GuardConfig.from_methods(name) for name in ("vhr", "gift", "pai")}
    configs["var"] = GuardConfig(var=var)
    configs["vcd"] = GuardConfig(vcd=vcd)
    every = GuardConfig.from_methods("vhr,gift,pai")
    every.var = var
    every.vcd = vcd
    configs["all"] = every
    return configs


@functools.cache
def _setup(family: str):
    model = tiny_model(family)
    if family_spec(family).mrope:  # rows of equal length: the loop lets the model place its M-RoPE positions
        n_image = image_token_count(model, family) + 2
        inputs = build_batch(model, [(True, 4), (False, 4 + n_image)])
        assert bool(inputs["attention_mask"].all())
    else:
        inputs = build_batch(model, [(True, 4), (False, 3)])
    return model, inputs


def _generate(model, inputs, cache_kind):
    extra = {"cache_implementation": "static"} if cache_kind == "static" else {}
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **extra)


_DYNAMIC_TOKENS: dict[tuple[str, str], torch.Tensor] = {}  # guarded dynamic-cache tokens, reused by the static case


def _loop(guarded, family, inputs, cache_kind, processors=None):
    cache = None
    if cache_kind == "static":
        cache = StaticCache(config=guarded.model.config, max_cache_len=inputs["input_ids"].shape[1] + NEW_TOKENS + 2)
    spec = family_spec(family)
    return greedy_loop(
        guarded,
        inputs,
        NEW_TOKENS,
        cache=cache,
        processors=processors,
        pass_mask=not spec.mrope,
        pass_positions=spec.loop_positions,
    )


# On transformers 4.57 the hand-written decode loop of this test does not reproduce generate for these families even
# with every method off (guarded generate equals plain generate there; the loop's positions or cache differ): a gap of
# the test's loop on the older transformers, not yet investigated; 5.x runs them all.
LOOP_GAPS_ON_4_57 = ("qwen3_vl", "qwen3_vl_moe", "gemma3", "llava_onevision", "glm4v")
OLD_TRANSFORMERS = int(transformers.__version__.split(".")[0]) < 5


def _family_param(family):
    if family in LOOP_GAPS_ON_4_57:
        gap = pytest.mark.xfail(OLD_TRANSFORMERS, reason="the test's decode loop on transformers 4.57", strict=False)
        return pytest.param(family, marks=gap)
    return family


@pytest.mark.parametrize("cache_kind", ["dynamic", pytest.param("static", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", [_family_param(family) for family in FAMILY_NAMES])
def test_generation_matrix(family, cache_kind):
    reason = family_available(family)
    if reason:
        pytest.skip(reason)
    model, inputs = _setup(family)
    plain = _generate(model, inputs, cache_kind)
    if cache_kind == "static":
        assert torch.equal(plain, _generate(model, inputs, "dynamic")), (
            "precondition: the plain model ignores the cache kind"
        )
    guarded = vlm_guard.wrap(model, config=GuardConfig())
    try:
        assert torch.equal(_generate(guarded, inputs, cache_kind), plain)
        assert torch.equal(_loop(guarded, family, inputs, cache_kind), plain)
        for name, config in _method_configs().items():
            guarded.set_config(config)
            generated = _generate(guarded, inputs, cache_kind)
            if cache_kind == "dynamic":
                _DYNAMIC_TOKENS[family, name] = generated
            looped = _loop(guarded, family, inputs, cache_kind, guarded.logits_processor(**inputs))
            assert torch.equal(looped, generated), (
                f"{family}/{cache_kind}/{name}: loop {looped[:, -NEW_TOKENS:].tolist()} vs generate {generated[:, -NEW_TOKENS:].tolist()}"
            )
            if cache_kind == "static":
                dynamic = _DYNAMIC_TOKENS.get((family, name))
                if dynamic is None:
                    dynamic = _generate(guarded, inputs, "dynamic")
                assert torch.equal(generated, dynamic), (
                    f"{family}/{name}: static {generated[:, -NEW_TOKENS:].tolist()} vs dynamic {dynamic[:, -NEW_TOKENS:].tolist()}"
                )
    finally:
        guarded.unwrap()
