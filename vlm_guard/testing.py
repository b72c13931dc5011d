"""Tiny random-weight models of every supported family, built from configs (no download), and
matching left-padded prompt batches. Used by the test suite and the benchmark.

Every family is one :class:`TinyFamily` entry of :data:`FAMILY_REGISTRY` (its names, in order:
:data:`FAMILY_NAMES`): how to build the tiny model, how many image tokens one image gives, the token
block one image becomes in the prompt (with the family's marker tokens), the image tensors of a batch,
and one row's image tensors. :func:`tiny_model`, :func:`image_token_count`, :func:`build_batch` and
:func:`split_row` read the entry.

Example:
    >>> from vlm_guard.testing import tiny_model, build_batch
    >>> model = tiny_model("llava")
    >>> inputs = build_batch(model, [(True, 5), (False, 3), (True, 9)])
"""

from __future__ import annotations

import inspect

import torch

VOCAB = 128
BOS, PAD, IMAGE, VISION_START, VISION_END, FAKE = 1, 0, 100, 101, 102, 103
IMG_BREAK, IMG_END = 104, 105  # Pixtral/Mistral 3: end of a row of patches, end of the image
MARKER_TOKENS = {"<img>": VISION_START, "</img>": VISION_END, "[IMG_BREAK]": IMG_BREAK, "[IMG_END]": IMG_END}
TEXT_IDS = (10, 90)  # ordinary text tokens are drawn from this range
_V5 = int(__import__("transformers").__version__.split(".")[0]) >= 5


# ------------------------------------------------------------------------------ the family registry
class TinyFamily:
    """The tiny model and prompt layout of one family (an entry of :data:`FAMILY_REGISTRY`).

    Attributes:
        family: the adapter's family name.
        model_class: the ``transformers`` class the tiny model is built with.
        mrope: positions come from the image grid (M-RoPE): a hand-written decode loop lets the model place each new
            token instead of passing a mask, so such loops run rows of equal length.
        loop_positions: a hand-written decode loop passes the left-padding-aware positions ``cumsum(mask) - 1`` (what
            ``generate`` does); False where ``generate`` counts positions from the cache instead (Idefics3, InternVL).
    """

    family = ""
    model_class = ""
    mrope = False
    loop_positions = True

    def config(self, text_overrides: dict, vision_overrides: dict):
        raise NotImplementedError

    def tokens_per_image(self, model) -> int:
        raise NotImplementedError

    def image_block(self, model) -> list[int]:
        """The tokens one image becomes in the prompt (image tokens and the family's markers)."""
        return [IMAGE] * self.tokens_per_image(model)

    def image_inputs(self, model, input_ids: torch.Tensor, has_image: list[int], generator) -> dict:
        """The image tensors of a batch whose row ``i`` holds ``has_image[i]`` images (drawn from ``generator``)."""
        raise NotImplementedError

    def row_image_inputs(self, inputs: dict, first: int, count: int, row: int) -> dict:
        """The image tensors of row ``row`` alone, whose images are ``first .. first + count - 1`` of the batch."""
        single = {"pixel_values": inputs["pixel_values"][first : first + count]}
        if "image_sizes" in inputs:
            single["image_sizes"] = inputs["image_sizes"][first : first + count]
        return single

    def token_type_inputs(self, model, input_ids: torch.Tensor) -> dict:
        """Per-token image markers some families take beside ``input_ids``."""
        return {}

    def post_init(self, model):
        """Weights that transformers initialises to zero but a trained model has (so that images matter)."""
        return model


def _llama_text(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def _clip_vision(image_size=32, patch_size=8, **overrides):
    from transformers import CLIPVisionConfig

    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    values.update(overrides)
    return CLIPVisionConfig(**values)


def _small_text(**overrides) -> dict:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.08,
    )  # 0.02 gives near-uniform attention
    values.update(overrides)
    return values


def _mm_token_type_ids(model, input_ids: torch.Tensor) -> dict:
    if "mm_token_type_ids" in inspect.signature(type(model).forward).parameters:  # transformers >= 5
        return {"mm_token_type_ids": (input_ids == IMAGE).int()}
    return {}


def _scale_last_projection(linear, factor: float) -> None:
    """Scale the image projector's last layer: random vision towers of this size give features 10-20x smaller than
    the text embeddings (norm ~0.01 vs ~0.16), and then the image barely changes the output."""
    with torch.no_grad():
        linear.weight.mul_(factor)


def _features_per_image(model, pixel_values, image_sizes) -> int:
    """Image tokens of one any-resolution image: the length of the features the model computes for it."""
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
    features = getattr(features, "pooler_output", features)
    if isinstance(features, (list, tuple)):
        return sum(f.shape[0] for f in features)
    return features.shape[0]


class _Llava(TinyFamily):
    family, model_class = "llava", "LlavaForConditionalGeneration"

    def config(self, text_overrides, vision_overrides):
        import transformers

        return transformers.LlavaConfig(
            vision_config=_clip_vision(**vision_overrides),
            text_config=_llama_text(**text_overrides),
            image_token_index=IMAGE,
            projector_hidden_act="gelu",
        )

    def tokens_per_image(self, model) -> int:
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def image_inputs(self, model, input_ids, has_image, generator) -> dict:
        size = model.config.vision_config.image_size
        return {"pixel_values": torch.randn(sum(has_image), 3, size, size, generator=generator)}


class _LlavaNext(TinyFamily):
    family, model_class = "llava_next", "LlavaNextForConditionalGeneration"

    def config(self, text_overrides, vision_overrides):
        import transformers

        return transformers.LlavaNextConfig(
            vision_config=_clip_vision(**vision_overrides),
            text_config=_llama_text(**text_overrides),
            image_token_index=IMAGE,
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
        )

    def _pixels(self, model, n_images: int):
        size = model.config.vision_config.image_size
        # image_sizes (32, 32) -> best resolution 32x32 -> 1 tile + the base image
        pixel_values = torch.randn(n_images, 2, 3, size, size, generator=torch.Generator().manual_seed(1))
        return pixel_values, torch.tensor([[32, 32]] * n_images)

    def tokens_per_image(self, model) -> int:
        return _features_per_image(model, *self._pixels(model, 1))

    def image_inputs(self, model, input_ids, has_image, generator) -> dict:
        pixel_values, image_sizes = self._pixels(model, sum(has_image))
        return {"pixel_values": pixel_values, "image_sizes": image_sizes}


class _PatchGridFamily(TinyFamily):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4.1V: flattened patches plus ``image_grid_thw``; M-RoPE positions from
    the grid."""

    mrope = True

    def tokens_per_image(self, model) -> int:
        vision = model.config.vision_config
        return (32 // vision.patch_size) ** 2 // vision.spatial_merge_size**2

    def image_block(self, model) -> list[int]:
        return [VISION_START] + [IMAGE] * self.tokens_per_image(model) + [VISION_END]

    def image_inputs(self, model, input_ids, has_image, generator) -> dict:
        vision = model.config.vision_config
        n_images = sum(has_image)
        grid = 32 // vision.patch_size
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return {
            "pixel_values": torch.randn(n_images * grid * grid, patch_dim, generator=generator),
            "image_grid_thw": torch.tensor([[1, grid, grid]] * n_images),
        }

    def row_image_inputs(self, inputs, first, count, row) -> dict:
        patches = inputs["image_grid_thw"].prod(dim=-1)
        start, end = int(patches[:first].sum()), int(patches[: first + count].sum())
        return {
            "pixel_values": inputs["pixel_values"][start:end],
            "image_grid_thw": inputs["image_grid_thw"][first : first + count],
        }

    def token_type_inputs(self, model, input_ids) -> dict:
        return _mm_token_type_ids(model, input_ids)


class _Qwen2VL(_PatchGridFamily):
    family, model_class = "qwen2_vl", "Qwen2VLForConditionalGeneration"

    def text(self, text_overrides: dict) -> dict:
        values = dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=BOS,
            pad_token_id=PAD,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        values.update(text_overrides)
        return values

    def config(self, text_overrides, vision_overrides):
        import transformers

        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=1,
            in_channels=3,
        )
        vision.update(vision_overrides)
        return transformers.Qwen2VLConfig(
            text_config=self.text(text_overrides),
            vision_config=vision,
            image_token_id=IMAGE,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )

    def token_type_inputs(self, model, input_ids) -> dict:
        # only beside image tensors: a prompt without an image has no markers
        return _mm_token_type_ids(model, input_ids) if bool((input_ids == IMAGE).any()) else {}


class _Qwen2_5VL(_Qwen2VL):
    family, model_class = "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"

    def config(self, text_overrides, vision_overrides):
        import transformers

        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            num_heads=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=1,
            in_channels=3,
            window_size=16,
            fullatt_block_indexes=[1],
        )
        vision.update(vision_overrides)
        return transformers.Qwen2_5_VLConfig(
            text_config=self.text(text_overrides),
            vision_config=vision,
            image_token_id=IMAGE,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )


class _Idefics3(TinyFamily):
    family, model_class = "idefics3", "Idefics3ForConditionalGeneration"
    loop_positions = False  # Idefics3's generate counts positions from the cache

    def config(self, text_overrides, vision_overrides):
        import transformers

        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        vision.update(vision_overrides)
        return transformers.Idefics3Config(
            vision_config=transformers.Idefics3VisionConfig(**vision).to_dict(),
            text_config=_llama_text(**text_overrides).to_dict(),
            image_token_id=IMAGE,
            scale_factor=2,
        )

    def tokens_per_image(self, model) -> int:
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor**2

    def image_block(self, model) -> list[int]:
        return [FAKE] + [IMAGE] * self.tokens_per_image(model) + [FAKE]

    def image_inputs(self, model, input_ids, has_image, generator) -> dict:
        # one image slot per image of the longest row, all-zero slots where a row has fewer (the model skips them)
        size = model.config.vision_config.image_size
        slots = max(has_image)
        pixel_values = torch.zeros(len(has_image), slots, 3, size, size)
        for row, count in enumerate(has_image):
            for slot in range(count):
                pixel_values[row, slot] = torch.randn(3, size, size, generator=generator)
        return {
            "pixel_values": pixel_values,
            "pixel_attention_mask": torch.ones(len(has_image), slots, size, size, dtype=torch.bool),
        }

    def row_image_inputs(self, inputs, first, count, row) -> dict:
        return {
            "pixel_values": inputs["pixel_values"][row : row + 1, :count],
            "pixel_attention_mask": inputs["pixel_attention_mask"][row : row + 1, :count],
        }


class _Qwen3VL(_PatchGridFamily):
    family, model_class = "qwen3_vl", "Qwen3VLForConditionalGeneration"

    def text(self, text_overrides: dict) -> dict:
        # interleaved M-RoPE over (t, h, w): the sections sum to head_dim / 2
        rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
        if _V5:
            return _small_text(rope_parameters={**rope, "rope_theta": 10000.0}, **text_overrides)
        return _small_text(rope_scaling=rope, rope_theta=10000.0, **text_overrides)

    def vision(self, vision_overrides: dict) -> dict:
        values = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            in_channels=3,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=1,
            out_hidden_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        )
        values.update(vision_overrides)
        return values

    def config(self, text_overrides, vision_overrides):
        import transformers

        return transformers.Qwen3VLConfig(
            text_config=self.text(text_overrides),
            vision_config=self.vision(vision_overrides),
            image_token_id=IMAGE,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )


class _Qwen3VLMoe(_Qwen3VL):
    family, model_class = "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"

    def config(self, text_overrides, vision_overrides):
        import transformers

        # every text layer sparse (4 experts, 2 per token) except layer 0, which keeps a dense MLP
        text = self.text(
            dict(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                decoder_sparse_step=1,
                mlp_only_layers=[0],
                **text_overrides,
            )
        )
        return transformers.Qwen3VLMoeConfig(
            text_config=text,
            vision_config=self.vision(vision_overrides),
            image_token_id=IMAGE,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )


class _Glm4v(_PatchGridFamily):
    family, model_class = "glm4v", "Glm4vForConditionalGeneration"

    def post_init(self, model):
        _scale_last_projection(model.model.visual.merger.down_proj, 20.0)
        return model

    def config(self, text_overrides, vision_overrides):
        import transformers

        rope = {"rope_type": "default", "mrope_section": [2, 1, 1]}
        if _V5:
            text = _small_text(
                rope_parameters={**rope, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, **text_overrides
            )
        else:
            text = _small_text(rope_scaling=rope, rope_theta=10000.0, partial_rotary_factor=0.5, **text_overrides)
        text.pop("head_dim")
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            in_channels=3,
            image_size=32,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=1,
            out_hidden_size=64,
        )
        vision.update(vision_overrides)
        return transformers.Glm4vConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE,
            image_start_token_id=VISION_START,
            image_end_token_id=VISION_END,
        )


class _Gemma3(TinyFamily):
    family, model_class = "gemma3", "Gemma3ForConditionalGeneration"
    # local (sliding-window) and global layers alternate; the window (6) is shorter than the prompts, so the local
    # layers really are local, in the prefill and in their sliding cache while decoding
    LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

    def config(self, text_overrides, vision_overrides):
        import transformers

        text = (
            _small_text(
                query_pre_attn_scalar=16,
                sliding_window=6,
                layer_types=self.LAYER_TYPES,
                rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                },
            )
            if _V5
            else _small_text(query_pre_attn_scalar=16, sliding_window=6, layer_types=self.LAYER_TYPES)
        )
        text.update(text_overrides)
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        vision.update(vision_overrides)
        return transformers.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=IMAGE,
            boi_token_index=VISION_START,
            eoi_token_index=VISION_END,
        )

    def tokens_per_image(self, model) -> int:
        return model.config.mm_tokens_per_image

    def image_block(self, model) -> list[int]:
        return [VISION_START] + [IMAGE] * self.tokens_per_image(model) + [VISION_END]

    def image_inputs(self, model, input_ids, has_image, generator) -> dict:
        size = model.config.vision_config.image_size
        return {"pixel_values": torch.randn(sum(has_image), 3, size, size, generator=generator)}

    def post_init(self, model):
        # transformers initialises the image projection to zeros, which would make every image invisible; text
        # embeddings are scaled by sqrt(hidden), so the projected image features get a comparable size
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.03)
        return model

    def token_type_inputs(self, model, input_ids) -> dict:
        # the processor's token_type_ids: 1 on image tokens (bidirectional attention inside each image in the prefill)
        return {"token_type_ids": (input_ids == IMAGE).long()}


class _LlavaOnevision(TinyFamily):
    family, model_class = "llava_onevision", "LlavaOnevisionForConditionalGeneration"

    def config(self, text_overrides, vision_overrides):
        import transformers

        text = _small_text(**text_overrides)
        text.pop("head_dim")
        return transformers.LlavaOnevisionConfig(
            vision_config=_clip_vision(**vision_overrides),
            text_config=transformers.Qwen2Config(**text),
            image_token_index=IMAGE,
            vision_feature_select_strategy="default",
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
            vision_aspect_ratio="anyres_max_9",
        )

    def _pixels(self, model, n_images: int):
        size = model.config.vision_config.image_size
        # image_sizes (32, 64) -> best resolution 32x64: the base image and 2 tiles, unpadded, a newline per row
        pixel_values = torch.randn(n_images, 3, 3, size, size, generator=torch.Generator().manual_seed(1))
        return pixel_values, torch.tensor([[32, 64]] * n_images)

    def tokens_per_image(self, model) -> int:
        return _features_per_image(model, *self._pixels(model, 1))

    def image_inputs(self, model, input_ids, has_image, generator) -> dict:
        pixel_values, image_sizes = self._pixels(model, sum(has_image))
        return {"pixel_values": pixel_values, "image_sizes": image_sizes}


class _InternVL(TinyFamily):
    family, model_class = "internvl", "InternVLForConditionalGeneration"
    loop_positions = False  # InternVL's generate counts positions from the cache
    TILES = 2  # one tile plus the thumbnail per image, all inside one <img> ... </img> block

    def config(self, text_overrides, vision_overrides):
        import transformers

        text = _small_text(**text_overrides)
        text.pop("head_dim")
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=[32, 32],
            patch_size=[8, 8],
        )
        vision.update(vision_overrides)
        return transformers.InternVLConfig(
            vision_config=vision,
            text_config=transformers.Qwen2Config(**text).to_dict(),
            image_token_id=IMAGE,
            image_seq_length=4,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )

    def tokens_per_image(self, model) -> int:
        return self.TILES * model.config.image_seq_length

    def image_block(self, model) -> list[int]:
        return [MARKER_TOKENS["<img>"]] + [IMAGE] * self.tokens_per_image(model) + [MARKER_TOKENS["</img>"]]

    def image_inputs(self, model, input_ids, has_image, generator) -> dict:
        return {"pixel_values": torch.randn(sum(has_image) * self.TILES, 3, 32, 32, generator=generator)}

    def row_image_inputs(self, inputs, first, count, row) -> dict:
        return {"pixel_values": inputs["pixel_values"][first * self.TILES : (first + count) * self.TILES]}


class _Mistral3(TinyFamily):
    family, model_class = "mistral3", "Mistral3ForConditionalGeneration"

    def config(self, text_overrides, vision_overrides):
        import transformers

        text = _small_text(sliding_window=None, **text_overrides)
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            head_dim=16,
        )
        vision.update(vision_overrides)
        return transformers.Mistral3Config(
            vision_config=transformers.PixtralVisionConfig(**vision),
            text_config=transformers.MistralConfig(**text),
            image_token_index=IMAGE,
            spatial_merge_size=2,
            tie_word_embeddings=False,
        )

    def post_init(self, model):
        _scale_last_projection(model.model.multi_modal_projector.linear_2, 10.0)
        return model

    def _side(self, model) -> int:
        return 32 // model.config.vision_config.patch_size // model.config.spatial_merge_size

    def tokens_per_image(self, model) -> int:
        return self._side(model) ** 2

    def image_block(self, model) -> list[int]:
        # Pixtral layout: a row of [IMG] tokens, [IMG_BREAK] after each row, [IMG_END] instead of the last break
        side = self._side(model)
        block = []
        for _ in range(side):
            block += [IMAGE] * side + [IMG_BREAK]
        return block[:-1] + [IMG_END]

    def image_inputs(self, model, input_ids, has_image, generator) -> dict:
        n_images = sum(has_image)
        return {
            "pixel_values": torch.randn(n_images, 3, 32, 32, generator=generator),
            "image_sizes": torch.tensor([[32, 32]] * n_images),
        }


FAMILY_REGISTRY: dict[str, TinyFamily] = {
    spec.family: spec
    for spec in (
        _Llava(),
        _LlavaNext(),
        _Qwen2VL(),
        _Qwen2_5VL(),
        _Idefics3(),
        _Qwen3VL(),
        _Qwen3VLMoe(),
        _Gemma3(),
        _LlavaOnevision(),
        _InternVL(),
        _Mistral3(),
        _Glm4v(),
    )
}
"""Every family with a tiny model, by name: the one list the test matrices run over."""
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILY_REGISTRY)
"""The names of :data:`FAMILY_REGISTRY`, in order."""

# Deprecated aliases, kept for one release: use FAMILY_NAMES / FAMILY_REGISTRY.
ALL_FAMILIES = FAMILY_NAMES
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3")
TINY_FAMILIES: dict[str, TinyFamily] = {name: spec for name, spec in FAMILY_REGISTRY.items() if name not in FAMILIES}


def family_spec(family: str) -> TinyFamily:
    """The :class:`TinyFamily` entry of ``family``; ValueError for a family without one."""
    spec = FAMILY_REGISTRY.get(family)
    if spec is None:
        raise ValueError(f"unknown family {family!r}; choose one of {list(FAMILY_NAMES)}")
    return spec


def family_available(family: str) -> str | None:
    """None when this transformers version has the family's model class, else the reason it has not."""
    import transformers

    spec = FAMILY_REGISTRY.get(family)
    if spec is None or hasattr(transformers, spec.model_class):
        return None
    return f"transformers {transformers.__version__} has no {spec.model_class}"


def tiny_model(
    family: str,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    text_overrides: dict | None = None,
    vision_overrides: dict | None = None,
    dtype=torch.float32,
):
    """A random-weight model of ``family`` in eval mode.

    Args:
        family: one of :data:`FAMILY_NAMES`.
        seed: weight seed.
        attn_implementation: for the whole model ("sdpa" or "eager").
        text_overrides / vision_overrides: config fields to change (e.g. ``num_hidden_layers``).
    """
    import transformers

    spec = family_spec(family)
    torch.manual_seed(seed)
    reason = family_available(family)
    if reason:
        raise ValueError(f"cannot build a tiny {family} model: {reason}")
    config = spec.config(dict(text_overrides or {}), dict(vision_overrides or {}))
    config._attn_implementation = attn_implementation
    model = spec.post_init(getattr(transformers, spec.model_class)(config)).to(dtype).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # never stop early: comparisons see every token
    return model


def image_token_count(model, family: str) -> int:
    """Image tokens per image for the tiny models' default image (32x32)."""
    return family_spec(family).tokens_per_image(model)


def _interleave(text: list[int], block: list[int], n_images: int) -> list[int]:
    """``text`` split into ``n_images + 1`` parts (the first a third of it for one image) with ``block`` between them."""
    if n_images == 0:
        return list(text)
    cut = max(1, len(text) // 3) if n_images == 1 else None
    cuts = (
        [cut] if cut is not None else [max(1, len(text) * (index + 1) // (n_images + 1)) for index in range(n_images)]
    )
    sequence, start = [], 0
    for end in cuts:
        sequence += text[start:end] + block
        start = end
    return sequence + text[start:]


def split_row(model, inputs: dict, row: int) -> dict:
    """Row ``row`` of a left-padded :func:`build_batch` batch as its own unpadded batch of one (its images' tensors and
    per-token markers included)."""
    spec = family_spec(_family_of(model))
    valid = inputs["attention_mask"][row].bool()
    input_ids = inputs["input_ids"][row][valid][None]
    single = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    single.update(spec.token_type_inputs(model, input_ids))
    block = spec.image_block(model)
    images_per_row = [_count_images(ids, block) for ids in inputs["input_ids"]]
    if images_per_row[row]:
        single.update(spec.row_image_inputs(inputs, sum(images_per_row[:row]), images_per_row[row], row))
    return single


def _count_images(ids: torch.Tensor, block: list[int]) -> int:
    """Images in one row: runs of image tokens, counted per image block (a block may hold several runs)."""
    per_block = sum(
        1 for index, token in enumerate(block) if token == IMAGE and (index == 0 or block[index - 1] != IMAGE)
    )
    is_image = ids == IMAGE
    runs = int((is_image[1:] & ~is_image[:-1]).sum()) + int(is_image[0])
    return runs // per_block


def _family_of(model) -> str:
    from vlm_guard.models import get_adapter

    return get_adapter(model).family


def build_batch(model, rows: list[tuple[bool, int]], seed: int = 0) -> dict:
    """A left-padded batch: one row per ``(has_image, n_text_tokens)``: BOS, a few text tokens, the
    image block (if any), then the rest of the text. ``has_image`` may be a count of images: the text is
    split around them (``(2, 9)``: BOS, text, image, text, image, text).

    Returns:
        model inputs (``input_ids``, ``attention_mask`` and the family's image tensors).
    """
    spec = family_spec(_family_of(model))
    generator = torch.Generator().manual_seed(seed)
    block = spec.image_block(model)
    sequences = []
    for has_image, n_text in rows:
        text = torch.randint(*TEXT_IDS, (n_text,), generator=generator).tolist()
        sequences.append([BOS] + _interleave(text, block, int(has_image)))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, sequence in enumerate(sequences):
        input_ids[index, width - len(sequence) :] = torch.tensor(sequence)
        attention_mask[index, width - len(sequence) :] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    inputs.update(spec.token_type_inputs(model, input_ids))
    counts = [int(has_image) for has_image, _ in rows]
    if sum(counts):
        inputs.update(spec.image_inputs(model, input_ids, counts, generator))
    return inputs


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary that names the marker tokens some adapters read from the
    processor's tokenizer (InternVL ``<img>`` / ``</img>``, Pixtral ``[IMG_BREAK]`` / ``[IMG_END]``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named = {"<pad>": PAD, "<s>": BOS, "</s>": 2, "<image>": IMAGE, "<unk>": 3, **MARKER_TOKENS}
    taken = set(named.values())
    vocab = {**{f"w{index}": index for index in range(VOCAB) if index not in taken}, **named}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


TOKENIZER_KINDS = ("sentencepiece", "byte_level_bpe", "word_level", "wordpiece")


def offline_tokenizer(kind: str, corpus: list[str], vocab_size: int = 200):
    """A small fast tokenizer of ``kind`` trained on ``corpus`` with the ``tokenizers`` library (offline).

    Kinds (:data:`TOKENIZER_KINDS`): ``"sentencepiece"`` (Unigram with the ``\u2581`` word-start marker,
    as Llama / Vicuna), ``"byte_level_bpe"`` (BPE with the ``\u0120`` byte-level marker, as GPT-2 / Qwen),
    ``"word_level"`` (whole words, no marker, as the shipped default model), ``"wordpiece"`` (``##``
    continuation pieces, as BERT).

    Returns:
        a ``transformers.PreTrainedTokenizerFast``.

    Example:
        >>> tokenizer = offline_tokenizer("wordpiece", ["describe the image"])
        >>> tokenizer.decode(tokenizer("describe the image")["input_ids"])
        'describe the image'
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<pad>"]
    if kind == "sentencepiece":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="<unk>")
    elif kind == "byte_level_bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    elif kind == "word_level":
        tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
        )
        trainer = trainers.WordLevelTrainer(special_tokens=special)
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {list(TOKENIZER_KINDS)}")
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")


def word_level_tokenizer(corpus: list[str]):
    """:func:`offline_tokenizer` of kind ``"word_level"`` (the shipped default model's kind)."""
    return offline_tokenizer("word_level", corpus)


def greedy_loop(
    model,
    inputs: dict,
    max_new_tokens: int,
    cache=None,
    processors=None,
    pass_mask: bool = True,
    pass_positions: bool = True,
) -> torch.Tensor:
    """A hand-written greedy decoding loop: one prefill call, then one call per new token that extends
    the cache (what a user writes instead of ``generate``). ``model`` may be a guarded wrapper.

    Args:
        model: the model or :class:`vlm_guard.GuardedModel` whose forward is called.
        inputs: the prompt's forward arguments (left padded).
        max_new_tokens: tokens to generate.
        cache: a cache object to fill (e.g. a ``StaticCache``); None lets the model create a dynamic one.
        processors: logits processors applied to each step's scores (``guarded.logits_processor(...)``).
        pass_mask: give each decode call the growing 2-D mask; False lets the model place the token itself
            (M-RoPE models, rows without padding).
        pass_positions: with ``pass_mask``, also give the left-padding-aware positions ``cumsum(mask) - 1``
            (what ``generate`` does for LLaVA; Idefics3's ``generate`` counts positions from the cache).
    Returns:
        ``[B, S + max_new_tokens]`` prompt and generated ids, like ``generate``.
    """
    from vlm_guard.models.compat import cache_kwargs, output_cache

    base = getattr(model, "model", model) if hasattr(model, "engine") else model
    sequence = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(sequence)
    with torch.no_grad():
        extra = cache_kwargs(base, cache) if cache is not None else {}
        output = model(**inputs, use_cache=True, **extra)
        cache = output_cache(output)
        for step in range(max_new_tokens):
            scores = output.logits[:, -1].float()
            if processors is not None:
                scores = processors(sequence, scores)
            token = scores.argmax(dim=-1, keepdim=True)  # [B, 1]
            sequence = torch.cat([sequence, token], dim=1)
            if step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step_inputs = {"input_ids": token}
            if pass_mask:
                step_inputs["attention_mask"] = mask
                if pass_positions:
                    step_inputs["position_ids"] = mask.long().cumsum(-1)[:, -1:] - 1
            output = model(**step_inputs, use_cache=True, **cache_kwargs(base, cache))
    return sequence


# ------------------------------------------------------------------------------ float comparisons on any CPU
ROUNDING_SAFETY = 16.0
"""Safety factor of :func:`rounding_tolerance` over the expected rounding (another CPU's vector width, a thread count
or a chunking that sums in another order moves a float32 result by a few ``eps * sqrt(n)``; 16 covers them with room,
and stays far below any method's effect)."""


def forward_reduction(model) -> int:
    """How many terms a forward pass of ``model`` sums into one output value, for :func:`rounding_tolerance`: the text
    model's hidden size times its decoder layers plus one (each layer's projections sum over the hidden size and add to
    the residual stream).

    Example:
        >>> forward_reduction(tiny_model("llava"))  # hidden size 64, 4 layers
        320
    """
    config = getattr(model, "config", model)
    text = getattr(config, "text_config", None) or config
    return int(text.hidden_size) * (int(text.num_hidden_layers) + 1)


def rounding_tolerance(reference, reduction: int = 1, safety: float = ROUNDING_SAFETY, dtype=None) -> float:
    """An absolute tolerance for two computations of the same values that differ only in rounding (summation order,
    kernels, chunking, threads, another CPU): ``safety * eps(dtype) * magnitude * sqrt(reduction)``.

    Args:
        reference: the expected values; ``magnitude`` is their largest finite absolute value, at least 1 (values near 0
            carry the rounding of the larger terms they come from; attention weights and normalised scores are <= 1).
        reduction: terms summed into each value along the computation (keys x head dim, a model's
            :func:`forward_reduction`, ...).
        safety: factor over the expected rounding (:data:`ROUNDING_SAFETY`).
        dtype: whose ``eps`` (default: the reference's floating dtype, float32 for other tensors).

    Example:
        >>> round(rounding_tolerance(torch.tensor([0.5, -4.0]), reduction=100), 9)  # 16 * 1.19e-7 * 4 * 10
        7.6294e-05
    """
    values = torch.as_tensor(reference)
    if dtype is None:
        dtype = values.dtype if values.is_floating_point() else torch.float32
    values = values.detach().double()
    finite = values[torch.isfinite(values)]
    magnitude = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return float(safety * torch.finfo(dtype).eps * magnitude * max(1, int(reduction)) ** 0.5)


def assert_close_scaled(actual, expected, reduction: int = 1, safety: float = ROUNDING_SAFETY, msg=None) -> None:
    """``torch.testing.assert_close`` with ``atol = rounding_tolerance(expected, reduction, safety)`` and ``rtol = 0``,
    in the lower precision of the two (a float64 reference is compared at the other's ``eps``); infinities and NaNs
    must match exactly.

    Example:
        >>> assert_close_scaled(torch.tensor([1.0 + 1e-6]), torch.tensor([1.0]), reduction=4)
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    dtype = actual.dtype if actual.is_floating_point() else torch.float32
    if expected.is_floating_point() and torch.finfo(expected.dtype).eps > torch.finfo(dtype).eps:
        dtype = expected.dtype
    atol = rounding_tolerance(expected, reduction, safety, dtype)
    torch.testing.assert_close(
        actual.to(expected.dtype) if actual.dtype != expected.dtype else actual,
        expected,
        atol=atol,
        rtol=0.0,
        equal_nan=True,
        msg=msg,
    )
