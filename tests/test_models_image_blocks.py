"""Image-free prompts: only image blocks (image tokens + the family's marker tokens) are removed, per family,
for any number of images; text between images stays (issue 10, repros 01 and 08)."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlm_guard.models import ModelAdapter, get_adapter
from vlm_guard.testing import IMAGE, VISION_END, VISION_START, tiny_model

FAKE, GLOBAL, ROW1COL1, ROW1COL2, NEWLINE = 103, 104, 105, 106, 107


class _Idefics3LikeProcessor:
    """The attributes the adapter reads from transformers' Idefics3Processor."""

    fake_image_token = "<fake_token_around_image>"
    image_token = "<image>"
    chat_template = None

    def __init__(self):
        special = {
            "<pad>": 0,
            "<s>": 1,
            "</s>": 2,
            "<image>": IMAGE,
            "<fake_token_around_image>": FAKE,
            "<global-img>": GLOBAL,
            "<row_1_col_1>": ROW1COL1,
            "<row_1_col_2>": ROW1COL2,
            "\n": NEWLINE,
            "<unk>": 127,
        }
        vocab = {f"w{i}": i for i in range(128) if i not in special.values()}
        vocab.update(special)
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def _image_free(adapter, ids: list[int]) -> list[int]:
    input_ids = torch.tensor([ids])
    new_ids, new_mask = adapter.remove_image(input_ids, torch.ones_like(input_ids))
    return new_ids[0][new_mask[0].bool()].tolist()


@pytest.fixture(scope="module")
def idefics3_adapter():
    return get_adapter(tiny_model("idefics3"), _Idefics3LikeProcessor())


def test_idefics3_single_image_block_removed_with_its_markers(idefics3_adapter):
    n = 4
    ids = [1, 11, 12, FAKE, GLOBAL] + [IMAGE] * n + [FAKE, 13, 14, 15]
    assert _image_free(idefics3_adapter, ids) == [1, 11, 12, 13, 14, 15]


def test_idefics3_split_image_tiles_rows_and_global_removed(idefics3_adapter):
    n = 4
    block = (
        [FAKE, ROW1COL1]
        + [IMAGE] * n
        + [FAKE, ROW1COL2]
        + [IMAGE] * n
        + [NEWLINE, NEWLINE]
        + [FAKE, GLOBAL]
        + [IMAGE] * n
        + [FAKE]
    )
    assert _image_free(idefics3_adapter, [1, 11, 12] + block + [13, 14, 15]) == [1, 11, 12, 13, 14, 15]


def test_idefics3_two_images_keep_words_and_newlines_between(idefics3_adapter):
    block = [FAKE, GLOBAL] + [IMAGE] * 3 + [FAKE]
    ids = [1, NEWLINE, 11] + block + [NEWLINE, 12, 13, NEWLINE] + block + [NEWLINE, 14]
    assert _image_free(idefics3_adapter, ids) == [1, NEWLINE, 11, NEWLINE, 12, 13, NEWLINE, NEWLINE, 14]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_two_images_keep_the_words_between(family):
    adapter = get_adapter(tiny_model(family))
    block = [VISION_START] + [IMAGE] * 4 + [VISION_END] if family == "qwen2_vl" else [IMAGE] * 4
    ids = [1, 11] + block + [12, 13] + block + [14, 15, 16]
    assert _image_free(adapter, ids) == [1, 11, 12, 13, 14, 15, 16]
    spans = adapter.prompt_spans(torch.tensor([ids]))
    # the query span is the text after the last image block
    assert spans.query[0].nonzero().flatten().tolist() == [len(ids) - 3, len(ids) - 2, len(ids) - 1]


def test_marker_without_image_is_text():
    adapter = get_adapter(tiny_model("qwen2_vl"))
    ids = [1, 11, VISION_START, 12, VISION_END, 13] + [VISION_START, IMAGE, IMAGE, VISION_END, 14]
    assert _image_free(adapter, ids) == [1, 11, VISION_START, 12, VISION_END, 13, 14]


def test_left_padded_batch_with_different_image_counts():
    adapter = get_adapter(tiny_model("qwen2_vl"))
    block = [VISION_START, IMAGE, IMAGE, VISION_END]
    rows = [[1, 11] + block + [12] + block + [13], [1, 21, 22], [1, 31] + block + [32]]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    new_ids, new_mask = adapter.remove_image(input_ids, mask)
    got = [new_ids[i][new_mask[i].bool()].tolist() for i in range(3)]
    assert got == [[1, 11, 12, 13], [1, 21, 22], [1, 31, 32]]


def test_a_new_family_declares_its_markers_as_data():
    class BracketAdapter(ModelAdapter):  # e.g. InternVL-style <img> ... </img>, GLM-4V-style config ids
        family = "bracket_test"
        image_marker_config_keys = ("vision_start_token_id",)
        image_marker_tokens = ("<row_1_col_2>",)

    adapter = BracketAdapter(tiny_model("llava"), _Idefics3LikeProcessor())
    adapter.model.config.vision_start_token_id = VISION_START
    assert adapter.marker_token_ids() == {VISION_START, ROW1COL2}
    ids = [1, 11, VISION_START] + [IMAGE] * 3 + [ROW1COL2, 12]
    assert _image_free(adapter, ids) == [1, 11, 12]
