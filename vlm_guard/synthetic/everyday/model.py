"""Assemble default model v2: a LLaVA-1.5-style ``LlavaForConditionalGeneration`` with the project's own
small CLIP vision tower and MLP projector in front of the pretrained SmolLM2-135M-Instruct.

* Tokenizer: SmolLM2's, plus one added special token ``<image>`` (the embedding matrix grows by one row,
  initialised to the mean embedding; the LM is otherwise untouched).
* Chat template: SmolLM2's ChatML (``<|im_start|>user ... <|im_end|>``) without its default system turn, so
  prompts stay short; the first token ``<|im_start|>`` carries the LM's massive activation (the sink).
* Image: 128x128 pixels, 32-pixel patches -> 16 image tokens (one per cell of the world's 4x4 grid).
* Light adaptation: low-rank adapters (``LoRALinear``) on the attention projections, trained with the
  projector and merged into the weights at export, so the shipped model is a plain LLaVA.

Example (not run: loads the SmolLM2-135M language model)::

    lm, lm_tokenizer = load_language_model()
    processor = build_processor(lm_tokenizer)
    model = build_model(V2Spec(), lm, processor.tokenizer)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vlm_guard.synthetic.everyday.world import IMAGE_SIZE

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class V2Spec:
    """Sizes of the v2 vision side and adapters (the LM is fixed: SmolLM2-135M-Instruct)."""

    image_size: int = field(default=IMAGE_SIZE, metadata={"help": "input image side in pixels"})
    patch_size: int = field(default=32, metadata={"help": "vision patch side; image tokens = (image/patch)^2"})
    vision_hidden: int = field(default=192, metadata={"help": "CLIP vision width"})
    vision_layers: int = field(default=3, metadata={"help": "CLIP vision depth"})
    vision_heads: int = field(default=4, metadata={"help": "CLIP vision heads"})
    lora_rank: int = field(default=8, metadata={"help": "rank of the LM adapters (0 = frozen LM)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "adapter scale numerator (scale = alpha / rank)"})
    lora_targets: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={"help": "adapted projections"})

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(
                f"vision_hidden {self.vision_hidden} must be divisible by vision_heads {self.vision_heads}"
            )
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        self.lora_targets = tuple(self.lora_targets)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with ``base`` frozen; B starts at zero so the wrapped model is unchanged.

    Args:
        base: the frozen ``nn.Linear``.
        rank: adapter rank r; ``scale = alpha / r``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """``W + scale * B @ A``: the weight of an equivalent plain Linear. [out, in]"""
        return self.base.weight + self.scale * (self.lora_b @ self.lora_a)


def add_lora(model, spec: V2Spec) -> dict[str, LoRALinear]:
    """Wrap ``spec.lora_targets`` of every text layer in ``LoRALinear``; returns ``{module path: adapter}``."""
    adapters: dict[str, LoRALinear] = {}
    if spec.lora_rank == 0:
        return adapters
    for index, layer in enumerate(model.model.language_model.layers):
        for target in spec.lora_targets:
            base = getattr(layer.self_attn, target)
            if isinstance(base, LoRALinear):
                raise ValueError(f"layer {index} {target} already has an adapter")
            adapter = LoRALinear(base, spec.lora_rank, spec.lora_alpha)
            setattr(layer.self_attn, target, adapter)
            adapters[f"model.language_model.layers.{index}.self_attn.{target}"] = adapter
    return adapters


def merge_lora(model) -> int:
    """Replace every ``LoRALinear`` by a plain ``nn.Linear`` holding the merged weight; returns the count."""
    count = 0
    for layer in model.model.language_model.layers:
        for name, child in list(layer.self_attn.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight.copy_(child.merged_weight())
                setattr(layer.self_attn, name, child.base)
                count += 1
    return count


def build_processor(lm_tokenizer, spec: V2Spec | None = None):
    """``LlavaProcessor``: SmolLM2's tokenizer + ``<image>``, a CLIP image processor, the short ChatML template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    spec = spec or V2Spec()
    tokenizer = lm_tokenizer
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids (transformers 4.57)
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        resample=0,  # nearest: upscaled example PNGs map back to the exact training pixels
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_config(spec: V2Spec, lm_config, tokenizer):
    """``LlavaConfig``: tiny CLIP vision tower + the LM's own config (vocabulary grown by ``<image>``)."""
    from transformers import CLIPVisionConfig, LlavaConfig

    text = lm_config.__class__.from_dict(lm_config.to_dict())
    text.vocab_size = len(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        hidden_act="gelu",
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=spec.num_image_tokens,
        projector_hidden_act="gelu",
        tie_word_embeddings=text.tie_word_embeddings,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_model(spec: V2Spec, lm, tokenizer, seed: int = 0):
    """A ``LlavaForConditionalGeneration`` whose text model holds ``lm``'s weights (vision + projector fresh,
    deterministic for ``seed``). The ``<image>`` row of the embeddings is the mean of the LM's rows."""
    from transformers import LlavaForConditionalGeneration

    config = build_config(spec, lm.config, tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    lm_state = lm.state_dict()
    embed = lm_state["model.embed_tokens.weight"]  # [vocab, hidden]
    grown = torch.cat([embed, embed.mean(0, keepdim=True).expand(config.text_config.vocab_size - embed.shape[0], -1)])
    text_state = {k[len("model.") :]: v for k, v in lm_state.items() if k.startswith("model.")}
    text_state["embed_tokens.weight"] = grown
    missing, unexpected = model.model.language_model.load_state_dict(text_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"LM weights do not fit the text model: missing {missing}, unexpected {unexpected}")
    if config.text_config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    else:
        model.lm_head.weight.data.copy_(torch.cat([lm_state["lm_head.weight"], grown[embed.shape[0] :]]))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.bos_token_id = None
    return model
