"""Build the toy LLaVA: word-level tokenizer, CLIP image processor, LlavaProcessor and model configs.

The toy model is an ordinary ``LlavaForConditionalGeneration`` (CLIP vision tower, two-layer
MLP projector, Llama decoder) built from configs, so every code path that works on it works on
real LLaVA checkpoints. The tokenizer is a word-level ``tokenizers`` model wrapped as
``PreTrainedTokenizerFast`` that always prepends BOS ``<s>``; ``<image>`` is an added special
token that ``LlavaProcessor`` expands to ``(image_size / patch_size) ** 2`` image tokens.

Example:
    >>> processor = build_processor()
    >>> model = build_model(ToyModelSpec(), processor.tokenizer)
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> prompt
    'USER: <image> describe the image ASSISTANT:'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vlm_guard.synthetic.world import IMAGE_SIZE, vocabulary

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}

# LLaVA-1.5 style: "USER: <image>\n{question} ASSISTANT: {answer}</s>"; BOS comes from the tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

CAPTION_PROMPT = "describe the image"


@dataclass
class ToyModelSpec:
    """Sizes of the toy LLaVA (defaults: about 3.5M parameters)."""

    image_size: int = field(default=IMAGE_SIZE, metadata={"help": "input image side in pixels"})
    patch_size: int = field(default=8, metadata={"help": "vision patch side; image tokens = (image/patch)^2"})
    vision_hidden: int = field(default=128, metadata={"help": "CLIP vision width"})
    vision_layers: int = field(default=4, metadata={"help": "CLIP vision depth"})
    vision_heads: int = field(default=4, metadata={"help": "CLIP vision heads"})
    text_hidden: int = field(default=192, metadata={"help": "Llama width"})
    text_layers: int = field(default=6, metadata={"help": "Llama depth"})
    text_heads: int = field(default=6, metadata={"help": "Llama attention heads"})
    text_intermediate: int = field(default=512, metadata={"help": "Llama MLP width"})
    max_positions: int = field(default=256, metadata={"help": "Llama max sequence length"})

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        for name in ("vision", "text"):
            hidden, heads = getattr(self, f"{name}_hidden"), getattr(self, f"{name}_heads")
            if hidden % heads:
                raise ValueError(f"{name}_hidden {hidden} must be divisible by {name}_heads {heads}")

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer():
    """Word-level fast tokenizer over the world's vocabulary, lower-casing, BOS prepended."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos", "image")]
    words = specials + [w for w in vocabulary() if w not in specials]
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    bos = SPECIAL_TOKENS["bos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, vocab[bos])]
    )
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        extra_special_tokens={"image_token": SPECIAL_TOKENS["image"]},
        padding_side="left",
        model_max_length=256,
        model_input_names=["input_ids", "attention_mask"],
    )
    return tokenizer


def build_processor(spec: ToyModelSpec | None = None):
    """``LlavaProcessor`` with the toy tokenizer, a CLIP image processor and the chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    spec = spec or ToyModelSpec()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        resample=0,  # nearest: a 4x upscaled example PNG maps back to the exact training pixels
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=SPECIAL_TOKENS["image"],
        num_additional_image_tokens=1,
    )


def build_config(spec: ToyModelSpec, tokenizer):
    """``LlavaConfig`` for ``spec`` (vision features from the last CLIP layer, CLS dropped)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab_size = len(tokenizer)
    vocab_size = (vocab_size + 15) // 16 * 16
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
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=spec.num_image_tokens,
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_model(spec: ToyModelSpec, tokenizer, seed: int = 0):
    """A freshly initialised ``LlavaForConditionalGeneration`` (deterministic for ``seed``)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    config = build_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
