"""The methods' fast paths against their plain reference formulas (VAR's and GIFT's ``kernel.py``).

Random shapes (batch, heads, rows, prompt keys and generated keys, matrices over fewer or more keys than the rows
have), random masks (samples without image, without sink, with every image key a sink) and random parameters; the
fast path in fp32, in place (a decoding step) and on a copy with gradients, against the reference in float64. Rows
within rounding of a selection threshold (VAR's image-centric test, GIFT's choice of heads) are left out of the
comparison: there the fp32 and float64 decisions may differ and both are right.
"""

from __future__ import annotations

import pytest
import torch

from vlm_guard.methods.gift.kernel import FusionMatrices, enhance, enhance_fusion, enhance_reference
from vlm_guard.methods.var.kernel import RecyclingMatrices, recycle, recycle_reference, recycle_sink_attention
from vlm_guard.testing import assert_close_scaled

SEEDS = list(range(8))
MARGIN = 1e-5  # rows closer than this to a selection threshold are not compared


def _shape(generator):
    """``(B, H, R, S, K)``: prompt keys ``S`` the matrices cover, ``K`` keys of the rows (usually ``S`` plus generated
    keys; sometimes fewer than ``S``: the matrices' first ``K`` keys are used)."""
    pick = lambda values: values[int(torch.randint(len(values), (1,), generator=generator))]  # noqa: E731
    batch, heads, rows, prompt = pick([1, 2, 3]), pick([1, 2, 4, 5, 8]), pick([1, 1, 2, 5]), pick([3, 6, 11])
    keys = prompt + pick([0, 1, 4, -1])
    return batch, heads, rows, prompt, keys


def _weights(generator, batch, heads, rows, keys, boost=None):
    """Post-softmax fp32 weights ``[B, H, R, K]``, some rows pushed towards the ``boost`` keys ``[B, K]``."""
    logits = torch.randn(batch, heads, rows, keys, generator=generator, dtype=torch.float64) * 2.0
    if boost is not None:
        push = torch.rand(batch, heads, rows, 1, generator=generator, dtype=torch.float64) * 4.0
        logits = logits + push * boost[:, None, None, :keys].double()
    return torch.softmax(logits, dim=-1).float()


def _pad(mask: torch.Tensor, keys: int) -> torch.Tensor:
    """A ``[B, S]`` prompt mask on the rows' ``K`` keys (generated keys False; the first ``K`` when ``S > K``)."""
    if mask.shape[1] >= keys:
        return mask[:, :keys]
    return torch.cat([mask, mask.new_zeros(mask.shape[0], keys - mask.shape[1])], dim=1)


def _var_case(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, heads, rows, prompt, keys = _shape(generator)
    image = torch.rand(batch, prompt, generator=generator) < 0.5
    sink = torch.rand(batch, prompt, generator=generator) < 0.3
    image[0, 0], sink[0, 0] = False, True  # a text sink (BOS)
    if batch > 1:
        image[1] = False  # a sample without image: nothing is image-centric
    if batch > 2:
        sink[2] = image[2]  # every image key a sink: no free key, nothing to recycle into
    p = float(torch.empty(()).uniform_(0.05, 1.0, generator=generator))
    rho = float(torch.empty(()).uniform_(0.0, 0.7, generator=generator))
    threshold = float(torch.empty(()).uniform_(0.0, 0.5, generator=generator))
    weights = _weights(generator, batch, heads, rows, keys, boost=_pad(image, keys))
    return weights, image, sink, p, rho, threshold


def _var_comparable(weights64, image, sink, rho, threshold):
    """``[B, H, R, 1]`` rows whose image-centric test is not within rounding of its thresholds (a row without a
    non-sink image key is decided exactly: its free mass is 0 in any precision)."""
    image, free = image[:, None, None, :], (image & ~sink)[:, None, None, :]
    visual = (weights64 * image).sum(-1, keepdim=True)
    free_mass = (weights64 * free).sum(-1, keepdim=True)
    return (free_mass == 0) | (((visual - threshold).abs() > MARGIN) & ((free_mass - rho * visual).abs() > MARGIN))


@pytest.mark.parametrize("seed", SEEDS)
def test_var_fast_path_equals_the_reference_in_place_and_on_a_copy(seed):
    weights, image, sink, p, rho, threshold = _var_case(seed)
    keys = weights.shape[-1]
    image_k, sink_k = _pad(image, keys), _pad(sink, keys)
    reference = recycle_reference(weights.double(), image_k, sink_k, p, rho, threshold)
    compared = _var_comparable(weights.double(), image_k, sink_k, rho, threshold).expand_as(weights)
    assert float(compared.float().mean()) > 0.8
    matrices = RecyclingMatrices.build(image, sink, p, rho, threshold)
    original = weights.clone()
    copy = recycle(weights, matrices)
    assert torch.equal(weights, original)  # the copy path never writes into its input
    edited = weights.clone()
    in_place = recycle(edited, matrices, in_place=True)
    assert in_place is edited
    for result in (copy, in_place):
        assert_close_scaled(result[compared], reference[compared], reduction=keys)
    assert_close_scaled(
        recycle_sink_attention(weights, image_k, sink_k, p, rho, threshold)[compared],
        reference[compared],
        reduction=keys,
    )
    assert_close_scaled(reference.sum(-1), weights.double().sum(-1), reduction=keys)  # rows keep their sums


def test_var_cases_edit_some_rows_and_leave_others():
    """The random cases exercise both sides of the image-centric test."""
    edited = kept = 0
    for seed in SEEDS:
        weights, image, sink, p, rho, threshold = _var_case(seed)
        keys = weights.shape[-1]
        changed = (
            recycle_reference(weights.double(), _pad(image, keys), _pad(sink, keys), p, rho, threshold)
            != weights.double()
        ).any(dim=-1)
        edited, kept = edited + int(changed.sum()), kept + int((~changed).sum())
    assert edited > 20 and kept > 20, (edited, kept)


@pytest.mark.parametrize("seed", SEEDS)
def test_var_fast_path_gradients_equal_the_reference(seed):
    weights, image, sink, p, rho, threshold = _var_case(seed)
    keys = weights.shape[-1]
    image_k, sink_k = _pad(image, keys), _pad(sink, keys)
    compared = _var_comparable(weights.double(), image_k, sink_k, rho, threshold)  # [B, H, R, 1]
    probe = torch.randn(weights.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    probe = probe * compared  # rows at a threshold carry no gradient in either
    fast_input = weights.clone().requires_grad_(True)
    fast = recycle(fast_input, RecyclingMatrices.build(image, sink, p, rho, threshold))
    (fast.double() * probe).sum().backward()
    reference_input = weights.double().requires_grad_(True)
    reference = recycle_reference(reference_input, image_k, sink_k, p, rho, threshold)
    (reference * probe).sum().backward()
    assert bool(torch.isfinite(fast_input.grad).all())
    mask = compared.expand_as(weights)
    assert_close_scaled(fast.detach()[mask], reference.detach()[mask], reduction=keys)
    assert_close_scaled(fast_input.grad[mask], reference_input.grad[mask], reduction=keys)


def _gift_case(seed):
    generator = torch.Generator().manual_seed(1000 + seed)
    batch, heads, rows, prompt, keys = _shape(generator)
    image = torch.rand(batch, prompt, generator=generator) < 0.4
    query = ~image & (torch.rand(batch, prompt, generator=generator) < 0.5)
    if batch > 1:
        image[1] = False  # a sample without image: no gain, r = 1
    saliency = torch.rand(batch, prompt, generator=generator, dtype=torch.float64)
    alpha = float(torch.empty(()).uniform_(0.0, 3.0, generator=generator))
    gain = ((torch.exp(alpha * saliency) - 1.0) * image).float()  # M - 1 on the image keys
    beta = [1.0, 0.5, 1.7][seed % 3]
    weights = _weights(generator, batch, heads, rows, keys, boost=_pad(image, keys))
    return weights, gain, image, query, beta


def _gift_comparable(weights64, image, query):
    """``[B, 1, R, 1]`` rows whose two head choices are not within rounding of a tie (``top`` vs ``top + 1``-th head)."""
    heads = weights64.shape[1]
    top = max(1, heads // 2)
    comparable = torch.ones(weights64.shape[0], 1, weights64.shape[2], 1, dtype=torch.bool)
    if top >= heads:
        return comparable
    for keys in (image, query):
        mass = (weights64 * keys[:, None, None, :]).sum(-1)  # [B, H, R]
        ranked = mass.sort(dim=1, descending=True).values
        gap = ranked[:, top - 1] - ranked[:, top]  # [B, R]
        tied_at_zero = ranked[:, top - 1] == 0  # no such key: every head ties at 0 and the choice changes nothing
        comparable &= ((gap > MARGIN) | tied_at_zero)[:, None, :, None]
    return comparable


@pytest.mark.parametrize("seed", SEEDS)
def test_gift_fast_path_equals_the_reference_in_place_and_on_a_copy(seed):
    weights, gain, image, query, beta = _gift_case(seed)
    keys = weights.shape[-1]
    gain_k, image_k, query_k = _pad(gain, keys), _pad(image, keys), _pad(query, keys)
    reference = enhance_reference(weights.double(), gain_k.double(), image_k, query_k, beta)
    compared = _gift_comparable(weights.double(), image_k, query_k).expand_as(weights)
    assert float(compared.float().mean()) > 0.8
    matrices = FusionMatrices.build(gain, image, query, beta)
    original = weights.clone()
    copy = enhance(weights, matrices)
    assert torch.equal(weights, original)
    edited = weights.clone()
    in_place = enhance(edited, matrices, in_place=True)
    assert in_place is edited
    scale = keys * weights.shape[1]  # the row sums and the ratio r add over keys and heads
    for result in (copy, in_place):
        assert_close_scaled(result[compared], reference[compared], reduction=scale)
    assert_close_scaled(
        enhance_fusion(weights, gain_k, image_k, query_k, beta)[compared], reference[compared], reduction=scale
    )
    assert_close_scaled(reference.sum(-1), torch.ones_like(reference.sum(-1)), reduction=scale)


def test_gift_cases_change_the_weights():
    changed = 0
    for seed in SEEDS:
        weights, gain, image, query, beta = _gift_case(seed)
        keys = weights.shape[-1]
        reference = enhance_reference(
            weights.double(), _pad(gain, keys).double(), _pad(image, keys), _pad(query, keys), beta
        )
        changed += int(((reference - weights.double()).abs() > 1e-3).any(dim=-1).sum())
    assert changed > 20, changed


@pytest.mark.parametrize("seed", SEEDS)
def test_gift_fast_path_gradients_equal_the_reference(seed):
    weights, gain, image, query, beta = _gift_case(seed)
    keys = weights.shape[-1]
    gain_k, image_k, query_k = _pad(gain, keys), _pad(image, keys), _pad(query, keys)
    compared = _gift_comparable(weights.double(), image_k, query_k)  # [B, 1, R, 1]
    probe = torch.randn(weights.shape, generator=torch.Generator().manual_seed(200 + seed), dtype=torch.float64)
    probe = probe * compared
    fast_input = weights.clone().requires_grad_(True)
    fast = enhance(fast_input, FusionMatrices.build(gain, image, query, beta))
    (fast.double() * probe).sum().backward()
    reference_input = weights.double().requires_grad_(True)
    reference = enhance_reference(reference_input, gain_k.double(), image_k, query_k, beta)
    (reference * probe).sum().backward()
    assert bool(torch.isfinite(fast_input.grad).all())
    mask = compared.expand_as(weights)
    scale = keys * weights.shape[1]
    assert_close_scaled(fast.detach()[mask], reference.detach()[mask], reduction=scale)
    assert_close_scaled(fast_input.grad[mask], reference_input.grad[mask], reduction=scale)
