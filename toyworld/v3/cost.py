"""Measure one v3 training step's cost per row kind and image size (run from the repository root):

    python -m toyworld.v3.cost --image-sizes 128 192 --batch 8

For each image size (128 px -> 64 image tokens, 192 px -> 144) and row kind (detail, caption, question), one
untimed warm-up step, then ``--repeats`` timed steps of the instruct stage (adapter gradients through every LM
layer, batch of biased scenes): wall and CPU seconds (``time.process_time``) per step, and the sequence length.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from toyworld.v3.data import IGNORE_INDEX, V3BatchBuilder
from toyworld.v3.train import V3TrainConfig, build_for_training
from vlm_guard.synthetic.everyday_v3.model import V3Spec
from vlm_guard.synthetic.everyday_v3.world import biased_world


def measure(image_size: int, kinds: list[str], batch: int, repeats: int, lm=None, lm_tokenizer=None) -> list[dict]:
    config = V3TrainConfig(out_dir="unused", spec=V3Spec(image_size=image_size))
    model, processor, _, adapters = build_for_training(config, lm, lm_tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    for adapter in adapters.values():
        adapter.lora_a.requires_grad_(True)
        adapter.lora_b.requires_grad_(True)
    builder = V3BatchBuilder(processor, config.spec.num_image_tokens, config.spec.cell)
    scenes = biased_world(1).scenes(0, batch)
    rows = []
    for kind in kinds:
        data = builder.kind_batch(scenes, {kind: 1.0}, seed=0)
        walls, cpus = [], []
        for repeat in range(repeats + 1):
            wall, cpu = time.perf_counter(), time.process_time()
            logits = model(**data.as_kwargs()).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), data.labels[:, 1:], ignore_index=IGNORE_INDEX
            )
            loss.backward()
            if repeat:  # the first step warms up allocations
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
        rows.append(
            {
                "image_size": image_size,
                "image_tokens": config.spec.num_image_tokens,
                "kind": kind,
                "batch": batch,
                "seq": int(data.input_ids.shape[1]),
                "wall_s": round(sum(walls) / len(walls), 2),
                "cpu_s": round(sum(cpus) / len(cpus), 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.v3.cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[128, 192])
    parser.add_argument(
        "--kinds", nargs="+", default=["detail", "caption", "question"], choices=["detail", "caption", "question"]
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error(f"--batch and --repeats must be >= 1, got {args.batch} and {args.repeats}")
    torch.set_num_threads(args.threads)
    for image_size in args.image_sizes:
        V3Spec(image_size=image_size)  # refuses a size whose cells do not hold whole patches
        measure(image_size, args.kinds, args.batch, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
