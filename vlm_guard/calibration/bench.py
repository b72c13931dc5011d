"""Calibration speed: seconds per image on a LLaVA-1.5-shaped random model (and the shipped default model).

The LLaVA-shaped model keeps what drives the cost of calibration: 576 image tokens (CLIP image 336,
patch 14) and 32 attention heads; width and depth are scaled down to fit a CPU (``--hidden``,
``--layers``). Weights are random and nothing is downloaded. This is a measurement, not a test.

Example:
    python -m vlm_guard.calibration.bench --layers 8 --hidden 512 --images 8 --batch-size 4
    python -m vlm_guard.calibration.bench --default-model --images 8
    python -m vlm_guard.calibration.bench --toy-shape --images 8      # random weights, the default model's shape
"""

from __future__ import annotations

import argparse
import time


def _random_images(count: int, size: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)) for _ in range(count)]


def llava_shaped(layers: int, hidden: int, heads: int = 32, intermediate: int | None = None):
    """``(model, processor)``: a random LLaVA with 576 image tokens and ``heads`` heads (toy tokenizer)."""
    from vlm_guard.synthetic.model import ToyModelSpec, build_model, build_processor

    spec = ToyModelSpec(
        image_size=336,
        patch_size=14,
        vision_hidden=64,
        vision_layers=2,
        vision_heads=2,
        text_hidden=hidden,
        text_layers=layers,
        text_heads=heads,
        text_intermediate=intermediate or 2 * hidden,
        max_positions=1024,
    )
    processor = build_processor(spec)
    model = build_model(spec, processor.tokenizer).eval()
    return model, processor


def measure(model, processor, images, prompt: str, batch_size: int) -> dict:
    """Calibrate once on one image (warm-up), then on ``images``; returns timings."""
    from vlm_guard.calibration.calibrate import calibrate

    calibrate(model, processor, images[:1], prompt, batch_size=1, progress=False, save_cache=False)
    started, cpu_started = time.perf_counter(), time.process_time()
    head_map = calibrate(model, processor, images, prompt, batch_size=batch_size, progress=False, save_cache=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "images": len(images),
        "seconds": seconds,
        "seconds_per_image": seconds / len(images),
        "cpu_seconds_per_image": cpu_seconds / len(images),
        "head_map": head_map,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--layers", type=int, default=8, help="text layers of the LLaVA-shaped model (LLaVA-1.5-7B: 32)"
    )
    parser.add_argument("--hidden", type=int, default=512, help="text width (LLaVA-1.5-7B: 4096)")
    parser.add_argument("--heads", type=int, default=32, help="attention heads (LLaVA-1.5-7B: 32)")
    parser.add_argument("--images", type=int, default=8, help="images to calibrate on")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--default-model", action="store_true", help="measure the shipped default model instead")
    parser.add_argument(
        "--toy-shape", action="store_true", help="a random model of the default model's shape (ToyModelSpec())"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.default_model:
        from vlm_guard.defaults import load_default

        model, processor = load_default()
        size = processor.image_processor.crop_size["height"]
        label = "default model"
    elif args.toy_shape:
        from vlm_guard.synthetic.model import ToyModelSpec, build_model, build_processor

        spec = ToyModelSpec()
        processor = build_processor(spec)
        model = build_model(spec, processor.tokenizer).eval()
        size = spec.image_size
        label = f"random model of the default model's shape ({spec.num_image_tokens} image tokens)"
    else:
        model, processor = llava_shaped(args.layers, args.hidden, args.heads)
        size = 336
        label = f"LLaVA-shaped random model (576 image tokens, {args.heads} heads, {args.layers} layers, width {args.hidden})"
    images = _random_images(args.images, size)
    result = measure(model, processor, images, "describe the image", args.batch_size)
    geometry = result["head_map"].fingerprint
    print(f"{label}: layers={geometry['num_layers']} heads={geometry['num_heads']} hidden={geometry['hidden_size']}")
    print(
        f"calibrated {result['images']} images in {result['seconds']:.2f} s (batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads): {result['seconds_per_image']:.3f} s/image wall, "
        f"{result['cpu_seconds_per_image']:.3f} CPU-s/image"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
