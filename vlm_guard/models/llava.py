"""LLaVA-1.5 (``LlavaForConditionalGeneration``): the processor expands ``<image>`` into one token per
image feature, with no marker tokens around them."""

from vlm_guard.models import register_adapter
from vlm_guard.models.base import ModelAdapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
