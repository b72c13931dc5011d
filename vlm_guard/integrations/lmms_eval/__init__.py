"""vlm-guard in lmms-eval: ``lmms-eval --model vlm_guard`` (install ``vlm-attention-guard[lmms-eval]``).

- :mod:`.model`: the chat model (any supported VLM, the methods on; model arguments in its docstring);
- :mod:`.tasks` and ``templates/``: POPE and CHAIR task configs over local files, scored by :mod:`vlm_guard.eval`;
- :mod:`.export` and ``vlm-guard export-lmms``: data folders for those tasks (the synthetic benchmark's held-out
  items, official POPE files, COCO CHAIR), so the default model runs offline through lmms-eval;
- :func:`model_manifest`: the entry point (group ``lmms_eval.models``) through which lmms-eval finds the model.

This package imports lmms-eval only in :mod:`.model` (and in :func:`model_manifest`, which lmms-eval calls).
See ``docs/lmms-eval.md``.
"""

from __future__ import annotations

MODEL_NAME = "vlm_guard"
"""The name lmms-eval knows the model by (``--model vlm_guard``)."""

MODEL_CLASS_PATH = "vlm_guard.integrations.lmms_eval.model.VLMGuardModel"


def model_manifest():
    """The ``ModelManifest`` lmms-eval reads from the entry point ``lmms_eval.models: vlm_guard``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, chat_class_path=MODEL_CLASS_PATH, aliases=("vlm-guard",))
