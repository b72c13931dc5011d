"""Model inputs of a prompt with tokens appended (teacher forcing), every per-token tensor extended.

A forward pass over ``prompt + answer`` (the demo's plain-run attention, T-VHD's image pass) must grow
every input that has one entry per prompt token, not only ``input_ids`` and ``attention_mask``:
Qwen2-VL on transformers 5.x reads ``mm_token_type_ids`` (``[B, S]``) to place its multimodal RoPE and
fails on a length mismatch. The rules are those of ``generate`` when it appends a token
(``GenerationMixin._update_model_kwargs_for_generation``); a per-token tensor no rule covers is refused
rather than passed on at the wrong length.

Example:
    >>> from PIL import Image
    >>> from vlm_guard.defaults import load_fixture
    >>> from vlm_guard.models.loading import chat_prompt
    >>> model, processor = load_fixture()                 # the 3.6M test fixture
    >>> inputs = processor(images=Image.new("RGB", (32, 32)), text=chat_prompt(processor, "describe the image"),
    ...                    return_tensors="pt")
    >>> answer_ids = torch.tensor([[5, 31, 21]])          # [B, T]
    >>> forced = append_tokens(inputs, answer_ids)
    >>> forced["input_ids"].shape[1] - inputs["input_ids"].shape[1]
    3
    >>> forced["attention_mask"].shape == forced["input_ids"].shape
    True
    >>> logits = model(**forced, use_cache=False).logits   # [B, S + T, V]
"""

from __future__ import annotations

import torch

ZERO_FILLED = ("mm_token_type_ids", "moe_mm_token_type_ids")
"""Per-token modality markers: appended tokens are text (0), as ``generate`` extends them."""

NOT_PER_TOKEN = (
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "video_grid_thw",
    "pixel_values_videos",
    "pixel_attention_mask",
    "second_per_grid_ts",
)
"""Image/video tensors: never per token, whatever their shape happens to be."""


def append_tokens(inputs: dict, new_ids: torch.Tensor) -> dict:
    """``inputs`` of a prompt batch with ``new_ids`` appended to every row.

    Rules (as ``generate`` applies them): ``input_ids`` gain ``new_ids``; ``attention_mask`` gains ones;
    ``token_type_ids`` repeat each row's last value; ``mm_token_type_ids`` gain zeros (text);
    ``position_ids`` (``[B, S]`` or ``[k, B, S]``) continue from each row's last position. Image tensors
    and non-tensors are kept as they are.

    Args:
        inputs: model inputs with ``input_ids`` ``[B, S]``.
        new_ids: ``[B, T]`` tokens to append (``T`` may be 0).
    Returns:
        a new dict; ``inputs`` is not modified.
    Raises:
        ValueError: ``new_ids`` of the wrong shape, or another ``[B, S, ...]`` tensor that no rule
                covers (its name is in the message; extending it by guesswork would feed the model wrong data).
    """
    input_ids = inputs["input_ids"]
    batch, length = input_ids.shape
    if new_ids.ndim != 2 or new_ids.shape[0] != batch:
        raise ValueError(f"new_ids must be [batch={batch}, T], got shape {tuple(new_ids.shape)}")
    new_ids = new_ids.to(device=input_ids.device, dtype=input_ids.dtype)
    count = new_ids.shape[1]
    result = dict(inputs)
    result["input_ids"] = torch.cat([input_ids, new_ids], dim=1)
    for key, value in inputs.items():
        if key == "input_ids" or key in NOT_PER_TOKEN or not isinstance(value, torch.Tensor):
            continue
        if key == "attention_mask":
            result[key] = torch.cat([value, value.new_ones(batch, count)], dim=1)
        elif key == "token_type_ids":
            result[key] = torch.cat([value, value[:, -1:].expand(batch, count)], dim=1)
        elif key in ZERO_FILLED:
            result[key] = torch.cat([value, value.new_zeros(batch, count)], dim=1)
        elif key == "position_ids":
            steps = torch.arange(1, count + 1, dtype=value.dtype, device=value.device)  # [T]
            result[key] = torch.cat([value, value[..., -1:] + steps], dim=-1)
        elif _is_per_token(value, batch, length):
            raise ValueError(
                f"cannot append tokens to the model input {key!r} (shape {tuple(value.shape)}, one entry per prompt token): "
                "no rule says what the new tokens' entries are. Drop it from the inputs if the model does not need it, "
                "or add a rule in vlm_guard/models/inputs.py."
            )
    return result


def _is_per_token(value: torch.Tensor, batch: int, length: int) -> bool:
    return value.ndim >= 2 and tuple(value.shape[:2]) == (batch, length)
