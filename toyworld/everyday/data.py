"""Training batches for default model v2, built deterministically from scene indices.

* ``cell_targets``: per-cell type/colour labels (vision-tower pretraining, no LM);
* ``BatchBuilder.chat_batch``: image + prompt + answer rows (plain captions, detail captions, yes/no
  questions in POPE's wording), loss on the answer and its ``<|im_end|>`` only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from toyworld.shapes.data import IGNORE_INDEX, pad_sequences
from vlm_guard.synthetic.everyday.model import IMAGE_TOKEN
from vlm_guard.synthetic.everyday.world import (
    CAPTION_PROMPTS,
    COLOURS,
    DETAIL_PROMPTS,
    GRID,
    OBJECT_TYPES,
    Scene,
    answer,
    caption,
    detailed_caption,
    question_text,
    render,
)

ROW_KINDS = ("caption", "detail", "question")


def user_messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    labels: torch.Tensor  # [batch, seq], IGNORE_INDEX outside the answers
    pixel_values: torch.Tensor  # [batch, 3, H, W]

    def as_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": self.pixel_values}


class BatchBuilder:
    """Scenes -> tensors with the processor's chat template and ``<image>`` expansion (right padding)."""

    def __init__(self, processor, num_image_tokens: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.num_image_tokens = num_image_tokens
        self._cache: dict[str, list[int]] = {}

    def prompt_ids(self, text: str) -> list[int]:
        """Generation prompt for ``text`` with one image, ``<image>`` expanded as ``LlavaProcessor`` does."""
        if text not in self._cache:
            chat = self.processor.apply_chat_template(user_messages(text), add_generation_prompt=True)
            ids: list[int] = []
            for token in self.tokenizer(chat, add_special_tokens=False).input_ids:
                ids.extend([token] * self.num_image_tokens if token == self.image_token_id else [token])
            self._cache[text] = ids
        return self._cache[text]

    def answer_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.end_id]

    def pixel_values(self, scenes: list[Scene]) -> torch.Tensor:
        """``[batch, 3, H, W]`` exactly as the processor's image processor gives them for rendered scenes
        (no resize or crop is needed at the native size: only ``(x / 255 - mean) / std``), computed directly
        because the image processor costs more than the vision tower here."""
        image_processor = self.processor.image_processor
        size = image_processor.crop_size["height"]
        images = [render(scene, size) for scene in scenes]
        pixels = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) for image in images]))  # [B, H, W, 3]
        pixels = pixels.permute(0, 3, 1, 2) / 255.0  # [batch, 3, H, W]
        mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def row(self, scene: Scene, kind: str, rng: random.Random) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of one row of ``kind`` in ROW_KINDS."""
        if kind == "caption":
            return self.prompt_ids(rng.choice(CAPTION_PROMPTS)), self.answer_ids(caption(scene))
        if kind == "detail":
            return self.prompt_ids(rng.choice(DETAIL_PROMPTS)), self.answer_ids(detailed_caption(scene))
        if kind == "question":
            present = sorted(scene.types)
            absent = [t for t in OBJECT_TYPES if t not in scene.types]
            object_type = rng.choice(present) if present and rng.random() < 0.5 else rng.choice(absent)
            return self.prompt_ids(question_text(object_type)), self.answer_ids(answer(scene, object_type))
        raise ValueError(f"unknown row kind {kind!r}; expected one of {ROW_KINDS}")

    def chat_batch(self, scenes: list[Scene], mixture: dict[str, float], seed: int) -> Batch:
        """One row per scene; the row kind is drawn from ``mixture`` (weights over ROW_KINDS)."""
        rng = random.Random(seed)
        kinds, weights = zip(*[(k, w) for k, w in mixture.items() if w > 0])
        sequences, starts = [], []
        for scene in scenes:
            prompt, reply = self.row(scene, rng.choices(kinds, weights)[0], rng)
            sequences.append(prompt + reply)
            starts.append(len(prompt))
        input_ids, mask, labels = pad_sequences(sequences, starts, self.tokenizer.pad_token_id)
        return Batch(input_ids, mask, labels, self.pixel_values(scenes))


def cell_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Per-cell targets, each ``[batch, GRID*GRID]``: type (0 = empty) and colour (IGNORE_INDEX if empty)."""
    colours = list(COLOURS)
    shape = (len(scenes), GRID * GRID)
    types = torch.zeros(shape, dtype=torch.long)
    colour = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            cell = obj.row * GRID + obj.col
            types[row, cell] = OBJECT_TYPES.index(obj.type) + 1
            colour[row, cell] = colours.index(obj.colour)
    return {"type": types, "colour": colour}
