"""``vlm-guard calibrate`` (its parser and ``heads show``: :mod:`vlm_guard.cli.heads`).

Examples:
    vlm-guard calibrate --images photos/ --out maps/toy                       # the shipped default model
    vlm-guard calibrate --model llava-hf/llava-1.5-7b-hf --images "coco/val2014/*.jpg" --limit 500 \\
        --out maps/llava-7b --batch-size 8 --device cuda --dtype float16
    vlm-guard heads show maps/llava-7b
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# the parsers of `vlm-guard calibrate` and `vlm-guard heads show` (and `heads show` itself, which needs no torch)
# live in vlm_guard.cli.heads: importing this package imports torch.


def load_model(
    model_id: str | None,
    device: str = "cpu",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """``(model, processor)`` for ``vlm-guard calibrate`` (:func:`vlm_guard.models.loading.load_model`), in
    ``dtype``, by default float16 on a CUDA device and float32 elsewhere."""
    from vlm_guard.models.loading import load_model as load

    if dtype is None:
        dtype = "float16" if str(device).startswith("cuda") else "float32"
    return load(model_id, device=device, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


def run_calibrate(args: argparse.Namespace) -> int:
    from vlm_guard.calibration.calibrate import calibrate
    from vlm_guard.calibration.head_map import cache_report, model_name
    from vlm_guard.cli.checks import check_device, check_model_argument, check_output_folder, model_load_error

    check_output_folder(args.out)  # before the model loads
    check_device(args.device)
    check_model_argument(args.model)
    from vlm_guard.calibration.calibrate import find_calibration_images

    find_calibration_images(args.images)  # no image matches --images: one line now, not after the model loaded
    from vlm_guard.parallel import data_parallel

    parallel = data_parallel(args.device)  # one process unless launched by torchrun / accelerate launch
    try:
        try:
            model, processor = load_model(
                args.model, parallel.device(args.device), args.dtype, args.trust_remote_code, args.allow_pickle
            )
        except OSError as error:  # from_pretrained: an id that is neither a folder nor in the local cache
            raise model_load_error(args.model, error) from None
        out = Path(args.out)
        head_map = calibrate(
            model,
            processor,
            args.images,
            args.prompt,
            batch_size=args.batch_size,
            limit=args.limit,
            distance=args.distance,
            sink_dims=args.sink_dims,
            rho=args.rho,
            progress=not args.quiet,
            out_dir=out,
            plots=not args.no_plots,
            save_cache=not args.no_cache,
            parallel=parallel,
        )
    finally:
        parallel.close()
    if not parallel.is_main:
        return 0  # rank 0 wrote the map and prints the summary
    calibration = head_map.calibration
    if not args.quiet:
        print(head_map.summary())
        print()
    print(
        f"profiled {calibration['n_images']} images, skipped {calibration['n_skipped']}, "
        f"{calibration['seconds_per_image']:.3f} s/image"
    )
    for line in calibration.get("skipped", [])[:10]:
        print(f"  skipped {line}")
    print(f"head map written to {out}")
    if not args.no_cache and model_name(head_map.fingerprint):
        print("\n".join(cache_report(head_map)))  # where it went, and which map vlm_guard.wrap uses
    return 0
