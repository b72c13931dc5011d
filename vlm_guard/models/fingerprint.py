"""Model fingerprints: cheap, deterministic digests of a loaded model's config and weights.

They tell two checkpoints of the same architecture apart (``runA/checkpoint-final`` and
``runB/checkpoint-final`` have the same name and shapes but different weights), so a head map, a cache
entry or an eval record can be tied to the exact model that made it.

How the digests are made:

- **config digest**: SHA-256 of the model config as sorted JSON (``config.to_dict()``, sub-configs
  included), without the keys that change with how the model was loaded rather than what it is: private
  keys (``_name_or_path``, ``_attn_implementation``, ...), ``transformers_version``, ``dtype`` /
  ``torch_dtype`` and the runtime switches in :data:`VOLATILE_CONFIG_KEYS`.
- **weights digest**: SHA-256 of a fixed sample of the parameters: for every parameter in registration
  order (``named_parameters()``, tied weights once), its shape and :data:`SAMPLES_PER_TENSOR` elements at
  evenly spaced flat positions (first and last included). Floating values are cast to float32 and then
  rounded to bfloat16 before hashing, so the same checkpoint loaded in float32 or bfloat16 gives the
  same digest (a float16 load can round differently and usually gets a digest of its own; compare
  :func:`weights_sample` with :func:`samples_match` across dtypes). Integer parameters (quantized
  weights) are hashed as int64. Parameter names are not hashed: the sample order already follows the
  module structure, and renamed modules between transformers versions do not change the digest.
  Parameters on the ``meta`` device (offloaded, not loaded) are left out.
  Cost: one small gather per parameter (a few thousand numbers for a 7B model), independent of model
  size; nothing reads the files. A fine-tune that changes none of the sampled elements (e.g. a
  handful of weights edited by hand) is not detected; any ordinary fine-tune or LoRA merge changes
  whole matrices and is.

All digests are the first 16 hex digits of the SHA-256.

Example:
    >>> from vlm_guard.defaults import load_fixture
    >>> from vlm_guard.models.fingerprint import model_fingerprint
    >>> model, processor = load_fixture()                 # the 3.6M test fixture
    >>> model_fingerprint(model)
    {'model_class': 'LlavaForConditionalGeneration', 'name_or_path': '...default_model', 'config_digest': '...',
     'weights_digest': '...', 'weights_dtype': 'float32', 'num_parameters': ...}
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

SAMPLES_PER_TENSOR = 32
DIGEST_LENGTH = 16
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "use_return_dict",
        "architectures",
    }
)


def _short(digest: hashlib._Hash) -> str:
    return digest.hexdigest()[:DIGEST_LENGTH]


def _config_dict(config: Any) -> Any:
    """The config as plain data without volatile keys (recursive over sub-configs and dicts)."""
    if hasattr(config, "to_dict") and not isinstance(config, dict):
        config = config.to_dict()
    if isinstance(config, dict):
        return {
            str(key): _config_dict(value)
            for key, value in config.items()
            if not str(key).startswith("_") and key not in VOLATILE_CONFIG_KEYS
        }
    if isinstance(config, (list, tuple)):
        return [_config_dict(value) for value in config]
    return config


def config_digest(model: nn.Module) -> str:
    """16 hex digits of the SHA-256 of ``model.config`` (see the module docstring for what is left out)."""
    data = _config_dict(model.config)
    text = json.dumps(data, sort_keys=True, default=str, allow_nan=True)
    return _short(hashlib.sha256(text.encode()))


def _sample_positions(numel: int, count: int = SAMPLES_PER_TENSOR) -> list[int]:
    """Evenly spaced flat positions, first and last included, each at most once."""
    if numel <= count:
        return list(range(numel))
    return sorted({(i * (numel - 1)) // (count - 1) for i in range(count)})


def _parameters(model: nn.Module):
    for name, parameter in model.named_parameters():
        if parameter.device.type == "meta":
            continue
        yield name, parameter


@torch.no_grad()
def weights_sample(model: nn.Module) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """The sampled parameter elements and the parameter shapes.

    Returns:
        ``(values, shapes)``: ``values`` a float32 CPU tensor ``[N]`` (the samples of every parameter in
        registration order, :data:`SAMPLES_PER_TENSOR` or fewer per parameter), ``shapes`` one tuple per
        parameter.
    """
    pieces, shapes = [], []
    for _, parameter in _parameters(model):
        flat = parameter.detach().reshape(-1)
        positions = _sample_positions(flat.numel())
        shapes.append(tuple(parameter.shape))
        if not positions:
            continue
        index = torch.tensor(positions, device=flat.device)
        picked = flat.index_select(0, index)  # [<= SAMPLES_PER_TENSOR]
        pieces.append(picked.float() if picked.is_floating_point() else picked.to(torch.float64).float())
    values = torch.cat([piece.cpu() for piece in pieces]) if pieces else torch.zeros(0)  # [N]
    return values, shapes


@torch.no_grad()
def weights_digest(model: nn.Module) -> str:
    """16 hex digits identifying the model's weights (see the module docstring for the sample and the rounding)."""
    digest = hashlib.sha256()
    for _, parameter in _parameters(model):
        flat = parameter.detach().reshape(-1)
        positions = _sample_positions(flat.numel())
        digest.update(repr((tuple(parameter.shape), "f" if parameter.is_floating_point() else "i")).encode())
        if not positions:
            continue
        picked = flat.index_select(0, torch.tensor(positions, device=flat.device)).cpu()
        if picked.is_floating_point():
            data = picked.float().to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        else:
            data = picked.to(torch.int64).numpy().tobytes()
        digest.update(data)
    return _short(digest)


def weights_dtype(model: nn.Module) -> str:
    """The dtype of the first floating parameter ("float32", "bfloat16", ...), or "none"."""
    for _, parameter in _parameters(model):
        if parameter.is_floating_point():
            return str(parameter.dtype).replace("torch.", "")
    return "none"


def samples_match(first: torch.Tensor, second: torch.Tensor, relative: float = 2.0**-7, absolute: float = 1e-5) -> bool:
    """Whether two :func:`weights_sample` value tensors come from the same weights up to float16/bfloat16
    rounding (every element within ``relative * |value| + absolute``)."""
    if first.shape != second.shape:
        return False
    first, second = first.float(), second.float()
    both_nan = first.isnan() & second.isnan()
    close = (first - second).abs() <= relative * torch.maximum(first.abs(), second.abs()) + absolute
    return bool((close | both_nan).all())


def model_fingerprint(model: nn.Module) -> dict:
    """What identifies a loaded model: class, name, config digest, weights digest, dtype and size.

    Use it to tag anything computed from a model (eval records, head maps, caches): two fingerprints
    with equal ``config_digest`` and ``weights_digest`` come from the same checkpoint. The name is
    informational only (two folders may hold the same weights, or two runs the same folder name).
    """
    return {
        "model_class": type(model).__name__,
        "name_or_path": str(getattr(model.config, "_name_or_path", "") or ""),
        "config_digest": config_digest(model),
        "weights_digest": weights_digest(model),
        "weights_dtype": weights_dtype(model),
        "num_parameters": int(sum(p.numel() for _, p in _parameters(model))),
    }


__all__ = [
    "SAMPLES_PER_TENSOR",
    "config_digest",
    "weights_digest",
    "weights_sample",
    "weights_dtype",
    "samples_match",
    "model_fingerprint",
]
