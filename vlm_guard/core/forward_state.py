"""Model state a forward call may leave behind, saved and restored around extra passes.

A side pass (VHR's image-free prefill, GIFT's saliency pass) or a contrast stream (PAI, VCD) runs the model
besides the generation; some families cache a value on the model during a forward call (Qwen2-VL's M-RoPE
``rope_deltas``), which the generation's next call would then read. :func:`save_forward_state` before such a pass
and :func:`restore_forward_state` after it leave the model as it was found.
"""

from __future__ import annotations

from torch import nn

# model attributes that a forward call may overwrite as a side effect (Qwen2-VL caches its M-RoPE deltas)
FORWARD_STATE_ATTRIBUTES = ("rope_deltas",)


def save_forward_state(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """Attributes a forward call may overwrite (see :data:`FORWARD_STATE_ATTRIBUTES`), to restore after a side pass."""
    saved = []
    for module in (model, getattr(model, "model", None)):
        if module is None:
            continue
        for name in FORWARD_STATE_ATTRIBUTES:
            if name in getattr(module, "__dict__", {}):
                saved.append((module, name, module.__dict__[name]))
    return saved


def restore_forward_state(saved: list[tuple[nn.Module, str, object]]) -> None:
    """Put back what :func:`save_forward_state` saved."""
    for module, name, value in saved:
        setattr(module, name, value)
