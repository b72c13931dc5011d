"""Parity: every method, both presets, against an independent reference of its released code.

For each model (a tiny random LLaVA with planted attention sinks, and the shipped default model), each
method and each preset (``"released"``, ``"paper"``): vlm_guard's guarded greedy generation (KV cache,
SDPA outside the edited rows) and the reference (:mod:`parity_reference`: full eager recomputation
without cache, written from the official code's semantics) must agree to ``TOLERANCE`` in the
next-token scores at the prefill and over ``DECODE_STEPS`` decode steps, with identical tokens.
The largest difference per case is written to ``PARITY_REPORT`` (JSON) when that variable is set.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import vlm_guard
from vlm_guard.config import GuardConfig
from vlm_guard.decoding.gift import GIFTConfig
from vlm_guard.decoding.pai import PAIConfig
from vlm_guard.decoding.var import VARConfig
from vlm_guard.decoding.vcd import VCDConfig
from vlm_guard.decoding.vhr import VHRConfig
from vlm_guard.testing import BOS, build_batch, tiny_model

import parity_reference as reference

TOLERANCE = 1e-4
DECODE_STEPS = 16
METHODS = ("vhr", "var", "gift", "pai", "vcd")
PRESETS = ("released", "paper")
RESULTS: dict[str, float] = {}

# spaCy's tags of the shipped model's prompt words (the released GIFT code keeps NOUN/PROPN/VERB/ADJ/ADV/NUM)
POS = {"describe": "VERB", "the": "DET", "image": "NOUN", "is": "AUX", "there": "PRON", "a": "DET", "house": "NOUN", "?": "PUNCT"}
INFORMATIVE_POS = {"NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM"}


class Case:
    """One model with its prompt, the reference's plan and vlm_guard's model-specific config fields."""

    def __init__(self, name, model, processor, inputs, prompt, plan, var_fields, hooks=()):
        self.name, self.model, self.processor, self.inputs = name, model, processor, inputs
        self.prompt, self.plan, self.var_fields, self.hooks = prompt, plan, var_fields, hooks


def _tiny_case() -> Case:
    model = tiny_model("llava", seed=3)
    sink_dim = 5
    inputs = build_batch(model, [(True, 9)], seed=4)
    ids = inputs["input_ids"]
    image = (ids[0] == model.config.image_token_index).nonzero().flatten()
    planted = int(image[5])
    with torch.no_grad():
        model.get_input_embeddings().weight[BOS, sink_dim] = 200.0  # BOS: a text sink from layer 0 on

    def visual_sink(module, args, output):  # an image token becomes a sink after layer 2 only
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] > planted:
            hidden[:, planted, sink_dim] += 300.0
        return output

    hook = model.model.language_model.layers[2].register_forward_hook(visual_sink)
    end = int(image[-1]) + 1
    query = list(range(end, ids.shape[1]))  # no chat template: the query runs to the end
    prompt = reference.Prompt(ids, model.config.image_token_index, query, query)
    plan = {"vhr_layers": [1, 2, 3], "gift_saliency_layer": 1, "gift_layers": [2, 3], "sink_dims": [sink_dim], "tau": 5.0}
    return Case("tiny_llava", model, None, inputs, prompt, plan, {"sink_dims": [sink_dim], "tau": 5.0}, (hook,))


def _shipped_case() -> Case:
    from PIL import Image

    from vlm_guard.defaults import EXAMPLES_DIR, load_default

    model, processor = load_default()
    model.generation_config.eos_token_id = None  # every case decodes all its steps
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(processor(images=Image.open(EXAMPLES_DIR / "cup_without_plate.png"), text=text, return_tensors="pt"))
    ids = inputs["input_ids"]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    image = [i for i, t in enumerate(ids[0].tolist()) if t == model.config.image_token_index]
    assistant = max(i for i, t in enumerate(tokens) if t == "assistant")
    query = list(range(image[-1] + 1, assistant))
    informative = [i for i in query if POS.get(tokens[i]) in INFORMATIVE_POS]
    assert [tokens[i] for i in informative] == ["describe", "image"]
    prompt = reference.Prompt(ids, model.config.image_token_index, query, informative)
    # the toy model has no massive activations: dims 31/34 and tau 1.9 make BOS a sink in every layer
    # and a few image tokens sinks in some layers, so both VAR rules (with and without a visual sink) act
    sink_fields = {"sink_dims": [31, 34], "tau": 1.9}
    plan = {"vhr_layers": [1, 3, 4, 5], "gift_saliency_layer": 1, "gift_layers": [2, 3, 4], **sink_fields}
    return Case("shipped", model, processor, inputs, prompt, plan, sink_fields)


@pytest.fixture(scope="module", params=["tiny_llava", "shipped"])
def case(request):
    built = _tiny_case() if request.param == "tiny_llava" else _shipped_case()
    yield built
    for hook in built.hooks:
        hook.remove()


def guard_config(method: str, preset: str, case: Case) -> GuardConfig:
    if method == "vhr":
        return GuardConfig(vhr=VHRConfig(preset=preset))
    if method == "var":
        return GuardConfig(var=VARConfig(preset=preset, **case.var_fields))
    if method == "gift":
        return GuardConfig(gift=GIFTConfig(preset=preset))
    if method == "pai":
        return GuardConfig(pai=PAIConfig(preset=preset))
    return GuardConfig(vcd=VCDConfig(preset=preset))


def ours(case: Case, config: GuardConfig, **generate_kwargs):
    guarded = vlm_guard.wrap(case.model, case.processor, config, head_map=None)
    try:
        return guarded.generate(**case.inputs, max_new_tokens=DECODE_STEPS + 1, output_logits=True, output_scores=True,
                                return_dict_in_generate=True, **generate_kwargs)
    finally:
        guarded.unwrap()


def max_difference(mine: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    worst = 0.0
    for step, (a, b) in enumerate(zip(mine, theirs)):
        a, b = a.float().flatten(), b.float().flatten()
        assert torch.equal(torch.isinf(a), torch.isinf(b)), f"step {step}: the plausibility cut keeps different tokens"
        finite = torch.isfinite(a)
        if bool(finite.any()):
            worst = max(worst, float((a[finite] - b[finite]).abs().max()))
    return worst


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_parity(case, method, preset):
    output = ours(case, guard_config(method, preset, case), do_sample=False)
    mine = [scores[0] for scores in output.scores]  # after the logits processors (PAI / VCD contrast)
    tokens = output.sequences[0, case.inputs["input_ids"].shape[1]:].tolist()
    harness = reference.EagerHarness(case.model)
    with harness.installed():
        theirs, their_tokens = reference.decode(harness, method, preset, case.inputs["input_ids"], case.inputs["pixel_values"],
                                                case.prompt, case.plan, DECODE_STEPS + 1)
    difference = max_difference(mine, theirs)
    RESULTS[f"{case.name}/{method}/{preset}/greedy"] = difference
    # the check has teeth: the method moves the scores far more than the tolerance (VCD's released
    # preset excepted: it leaves greedy decoding plain)
    with harness.installed():
        plain, _ = reference.decode(harness, "plain", preset, case.inputs["input_ids"], case.inputs["pixel_values"],
                                    case.prompt, case.plan, DECODE_STEPS + 1, forced=their_tokens)
    effect = max_difference([torch.where(torch.isinf(t), torch.zeros_like(t), t) for t in theirs],
                            [torch.where(torch.isinf(t), torch.zeros_like(t), p) for t, p in zip(theirs, plain)])
    RESULTS[f"{case.name}/{method}/{preset}/effect"] = effect
    _report()
    if not (method == "vcd" and preset == "released"):
        assert effect > 10 * TOLERANCE, f"{method} ({preset}) barely changes the scores ({effect:.2e}): the parity check would be empty"
    assert tokens == their_tokens
    assert difference <= TOLERANCE, f"{method} ({preset}) differs from the released code by {difference:.2e}"
    if method == "vcd" and preset == "released":  # greedy: the released code leaves decoding plain
        with torch.no_grad():
            plain = case.model.generate(**case.inputs, max_new_tokens=DECODE_STEPS + 1, do_sample=False)
        assert output.sequences.tolist() == plain.tolist()


def test_vcd_released_sampling_parity(case):
    """Sampling (the released code's path): the contrasted scores along the sampled tokens."""
    torch.manual_seed(0)
    output = ours(case, guard_config("vcd", "released", case), do_sample=True, top_k=0)
    tokens = output.sequences[0, case.inputs["input_ids"].shape[1]:].tolist()
    harness = reference.EagerHarness(case.model)
    with harness.installed():
        theirs, _ = reference.decode(harness, "vcd", "released", case.inputs["input_ids"], case.inputs["pixel_values"],
                                     case.prompt, case.plan, DECODE_STEPS + 1, forced=tokens)
    difference = max_difference([scores[0] for scores in output.scores], theirs)
    RESULTS[f"{case.name}/vcd/released/sampling"] = difference
    _report()
    assert difference <= TOLERANCE


def _report() -> None:
    path = os.environ.get("PARITY_REPORT")
    if path:
        with open(path, "w") as handle:
            json.dump(RESULTS, handle, indent=2, sort_keys=True)
