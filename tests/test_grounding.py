"""The grounding checker: mention parsing, the shipped open_clip checker, absent vs present objects."""

from __future__ import annotations

import pytest

from vlm_guard.grounding import COCO_OBJECTS, DEFAULT_CHECKER_DIR, GroundingChecker, Mention, find_mentions
from vlm_guard.synthetic import OBJECT_TYPES, World, render


def test_find_mentions_handles_plurals_and_multiword_names():
    assert find_mentions("Two houses and a tree.", OBJECT_TYPES) == [("houses", "house"), ("tree", "tree")]
    found = find_mentions("a hot dog next to a dog and two traffic lights", COCO_OBJECTS)
    assert found == [("hot dog", "hot dog"), ("dog", "dog"), ("traffic lights", "traffic light")]
    assert find_mentions("nothing here", OBJECT_TYPES) == []


@pytest.fixture(scope="module")
def checker():
    return GroundingChecker.default()


def test_default_checker_is_plain_open_clip(checker):
    import open_clip

    assert (DEFAULT_CHECKER_DIR / "open_clip_model.safetensors").exists()
    model = open_clip.create_model(f"local-dir:{DEFAULT_CHECKER_DIR}")
    assert model.logit_bias is not None
    assert checker.calibrated and checker.threshold == 0.5


def test_checker_flags_absent_objects_more_than_present_ones(checker):
    present_scores, absent_scores = [], []
    present_flags = absent_flags = 0
    for scene in World(seed=99, bias=False).scenes(0, 30):
        absent = [t for t in OBJECT_TYPES if t not in scene.types][:2]
        text = " , ".join(f"a {t}" for t in sorted(scene.types) + absent)
        for mention in checker.check(render(scene), text):
            assert isinstance(mention, Mention)
            if mention.object in scene.types:
                present_scores.append(mention.score)
                present_flags += mention.flagged
            else:
                absent_scores.append(mention.score)
                absent_flags += mention.flagged
    assert sum(absent_scores) / len(absent_scores) < sum(present_scores) / len(present_scores)
    assert absent_flags / len(absent_scores) > 0.8
    assert present_flags / len(present_scores) < 0.2


def test_checker_rejects_bad_prompt(checker):
    with pytest.raises(ValueError, match="prompt"):
        GroundingChecker(checker.model, checker.preprocess, checker.tokenize, OBJECT_TYPES, prompt="a photo")


def test_the_shipped_checker_knows_only_the_shapes_world(checker):
    assert checker.world == "shapes"
    assert checker.knows_world("shapes") and not checker.knows_world("everyday") and not checker.knows_world(None)


def test_truth_mentions_judge_a_caption_against_the_examples_objects():
    from vlm_guard.grounding import TRUTH, truth_mentions
    from vlm_guard.synthetic.worlds import world_kind

    everyday = world_kind("everyday")
    mentions = truth_mentions("A white fork and a red cup, and a knife.", ["fork", "cup"], everyday.mentions_with_words)
    assert [(m.word, m.object, m.flagged, m.source) for m in mentions] == [
        ("fork", "fork", False, TRUTH),
        ("cup", "cup", False, TRUTH),
        ("knife", "knife", True, TRUTH),
    ]
    assert [m.score for m in mentions] == [1.0, 1.0, 0.0]
    # without a world parser: the vocabulary and the objects
    assert [
        (m.object, m.flagged) for m in truth_mentions("two houses and a tree", ["house"], vocabulary=OBJECT_TYPES)
    ] == [("house", False), ("tree", True)]
