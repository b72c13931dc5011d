"""Eval batching for every family of ``vlm_guard.testing.FAMILY_NAMES`` (and SmolVLM) at the default batch size, through
each family's real processor (a flat image list is read by SmolVLM's processor as all images of the first prompt: batch
1 worked, the default batch of 8 failed). A family without a tiny processor in tiny_processors is skipped with that
reason."""

import pytest
from PIL import Image
from tiny_processors import IMAGE_STRINGS, tiny_family_model, tiny_processor

from vlm_guard.eval.runner import chat_prompt, generate_answers, prepare_processor
from vlm_guard.testing import FAMILY_NAMES, family_available


def _smolvlm_available():
    try:
        import num2words  # noqa: F401  (the SmolVLM processor requires it)
    except ImportError:
        return False
    import transformers

    return hasattr(transformers, "SmolVLMProcessor")


def _family_param(family: str):
    reason = family_available(family)
    if reason is None and family not in IMAGE_STRINGS:
        reason = f"tests/tiny_processors.py builds no tiny {family} processor"
    return pytest.param(family, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


FAMILY_PARAMS = [
    *(_family_param(family) for family in FAMILY_NAMES),
    pytest.param(
        "smolvlm",
        marks=pytest.mark.skipif(not _smolvlm_available(), reason="SmolVLM's processor needs the num2words package"),
    ),
]


def _images():
    return [Image.new("RGB", (32, 32), colour) for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_generate_answers_batch_equals_each_row_alone(family):
    model = tiny_family_model(family)
    processor = prepare_processor(tiny_processor(family))
    images = _images()
    prompts = [chat_prompt(processor, text) for text in ("describe the image", "is there a dog ?", "describe")]
    batched = generate_answers(model, processor, images, prompts, max_new_tokens=3)
    alone = [
        generate_answers(model, processor, [image], [prompt], max_new_tokens=3)[0]
        for image, prompt in zip(images, prompts)
    ]
    assert len(batched) == 3 and batched == alone


@pytest.mark.skipif(not _smolvlm_available(), reason="SmolVLM's processor needs the num2words package")
def test_eval_cli_runs_smolvlm_at_the_default_batch_size(tmp_path, capsys):
    from vlm_guard.cli import main
    from vlm_guard.eval.records import read_records

    folder = tmp_path / "smolvlm"
    tiny_family_model("smolvlm").save_pretrained(folder)
    tiny_processor("smolvlm").save_pretrained(folder)
    out = tmp_path / "syn.jsonl"
    code = main(
        [
            "eval",
            "synthetic",
            "--model",
            str(folder),
            "--tasks",
            "pope",
            "--limit",
            "3",
            "--max-new-tokens",
            "2",
            "--no-progress",
            "--n-resamples",
            "20",
            "--max-unclear",
            "1",  # a random model answers no yes/no
            "--out",
            str(out),
        ]
    )  # default --batch-size 8
    assert code == 0, capsys.readouterr().err
    assert len(read_records(out)) == 9
