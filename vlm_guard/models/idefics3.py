"""Idefics3 and SmolVLM: each image is a block of ``<image>`` tokens framed by
``<fake_token_around_image>`` and ``<global-img>`` (or one ``<row_i_col_j>`` tile per crop of a split
image, rows ended by a newline). The whole block is the image span; the words around it are text.
The marker tokens are found in the processor's tokenizer."""

from vlm_guard.models import register_adapter
from vlm_guard.models.base import ModelAdapter


@register_adapter
class Idefics3Adapter(ModelAdapter):
    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    text_model_paths = ("model.text_model", "text_model")
    image_marker_tokens = ("<fake_token_around_image>", "<global-img>")
    image_marker_pattern = r"<row_\d+_col_\d+>"
    image_block_inner_texts = ("\n", "\n\n")
