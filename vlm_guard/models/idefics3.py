"""Idefics3 and SmolVLM: image tiles of ``<image>`` tokens separated by ``<fake_token_around_image>``
and ``<row_i_col_j>`` / ``<global-img>`` tokens. The image span runs from the first to the last image
token, widened over the surrounding fake tokens when the processor names them."""

from . import register_adapter
from .base import ModelAdapter


@register_adapter
class Idefics3Adapter(ModelAdapter):
    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    text_model_paths = ("model.text_model", "text_model")

    def marker_token_ids(self) -> set[int]:
        tokenizer = self.tokenizer
        fake_token = getattr(self.processor, "fake_image_token", None)
        if tokenizer is None or not fake_token:
            return set()
        token = getattr(fake_token, "content", fake_token)
        token_id = tokenizer.convert_tokens_to_ids(str(token))
        return {token_id} if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else set()
