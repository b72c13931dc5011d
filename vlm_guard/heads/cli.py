"""``vlm-guard calibrate`` and ``vlm-guard heads show``.

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

from ..commands.arguments import add_allow_pickle_argument
from ..models.loading import DTYPE_NAMES as DTYPES

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    calibrate_parser = subparsers.add_parser(
        "calibrate",
        help="profile a model's attention heads once and save a head map",
        description=(
            "Profile attention heads over a set of images (two forward passes per batch, no generation) and save a head "
            "map (head_map.json + head_map.safetensors) with a VHD heatmap and a sink-dimension plot into --out. The map is "
            "also saved into the head-map cache ($VLM_GUARD_CACHE or ~/.cache/vlm_guard/head_maps), where vlm_guard.wrap "
            "finds it. Unreadable images are skipped and counted."
        ),
    )
    calibrate_parser.add_argument("--model", default=None, help="hub id or local folder (default: the shipped default model)")
    calibrate_parser.add_argument("--images", required=True, help="folder of images or a glob pattern (quote it)")
    calibrate_parser.add_argument("--out", required=True, help="folder to write the head map and plots into")
    calibrate_parser.add_argument("--limit", type=int, default=None, help="profile at most N images (first in sorted order)")
    calibrate_parser.add_argument("--prompt", action="append", default=None,
                                  help="calibration prompt (repeat for several, used in turn); default 'Please describe this image in detail.'")
    calibrate_parser.add_argument("--batch-size", type=int, default=4, help="prompts per forward pass (default 4)")
    calibrate_parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    calibrate_parser.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: float32 on cpu, float16 on cuda)")
    calibrate_parser.add_argument("--distance", choices=("sq_l2", "l2", "cosine"), default="sq_l2", help="VHD distance (default sq_l2, released)")
    calibrate_parser.add_argument("--sink-dims", default=None, help="override the sink dimensions, e.g. '2533,1415'")
    calibrate_parser.add_argument("--rho", type=float, default=0.8, help="image-centric non-sink ratio threshold (default 0.8)")
    calibrate_parser.add_argument("--no-cache", action="store_true", help="do not save the map into the head-map cache")
    calibrate_parser.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    calibrate_parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code (off by default)")
    add_allow_pickle_argument(calibrate_parser)
    calibrate_parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    calibrate_parser.set_defaults(func=run_calibrate)

    heads_parser = subparsers.add_parser("heads", help="inspect head maps", description="Inspect head maps.")
    heads_subparsers = heads_parser.add_subparsers(dest="heads_command", metavar="SUBCOMMAND")
    show_parser = heads_subparsers.add_parser("show", help="print a head map's summary", description="Print a head map's summary table.")
    show_parser.add_argument("directory", help="folder written by `vlm-guard calibrate --out`")
    show_parser.set_defaults(func=run_show)
    heads_parser.set_defaults(func=lambda args: heads_parser.print_help() or 2)


def _parse_dims(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        dims = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"--sink-dims {text!r} must be comma-separated integers, e.g. '2533,1415'") from None
    if not dims:
        raise ValueError(f"--sink-dims {text!r} names no dimension; omit it to find them automatically")
    return dims


def load_model(model_id: str | None, device: str = "cpu", dtype: str | None = None, trust_remote_code: bool = False,
               allow_pickle: bool = False):
    """``(model, processor)``: the shipped default when ``model_id`` is None, else
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` from a hub id or a local folder (safetensors weights
    only unless ``allow_pickle``, see :mod:`vlm_guard.models.loading`)."""
    import torch

    if dtype is None:
        dtype = "float16" if str(device).startswith("cuda") else "float32"
    torch_dtype = getattr(torch, dtype)
    if model_id is None:
        import vlm_guard

        return vlm_guard.load_default(device=device, dtype=torch_dtype)
    from transformers import AutoProcessor

    from ..models.loading import load_pretrained_model

    local = Path(model_id).expanduser()
    if str(model_id).startswith((".", "/", "~")) and not local.exists():
        raise FileNotFoundError(f"--model {model_id}: no such folder")
    source = str(local) if local.exists() else model_id
    model = load_pretrained_model(source, allow_pickle=allow_pickle, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, processor


def run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate
    from .head_map import cache_folder, model_name

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be >= 1")
    from ..commands.checks import check_device, check_model_argument, check_output_folder

    check_output_folder(args.out)  # before the model loads
    check_device(args.device)
    check_model_argument(args.model)
    from ..parallel import data_parallel

    parallel = data_parallel(args.device)  # one process unless launched by torchrun / accelerate launch
    try:
        model, processor = load_model(args.model, parallel.device(args.device), args.dtype, args.trust_remote_code,
                                      args.allow_pickle)
        out = Path(args.out)
        head_map = calibrate(
            model, processor, args.images, args.prompt, batch_size=args.batch_size, limit=args.limit,
            distance=args.distance, sink_dims=_parse_dims(args.sink_dims), rho=args.rho, progress=not args.quiet,
            out_dir=out, plots=not args.no_plots, save_cache=not args.no_cache, parallel=parallel,
        )
    finally:
        parallel.close()
    if not parallel.is_main:
        return 0  # rank 0 wrote the map and prints the summary
    calibration = head_map.calibration
    if not args.quiet:
        print(head_map.summary())
        print()
    print(f"profiled {calibration['n_images']} images, skipped {calibration['n_skipped']}, "
          f"{calibration['seconds_per_image']:.3f} s/image")
    for line in calibration.get("skipped", [])[:10]:
        print(f"  skipped {line}")
    print(f"head map written to {out}")
    if not args.no_cache and model_name(head_map.fingerprint):
        print(f"cached at {cache_folder(head_map.fingerprint)}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from .head_map import HeadMap

    from ..tuning.settings import tuned_report

    head_map = HeadMap.from_pretrained(args.directory)
    print(head_map.summary())
    print()
    print("\n".join(tuned_report(head_map)))
    return 0
