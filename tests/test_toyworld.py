"""The synthetic world: determinism, bias statistics, captions/questions, tokenizer and processor."""

from __future__ import annotations

import pytest

from vlm_guard.synthetic import (
    OBJECT_TYPES,
    PARTNER_PAIRS,
    World,
    caption,
    mentioned_objects,
    partner_of,
    questions,
    render,
)
from vlm_guard.synthetic.world import mentions_with_words


def _together_rate(scenes) -> float:
    together = apart = 0
    for scene in scenes:
        for a, b in PARTNER_PAIRS:
            if a in scene.types and b in scene.types:
                together += 1
            elif a in scene.types or b in scene.types:
                apart += 1
    return together / (together + apart)


def test_scenes_and_images_are_deterministic():
    first, second = World(seed=3), World(seed=3)
    for index in (0, 7, 123):
        assert first.scene(index) == second.scene(index)
        assert render(first.scene(index)).tobytes() == render(second.scene(index)).tobytes()
    assert World(seed=3).scene(0) != World(seed=4).scene(0) or World(seed=3).scene(1) != World(seed=4).scene(1)


@pytest.mark.slow
def test_bias_statistics():
    biased = World(seed=0, bias=True).scenes(0, 2000)
    unbiased = World(seed=0, bias=False).scenes(0, 2000)
    assert _together_rate(biased) > 0.75  # partners mostly together
    assert _together_rate(unbiased) < 0.3  # independent draws: mostly apart
    stronger = World(seed=0, pair_prob=1.0).scenes(0, 500)
    assert _together_rate(stronger) > _together_rate(biased)


def test_scene_layout_is_valid():
    for scene in World(seed=1, bias=False).scenes(0, 200):
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells)
        assert cells == sorted(cells)  # reading order
        assert len({o.type for o in scene.objects}) == len(scene.objects)
        assert 1 <= len(scene.objects) <= 4


def test_caption_questions_and_mentions():
    scene = World(seed=0).scene(3)
    text = caption(scene)
    assert mentioned_objects(text) == scene.types
    assert mentioned_objects("Two Houses and a TREE.") == {"house", "tree"}
    assert [m[1] for m in mentions_with_words("a big red house , a tree")] == ["house", "tree"]
    for split in ("random", "popular", "adversarial"):
        items = questions(scene, split=split)
        assert {q.answer for q in items} <= {"yes", "no"}
        for q in items:
            assert (q.answer == "yes") == (q.object in scene.types)
    with pytest.raises(ValueError, match="unknown split"):
        questions(scene, split="hard")


def test_adversarial_questions_ask_absent_partners_first():
    for scene in World(seed=2, bias=False).scenes(0, 100):
        trap = {partner_of(t) for t in scene.types} - {None} - scene.types
        if trap:
            asked = {q.object for q in questions(scene, split="adversarial") if q.answer == "no"}
            assert asked & trap
            return
    pytest.fail("no scene with an absent partner found")


def test_partner_table_and_errors():
    assert {t for pair in PARTNER_PAIRS for t in pair} <= set(OBJECT_TYPES)
    assert partner_of("house") == "tree" and partner_of("ring") is None
    with pytest.raises(ValueError, match="unknown object type"):
        partner_of("unicorn")
    with pytest.raises(ValueError, match="pair_prob"):
        World(pair_prob=1.5)


def test_tokenizer_and_processor_expand_image_tokens():
    from toyworld.shapes.data import BatchBuilder, caption_messages
    from vlm_guard.synthetic.model import ToyModelSpec, build_processor

    processor = build_processor()
    tokenizer = processor.tokenizer
    ids = tokenizer("a big red house .").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    prompt = processor.apply_chat_template(caption_messages(), add_generation_prompt=True)
    assert prompt == "USER: <image> describe the image ASSISTANT:"
    image = render(World(seed=0).scene(0))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_token_id).sum()) == ToyModelSpec().num_image_tokens
    # the training batches use exactly the processor's ids
    builder = BatchBuilder(processor)
    assert builder.prompt_ids(caption_messages(), 64) == inputs["input_ids"][0].tolist()
