"""InternVL 2.5 / 3 / 3.5 in the Hugging Face native layout (``InternVLForConditionalGeneration``).

- Image span: ``<img>`` + ``<IMG_CONTEXT>`` x (256 per tile) + ``</img>`` per image. Dynamic tiling and the
  thumbnail tile all go inside the one ``<img> ... </img>`` block of their image, so the span is that block.
- The config names only the image token; ``<img>`` / ``</img>`` are looked up in the processor's tokenizer.
  Without a processor the span is the image tokens alone (the markers would stay in the image-free prompt).
- Plain 1-D positions; Qwen2 / Qwen3 / InternLM text backbones with grouped-query attention.
"""

from vlm_guard.models import register_adapter
from vlm_guard.models.base import ModelAdapter


@register_adapter
class InternVLAdapter(ModelAdapter):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    image_marker_tokens = ("<img>", "</img>")
