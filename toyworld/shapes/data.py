"""Training batches for the toy LLaVA, built deterministically from scene indices.

Three kinds of batch, one per training stage:
  * ``vision_batch``: images + per-cell labels (type, colour, size) for vision-tower pretraining;
  * ``text_batch``: chat-formatted captions without any image (language-model pretraining);
  * ``multimodal_batch``: image + prompt + answer (captions and yes/no questions), loss on the answer only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from vlm_guard.synthetic.model import CAPTION_PROMPT, SPECIAL_TOKENS
from vlm_guard.synthetic.world import COLOURS, GRID, OBJECT_TYPES, SIZES, Scene, caption, question_text, render

IGNORE_INDEX = -100


def pad_sequences(
    sequences: list[list[int]], label_starts: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token sequences into ``(input_ids, attention_mask, labels)``; labels before ``label_starts[i]``
    (and on padding) are IGNORE_INDEX."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (seq, start) in enumerate(zip(sequences, label_starts)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, start : len(seq)] = torch.tensor(seq[start:])
    return input_ids, mask, labels


def caption_messages(with_image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": CAPTION_PROMPT}]
    return [{"role": "user", "content": content}]


def question_messages(object_type: str, with_image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question_text(object_type)}]
    return [{"role": "user", "content": content}]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    labels: torch.Tensor  # [batch, seq], IGNORE_INDEX outside the supervised span
    pixel_values: torch.Tensor | None = None  # [batch, 3, H, W]

    def as_kwargs(self) -> dict:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
        return kwargs


class BatchBuilder:
    """Turns scenes into tensors with the processor's own chat template and image-token expansion."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"])
        self.num_image_tokens = processor.num_image_tokens if hasattr(processor, "num_image_tokens") else None
        self._prompt_cache: dict[str, list[int]] = {}

    def prompt_ids(self, messages: list[dict], num_image_tokens: int) -> list[int]:
        """Token ids of the generation prompt, ``<image>`` expanded as ``LlavaProcessor`` does."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        key = f"{num_image_tokens}|{text}"
        if key not in self._prompt_cache:
            ids = self.tokenizer(text).input_ids
            expanded: list[int] = []
            for token in ids:
                expanded.extend([token] * num_image_tokens if token == self.image_token_id else [token])
            self._prompt_cache[key] = expanded
        return self._prompt_cache[key]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

    def pixel_values(self, scenes: list[Scene], image_size: int) -> torch.Tensor:
        images = [render(scene, image_size) for scene in scenes]
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"]

    def _pad(self, sequences: list[list[int]], label_starts: list[int]) -> Batch:
        return Batch(*pad_sequences(sequences, label_starts, self.tokenizer.pad_token_id))

    def text_batch(self, scenes: list[Scene], turns: int = 1) -> Batch:
        """Captions in chat format without an image, ``turns`` chat turns per sequence (one BOS at the
        start, as in packed LM pretraining); loss on every token after BOS. Rows = len(scenes) // turns."""
        if turns < 1 or len(scenes) % turns:
            raise ValueError(f"turns must be >= 1 and divide the {len(scenes)} scenes, got {turns}")
        prompt = self.prompt_ids(caption_messages(with_image=False), 0)
        sequences = []
        for start in range(0, len(scenes), turns):
            sequence: list[int] = []
            for turn, scene in enumerate(scenes[start : start + turns]):
                sequence += (prompt if turn == 0 else prompt[1:]) + self.answer_ids(caption(scene))
            sequences.append(sequence)
        return self._pad(sequences, [1] * len(sequences))

    def multimodal_batch(
        self, scenes: list[Scene], image_size: int, num_image_tokens: int, question_fraction: float, seed: int
    ) -> Batch:
        """Image + prompt + answer; a ``question_fraction`` of rows are yes/no questions (half yes, half no)."""
        rng = random.Random(seed)
        sequences, starts = [], []
        for scene in scenes:
            if rng.random() < question_fraction:
                present = sorted(scene.types)
                absent = [t for t in OBJECT_TYPES if t not in scene.types]
                if present and (not absent or rng.random() < 0.5):
                    object_type, answer = rng.choice(present), "yes"
                else:
                    object_type, answer = rng.choice(absent), "no"
                prompt = self.prompt_ids(question_messages(object_type), num_image_tokens)
            else:
                prompt, answer = self.prompt_ids(caption_messages(), num_image_tokens), caption(scene)
            sequences.append(prompt + self.answer_ids(answer))
            starts.append(len(prompt))
        batch = self._pad(sequences, starts)
        batch.pixel_values = self.pixel_values(scenes, image_size)
        return batch


def cell_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Per-cell targets, each ``[batch, GRID*GRID]``: type (0 = empty cell), colour and size (-100 if empty)."""
    colours, sizes = list(COLOURS), list(SIZES)
    shape = (len(scenes), GRID * GRID)
    types = torch.zeros(shape, dtype=torch.long)
    colour = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    size = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            cell = obj.row * GRID + obj.col
            types[row, cell] = OBJECT_TYPES.index(obj.type) + 1
            colour[row, cell] = colours.index(obj.colour)
            size[row, cell] = sizes.index(obj.size)
    return {"type": types, "colour": colour, "size": size}
