"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes tiles and the newline features all sit at
``<image>`` positions after the processor's expansion, so the image span is the run of image tokens."""

from vlm_guard.models import register_adapter
from vlm_guard.models.base import ModelAdapter


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
