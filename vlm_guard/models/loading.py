"""Loading a model for the command-line tools: the shipped default, a local folder or a hub id.

Real checkpoints go through ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained`` exactly
as a user would load them (a hub id needs the hub or a populated cache; a local folder works offline).
``trust_remote_code`` stays off unless the caller asks for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def load_model(model: str | None = None, device: str = "cpu", dtype: str | None = None, trust_remote_code: bool = False):
    """Load ``(model, processor)``.

    Args:
        model: hub id or local folder; None for the shipped default model.
        device: torch device.
        dtype: "float32", "float16", "bfloat16" or None (the checkpoint's own / float32 on CPU).
        trust_remote_code: allow custom modelling code from the checkpoint (off by default).
    Raises:
        ValueError: the dtype name is unknown, or the checkpoint cannot be loaded (the message says why).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = None
    if dtype is not None:
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype={dtype!r} is not known; use float32, float16 or bfloat16")
        torch_dtype = getattr(torch, dtype)
    if model is None:
        from ..defaults import load_default

        return load_default(device=device, dtype=torch_dtype)
    if Path(model).exists() and not (Path(model) / "config.json").exists():
        raise ValueError(f"{model} is a folder without config.json; pass a model folder saved with save_pretrained or a hub id")
    try:
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        loaded = AutoModelForImageTextToText.from_pretrained(
            model, dtype=torch_dtype or "auto", trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise ValueError(
            f"could not load {model!r}: {error}. Pass a local folder, or a hub id whose files are in the local cache "
            "(this machine may have no access to the hub)."
        ) from error
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    return loaded.to(device).eval(), processor


def chat_prompt(processor, text: str, with_image: bool = True) -> str:
    """A one-turn prompt built with the processor's chat template (a plain ``<image>\\ntext`` fallback
    when the processor has none)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None), "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", "<image>")
    return f"{image_token}\n{text}" if with_image else text
