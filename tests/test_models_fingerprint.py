"""Model fingerprints: config and weights digests that tell checkpoints apart and ignore how they were loaded."""

import torch

import vlm_guard
from vlm_guard.models.fingerprint import (
    SAMPLES_PER_TENSOR,
    config_digest,
    model_fingerprint,
    samples_match,
    weights_digest,
    weights_sample,
)
from vlm_guard.testing import tiny_model


def test_same_weights_same_digest_and_other_weights_differ():
    first, again, other = tiny_model("llava", seed=0), tiny_model("llava", seed=0), tiny_model("llava", seed=1)
    assert model_fingerprint(first) == model_fingerprint(again)
    assert weights_digest(first) != weights_digest(other)
    assert config_digest(first) == config_digest(other)  # same architecture, other weights (runA vs runB)
    assert len(weights_digest(first)) == 16 and len(config_digest(first)) == 16


def test_one_edited_matrix_changes_the_digest():
    model = tiny_model("llava")
    before = weights_digest(model)
    with torch.no_grad():
        model.model.language_model.layers[2].self_attn.q_proj.weight.mul_(1.01)  # a fine-tune of one matrix
    assert weights_digest(model) != before


def test_config_digest_ignores_load_details_but_not_architecture():
    model = tiny_model("llava")
    before = config_digest(model)
    model.config._name_or_path = "runA/checkpoint-final"
    assert config_digest(model) == before
    guarded = vlm_guard.wrap(model)  # changes the attention implementation while wrapped
    try:
        assert config_digest(model) == before
    finally:
        guarded.unwrap()
    assert config_digest(tiny_model("llava", text_overrides={"rope_theta": 5000.0})) != before


def test_float32_and_bfloat16_loads_share_the_digest():
    model = tiny_model("llava")
    digest = weights_digest(model)
    values, shapes = weights_sample(model)
    assert values.dtype == torch.float32 and values.numel() <= SAMPLES_PER_TENSOR * len(shapes)
    half = tiny_model("llava").to(torch.bfloat16)
    assert weights_digest(half) == digest
    assert model_fingerprint(half)["weights_dtype"] == "bfloat16"
    assert samples_match(values, weights_sample(tiny_model("llava").to(torch.float16))[0])
    assert not samples_match(values, weights_sample(tiny_model("llava", seed=1))[0])


def test_every_family_has_a_fingerprint():
    from vlm_guard.testing import FAMILIES

    digests = {family: model_fingerprint(tiny_model(family))["weights_digest"] for family in FAMILIES}
    assert len(set(digests.values())) == len(FAMILIES)
