"""The shipped default toy LLaVA (quality floor) and the determinism of `python -m toyworld toy train`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from toyworld import main
from toyworld.shapes.report import CAPTION_MESSAGES, HELD_OUT_SEED, caption_metrics, generate
from vlm_guard.defaults import DEFAULT_MODEL_DIR, load_default
from vlm_guard.synthetic import World, render
from vlm_guard.synthetic.world import mentioned_objects


@pytest.fixture(scope="module")
def default_model():
    return load_default()


def test_default_model_loads_like_a_real_llava(default_model):
    model, processor = default_model
    assert model.config.model_type == "llava"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    prompt = processor.apply_chat_template(CAPTION_MESSAGES, add_generation_prompt=True)
    inputs = processor(images=render(World(seed=1).scene(0)), text=prompt, return_tensors="pt")
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.image_seq_length
    assert (DEFAULT_MODEL_DIR / "training_report.json").exists()


def test_default_model_quality_floor(default_model):
    model, processor = default_model
    scenes = World(seed=HELD_OUT_SEED + 1, bias=False).scenes(0, 48)  # held out, unbiased
    texts = generate(model, processor, [render(s) for s in scenes], [CAPTION_MESSAGES] * len(scenes), batch_size=48)
    metrics = caption_metrics([s.types for s in scenes], [mentioned_objects(t) for t in texts])
    assert metrics["f1"] >= 0.9, metrics


def test_shipped_report_shows_partner_hallucination():
    report = json.loads((DEFAULT_MODEL_DIR / "training_report.json").read_text())
    rates = report["partner_hallucination"]["captions_unbiased"]
    assert rates["absent_partner_claimed"] > rates["absent_other_claimed"]


TINY = [
    "toy",
    "train",
    "--preset",
    "tiny",
    "--vision-steps",
    "2",
    "--lm-steps",
    "2",
    "--align-steps",
    "2",
    "--finetune-steps",
    "3",
    "--qa-steps",
    "2",
    "--batch",
    "4",
    "--checkpoint-every",
    "2",
    "--no-progress",
]


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "final" / "model.safetensors"))


@pytest.mark.slow
def test_training_command_is_deterministic_and_resumes(tmp_path):
    from toyworld.shapes.train import TINY_SPEC, TrainConfig, train

    assert main([*TINY, "--out", str(tmp_path / "a")]) == 0
    assert main([*TINY, "--out", str(tmp_path / "b")]) == 0
    first, second = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # interrupted after 4 steps, then resumed: same weights as the uninterrupted run
    config = TrainConfig(
        out_dir=str(tmp_path / "c"),
        spec=TINY_SPEC,
        vision_steps=2,
        lm_steps=2,
        align_steps=2,
        finetune_steps=3,
        qa_steps=2,
        multimodal_batch=4,
        checkpoint_every=2,
    )
    assert train(config, progress=False, stop_after=4) is None
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, progress=False)
    train(config, resume=True, progress=False)
    resumed = _weights(tmp_path / "c")
    assert all(torch.equal(first[k], resumed[k]) for k in first)
