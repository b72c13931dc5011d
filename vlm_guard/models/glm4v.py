"""GLM-4.1V / GLM-4.5V (``Glm4vForConditionalGeneration``).

- Image span: ``<|begin_of_image|>`` + ``<|image|>`` x N + ``<|end_of_image|>`` per image (ids from the config's
  ``image_start_token_id`` / ``image_end_token_id``).
- Positions: 3-D multimodal RoPE (time, height, width) computed by the model from the image grid
  (``image_grid_thw``; ``mm_token_type_ids`` on transformers 5.x) with a partial rotary factor; the image-free prompt
  drops the image tensors and the per-token markers and runs at plain text positions.
- Grouped-query attention (GLM-4.1V-9B: 32 query heads, 2 key/value heads).
"""

from vlm_guard.models import register_adapter
from vlm_guard.models.base import ModelAdapter


@register_adapter
class Glm4vAdapter(ModelAdapter):
    family = "glm4v"
    model_classes = ("Glm4vForConditionalGeneration",)

    image_marker_config_keys = ("image_start_token_id", "image_end_token_id")
