"""``vlm-guard caption``: the plain and the guarded caption of one image, side by side.

Example:
    vlm-guard caption                                   # a bundled example, shipped default model
    vlm-guard caption photo.jpg --methods vhr,gift --check
    vlm-guard caption photo.jpg --model llava-hf/llava-1.5-7b-hf --compare
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .arguments import add_allow_pickle_argument

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "describe the image"


def register(subparsers) -> None:
    parser = subparsers.add_parser("caption", help="caption an image with and without the guard",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="?", help="image file (default: a bundled example image)")
    parser.add_argument("--model", help="hub id or local folder (default: the shipped toy model)")
    parser.add_argument("--prompt", default=None, help=f"instruction (default: {DEFAULT_PROMPT!r} for the shipped model, "
                        "'Please describe this image in detail.' otherwise)")
    parser.add_argument("--methods", default="all", help="vhr,var,gift,pai,vcd | all (vhr,var,gift) | none (default: all)")
    parser.add_argument("--compare", action="store_true", help="also caption with each method alone")
    parser.add_argument("--check", action="store_true", help="flag mentions the grounding checker finds unsupported")
    parser.add_argument("--checker", help="open_clip model for --check on real images, as NAME:PRETRAINED "
                        "(e.g. ViT-B-32:laion2b_s34b_b79k; the weights must be available locally). "
                        "Default: the shipped checker, trained on the synthetic world")
    parser.add_argument("--head-map", help="head map folder from `vlm-guard calibrate` (default: the cache)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    add_allow_pickle_argument(parser)
    parser.set_defaults(func=run)


def _load_image(path: str | None):
    """``(RGB image, path)`` through :func:`vlm_guard.images.load_image`; a bundled example when ``path`` is None."""
    from ..images import ImageLoadError, display_name, load_image

    if path is None:
        from ..defaults import EXAMPLES_DIR

        candidates = sorted(EXAMPLES_DIR.glob("*.png"))
        if not candidates:
            raise ValueError(f"no image given and no bundled examples in {EXAMPLES_DIR}; pass an image path")
        path = str(candidates[0])
        print(f"image: {display_name(path)} (bundled example)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"image {display_name(path)!r} does not exist; pass the path of a PNG or JPEG file")
    try:
        return load_image(path), path
    except ImageLoadError as error:
        raise ValueError(f"could not read {error}") from None


def _caption(guarded, processor, image, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    import torch

    from ..models.loading import chat_prompt

    inputs = processor(images=[image], text=[chat_prompt(processor, prompt)], return_tensors="pt").to(guarded.device)
    start = time.perf_counter()
    with torch.no_grad():
        output = guarded.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new_tokens, skip_special_tokens=True).strip(), seconds


def run(args: argparse.Namespace) -> int:
    import vlm_guard
    from vlm_guard import GuardConfig

    from ..models.loading import load_model

    if args.max_new_tokens < 1 or args.max_new_tokens > 4096:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is out of range; allowed range is [1, 4096]")
    config = GuardConfig.from_methods(args.methods)
    image, _ = _load_image(args.image)
    from .checks import check_device, check_model_argument

    check_device(args.device)
    check_model_argument(args.model)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                  allow_pickle=args.allow_pickle)
    prompt = args.prompt or (DEFAULT_PROMPT if args.model is None else "Please describe this image in detail.")
    head_map = None
    if args.head_map:
        from ..heads.head_map import HeadMap

        head_map = HeadMap.from_pretrained(args.head_map)
    guarded = vlm_guard.wrap(model, processor, config, head_map=head_map)
    rows: list[tuple[str, str, float]] = []
    with guarded.disabled():
        rows.append(("plain", *_caption(guarded, processor, image, prompt, args.max_new_tokens)))
    label = ",".join(intervention.name for intervention in guarded.interventions) or "none"  # the methods that run
    if args.compare and len(config.enabled_methods) > 1:
        for name in config.enabled_methods:
            guarded.set_config(GuardConfig.from_methods(name))
            if not guarded.interventions:
                print(f"{name}: switched off on this model (see the warning above)")
                continue
            rows.append((name, *_caption(guarded, processor, image, prompt, args.max_new_tokens)))
        guarded.set_config(config)
    rows.append((f"guarded ({label})", *_caption(guarded, processor, image, prompt, args.max_new_tokens)))
    width = max(len(name) for name, _, _ in rows)
    print(f"prompt: {prompt}")
    for name, text, seconds in rows:
        print(f"{name:<{width}}  [{seconds:5.2f}s]  {text}")
    if args.check:
        from ..grounding import GroundingChecker

        if args.checker:
            name, _, pretrained = args.checker.partition(":")
            checker = GroundingChecker.from_open_clip(name, pretrained or None)
        else:
            if args.model is not None:
                logger.warning("--check without --checker uses the synthetic-world checker, which only knows toy objects")
            checker = GroundingChecker.default()
        for name, text, _ in (rows[0], rows[-1]):
            mentions = checker.check(image, text)
            flagged = [m for m in mentions if m.flagged]
            summary = ", ".join(f"{m.word} ({m.score:.2f})" for m in flagged) or "none"
            print(f"flagged in {name}: {summary}")
    return 0
