"""Models dispatched with accelerate's ``device_map`` (issue 14): a tiny LLaVA saved to disk and reloaded with
some decoder layers on "cpu" and the others offloaded to "disk" (their weights live on the meta device and
accelerate's hooks load them per forward). Wrapped with methods off it gives the plain model's tokens; each method
runs and gives the tokens of the same method on the undispatched model (same weights, same math).
"""

import pytest
import torch

import vlm_guard
from vlm_guard import GuardConfig
from vlm_guard.methods.registry import method_names
from vlm_guard.methods.var.intervention import VARConfig
from vlm_guard.methods.vcd.intervention import VCDConfig
from vlm_guard.testing import PAD, assert_close_scaled, build_batch, forward_reduction, tiny_model

pytest.importorskip("accelerate")

ROWS = [(True, 5), (False, 3), (True, 9)]
NEW_TOKENS = 4
DEVICE_MAP = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "disk",
    "model.language_model.layers.2": "cpu",
    "model.language_model.layers.3": "disk",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def _method_configs() -> dict[str, GuardConfig]:
    configs = {name: GuardConfig.from_methods(name) for name in method_names()}
    configs["var"] = GuardConfig(var=VARConfig(sink_dims=[0, 1], tau=1.5))  # random weights: low threshold makes sinks
    configs["vcd"] = GuardConfig(vcd=VCDConfig(contrast_when="always"))  # greedy runs: contrast every step
    return configs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers

    model = tiny_model("llava")
    saved = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(saved)
    dispatched = transformers.LlavaForConditionalGeneration.from_pretrained(
        saved,
        device_map=DEVICE_MAP,
        offload_folder=str(tmp_path_factory.mktemp("offload")),
        dtype=torch.float32,
        attn_implementation="sdpa",
    ).eval()
    dispatched.generation_config.pad_token_id = PAD
    dispatched.generation_config.eos_token_id = None
    return model, dispatched, build_batch(model, ROWS)


def _generate(model_like, inputs):
    return model_like.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


def test_layers_are_dispatched_and_offloaded(models):
    _, dispatched, _ = models
    assert set(dispatched.hf_device_map.values()) == {"cpu", "disk"}
    offloaded = dispatched.model.language_model.layers[1].self_attn.q_proj.weight
    resident = dispatched.model.language_model.layers[0].self_attn.q_proj.weight
    assert offloaded.device.type == "meta" and resident.device.type == "cpu"
    assert hasattr(dispatched.model.language_model.layers[1], "_hf_hook")


def test_methods_off_are_token_identical(models):
    model, dispatched, inputs = models
    plain = _generate(dispatched, inputs)
    assert torch.equal(plain, _generate(model, inputs))  # the dispatch itself changes nothing
    guarded = vlm_guard.wrap(dispatched)
    try:
        assert torch.equal(_generate(guarded, inputs), plain)
        guarded.set_config(GuardConfig.from_methods("vhr"))
        with guarded.disabled():
            assert torch.equal(_generate(guarded, inputs), plain)
    finally:
        guarded.unwrap()
    assert torch.equal(_generate(dispatched, inputs), plain)


def _scored(model_like, inputs):
    out = model_like.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    return out.sequences, torch.stack(out.scores)  # scores: [step, batch, vocab]


@pytest.mark.parametrize("method", method_names())
def test_each_method_runs_as_on_the_undispatched_model(models, method):
    model, dispatched, inputs = models
    config = _method_configs()[method]
    _, plain_scores = _scored(dispatched, inputs)
    guarded_dispatched = vlm_guard.wrap(dispatched, config=config)
    try:
        tokens, scores = _scored(guarded_dispatched, inputs)
    finally:
        guarded_dispatched.unwrap()
    guarded = vlm_guard.wrap(model, config=config)
    try:
        expected_tokens, expected_scores = _scored(guarded, inputs)
    finally:
        guarded.unwrap()
    assert tokens.shape == (len(ROWS), inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert torch.equal(tokens, expected_tokens)
    assert_close_scaled(scores, expected_scores, reduction=forward_reduction(dispatched))
    assert not torch.allclose(scores, plain_scores, atol=1e-4)  # the method acts on the dispatched model
