"""The decoding hot path: no host-device synchronisation in a decoding step, layers without an
active method cost exactly what plain layers cost, and a long prefill's explicit rows taken in chunks give
the same results as taken whole.

Counted, not timed: operations are counted with a ``TorchDispatchMode`` (device independent).
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from test_decoding_common import planted_sink_model, tiny_var_config
from torch.utils._python_dispatch import TorchDispatchMode

import vlm_guard
from vlm_guard.config import GuardConfig
from vlm_guard.eval.bench import OpCounter
from vlm_guard.methods.gift.intervention import GIFTConfig
from vlm_guard.methods.pai.intervention import PAIConfig
from vlm_guard.methods.var.kernel import recycle_sink_attention
from vlm_guard.methods.vhr.intervention import VHRConfig
from vlm_guard.models.compat import cache_kwargs, output_cache
from vlm_guard.testing import assert_close_scaled, build_batch, forward_reduction

PACKAGE = str(Path(vlm_guard.__file__).resolve().parent)
TORCH = str(Path(torch.__file__).resolve().parent)
# aten operations whose result the host must wait for (a value read, or an output shape that depends on values)
SYNC_OPS = (
    "aten._local_scalar_dense",
    "aten.item",
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique",
    "aten.unique",
    "aten.repeat_interleave.Tensor",
    "aten.allclose",
)


class SyncDetector(TorchDispatchMode):
    """Records every synchronising operation (and ``Tensor.tolist``) called from vlm_guard's own code."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def _check(self, name: str) -> None:
        # the innermost caller outside torch and this file decides: vlm_guard's code, or the model's own (plain does it too)
        stack = [
            frame
            for frame in traceback.extract_stack()
            if not frame.filename.startswith(TORCH) and frame.filename != __file__
        ]
        caller = stack[-1] if stack else None
        if caller is not None and caller.filename.startswith(PACKAGE) and not caller.filename.endswith("testing.py"):
            self.found.append(f"{name} at {caller.filename}:{caller.lineno} ({caller.name})")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNC_OPS):
            self._check(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        detector = self

        def tolist(tensor):
            detector._check("Tensor.tolist")
            return detector._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


METHODS = {
    "vhr": GuardConfig(vhr=VHRConfig(target_layers=[1, 3])),
    "var": GuardConfig(var=tiny_var_config()),
    "gift": GuardConfig(gift=GIFTConfig(saliency_layer=1, enhance_layers=[2, 3])),
    "pai": GuardConfig(pai=PAIConfig()),
    "vhr+var+gift+pai": GuardConfig(
        vhr=VHRConfig(target_layers=[1, 3]),
        var=tiny_var_config(),
        gift=GIFTConfig(saliency_layer=1, enhance_layers=[2, 3]),
        pai=PAIConfig(),
    ),
}


def _prefill_and_step(runner, inputs: dict, base_model, mode=None):
    """The prompt's forward, then one decoding step (under ``mode`` when given); returns the step's logits."""
    with torch.no_grad():
        output = runner(**inputs, use_cache=True)
        cache = output_cache(output)
        token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(token.shape[0], 1)], dim=1)
        step = {"input_ids": token, "attention_mask": mask, "position_ids": mask.long().cumsum(-1)[:, -1:] - 1}
        if mode is None:
            return runner(**step, use_cache=True, **cache_kwargs(base_model, cache)).logits
        with mode:
            return runner(**step, use_cache=True, **cache_kwargs(base_model, cache)).logits


def test_sync_detector_catches_a_value_read_in_vlm_guard():
    """The detector can fail: vlm_guard code that reads a tensor value (``.item()``) is reported."""
    from vlm_guard.methods.gift.gaze import saliency_layer

    with SyncDetector() as detector:
        saliency_layer(torch.tensor([0.1, 0.7]))
    assert detector.found and "_local_scalar_dense" in detector.found[0] and "gaze.py" in detector.found[0]
    with SyncDetector() as detector:
        torch.ones(2).sum().item()  # outside vlm_guard: not ours
    assert detector.found == []


@pytest.mark.parametrize("rows", [[(True, 5), (True, 8)], [(True, 5), (False, 3), (True, 9)]], ids=["images", "mixed"])
@pytest.mark.parametrize("name", list(METHODS))
def test_a_decoding_step_reads_no_tensor_value(name, rows):
    """One decoding step of each method (a batch where every row has an image, and a mixed batch) makes no
    host-device synchronisation in vlm_guard's code: no ``.item()``, ``bool(tensor)``, ``.tolist()``,
    ``nonzero`` or ``torch.equal``; and the method really runs (the step's logits differ from plain)."""
    model = planted_sink_model("llava")
    inputs = build_batch(model, rows)
    plain = _prefill_and_step(model, inputs, model)
    guarded = vlm_guard.wrap(model, config=METHODS[name])
    try:
        detector = SyncDetector()
        logits = _prefill_and_step(guarded, inputs, model, detector)
    finally:
        guarded.unwrap()
    assert detector.found == [], detector.found
    assert not torch.allclose(logits, plain), f"{name} did not change the decoding step"


def _ops_per_layer(runner, inputs: dict, base_model, layers) -> tuple[int, list[int]]:
    """Operations dispatched by one decoding step: in all, and inside each decoder layer."""
    counter = OpCounter()
    totals: dict[int, list[int]] = {}
    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda module, args, index=index: totals.__setitem__(index, [counter.total])
            )
        )
        hooks.append(
            layer.register_forward_hook(
                lambda module, args, output, index=index: totals[index].append(counter.total) and None
            )
        )
    try:
        with torch.no_grad():
            output = runner(**inputs, use_cache=True)
            totals.clear()
            token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
            mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(token.shape[0], 1)], dim=1)
            step = {"input_ids": token, "attention_mask": mask, "position_ids": mask.long().cumsum(-1)[:, -1:] - 1}
            with counter:
                runner(**step, use_cache=True, **cache_kwargs(base_model, output_cache(output)))
    finally:
        for hook in hooks:
            hook.remove()
    return counter.total, [totals[index][1] - totals[index][0] for index in range(len(layers))]


def test_layers_without_an_active_method_cost_what_plain_layers_cost():
    """Per decoder layer, a decoding step dispatches exactly plain's operations in every layer where no method
    acts, and the whole step with every method off dispatches exactly plain's. Layers whose edit is the identity
    for this sample are left out after the prefill: VHR's target layer with no chosen head, and every VAR
    layer when the sinks are all text tokens and ``require_visual_sink`` (the released code) holds."""
    model = planted_sink_model("llava", seed=1)
    layers = vlm_guard.models.get_adapter(model).decoder_layers
    inputs = build_batch(model, [(True, 5), (True, 7)])
    plain_total, plain = _ops_per_layer(model, inputs, model, layers)
    heads = {0: [], 1: [0, 2], 2: [], 3: []}  # head-map selection: layer 2 is a target with no head chosen
    from vlm_guard.methods.vhr.intervention import VHR

    cases = {
        "off": (GuardConfig(), set()),
        "vhr layer 1 (layer 2 has no head)": (GuardConfig(vhr=VHRConfig(target_layers=[1, 2])), {1}),
        "gift enhances 3": (GuardConfig(gift=GIFTConfig(saliency_layer=1, enhance_layers=[3])), {3}),
        "var, text-only sinks (released)": (GuardConfig(var=tiny_var_config(require_visual_sink=True)), set()),
        "var on 2, 3": (GuardConfig(var=tiny_var_config(layers=[2, 3])), {2, 3}),
    }
    for label, (config, acting) in cases.items():
        guarded = vlm_guard.wrap(model, config=config)
        try:
            for intervention in guarded.interventions:
                if isinstance(intervention, VHR):  # fixed heads, so that layer 2 surely has none
                    intervention.static_mask = {
                        layer: torch.tensor([h in chosen for h in range(4)]) for layer, chosen in heads.items()
                    }
            total, counts = _ops_per_layer(guarded, inputs, model, layers)
        finally:
            guarded.unwrap()
        for layer, (count, plain_count) in enumerate(zip(counts, plain)):
            if layer in acting:
                assert count > plain_count, f"{label}: layer {layer} should run the method"
            else:
                assert count == plain_count, f"{label}: layer {layer} costs {count} ops, plain {plain_count}"
        if label == "off":
            assert total == plain_total


@pytest.mark.parametrize("chunk_rows", [1, 3])
def test_chunked_explicit_rows_equal_whole_ones(chunk_rows):
    """A prefill's explicit rows taken a few at a time (VAR on every text row after the image, GIFT's
    saliency rows accumulated over chunks, PAI, VHR) give the same prefill logits, GIFT saliency, VAR sinks and
    generated tokens as taken whole; on a left-padded batch with a row without an image."""
    model = planted_sink_model("llava")
    inputs = build_batch(model, [(True, 9), (False, 4), (True, 12)])
    config = GuardConfig(
        vhr=VHRConfig(target_layers=[1, 3]),
        var=tiny_var_config(),
        gift=GIFTConfig(saliency_layer=1, enhance_layers=[2, 3]),
        pai=PAIConfig(),
    )
    results = {}
    for chunk in (None, chunk_rows):
        guarded = vlm_guard.wrap(model, config=config)
        guarded.engine.chunk_rows = chunk
        try:
            with torch.no_grad():
                logits = guarded(**inputs).logits
            gift, var = guarded.last_generation.states["gift"], guarded.last_generation.states["var"]
            saliency, sinks = gift.saliency.clone(), {k: v.clone() for k, v in var.sink_mask.items()}
            tokens = guarded.generate(**inputs, max_new_tokens=4, do_sample=False)
        finally:
            guarded.unwrap()
        results[chunk] = (logits, saliency, sinks, tokens)
    whole, chunked = results[None], results[chunk_rows]
    assert bool((whole[1] > 0).any()), "the saliency should be non-trivial"
    # each row's arithmetic is the same in a chunk, but a matmul may split its sums differently for another row count
    # (another CPU's vector width, threads), so the floats are compared to the rounding of a forward pass, the tokens
    # exactly; the saliency (in [0, 1]) comes from layer 1's attention, min-max normalised
    assert_close_scaled(chunked[0], whole[0], reduction=forward_reduction(model))
    assert_close_scaled(chunked[1], whole[1], reduction=forward_reduction(model))
    assert chunked[2].keys() == whole[2].keys() and all(torch.equal(chunked[2][k], whole[2][k]) for k in whole[2])
    assert torch.equal(chunked[3], whole[3])


def test_long_prefill_is_chunked_by_the_memory_budget():
    """Without a fixed chunk size, a prompt's explicit rows are split so that one chunk's ``[B, H, rows, K]`` scores
    hold about as many elements as the prompt's hidden states ``[B, S, M]``."""
    from types import SimpleNamespace

    import vlm_guard.core.engine as engine_module

    model = planted_sink_model("llava")
    engine = engine_module.GuardEngine(model, vlm_guard.models.get_adapter(model))
    query = torch.zeros(2, 4, 4096, 16)  # [B, H, Q, D]; hidden size 64
    ctx = SimpleNamespace(key_length=4096)
    rows = engine._chunk_rows(ctx, query, 4000)
    assert rows * 2 * 4 * 4096 <= max(engine_module.MIN_CHUNK_ELEMENTS, 2 * 4096 * 64) and rows == 16
    assert (
        engine._chunk_rows(SimpleNamespace(key_length=8), torch.zeros(1, 4, 8, 16), 5) == 5
    )  # short prompt: one chunk


def _naive_recycle(weights, image, sink, p, rho, threshold):
    """VAR's edit row by row in plain Python (the reference of the batched, in-place one)."""
    out = weights.clone()
    batch, heads, rows, keys = weights.shape
    free = image & ~sink
    for b in range(batch):
        for h in range(heads):
            for r in range(rows):
                row = weights[b, h, r]
                visual, free_mass, sink_mass = (
                    float(row[image[b]].sum()),
                    float(row[free[b]].sum()),
                    float(row[sink[b]].sum()),
                )
                if visual >= threshold and free_mass >= rho * visual and free_mass > 0:
                    out[b, h, r, sink[b]] = row[sink[b]] * (1 - p)
                    out[b, h, r, free[b]] = row[free[b]] * (1 + p * sink_mass / free_mass)
    return out


@pytest.mark.parametrize("in_place", [False, True])
def test_var_edit_over_the_prompt_keys_matches_the_row_by_row_reference(in_place):
    """The matrices cover the prompt's 6 keys, the rows have 9 (3 generated keys, left as they are); in place or on a
    copy, the batched edit equals the per-row formula, and the copy leaves its input untouched."""
    from vlm_guard.methods.var.kernel import RecyclingMatrices, recycle

    generator = torch.Generator().manual_seed(0)
    weights = torch.softmax(torch.randn(2, 3, 2, 9, generator=generator) * 2, dim=-1)
    weights[0, 0, 0] = torch.tensor([0.3, 0.1, 0.1, 0.3, 0.1, 0.0, 0.05, 0.05, 0.0])  # image-centric (visual 0.5)
    image = torch.tensor([[False, False, True, True, True, False], [False, True, True, True, False, False]])
    sink = torch.tensor([[True, False, True, False, False, False], [True, False, False, False, False, True]])
    padded = lambda mask: torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)  # noqa: E731
    expected = _naive_recycle(weights, padded(image), padded(sink), 0.4, 0.5, 0.2)
    original = weights.clone()
    result = recycle(weights, RecyclingMatrices.build(image, sink, 0.4, 0.5, 0.2), in_place=in_place)
    torch.testing.assert_close(result, expected)
    assert (result is weights) == in_place
    if not in_place:
        assert torch.equal(weights, original)
    assert not torch.equal(expected[0, 0, 0], original[0, 0, 0])  # the hand-made row is edited


@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_gift_edit_in_place_equals_the_copy_and_the_pure_function(beta):
    from vlm_guard.methods.gift.kernel import FusionMatrices, enhance, enhance_fusion

    generator = torch.Generator().manual_seed(1)
    weights = torch.softmax(torch.randn(1, 4, 1, 8, generator=generator), dim=-1)
    gain = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.0]])
    image = torch.tensor([[False, True, True, False, False]])
    query = torch.tensor([[False, False, False, True, True]])
    keys = lambda mask: torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)], dim=1)  # noqa: E731
    reference = enhance_fusion(weights, keys(gain), keys(image), keys(query), beta)  # matrices over all 8 keys
    copy = enhance(weights, FusionMatrices.build(gain, image, query, beta))  # over the 5 prompt keys
    in_place = enhance(weights.clone(), FusionMatrices.build(gain, image, query, beta), in_place=True)
    torch.testing.assert_close(copy, reference)
    torch.testing.assert_close(in_place, reference)
    torch.testing.assert_close(reference.sum(-1), torch.ones(1, 4, 1))


def test_var_reads_the_layer_input_at_the_prefill_only():
    """VAR's layer-input hooks exist during the prefill (its sinks) and are gone while decoding (the layers take torch's
    fast call path); a second generation through the same wrapper finds its own sinks again."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model = planted_sink_model("llava")
    guarded = vlm_guard.wrap(model, config=GuardConfig(var=tiny_var_config(p=1.0)))
    layers = guarded.adapter.decoder_layers
    seen = []

    class Hooks(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            seen.append(sum(len(layer._forward_pre_hooks) for layer in layers))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    try:
        for rows in ([(True, 5)], [(True, 8), (True, 3)]):
            inputs = build_batch(model, rows)
            seen.clear()
            guarded.generate(
                **inputs, max_new_tokens=4, do_sample=False, stopping_criteria=StoppingCriteriaList([Hooks()])
            )
            assert seen == [0, 0, 0, 0]  # after the prefill and every step: no layer hook
            var = guarded.last_generation.states["var"]
            assert sorted(var.sink_mask) == [2, 3] and var.sink_mask[2].shape == inputs["input_ids"].shape
            assert bool(var.sink_mask[2][:, :].any(dim=1).all())  # BOS found in every row of this prompt
        assert sum(len(layer._forward_pre_hooks) for layer in layers) == 0
    finally:
        guarded.unwrap()


def test_gradients_flow_through_a_guarded_decoding_step():
    """With gradients recorded, VAR and GIFT edit a copy (never their input) and divide by a clamped mass: backward
    through a decoding step gives finite gradients (the in-place fast path is for steps without gradients only)."""
    from vlm_guard.testing import BOS, tiny_model

    model = tiny_model("llava")
    with torch.no_grad():
        model.get_input_embeddings().weight[BOS, 5] = 200.0
    inputs = build_batch(model, [(True, 5), (True, 9)])
    var = tiny_var_config(sink_dims=[5], tau=5.0, p=1.0)
    gift = GIFTConfig(saliency_layer=1, enhance_layers=[2, 3])
    for name, config in {"var": GuardConfig(var=var), "var+gift": GuardConfig(var=var, gift=gift)}.items():
        guarded = vlm_guard.wrap(model, config=config)
        try:
            with torch.no_grad():
                prefill = guarded(**inputs, use_cache=True)
                ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids)], 1)
            with torch.enable_grad():
                step = guarded(
                    input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, output_cache(prefill))
                )
                step.logits[:, -1].logsumexp(-1).sum().backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads, name
            assert all(bool(torch.isfinite(g).all()) for g in grads), name
        finally:
            model.zero_grad(set_to_none=True)
            guarded.unwrap()


def test_var_with_zero_thresholds_never_divides_by_a_denormal_mass():
    """rho = 0 and visual_threshold = 0 pass validation; a row whose non-sink visual weight is denormal is not
    image-centric (no 1 / 1e-39 coefficient, no inf * 0 = NaN), and a row with real visual weight is edited."""
    image = torch.tensor([[False, True, True, False]])
    sink = torch.tensor([[True, True, False, False]])
    for free in (1e-39, 1e-44):
        weights = torch.tensor([[[[0.5, 0.3, free, 0.2 - free]]]])
        out = recycle_sink_attention(weights, image, sink, p=0.6, rho=0.0, visual_threshold=0.0)
        assert bool(torch.isfinite(out).all()), (free, out)
        torch.testing.assert_close(out, weights)
    edited = recycle_sink_attention(
        torch.tensor([[[[0.5, 0.1, 0.2, 0.2]]]]), image, sink, p=0.5, rho=0.0, visual_threshold=0.0
    )
    torch.testing.assert_close(edited, torch.tensor([[[[0.25, 0.05, 0.5, 0.2]]]]))


def test_a_hand_written_decoding_loop_runs_its_steps_without_layer_hooks():
    """One guarded call per step (a frame each): VAR's layer-input hooks are taken at the prefill only."""
    model = planted_sink_model("llava")
    guarded = vlm_guard.wrap(model, config=GuardConfig(var=tiny_var_config(p=1.0)))
    layers = guarded.adapter.decoder_layers
    seen = []
    probe = layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(sum(len(layer._forward_pre_hooks) for layer in layers))
    )
    try:
        inputs = build_batch(model, [(True, 6)])
        with torch.no_grad():
            out = guarded(**inputs, use_cache=True)
            cache, mask = output_cache(out), inputs["attention_mask"]
            for _ in range(3):
                ids = out.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(ids)], 1)
                out = guarded(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
                cache = output_cache(out)
        # the probe itself is one hook on layer 0; the prefill adds VAR's (layers 2, 3), the steps none
        assert seen == [3, 1, 1, 1]
    finally:
        probe.remove()
        guarded.unwrap()
