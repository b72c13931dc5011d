"""Qwen3-VL, dense (``Qwen3VLForConditionalGeneration``) and MoE (``Qwen3VLMoeForConditionalGeneration``).

- Image span: ``<|vision_start|>`` + ``<|image_pad|>`` x N + ``<|vision_end|>`` per image (ids from the config);
  several images are several such blocks.
- Positions: interleaved multimodal RoPE (time, height, width sections interleaved over the rotary dims), computed
  by the model from ``input_ids``, ``mm_token_type_ids`` (transformers 5.x) and ``image_grid_thw``; the image-free
  prompt drops the image tensors and the per-token markers and gets plain 1-D text positions, as for Qwen2-VL.
- DeepStack: visual features of early vision layers are added to the hidden states at the image positions of the
  first text layers; nothing for the adapter to do (the image positions are the ``<|image_pad|>`` tokens).
- Grouped-query attention with an explicit ``head_dim``; q/k RMS norms run before the attention function, so the
  explicit rows see the normalised queries and keys.
- MoE: sparse expert MLPs replace the dense MLP in the decoder layers; the attention (all that vlm_guard touches)
  is the same module, so both classes share this adapter's rules.
"""

from vlm_guard.models import register_adapter
from vlm_guard.models.qwen2_vl import Qwen2VLAdapter


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)


@register_adapter
class Qwen3VLMoeAdapter(Qwen2VLAdapter):
    family = "qwen3_vl_moe"
    model_classes = ("Qwen3VLMoeForConditionalGeneration",)
