"""Synthetic POPE/CHAIR benchmark: split construction (hand-checked scenes), determinism, caption scoring.

Most tests run on the shapes world (the test fixture's; every function called through ``world="shapes"``);
the everyday world (default model v2's) has its own tests at the end."""

import functools
import random
from collections import Counter

import pytest

from toyworld.shapes.report import HELD_OUT_SEED
from vlm_guard.eval import synthetic as synthetic_module
from vlm_guard.eval.chair import chair_metrics
from vlm_guard.eval.synthetic import EVAL_SEED, SPLITS, TUNING_SEED
from vlm_guard.synthetic.world import PARTNER_PAIRS, Scene, SceneObject, partner_of

PAIRED_TYPES = frozenset(t for pair in PARTNER_PAIRS for t in pair)
absent_kind = functools.partial(synthetic_module.absent_kind, world="shapes")
caption_items = functools.partial(synthetic_module.caption_items, world="shapes")
negative_candidates = functools.partial(synthetic_module.negative_candidates, world="shapes")
pope_questions = functools.partial(synthetic_module.pope_questions, world="shapes")
scene_questions = functools.partial(synthetic_module.scene_questions, world="shapes")
score_synthetic_caption = functools.partial(synthetic_module.score_synthetic_caption, world="shapes")
synthetic_world = functools.partial(synthetic_module.synthetic_world, world="shapes")


def make_scene(*types, index=0):
    objects = tuple(SceneObject(t, "red", "big", position // 4, position % 4) for position, t in enumerate(types))
    return Scene(objects, index=index, biased=False, seed=1)


def test_adversarial_asks_only_absent_partners():
    # house + ring: the only absent partner is tree; one (yes, no) pair
    questions = scene_questions(make_scene("house", "ring"), "adversarial")
    assert [(q.label, q.kind) for q in questions] == [("yes", "present"), ("no", "absent_partner")]
    assert questions[0].object in {"house", "ring"}
    assert questions[1].object == "tree" and questions[1].text == "is there a tree ?"
    # house + moon: both partners absent -> two pairs, negatives exactly {tree, star}
    questions = scene_questions(make_scene("house", "moon"), "adversarial")
    assert {q.object for q in questions if q.label == "no"} == {"tree", "star"}
    assert {q.object for q in questions if q.label == "yes"} == {"house", "moon"}
    # house + tree together: no absent partner, so no adversarial question at all
    assert scene_questions(make_scene("house", "tree"), "adversarial") == []
    # ring + cross have no partner
    assert negative_candidates(make_scene("ring", "cross"), "adversarial", random.Random(0)) == []


def test_random_and_popular_negatives():
    scene = make_scene("house", "tree", "ring")
    for split in ("random", "popular"):
        questions = scene_questions(scene, split, per_scene=2)
        assert Counter(q.label for q in questions) == {"yes": 2, "no": 2}
        assert all(q.object not in scene.types for q in questions if q.label == "no")
        assert all(q.object in scene.types for q in questions if q.label == "yes")
    # popular: paired (frequent) types first; ring/cross only when no paired type is absent
    popular = negative_candidates(make_scene("ring", "cross"), "popular", random.Random(3))
    assert set(popular[:8]) == PAIRED_TYPES and popular[8:] == []
    every_paired = make_scene(*sorted(PAIRED_TYPES))
    assert [(q.object, q.kind) for q in scene_questions(every_paired, "popular") if q.label == "no"] in (
        [("ring", "absent_other"), ("cross", "absent_other")],
        [("cross", "absent_other"), ("ring", "absent_other")],
    )
    # a single-object scene gives one pair
    assert len(scene_questions(make_scene("cup"), "random", per_scene=3)) == 2


def test_absent_kind_and_errors():
    assert absent_kind("plate", {"cup"}) == "absent_partner"
    assert absent_kind("kite", {"cup"}) == "absent_popular"
    assert absent_kind("cross", {"cup"}) == "absent_other"
    with pytest.raises(ValueError, match="present"):
        absent_kind("cup", {"cup"})
    with pytest.raises(ValueError, match="split"):
        scene_questions(make_scene("cup"), "hard")
    with pytest.raises(ValueError, match="per_scene"):
        scene_questions(make_scene("cup"), "random", per_scene=0)


@pytest.mark.parametrize("split", SPLITS)
def test_pope_split_is_balanced_deterministic_and_true(split):
    questions = pope_questions(split, 120)
    assert len(questions) == 120
    assert Counter(q.label for q in questions) == {"yes": 60, "no": 60}
    assert questions == pope_questions(split, 120)  # deterministic
    assert questions != pope_questions(split, 120, seed=TUNING_SEED)
    assert len({q.question_id for q in questions}) == 120
    world = synthetic_world(EVAL_SEED)
    for question in questions:
        types = world.scene(question.scene_index).types
        assert (question.object in types) == (question.label == "yes")
        if split == "adversarial" and question.label == "no":
            assert question.kind == "absent_partner"
            assert partner_of(question.object) in types
    if split == "random":  # random negatives are not all partners
        assert {q.kind for q in questions if q.label == "no"} > {"absent_partner"}


def test_held_out_seeds_are_disjoint():
    training_seeds = {1_000_003 * k for k in range(1, 5)}
    assert len({EVAL_SEED, TUNING_SEED, HELD_OUT_SEED} | training_seeds) == 7
    assert synthetic_world(EVAL_SEED).scene(0) != synthetic_world(TUNING_SEED).scene(0)
    assert not synthetic_world(EVAL_SEED).bias


def test_caption_items_match_scenes():
    items = caption_items(5, start=10)
    world = synthetic_world(EVAL_SEED)
    assert [item.image_id for item in items] == [f"scene/{i:06d}" for i in range(10, 15)]
    assert all(set(item.gt_objects) == world.scene(item.scene_index).types for item in items)
    assert items == caption_items(5, start=10)


def test_score_synthetic_caption_by_hand():
    record = score_synthetic_caption("a big red house , a small blue tree , two moons .", {"house", "star"})
    assert record["mentions"] == [["house", "house"], ["tree", "tree"], ["moons", "moon"]]
    assert record["hallucinated"] == [["tree", "tree"], ["moons", "moon"]]
    assert (record["n_mentions"], record["n_hallucinated"], record["n_recalled"], record["n_gt_objects"]) == (
        3,
        2,
        1,
        2,
    )
    assert record["hallucinated_caption"] and record["recalled_objects"] == ["house"]
    clean = score_synthetic_caption("a red house .", {"house"})
    metrics = chair_metrics([record, clean])
    assert metrics["chair_s"] == 0.5
    assert metrics["chair_i"] == pytest.approx(2 / 4)
    assert metrics["recall"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown type"):
        score_synthetic_caption("a dog", {"dog"})


def test_smaller_runs_are_prefixes_of_larger_ones():
    # a run resumed with a larger n only adds items: the item lists must be prefixes of each other
    for split in SPLITS:
        assert pope_questions(split, 41) == pope_questions(split, 90)[:41]
    assert caption_items(7) == caption_items(12)[:7]


# ---- the everyday world (default model v2) ----------------------------------------------------------------


def _everyday_scene(*types, index=0):
    from vlm_guard.synthetic.everyday import world as everyday

    objects = tuple(everyday.SceneObject(t, "red", position // 4, position % 4) for position, t in enumerate(types))
    return everyday.Scene(objects, index=index, biased=False, seed=1)


def test_everyday_splits_use_official_wording_training_frequency_and_partners():
    from vlm_guard.synthetic.everyday import world as everyday

    scene = _everyday_scene("fork", "ball")
    adversarial = synthetic_module.scene_questions(scene, "adversarial", world="everyday")
    assert [(q.object, q.label, q.kind) for q in adversarial if q.label == "no"] == [("knife", "no", "absent_partner")]
    assert adversarial[1].text == "Is there a knife in the image?"  # POPE's official question
    # popular: the most frequent training types first (cup and table are the two most frequent)
    assert everyday.POPULARITY[:2] == ("cup", "table")
    popular = synthetic_module.negative_candidates(scene, "popular", random.Random(0), world="everyday")
    assert popular == [t for t in everyday.POPULARITY if t not in scene.types]
    assert synthetic_module.absent_kind("cup", {"fork"}, world="everyday") == "absent_popular"
    assert synthetic_module.absent_kind("leaf", {"fork"}, world="everyday") == "absent_other"
    assert synthetic_module.absent_kind("knife", {"fork"}, world="everyday") == "absent_partner"
    record = synthetic_module.score_synthetic_caption(
        "A red fork and a blue knife, and two balls.", {"fork", "ball"}, world="everyday"
    )
    assert record["hallucinated"] == [["knife", "knife"]] and record["n_recalled"] == 2
    with pytest.raises(ValueError, match="unknown type"):
        synthetic_module.score_synthetic_caption("a house", {"house"}, world="everyday")


def test_everyday_pope_split_is_balanced_and_true():
    world = synthetic_module.synthetic_world(EVAL_SEED, world="everyday")
    for split in SPLITS:
        questions = synthetic_module.pope_questions(split, 60, world="everyday")
        assert Counter(q.label for q in questions) == {"yes": 30, "no": 30}
        for question in questions:
            assert (question.object in world.scene(question.scene_index).types) == (question.label == "yes")


def test_world_follows_the_model():
    from vlm_guard.defaults import FIXTURE_MODEL_DIR
    from vlm_guard.synthetic.worlds import world_for_model_argument, world_kind

    assert world_for_model_argument(str(FIXTURE_MODEL_DIR)).name == "shapes"
    assert world_for_model_argument("some/hub-model").name == "everyday"
    assert world_for_model_argument(None).name == "shapes"  # the suite sets VLM_GUARD_DEFAULT_MODEL=fixture
    assert world_for_model_argument(None, "everyday").name == "everyday"
    with pytest.raises(ValueError, match="unknown world 'moon'"):
        world_kind("moon")
