"""The shipped default model v3 (the default model; ``VLM_GUARD_DEFAULT_MODEL=v3``): it loads offline, its shipped head map is found for
it (the fingerprint matches the shipped weights), and with every method off guarded generation is token-identical to
``model.generate`` on a bundled example."""

import pytest
import torch

from vlm_guard.synthetic.default import DEFAULT_MODEL_ENV, EXAMPLES_DIRS, V3_WEIGHTS

pytestmark = pytest.mark.skipif(not V3_WEIGHTS.exists(), reason="default model v3 is not shipped")


@pytest.fixture(scope="module")
def v3():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DEFAULT_MODEL_ENV, "v3")
        from vlm_guard.defaults import load_default

        model, processor = load_default()
        yield model, processor


def _inputs(processor):
    from PIL import Image

    image = Image.open(sorted(EXAMPLES_DIRS["everyday_v3"].glob("*.png"))[0]).convert("RGB")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Please describe this image in detail."}],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt")


def test_v3_loads_with_its_shipped_head_map_and_generates_as_the_plain_model(v3):
    import vlm_guard
    from vlm_guard.calibration.shipped import SHIPPED_HEAD_MAPS

    model, processor = v3
    assert int(model.config.image_seq_length) == 144
    guarded = vlm_guard.wrap(model, processor, "none")
    try:
        assert guarded.head_map is not None, "the shipped v3 head map was not found for the shipped v3 weights"
        shipped = sorted(SHIPPED_HEAD_MAPS.glob("default-v3-*"))
        assert len(shipped) == 1 and guarded.head_map.fingerprint_hash
        inputs = _inputs(processor)
        with torch.no_grad():
            plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            ours = guarded.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(plain, ours)
        words = processor.tokenizer.decode(plain[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert words.startswith("The image shows"), words
    finally:
        guarded.unwrap()


def test_v3_is_the_default_model_and_v2_stays_loadable_by_name(monkeypatch):
    """Issue 25: v3 becomes the default once it meets its bars; ``VLM_GUARD_DEFAULT_MODEL=v2`` still selects v2, and
    a name that is not a shipped model is refused with one line naming the choices."""
    from vlm_guard.synthetic.default import default_model_name, default_world, examples_dir

    monkeypatch.delenv(DEFAULT_MODEL_ENV, raising=False)
    assert default_model_name() == "v3"
    assert default_world() == "everyday_v3" and examples_dir() == EXAMPLES_DIRS["everyday_v3"]
    monkeypatch.setenv(DEFAULT_MODEL_ENV, "v2")
    assert default_model_name() == "v2" and default_world() == "everyday"
    monkeypatch.setenv(DEFAULT_MODEL_ENV, "v4")
    with pytest.raises(ValueError, match=r"'v4' is not one of .*unset it for default model v3"):
        default_model_name()
