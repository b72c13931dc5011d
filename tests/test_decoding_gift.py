"""GIFT: hand-computed saliency and enhancement, informative words, layer defaults, generation."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from test_decoding_common import ROWS, assert_batch_matches_singles, image_rows_changed, matches_plain

import vlm_guard
from vlm_guard.config import GuardConfig
from vlm_guard.methods.gift.gaze import (
    gaze_head_sums,
    gaze_saliency,
    gaze_shift,
    normalise_saliency,
    saliency_from_head_sums,
    saliency_multipliers,
    total_positive_gaze_shift,
)
from vlm_guard.methods.gift.intervention import (
    GIFTConfig,
    default_gift_layers,
    enhance_fusion,
    informative_query_counts,
    informative_query_mask,
    informative_word_spans,
    overlap_counts,
    query_words,
    token_char_spans,
)
from vlm_guard.testing import (
    TOKENIZER_KINDS,
    assert_close_scaled,
    build_batch,
    forward_reduction,
    offline_tokenizer,
    tiny_model,
)


def test_enhancement_multipliers_ratio_and_renormalisation():
    # keys: text, image a, image b, query; 4 heads -> 2 visual heads and 2 query heads
    weights = torch.tensor(
        [
            [0.1, 0.4, 0.2, 0.3],  # most visual (0.6) -> H_V; query 0.3 -> H_Q
            [0.5, 0.2, 0.2, 0.1],  # visual 0.4 -> H_V; query 0.1
            [0.5, 0.1, 0.0, 0.4],  # visual 0.1; query 0.4 -> H_Q
            [0.7, 0.05, 0.05, 0.2],  # neither
        ]
    )[None, :, None, :]  # [1, 4, 1, 4]
    image = torch.tensor([[False, True, True, False]])
    query = torch.tensor([[False, False, False, True]])
    gain = torch.tensor([[0.0, 1.0, 0.5, 0.0]])  # M = 2, 1.5 on the image
    out = enhance_fusion(weights, gain, image, query, beta=1.0)[0, :, 0]
    # r = (0.8 + 0.3 + 0.4 + 0.3) / (0.6 + 0.4) = 1.8
    r = 1.8
    expected = torch.tensor(
        [
            [0.1, 0.8, 0.3, 0.3 * r],
            [0.5, 0.4, 0.3, 0.1],
            [0.5, 0.1, 0.0, 0.4 * r],
            [0.7, 0.05, 0.05, 0.2],
        ]
    )
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(-1), torch.ones(4))
    # identity settings: M = 1 (alpha = 0) and beta = 1 leave the rows unchanged
    torch.testing.assert_close(enhance_fusion(weights, torch.zeros_like(gain), image, query, 1.0), weights)


def test_saliency_hand_computed_and_nan_free():
    # 2 heads, rows 0..2 (row 0 text, rows 1-2 query), keys: text, image, image
    weights = torch.tensor(
        [
            [[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]],
            [[0.4, 0.3, 0.3], [0.4, 0.3, 0.3], [0.4, 0.3, 0.3]],
        ]
    )[None]
    query = torch.tensor([[False, True, True]])
    image = torch.tensor([[False, True, True]])
    shift = gaze_shift(weights, query, image)
    torch.testing.assert_close(shift[0, 0], torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.4]]))
    assert shift[0, 1].abs().sum() == 0
    torch.testing.assert_close(total_positive_gaze_shift(weights, query, image), torch.tensor([[0.7, 0.0]]))
    # top floor(2/2)=1 head (head 0), mean over the 2 informative rows
    raw = gaze_saliency(shift, informative_rows=query, query_rows=query)
    torch.testing.assert_close(raw, torch.tensor([[0.0, 0.15, 0.2]]))
    normalised = normalise_saliency(raw, image)
    torch.testing.assert_close(normalised, torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(saliency_multipliers(normalised, 5.0), torch.tensor([[1.0, 1.0, math.exp(5.0)]]))
    # no informative row -> all query rows; no query row either -> zeros, never NaN
    none = torch.zeros_like(query)
    torch.testing.assert_close(gaze_saliency(shift, none, query), raw)
    empty = gaze_saliency(shift, none, none)
    assert torch.equal(empty, torch.zeros_like(empty))
    flat = normalise_saliency(torch.full((1, 3), 0.5), image)
    assert not torch.isnan(flat).any() and flat.abs().sum() == 0


def test_saliency_clamps_outliers_at_three_std():
    image = torch.ones(1, 12, dtype=torch.bool)
    raw = torch.cat([torch.full((1, 11), 1.0), torch.tensor([[100.0]])], dim=1)
    raw[0, 0] = 0.0
    normalised = normalise_saliency(raw, image)
    assert normalised[0, -1] == 1.0 and normalised[0, 0] == 0.0
    assert 0.0 < normalised[0, 1] < 0.1  # the outlier was clamped, so the ordinary values are not squashed to 0.01


CORPUS = [
    "is there a house ?",
    "describe the image",
    "what is the red elephant sitting on ?",
    "a big red house , a big green tree .",
    "is there a tree in the image ?",
    "please describe this image in detail .",
] * 4


def informative_words(tokenizer, text: str) -> list[str]:
    """The words whose tokens GIFT keeps, for ``text`` as the whole query."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    mask = informative_query_mask(input_ids, torch.ones_like(input_ids, dtype=torch.bool), tokenizer)[0]
    return [word for word, members in query_words(tokenizer, ids) if all(mask[i] for i in members)]


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_informative_words_are_the_same_for_every_tokenizer_kind(kind):
    # word-level (the shipped model's kind) has no word-start marker: all query tokens used to be one "word"
    tokenizer = offline_tokenizer(kind, CORPUS)
    assert informative_words(tokenizer, "is there a house ?") == ["house"]
    assert informative_words(tokenizer, "describe the image") == ["describe", "image"]
    assert informative_words(tokenizer, "what is the red elephant sitting on ?") == ["red", "elephant", "sitting"]
    # sub-word pieces of one word are kept together; punctuation tokens never count
    ids = tokenizer("is there a house ?", add_special_tokens=False)["input_ids"]
    mask = informative_query_mask(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), tokenizer)[0]
    kept = tokenizer.decode([i for i, keep in zip(ids, mask) if keep]).strip()
    assert kept == "house"


def test_informative_words_rows_padding_and_fallbacks():
    tokenizer = offline_tokenizer("word_level", CORPUS)
    vocab = tokenizer.get_vocab()
    row0 = [vocab[w] for w in "is there a house ?".split()]
    row1 = [vocab["<pad>"]] * 3 + [vocab[w] for w in "is there".split()]
    input_ids = torch.tensor([row0, row1])
    query = input_ids != vocab["<pad>"]
    mask = informative_query_mask(input_ids, query, tokenizer)
    assert mask.tolist() == [[False, False, False, True, False], [False] * 5]  # row 1: stop words only
    assert torch.equal(informative_query_mask(input_ids, query, None), query)  # no tokenizer: all tokens


def test_saliency_clamp_uses_the_unbiased_std():
    # image values 0 x8, 3, 10: mean 1.3; sum of squared deviations 92.1; unbiased std sqrt(92.1 / 9) = 3.1990
    # (population std 3.0348); clamp at 1 std: high = 1.3 + 3.1990 = 4.4990, so S'(3) = 3 / 4.4990 = 0.66681
    raw = torch.tensor([[0.0] * 8 + [3.0, 10.0]])
    normalised = normalise_saliency(raw, torch.ones_like(raw, dtype=torch.bool), clamp_stds=1.0)
    torch.testing.assert_close(normalised[0, 8], torch.tensor(3.0 / (1.3 + math.sqrt(92.1 / 9))))
    assert abs(float(normalised[0, 8]) - 0.66681) < 1e-4
    assert normalised[0, 9] == 1.0 and normalised[0, 0] == 0.0


def test_layer_defaults_follow_the_llava_recipe():
    assert default_gift_layers(32) == (11, list(range(12, 23)))
    saliency, layers = default_gift_layers(4)
    assert saliency < layers[0] and all(0 <= layer < 4 for layer in layers)


@pytest.mark.parametrize("field, value", [("alpha", -1.0), ("alpha", 25.0), ("beta", -0.5), ("clamp_stds", 0.0)])
def test_out_of_range_values_name_field_and_range(field, value):
    with pytest.raises(ValueError, match=rf"GIFTConfig\.{field}=.*allowed range is"):
        GIFTConfig(**{field: value})
    with pytest.raises(ValueError, match="GIFTConfig.saliency_layer"):
        GIFTConfig(saliency_layer=-1)


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    return model, build_batch(model, ROWS)


def test_output_changes_and_alpha0_matches_plain(llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("gift"))
    try:
        assert image_rows_changed(guarded, inputs)
        saliency = guarded.last_generation.states["gift"].saliency
        image = inputs["input_ids"] == 100
        assert saliency.shape == inputs["input_ids"].shape and saliency.dtype == torch.float32
        assert saliency[~image].abs().sum() == 0 and 0 <= saliency.min() and saliency.max() <= 1
        assert saliency[0].max() == 1.0 and saliency[2].max() == 1.0
        guarded.set_config(GuardConfig(gift=GIFTConfig(alpha=0.0)))
        assert matches_plain(guarded, inputs)
    finally:
        guarded.unwrap()


def test_side_pass_stops_at_the_saliency_layer_and_agrees_with_in_prefill(llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig(gift=GIFTConfig(saliency_layer=1, enhance_layers=[2, 3])))
    last_layer_calls = []
    hook = guarded.adapter.decoder_layers[3].register_forward_pre_hook(lambda *args: last_layer_calls.append(1))
    try:
        assert guarded.interventions[0].in_prefill
        with torch.no_grad():
            guarded(**inputs)
        in_prefill = guarded.last_generation.states["gift"].saliency.clone()
        guarded.set_config(GuardConfig(gift=GIFTConfig(saliency_layer=1, enhance_layers=[1, 2, 3])))
        assert not guarded.interventions[0].in_prefill
        last_layer_calls.clear()
        with torch.no_grad():
            guarded(**inputs)
        side_pass = guarded.last_generation.states["gift"].saliency
        assert len(last_layer_calls) == 1, "the side pass must stop after layer 1"
        assert_close_scaled(side_pass, in_prefill, reduction=forward_reduction(model))  # S' in [0, 1]
    finally:
        hook.remove()
        guarded.unwrap()


def test_padded_batch_matches_rows_alone(llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig.from_methods("gift"))
    try:
        assert_batch_matches_singles(guarded, model, inputs, "gift")
    finally:
        guarded.unwrap()


# ---------------------------------------------------------------------------------------------------------------
# word -> token alignment by character offsets (the released code's extract_and_align)
def released_alignment(tokenizer, text: str) -> list[int]:
    """The released code's rule, written out: the informative words of ``text`` (here: not stop words), each word's
    tokens those whose offset span overlaps it, listed once per word (a token spanning two words twice)."""
    from vlm_guard.methods.gift.intervention import STOP_WORDS

    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # words as spaCy splits them here: "dog's" -> dog, 's; "don't" -> do, n't (letters and digits, apostrophes apart)
    words = [m.span() for m in re.finditer(r"[^\W_]+", text) if m.group().lower() not in STOP_WORDS]
    counts = [0] * len(encoded["input_ids"])
    for first, last in words:
        for i, (start, end) in enumerate(encoded["offset_mapping"]):
            if not (end <= first or start >= last):
                counts[i] += 1
    return counts


ALIGNMENT_TEXTS = [
    "what color is the car ?",  # unknown words (word-level vocabulary)
    "is there a skateboard near the house ?",  # a word split into pieces
    "describe the café , its naïve décor and the 12 chairs",  # multi-byte characters: byte-level pieces
    "don't describe the dog's red-brown ball",  # apostrophes, a hyphen
    "  describe   the image",  # leading and repeated spaces
]


@functools.cache
def alignment_tokenizer(kind: str, vocabulary: str):
    return offline_tokenizer(kind, CORPUS + (ALIGNMENT_TEXTS * 4 if vocabulary == "covering" else []), vocab_size=400)


@pytest.mark.parametrize(
    "vocabulary", ["small", "covering"]
)  # covering: trained on the texts too (fewer unknown tokens)
@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@pytest.mark.parametrize("text", ALIGNMENT_TEXTS)
def test_alignment_by_character_offsets_matches_the_released_rule(kind, text, vocabulary):
    tokenizer = alignment_tokenizer(kind, vocabulary)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    query = torch.ones_like(input_ids, dtype=torch.bool)
    expected = released_alignment(tokenizer, text)
    # with the query's own text: the released alignment exactly, unknown words included
    with_text = informative_query_counts(input_ids, query, tokenizer, texts=[text])[0].tolist()
    assert with_text == expected, (tokenizer.convert_ids_to_tokens(ids), with_text, expected)
    # from the ids alone: the same when the ids keep the whole text; an unknown token (its text lost: a word, a piece
    # of one, or punctuation) always counts
    unknown = [i == tokenizer.unk_token_id for i in ids]
    from_ids = informative_query_counts(input_ids, query, tokenizer)[0].tolist()
    if not any(unknown):
        assert from_ids == expected
    assert all(from_ids[i] >= 1 for i, u in enumerate(unknown) if u)
    assert informative_query_mask(input_ids, query, tokenizer)[0].tolist() == [c > 0 for c in from_ids]


def test_unknown_word_tokens_are_kept():
    # the shipped fixture's kind: a word-level vocabulary that does not know "color" nor "car"
    tokenizer = offline_tokenizer("word_level", CORPUS)
    text = "is the color of the car red ?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["is", "the", "<unk>", "<unk>", "the", "<unk>", "red", "?"]
    input_ids = torch.tensor([ids])
    query = torch.ones_like(input_ids, dtype=torch.bool)
    # "of" is unknown too: from the ids alone its text is lost and it counts; with the text it does not
    assert informative_query_mask(input_ids, query, tokenizer)[0].nonzero().flatten().tolist() == [2, 3, 5, 6]
    assert informative_query_mask(input_ids, query, tokenizer, texts=[text])[0].nonzero().flatten().tolist() == [
        2,
        5,
        6,
    ]
    # a text that does not give these ids is not used (the decoded ids are aligned instead)
    assert informative_query_mask(input_ids, query, tokenizer, texts=["is there a house ?"])[
        0
    ].nonzero().flatten().tolist() == [2, 3, 5, 6]


def test_a_token_spanning_two_words_counts_for_each():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "a": 1, "red/blue": 2, "ball": 3, "the/a": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    text = "the/a red/blue ball"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [4, 2, 3]
    counts = informative_query_counts(torch.tensor([ids]), torch.ones(1, 3, dtype=torch.bool), tokenizer)[0].tolist()
    assert counts == [0.0, 2.0, 1.0] == released_alignment(tokenizer, text)


def test_byte_pieces_of_one_character_share_its_span_without_offsets():
    tokenizer = offline_tokenizer("byte_level_bpe", CORPUS)
    ids = tokenizer("naïve décor", add_special_tokens=False)["input_ids"]

    class SlowView:  # the same tokenizer seen as a slow one: spans from decoding growing prefixes
        is_fast = False
        all_special_ids = tokenizer.all_special_ids
        unk_token_id = tokenizer.unk_token_id

        def decode(self, token_ids, **kwargs):
            return tokenizer.decode(token_ids, **kwargs)

    text, spans = token_char_spans(SlowView(), ids)
    assert text == "naïve décor"
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces), pieces  # "ï" and "é" are split into bytes in this vocabulary
    assert all(end > start for start, end in spans) and spans[-1][1] == len(text)
    fast_text, fast_spans = token_char_spans(tokenizer, ids)
    assert fast_text == text
    assert (
        overlap_counts(spans, informative_word_spans(text))
        == overlap_counts(fast_spans, informative_word_spans(text))
        == released_alignment(tokenizer, text)
    )


def test_saliency_weights_tokens_once_per_word_as_the_released_code():
    # the released code indexes the shift with its token list (duplicates included), picks the top heads by the sum
    # and averages: the same as weighting each row by its count
    torch.manual_seed(0)
    shift = torch.rand(1, 4, 5, 6)  # [B, H, R, K]
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0, 1.0]])
    selected = [1, 1, 2, 4]
    listed = shift[0][:, selected]  # [H, 4, K]
    top = listed.sum(dim=(1, 2)).topk(2).indices
    expected = listed[top].double().mean(dim=(0, 1))
    ours = saliency_from_head_sums(gaze_head_sums(shift, counts), counts.sum(dim=1))[0]
    torch.testing.assert_close(ours.double(), expected, atol=0.0, rtol=4 * torch.finfo(torch.float32).eps * 8)
