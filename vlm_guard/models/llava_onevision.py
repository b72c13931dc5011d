"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``).

- Image span: the processor expands ``<image>`` into one token per feature: the base image's features, then the
  AnyRes tiles (unpadded to the image's aspect ratio, bilinearly pooled down when there are more than
  ``anyres_max_9`` tiles' worth) with an ``image_newline`` feature after each row of the tiled grid. Tiles, base image
  and newlines all sit at ``<image>`` positions, so the image span is each image's run of image tokens, with no
  marker token around it.
- Plain 1-D positions, Qwen2 text backbone with grouped-query attention.
"""

from vlm_guard.models import register_adapter
from vlm_guard.models.base import ModelAdapter


@register_adapter
class LlavaOnevisionAdapter(ModelAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
