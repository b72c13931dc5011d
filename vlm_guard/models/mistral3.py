"""Mistral 3 / Mistral Small 3.x (``Mistral3ForConditionalGeneration``, Pixtral vision).

- Image span: Pixtral's row layout. Each row of (spatially merged) patches is a run of ``[IMG]`` tokens followed
  by ``[IMG_BREAK]``; the last row ends with ``[IMG_END]`` instead. The image features sit at the ``[IMG]``
  positions only (these are the keys V of the methods); the break and end tokens are marker tokens of the span, so
  the image-free prompt loses them too and the rows of one image form one block.
- ``[IMG_BREAK]`` / ``[IMG_END]`` are looked up in the processor's tokenizer; without a processor each row of
  ``[IMG]`` tokens is a block of its own (the image-free prompt would keep the break and end tokens).
- Plain 1-D positions; Mistral text backbone with grouped-query attention (no sliding window in Mistral 3).
"""

from vlm_guard.models import register_adapter
from vlm_guard.models.base import ModelAdapter


@register_adapter
class Mistral3Adapter(ModelAdapter):
    family = "mistral3"
    model_classes = ("Mistral3ForConditionalGeneration",)
    image_marker_tokens = ("[IMG_BREAK]", "[IMG_END]")
