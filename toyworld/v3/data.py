"""Training batches of default model v3, each a pure function of the scenes and a seed.

* ``patch_targets``: per-patch type / colour / size / brightness labels of independent scenes (vision-tower
  pretraining; each object labels the patches of its grid cell);
* ``V3BatchBuilder.kind_batch``: image + prompt + answer rows of one kind per batch (plain captions, long
  detail descriptions, POPE-worded yes/no questions), loss on the answer and its ``<|im_end|>`` only.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from toyworld.everyday.data import Batch, BatchBuilder
from toyworld.shapes.data import IGNORE_INDEX, pad_sequences
from vlm_guard.synthetic.everyday_v3.world import (
    CAPTION_PROMPTS,
    COLOURS,
    DETAIL_PROMPTS,
    GRID,
    OBJECT_TYPES,
    Scene,
    answer,
    brightness_word,
    caption,
    long_description,
    question_text,
    render,
    size_word,
)

ROW_KINDS = ("caption", "detail", "question")
SIZES = ("small", "medium-sized", "large")
BRIGHTNESS = ("barely visible", "faint", "bright")

__all__ = ["BRIGHTNESS", "IGNORE_INDEX", "ROW_KINDS", "SIZES", "Batch", "V3BatchBuilder", "patch_targets"]


class V3BatchBuilder(BatchBuilder):
    """Scenes -> tensors with the processor's chat template, ``<image>`` expanded to ``num_image_tokens``."""

    def __init__(self, processor, num_image_tokens: int, cell: int):
        super().__init__(processor, num_image_tokens)
        self.cell = cell

    def pixel_values(self, scenes: list[Scene]) -> torch.Tensor:
        """``[batch, 3, H, W]`` as the processor's image processor gives them for ``render(scene, cell)``."""
        image_processor = self.processor.image_processor
        images = [np.asarray(render(scene, self.cell), dtype=np.float32) for scene in scenes]
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 255.0  # [batch, 3, H, W]
        mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def row(self, scene: Scene, kind: str, rng: random.Random) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of one row of ``kind`` in ROW_KINDS."""
        if kind == "caption":
            return self.prompt_ids(rng.choice(CAPTION_PROMPTS)), self.answer_ids(caption(scene))
        if kind == "detail":
            return self.prompt_ids(rng.choice(DETAIL_PROMPTS)), self.answer_ids(long_description(scene))
        if kind == "question":
            present = sorted(scene.types)
            absent = [t for t in OBJECT_TYPES if t not in scene.types]
            object_type = rng.choice(present) if present and rng.random() < 0.5 else rng.choice(absent)
            return self.prompt_ids(question_text(object_type)), self.answer_ids(answer(scene, object_type))
        raise ValueError(f"unknown row kind {kind!r}; expected one of {ROW_KINDS}")

    def kind_batch(self, scenes: list[Scene], mixture: dict[str, float], seed: int) -> Batch:
        """One row per scene, every row of one kind drawn from ``mixture`` by ``seed`` (rows of one kind have
        similar lengths: little padding, so a batch of questions costs a third of a batch of descriptions)."""
        rng = random.Random(seed)
        kinds, weights = zip(*[(k, w) for k, w in mixture.items() if w > 0])
        kind = rng.choices(kinds, weights)[0]
        sequences, starts = [], []
        for scene in scenes:
            prompt, reply = self.row(scene, kind, rng)
            sequences.append(prompt + reply)
            starts.append(len(prompt))
        input_ids, mask, labels = pad_sequences(sequences, starts, self.tokenizer.pad_token_id)
        return Batch(input_ids, mask, labels, self.pixel_values(scenes))


def patch_targets(scenes: list[Scene], patches_per_cell: int) -> dict[str, torch.Tensor]:
    """Per-patch targets, each ``[batch, (GRID * patches_per_cell) ** 2]`` in the vision tower's row-major
    patch order: ``type`` (0 = empty), and ``colour`` / ``size`` / ``brightness`` (IGNORE_INDEX if empty)."""
    side = GRID * patches_per_cell
    colours = list(COLOURS)
    shape = (len(scenes), side, side)
    targets = {"type": torch.zeros(shape, dtype=torch.long)}
    for name in ("colour", "size", "brightness"):
        targets[name] = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            rows = slice(obj.row * patches_per_cell, (obj.row + 1) * patches_per_cell)
            cols = slice(obj.col * patches_per_cell, (obj.col + 1) * patches_per_cell)
            targets["type"][row, rows, cols] = OBJECT_TYPES.index(obj.type) + 1
            targets["colour"][row, rows, cols] = colours.index(obj.colour)
            targets["size"][row, rows, cols] = SIZES.index(size_word(obj))
            targets["brightness"][row, rows, cols] = BRIGHTNESS.index(brightness_word(obj))
    return {name: value.flatten(1) for name, value in targets.items()}
