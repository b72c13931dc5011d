"""The engine's observer API: a read-only intervention that rides along with whatever methods run
(``GuardEngine.add_observer`` / ``remove_observer`` / ``observing``)."""

from __future__ import annotations

import logging

import torch

import vlm_guard
from vlm_guard import GuardConfig
from vlm_guard.core.contract import EVERY_ROW, Intervention
from vlm_guard.methods.vhr.intervention import VHRConfig
from vlm_guard.models.compat import cache_kwargs, output_cache
from vlm_guard.testing import build_batch, tiny_model


class Recorder(Intervention):
    """Records which layer, phase and rows it saw (never edits)."""

    name = "recorder"
    needs_image = False
    uses_weights = True

    def __init__(self, layer: int = 2):
        self.layer = layer
        self.seen: list[tuple[str, int]] = []
        self.begun = 0
        self.ended = 0

    def layers(self) -> set[int]:
        return {self.layer}

    def begin(self, prompt, engine) -> None:
        self.begun += 1

    def rows(self, ctx):
        return EVERY_ROW if ctx.all_generated else ctx.predicting_rows()

    def on_weights(self, ctx, weights, rows):
        self.seen.append((ctx.phase, weights.shape[2]))
        return weights

    def end(self) -> None:
        self.ended += 1


def _greedy(guarded, inputs, n=3):
    return guarded.generate(**inputs, max_new_tokens=n, do_sample=False)


def test_an_observer_rides_along_with_the_methods_and_changes_nothing():
    """It joins a guarded generation (its prefill and every step, after the methods), not VHR's side pass (one
    ``begin`` per generation), not a call with the methods switched off; the tokens are the same as without it."""
    model = tiny_model("llava")
    inputs = build_batch(model, [(True, 4), (True, 6)])
    guarded = vlm_guard.wrap(model, config=GuardConfig(vhr=VHRConfig(target_layers=[1, 3])))
    try:
        without = _greedy(guarded, inputs)
        recorder = Recorder()
        guarded.engine.add_observer(recorder)
        assert guarded.engine.observers == (recorder,)
        guarded.engine.add_observer(recorder)  # once only
        assert guarded.engine.observers == (recorder,)
        with_observer = _greedy(guarded, inputs)
        assert torch.equal(with_observer, without)
        assert recorder.begun == 1 and recorder.ended >= 1
        assert [phase for phase, _ in recorder.seen] == ["prefill", "decode", "decode"]
        with guarded.disabled():
            _greedy(guarded, inputs)
        assert recorder.begun == 1 and len(recorder.seen) == 3
        guarded.engine.remove_observer(recorder)
        guarded.engine.remove_observer(recorder)  # one not added is ignored
        _greedy(guarded, inputs)
        assert recorder.begun == 1 and len(recorder.seen) == 3
        second = Recorder(layer=0)
        with guarded.engine.observing(second):
            _greedy(guarded, inputs)
        assert guarded.engine.observers == ()
        assert second.begun == 1 and len(second.seen) == 3
    finally:
        guarded.unwrap()


def test_an_observer_added_between_the_calls_of_a_generation_does_not_end_it(caplog):
    """Observers are not part of a generation's identity: a hand-written loop that adds one after its prefill keeps
    the methods running (no warning about an unknown cache, the same logits); the observer starts with the next
    generation."""
    model = tiny_model("llava")
    inputs = build_batch(model, [(True, 5)])
    guarded = vlm_guard.wrap(model, config=GuardConfig(vhr=VHRConfig(target_layers=[1, 3])))
    recorder = Recorder()

    def loop(observe_after_prefill: bool):
        tokens = []
        with torch.no_grad():
            output = guarded(**inputs, use_cache=True)
            if observe_after_prefill:
                guarded.engine.add_observer(recorder)
            mask = inputs["attention_mask"]
            for _ in range(2):
                token = output.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                output = guarded(
                    input_ids=token,
                    attention_mask=mask,
                    position_ids=mask.cumsum(-1)[:, -1:] - 1,
                    use_cache=True,
                    **cache_kwargs(model, output_cache(output)),
                )
        return torch.cat(tokens, dim=1), output.logits

    try:
        plain_tokens, plain_logits = loop(False)
        with caplog.at_level(logging.WARNING):
            tokens, logits = loop(True)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("vlm_guard")]
        assert torch.equal(tokens, plain_tokens)
        torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)
        assert recorder.begun == 0 and recorder.seen == []
        with torch.no_grad():
            guarded(**inputs, use_cache=True)
        assert recorder.begun == 1 and [phase for phase, _ in recorder.seen] == ["prefill"]
    finally:
        guarded.engine.remove_observer(recorder)
        guarded.unwrap()


def test_the_wrappers_observing_block_holds_the_lock_and_removes_the_observer():
    """``GuardedModel.observing``: the observer runs in the block's guarded calls, another thread's call waits for the
    block to end (so it never runs the observer), and the observer is gone afterwards."""
    import threading

    model = tiny_model("llava")
    inputs = build_batch(model, [(True, 4)])
    guarded = vlm_guard.wrap(model, config=GuardConfig(vhr=VHRConfig(target_layers=[1, 3])))
    try:
        recorder, finished = Recorder(), threading.Event()
        other = threading.Thread(target=lambda: (_greedy(guarded, inputs), finished.set()))
        with guarded.observing(recorder):
            assert guarded.engine.observers == (recorder,)
            other.start()
            _greedy(guarded, inputs)
            assert not finished.wait(0.5)  # the other thread's call waits for the block
            seen = len(recorder.seen)
        other.join(120)
        assert finished.is_set() and seen > 0 and recorder.begun == 1
        assert len(recorder.seen) == seen and guarded.engine.observers == ()
    finally:
        guarded.unwrap()
