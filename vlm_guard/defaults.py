"""The embedded default model: a small LLaVA trained by ``vlm-guard toy train`` on the synthetic world.

It ships inside the package so everything runs offline on first install.

Example:
    >>> from vlm_guard.defaults import load_default
    >>> model, processor = load_default()
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
"""Folder of the shipped toy LLaVA (``from_pretrained``-loadable)."""

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
"""Example images with their ground-truth objects in ``examples.json``."""


def load_default(device: str = "cpu", dtype=None):
    """Load the shipped toy LLaVA and its processor.

    Args:
        device: torch device to move the model to.
        dtype: torch dtype (default float32; the weights are stored in float32).
    Returns:
        ``(model, processor)``: a ``LlavaForConditionalGeneration`` in eval mode and its ``LlavaProcessor``.
    Raises:
        FileNotFoundError: the package was installed without its assets.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"no default model in {DEFAULT_MODEL_DIR}; reinstall vlm-guard with its package data "
            "or train one with `vlm-guard toy train --ship`"
        )
    dtype = dtype or torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=dtype)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(str(DEFAULT_MODEL_DIR))
    return model, processor
