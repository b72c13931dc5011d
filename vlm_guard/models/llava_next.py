"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes tiles and the newline features all sit at
``<image>`` positions after the processor's expansion, so the image span is the run of image tokens."""

from . import register_adapter
from .base import ModelAdapter


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
