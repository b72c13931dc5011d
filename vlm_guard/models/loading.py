"""Loading a model (the shipped default, a local folder or a hub id) and building its prompts: the one
:func:`load_model` and the one :func:`chat_prompt` of every command.

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
from typing import Any

logger = logging.getLogger(__name__)

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class PickleCheckpointError(ValueError):
    """A checkpoint has no safetensors weights, only pickle files, and pickle was not allowed."""


def _pickle_message(source: str, found: str) -> str:
    return (
        f"{source} has no safetensors weights, only pickle checkpoints ({found}); vlm-guard reads safetensors only "
        "because unpickling a file can run code. Convert it once where you trust it (load it, then "
        "model.save_pretrained(folder) writes model.safetensors), or pass --allow-pickle "
        "(Python: allow_pickle=True) if you trust the file."
    )


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
            raise PickleCheckpointError(
                _pickle_message(str(source), ", ".join(pickles[:3]) + (" ..." if len(pickles) > 3 else ""))
            )
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


def _torch_dtype(dtype: Any):
    """``None`` (the checkpoint's own), ``"auto"``, or a ``torch.dtype`` from a name in :data:`DTYPE_NAMES` (a
    ``torch.dtype`` passes through)."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is not known; use float32, float16, bfloat16 or auto")
    return getattr(torch, dtype)


def load_model(
    model: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
):
    """Load ``(model, processor)``: the one loader behind every command (caption, calibrate, eval, tune, the demo,
    the lmms-eval model).

    Args:
        model: hub id or local folder; None for the shipped default model (:func:`vlm_guard.defaults.load_default`).
        device: torch device.
        dtype: "float32", "float16", "bfloat16", a ``torch.dtype``, or None / "auto": the checkpoint's own dtype
            (the default model's weights are float32).
        trust_remote_code: allow custom modelling code from the checkpoint (off by default).
        allow_pickle: read a checkpoint that has only pickle weights (off by default).
        attn_implementation: transformers' attention implementation (``"eager"``, ``"sdpa"``...); None keeps
            the model's default.
    Returns:
        The model in eval mode on ``device`` and its processor, prepared for batched generation
        (:func:`prepare_processor`: left padding, a pad token).
    Raises:
        ValueError: the dtype name is unknown, or ``model`` is a folder without ``config.json``.
        PickleCheckpointError: the checkpoint has only pickle weights and ``allow_pickle`` is False.
        OSError: transformers cannot read the checkpoint (a hub id that is not cached on a machine without access
            to the hub, missing files); commands turn it into one line with :func:`vlm_guard.checks.model_load_error`.
    """
    torch_dtype = _torch_dtype(dtype)
    if model is None:
        from vlm_guard.defaults import load_default

        loaded, processor = load_default(device=device, dtype=torch_dtype)
        if attn_implementation is not None:
            loaded.set_attn_implementation(str(attn_implementation))
        return loaded, prepare_processor(processor)
    from transformers import AutoProcessor

    local = Path(model).expanduser()
    source = str(local) if local.exists() else str(model)
    if local.exists() and not (local / "config.json").exists():
        raise ValueError(
            f"{model} is a folder without config.json; pass a model folder saved with save_pretrained or a hub id"
        )
    weights_format_kwargs(source, allow_pickle)  # refuse pickle before anything else is read
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    attention = {} if attn_implementation is None else {"attn_implementation": str(attn_implementation)}
    loaded = load_pretrained_model(
        source, allow_pickle=allow_pickle, dtype=torch_dtype or "auto", trust_remote_code=trust_remote_code, **attention
    )
    return loaded.to(device).eval(), prepare_processor(processor)


def model_label(model: str | os.PathLike | None) -> str:
    """The name of the model :func:`load_model` loads for ``model``, for reports: the id or folder as given, or a
    description of the shipped default model."""
    if model is None:
        from vlm_guard.defaults import describe_default

        return describe_default()
    return str(model)


def prepare_processor(processor: Any) -> Any:
    """Left padding for batched generation (the new tokens then start at the same column in every row), and the
    end-of-sequence token as pad token when the tokenizer has none. Returns ``processor``.

    Raises:
        ValueError: ``processor`` has no tokenizer (pass the model's ``AutoProcessor``).
    """
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"processor {type(processor).__name__} has no tokenizer; pass the model's AutoProcessor.")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def chat_prompt(processor: Any, text: str, with_image: bool = True, fallback: bool = False) -> str:
    """The generation prompt of one user turn (an image, then ``text``) through the processor's chat template.

    Args:
        with_image: put an image placeholder before the text.
        fallback: without a chat template, a plain ``<image>\\ntext`` prompt instead of an error.
    Raises:
        ValueError: the processor has no chat template and ``fallback`` is False.

    Example:
        >>> from vlm_guard.synthetic.model import build_processor
        >>> processor = build_processor()                              # the 3.6M test fixture's processor
        >>> chat_prompt(processor, "describe the image")
        'USER: <image> describe the image ASSISTANT:'
    """
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    if getattr(processor, "chat_template", None):
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return prompt[0] if isinstance(prompt, list) else prompt
    if not fallback:
        raise ValueError(
            f"processor {type(processor).__name__} has no chat template; load the processor of an instruction-tuned "
            f"checkpoint (its chat_template.json) or set processor.chat_template."
        )
    image_token = getattr(processor, "image_token", None) or "<image>"
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
        >>> from PIL import Image
        >>> from vlm_guard.synthetic.model import build_processor
        >>> processor = build_processor()                              # the 3.6M test fixture's processor
        >>> image_a, image_b = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
        >>> prompt_a = chat_prompt(processor, "describe the image")
        >>> prompt_b = chat_prompt(processor, "is there a house ?")
        >>> inputs = encode_prompts(processor, [image_a, image_b], [prompt_a, prompt_b])
        >>> inputs["input_ids"].shape[0], inputs["pixel_values"].shape[0]
        (2, 2)
    """
    if len(images) != len(texts):
        raise ValueError(
            f"images and prompts differ in length ({len(images)} vs {len(texts)}); give one image per prompt."
        )
    options = {"return_tensors": "pt", "padding": True, **kwargs}
    return processor(images=[[image] for image in images], text=list(texts), **options)
