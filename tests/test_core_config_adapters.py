"""GuardConfig validation and serialisation; adapters: unsupported models, spans from token ids, image-free prompts."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import vlm_guard
from vlm_guard import GuardConfig
from vlm_guard.methods.vhr.intervention import VHRConfig
from vlm_guard.models import get_adapter, supported_families
from vlm_guard.testing import FAMILY_NAMES, IMAGE, build_batch, tiny_model


def test_out_of_range_value_names_field_and_range():
    with pytest.raises(ValueError, match=r"VHRConfig\.alpha=-1.*allowed range is \(0\.0, 10\.0\]"):
        VHRConfig(alpha=-1)
    with pytest.raises(ValueError, match=r"VHRConfig\.selection"):
        VHRConfig(selection="sometimes")
    with pytest.raises(ValueError, match="unknown method"):
        GuardConfig.from_methods("vhr,magic")
    with pytest.raises(ValueError, match="GuardConfig.vhr must be a VHRConfig"):
        GuardConfig(vhr=3)


def test_config_round_trip(tmp_path):
    config = GuardConfig(vhr=VHRConfig(alpha=3.0, target_layers=[1, 2]))
    data = config.to_dict()
    assert data["vhr"]["alpha"] == 3.0 and data["var"] is None and "vlm_guard_version" in data
    assert GuardConfig.from_dict(json.loads(json.dumps(data))) == config
    config.save(tmp_path / "guard.json")
    assert GuardConfig.load(tmp_path / "guard.json") == config
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GuardConfig.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown field"):
        GuardConfig.from_dict({"vhr": {"alpha": 2.0, "beta": 1}})
    assert GuardConfig.from_methods("none").enabled_methods == []


def test_target_layer_out_of_model_range():
    model = tiny_model("llava")
    with pytest.raises(ValueError, match=r"target_layers \[7\] are out of range; the model has layers 0..3"):
        vlm_guard.wrap(model, config=GuardConfig(vhr=VHRConfig(target_layers=[1, 7])))


def test_unsupported_model_lists_families():
    class Other(torch.nn.Module):
        pass

    with pytest.raises(ValueError) as error:
        get_adapter(Other())
    for family in FAMILY_NAMES:
        assert family in str(error.value)
    assert set(supported_families()) >= set(FAMILY_NAMES)


def _tiny_processor():
    words = ["<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "what", "is", "red", "?", VLMMARK]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<unk>"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    return fast, vocab


VLMMARK = "VLMGUARDQUERYMARKER"


def test_prompt_spans_from_chat_template():
    tokenizer, vocab = _tiny_processor()
    model = tiny_model("llava")
    model.config.image_token_index = vocab["<image>"]
    adapter = get_adapter(model, tokenizer)
    assert adapter.image_token_id == vocab["<image>"]
    assert adapter.assistant_suffix_ids() == [vocab["ASSISTANT:"]]
    # row 0: <s> USER: <image> <image> what is red ? ASSISTANT: ; row 1 (left padded, no image): <s> USER: red ? ASSISTANT:
    row0 = ["<s>", "USER:", "<image>", "<image>", "what", "is", "red", "?", "ASSISTANT:"]
    row1 = ["<pad>", "<pad>", "<pad>", "<pad>", "<s>", "USER:", "red", "?", "ASSISTANT:"]
    input_ids = torch.tensor([[vocab[w] for w in row0], [vocab[w] for w in row1]])
    attention_mask = (input_ids != vocab["<pad>"]).long()
    spans = adapter.prompt_spans(input_ids, attention_mask)
    assert spans.image[0].nonzero().flatten().tolist() == [2, 3]
    assert spans.query[0].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert spans.has_image.tolist() == [True, False]
    assert not spans.query[1].any() and not spans.image[1].any()
    assert spans.after_image[0].nonzero().flatten().tolist() == [4, 5, 6, 7, 8]
    free_ids, free_mask = adapter.remove_image(input_ids, attention_mask)
    assert free_ids.shape == (2, 7)
    assert free_ids[0].tolist() == [vocab[w] for w in ["<s>", "USER:", "what", "is", "red", "?", "ASSISTANT:"]]
    assert free_mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_qwen_and_idefics_spans_include_markers():
    for family, markers in (("qwen2_vl", 2), ("idefics3", 0)):
        model = tiny_model(family)
        inputs = build_batch(model, [(True, 4)])
        adapter = get_adapter(model)
        spans = adapter.prompt_spans(inputs["input_ids"], inputs["attention_mask"])
        n_image = int((inputs["input_ids"] == IMAGE).sum())
        assert int(spans.image.sum()) == n_image
        assert int(spans.image_span.sum()) == n_image + markers
