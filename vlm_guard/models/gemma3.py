"""Gemma 3 (``Gemma3ForConditionalGeneration``).

- Image span: ``<start_of_image>`` + ``<image_soft_token>`` x 256 + ``<end_of_image>`` per image (ids from the
  config's ``boi_token_index`` / ``eoi_token_index``); the processor puts blank lines around the block, which are
  text and stay in the image-free prompt.
- Bidirectional attention inside each image during the prefill, driven by the processor's ``token_type_ids``; they
  are per-token image markers, so the image-free prompt drops them with the image tensors.
- Local and global layers: five sliding-window layers (window 512 or 1024) per global layer. The methods act on
  the same depth-mapped layers as for every family, local and global. In a local layer the mask the model builds
  already limits each query to its window, and while decoding the engine places the window's cached keys at their
  absolute positions (the keys that left the window are masked), so an edit reaches only the image tokens still
  inside that query's window; a global layer sees the whole image at every step.
- Queries scaled by ``query_pre_attn_scalar ** -0.5`` (passed to the attention function and used by the explicit
  rows). Attention-logit soft-capping: Gemma 3 keeps ``attn_logit_softcapping`` in its config (None in released
  checkpoints) but transformers' Gemma 3 attention does not pass it to the attention function, so there is no cap
  to reproduce; the engine's explicit rows apply ``softcap`` whenever a layer passes it (Gemma 2-style backbones).
- Grouped-query attention; ``head_dim`` from the config (256 in released checkpoints, not hidden / heads).
"""

from typing import ClassVar

from vlm_guard.models import register_adapter
from vlm_guard.models.base import ModelAdapter


@register_adapter
class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    image_input_keys: ClassVar[tuple[str, ...]] = ModelAdapter.image_input_keys + ("token_type_ids",)
    image_marker_config_keys = ("boi_token_index", "eoi_token_index")
