"""The v3 everyday world as eval, tuning and the examples see it (``world_kind("everyday_v3")``)."""

from __future__ import annotations

import pytest

from vlm_guard.eval.synthetic import caption_items, pope_questions, score_synthetic_caption
from vlm_guard.synthetic.everyday_v3.world import long_description
from vlm_guard.synthetic.worlds import WORLD_NAMES, world_kind, world_of_folder


def test_the_world_is_registered_with_the_everyday_vocabulary():
    kind = world_kind("everyday_v3")
    assert "everyday_v3" in WORLD_NAMES
    assert kind.object_types == world_kind("everyday").object_types
    assert kind.partner_pairs == world_kind("everyday").partner_pairs
    assert kind.caption_prompt == "Please describe this image in detail."
    assert kind.caption_tokens >= 200  # the reference descriptions run up to 185 tokens


def test_held_out_scenes_are_independent_and_drawn_at_the_model_size():
    kind = world_kind("everyday_v3")
    scenes = [kind.world(seed=900001).scene(i) for i in range(400)]
    assert all(3 <= len(scene.objects) <= 5 for scene in scenes)
    assert kind.render(scenes[0]).size == (192, 192)
    assert kind.render(scenes[0], 128).size == (128, 128)
    with pytest.raises(ValueError, match="multiple of 4"):
        kind.render(scenes[0], 130)
    # independent: a partner is present with its pair no more often than any other type
    both = sum(1 for s in scenes for a, b in kind.partner_pairs if a in s.types and b in s.types)
    biased = [kind.world(seed=900001, bias=True).scene(i) for i in range(400)]
    both_biased = sum(1 for s in biased for a, b in kind.partner_pairs if a in s.types and b in s.types)
    assert both_biased > 3 * both


def test_reference_caption_is_the_long_description_and_scores_clean():
    kind = world_kind("everyday_v3")
    scene = kind.world(seed=900001).scene(5)
    reference = kind.reference_caption(scene)
    assert reference == long_description(scene)
    record = score_synthetic_caption(reference, scene.types, kind)
    assert record["n_hallucinated"] == 0 and record["n_recalled"] == len(scene.types)


def test_pope_and_caption_items_come_from_the_v3_scenes():
    kind = world_kind("everyday_v3")
    items = caption_items(3, world=kind)
    assert items[0].gt_objects == tuple(sorted(kind.world(seed=900001).scene(0).types))
    questions = pope_questions("adversarial", 20, world=kind)
    assert {q.kind for q in questions if q.label == "no"} == {"absent_partner"}
    assert questions[0].text.startswith("Is there a")


def test_a_v3_model_folder_names_its_world(tmp_path):
    (tmp_path / "vlm_guard.json").write_text('{"world": "everyday_v3"}')
    assert world_of_folder(tmp_path) == "everyday_v3"


def test_v3_is_a_default_model_choice(monkeypatch, tmp_path):
    from vlm_guard.synthetic import default
    from vlm_guard.synthetic.default import default_model_name, default_world

    monkeypatch.setenv("VLM_GUARD_DEFAULT_MODEL", "v3")
    monkeypatch.setattr(default, "V3_WEIGHTS", tmp_path / "v3_weights.safetensors")
    with pytest.raises(
        ValueError, match="v3's trained parts are missing.*VLM_GUARD_DEFAULT_MODEL=v2 to use default model v2"
    ):
        default_model_name()  # refused up front, before any command looks for v3's examples or weights
    monkeypatch.delenv("VLM_GUARD_DEFAULT_MODEL")  # v3 is the default: the same line when nothing is set
    with pytest.raises(ValueError, match="v3's trained parts are missing.*VLM_GUARD_DEFAULT_MODEL=v2"):
        default_model_name()
    monkeypatch.setenv("VLM_GUARD_DEFAULT_MODEL", "v3")
    (tmp_path / "v3_weights.safetensors").write_bytes(b"")
    assert default_model_name() == "v3" and default_world() == "everyday_v3"
    monkeypatch.setenv("VLM_GUARD_DEFAULT_MODEL", "v4")
    with pytest.raises(ValueError, match="'v4' is not one of"):
        default_model_name()
