"""Qwen2-VL and Qwen2.5-VL: ``<|image_pad|>`` tokens wrapped in ``<|vision_start|>`` / ``<|vision_end|>``.

Position ids are multimodal RoPE computed by the model from ``input_ids`` and ``image_grid_thw``, so
the image-free prompt only needs the span deleted and the image tensors dropped.
"""

from vlm_guard.models import register_adapter
from vlm_guard.models.base import ModelAdapter


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)

    image_marker_config_keys = ("vision_start_token_id", "vision_end_token_id")


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
