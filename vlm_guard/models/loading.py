"""Loading a model for the command-line tools: the shipped default, a local folder or a hub id.

Real checkpoints go through ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained`` exactly
as a user would load them (a hub id needs the hub or a populated cache; a local folder works offline).
``trust_remote_code`` stays off unless the caller asks for it.

Weights are read from safetensors only: a checkpoint that has only pickle files (``pytorch_model.bin``,
``*.pt``, ...) is refused with :class:`PickleCheckpointError`, because unpickling a file can run code.
``allow_pickle=True`` (the ``--allow-pickle`` flag of every command that takes ``--model``) lets
transformers read such a checkpoint (it still prefers safetensors when both exist).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class PickleCheckpointError(ValueError):
    """A checkpoint has no safetensors weights, only pickle files, and pickle was not allowed."""


def _pickle_message(source: str, found: str) -> str:
    return (f"{source} has no safetensors weights, only pickle checkpoints ({found}); vlm-guard reads safetensors only "
            "because unpickling a file can run code. Convert it once where you trust it (load it, then "
            "model.save_pretrained(folder) writes model.safetensors), or pass --allow-pickle "
            "(Python: allow_pickle=True) if you trust the file.")


def weights_format_kwargs(source: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """``from_pretrained`` keyword arguments that choose the weights format (``use_safetensors=True`` unless pickle
    is allowed).

    Raises:
        PickleCheckpointError: ``source`` is a local folder with pickle weights and no ``*.safetensors``, and
            ``allow_pickle`` is False.

    Example:
        >>> weights_format_kwargs("llava-hf/llava-1.5-7b-hf")
        {'use_safetensors': True}
    """
    if allow_pickle:
        return {}
    folder = Path(source).expanduser()
    if folder.is_dir():
        names = sorted(path.name for path in folder.iterdir() if path.is_file())
        pickles = [name for name in names if name.endswith(PICKLE_WEIGHT_SUFFIXES) and name != "training_args.bin"]
        if pickles and not any(name.endswith(".safetensors") for name in names):
            raise PickleCheckpointError(_pickle_message(str(source), ", ".join(pickles[:3]) + (" ..." if len(pickles) > 3 else "")))
    return {"use_safetensors": True}


def load_pretrained_model(source: str | os.PathLike, *, allow_pickle: bool = False, **kwargs):
    """``AutoModelForImageTextToText.from_pretrained(source, **kwargs)`` reading safetensors only unless
    ``allow_pickle`` (see the module docstring).

    Raises:
        PickleCheckpointError: the checkpoint has only pickle weights and ``allow_pickle`` is False.
    """
    from transformers import AutoModelForImageTextToText

    format_kwargs = weights_format_kwargs(source, allow_pickle)
    try:
        return AutoModelForImageTextToText.from_pretrained(str(source), **format_kwargs, **kwargs)
    except OSError as error:
        if format_kwargs and "safetensors" in str(error).lower():  # e.g. a hub repository with only .bin files
            raise PickleCheckpointError(_pickle_message(str(source), "no model.safetensors")) from error
        raise


DTYPE_NAMES = ("float32", "float16", "bfloat16")
"""The model dtypes the commands take by name (``getattr(torch, name)``)."""


def load_model(model: str | None = None, device: str = "cpu", dtype: str | None = None, trust_remote_code: bool = False,
               allow_pickle: bool = False):
    """Load ``(model, processor)``.

    Args:
        model: hub id or local folder; None for the shipped default model.
        device: torch device.
        dtype: "float32", "float16", "bfloat16" or None (the checkpoint's own / float32 on CPU).
        trust_remote_code: allow custom modelling code from the checkpoint (off by default).
        allow_pickle: read a checkpoint that has only pickle weights (off by default).
    Raises:
        ValueError: the dtype name is unknown, or the checkpoint cannot be loaded (the message says why).
        PickleCheckpointError: the checkpoint has only pickle weights and ``allow_pickle`` is False.
    """
    import torch
    from transformers import AutoProcessor

    torch_dtype = None
    if dtype is not None:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype={dtype!r} is not known; use float32, float16 or bfloat16")
        torch_dtype = getattr(torch, dtype)
    if model is None:
        from vlm_guard.defaults import load_default

        return load_default(device=device, dtype=torch_dtype)
    if Path(model).exists() and not (Path(model) / "config.json").exists():
        raise ValueError(f"{model} is a folder without config.json; pass a model folder saved with save_pretrained or a hub id")
    try:
        weights_format_kwargs(model, allow_pickle)  # refuse pickle before anything else is read
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        loaded = load_pretrained_model(model, allow_pickle=allow_pickle, dtype=torch_dtype or "auto",
                                       trust_remote_code=trust_remote_code)
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


def encode_prompts(processor, images, texts, **kwargs):
    """Processor inputs for a batch of one-image prompts (``images[i]`` belongs to ``texts[i]``).

    Images go in as one list per prompt (``[[image_0], [image_1], ...]``), the layout every supported processor
    documents for batches: a flat list is read by SmolVLM's processor as all images of the first prompt, and it
    then refuses the batch ("the number of <image> tokens ... should be the same as the number of images").

    Args:
        processor: the model's processor (its tokenizer's padding side is used as set).
        images: one PIL image per prompt.
        texts: the prompts, each with one image placeholder.
        kwargs: passed to the processor (default ``return_tensors="pt"``, ``padding=True``).

    Returns:
        The processor's ``BatchFeature``.

    Example:
        >>> inputs = encode_prompts(processor, [image_a, image_b], [prompt_a, prompt_b])  # doctest: +SKIP
    """
    if len(images) != len(texts):
        raise ValueError(f"images and prompts differ in length ({len(images)} vs {len(texts)}); give one image per prompt.")
    options = {"return_tensors": "pt", "padding": True, **kwargs}
    return processor(images=[[image] for image in images], text=list(texts), **options)
