"""Access to a guarded attention engine for profiling passes (observers only).

Profilers accept either a plain model or a :class:`vlm_guard.GuardedModel`. For a plain model a
temporary :class:`~vlm_guard.core.engine.GuardEngine` is installed and removed in ``finally``;
for a wrapped model its own engine is used (with the wrapper's methods inactive unless asked), and
its ``enabled`` flag is restored afterwards. A wrapped model is recognised by what it holds (an installed
``engine``, its ``adapter``, the bare ``model`` and its ``interventions``), so this module needs no wrapper.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ProfilingSession:
    """What a profiler needs: the engine, the adapter, the bare model and the wrapper's interventions."""

    engine: object
    adapter: object
    model: nn.Module
    guard_interventions: list

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to_model(self, inputs: dict) -> dict:
        """Move tensors to the model's device; floating tensors (pixels) to its dtype."""
        moved = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            moved[key] = value
        return moved

    def forward(self, inputs: dict, observers: list, last_logits_only: bool = True):
        """One plain forward (no cache) with ``observers`` active."""
        kwargs = dict(inputs)
        kwargs["use_cache"] = False
        if last_logits_only and _accepts(self.model, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1  # skip the vocabulary projection of every other position
        with torch.no_grad(), self.engine.activate(observers):
            return self.model(**kwargs)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def profiling_session(model, processor=None) -> Iterator[ProfilingSession]:
    """Yield a :class:`ProfilingSession` for ``model`` (plain or wrapped); undone in ``finally``."""
    from vlm_guard.core.engine import GuardEngine
    from vlm_guard.models import get_adapter

    if isinstance(getattr(model, "engine", None), GuardEngine):  # a GuardedModel: profile through its own engine
        engine = model.engine
        previous = engine.enabled
        engine.enabled = True
        try:
            yield ProfilingSession(
                engine=engine, adapter=model.adapter, model=model.model, guard_interventions=list(model.interventions)
            )
        finally:
            engine.enabled = previous
        return
    adapter = get_adapter(model, processor)
    engine = GuardEngine(model, adapter)
    engine.install()
    try:
        yield ProfilingSession(engine=engine, adapter=adapter, model=model, guard_interventions=[])
    finally:
        engine.uninstall()
