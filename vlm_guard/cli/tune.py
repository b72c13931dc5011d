"""``vlm-guard tune``: choose each method's strength and layer band for one model and store them in its head map.

Examples:
    vlm-guard tune                                            # shipped default model, synthetic tuning seed 910001
    vlm-guard tune --methods vhr,gift --budget 20 --out maps/default-tuned
    vlm-guard tune --profiles caption,answer --out maps/default-profiles   # one setting per task profile
    vlm-guard tune --model llava-hf/llava-1.5-7b-hf --head-map maps/llava-7b \\
        --pope my_pope/adversarial.json my_pope/random.json --images coco/train2014 \\
        --instances annotations/instances_train2014.json --captions annotations/captions_train2014.json \\
        --n-images 200 --out maps/llava-7b-tuned --budget 240 --device cuda

The tuned map is written to --out (default: the head-map cache folder of the model, where ``vlm_guard.wrap`` finds
it) with ``tuning.md`` (every setting measured) and ``tune_<method>.png`` (the objective against each method's
strength). Rerunning the same command resumes from ``<out>/tune_state.json``. Tune on data you do not report on.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vlm_guard.cli.arguments import (
    INTERRUPTED_RESUMABLE,
    max_new_tokens_int,
    non_negative_int,
    plain_description,
    positive_float,
    positive_int,
    seed_int,
)
from vlm_guard.methods.registry import MethodNames

TUNABLE_METHODS = MethodNames(lambda spec: spec.tuning_grid is not None, "the methods with a tuning grid")
"""The methods `vlm-guard tune` can tune: the registry's, as :data:`vlm_guard.tuning.space.TUNABLE_METHODS` (registering
a method imports no torch)."""

logger = logging.getLogger(__name__)


def _methods(text: str) -> list[str]:
    """``--methods vhr,gift`` -> ``["vhr", "gift"]``, checked while parsing (before any data or model loads)."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TUNABLE_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r} must name methods from {','.join(TUNABLE_METHODS)}, comma-separated"
        )
    return names


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="choose each method's strength and layers for a model (stored in its head map)",
        description=plain_description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the shipped default model)")
    parser.add_argument(
        "--head-map",
        default=None,
        help="the model's head map folder from `vlm-guard calibrate` (default: the cached or shipped one)",
    )
    parser.add_argument(
        "--methods",
        type=_methods,
        default=",".join(TUNABLE_METHODS),
        help="methods to tune, comma-separated (default: every tunable method, %(default)s)",
    )
    parser.add_argument(
        "--out", default=None, help="folder for the tuned head map (default: the model's head-map cache folder)"
    )
    parser.add_argument("--state", default=None, help="resumable JSON state (default: <out>/tune_state.json)")
    parser.add_argument(
        "--budget",
        type=positive_float,
        default=60.0,
        help="time budget in minutes, resumed runs included (default %(default)s)",
    )
    parser.add_argument("--no-combine", action="store_true", help="tune the methods alone, not their combination")
    parser.add_argument(
        "--profiles",
        default=None,
        help="tune one setting per task profile, comma-separated (caption,answer), on the synthetic "
        "world's tuning and confirmation seeds (default: one setting for every task)",
    )
    parser.add_argument(
        "--confirm-items",
        type=non_negative_int,
        default=None,
        help="items per task on which each method's winner and the best combination are measured again "
        "before they are shipped (default 300, all when the tuning data has fewer; 0: off)",
    )
    data = parser.add_argument_group("tuning data (default: the synthetic world's tuning seed, for the default model)")
    data.add_argument(
        "--world-seed", type=seed_int, default=None, help="synthetic world seed (default 910001; 900001 is refused)"
    )
    data.add_argument(
        "--n-questions", type=positive_int, default=600, help="synthetic POPE questions per split (default %(default)s)"
    )
    data.add_argument(
        "--n-captions", type=positive_int, default=600, help="synthetic scenes to caption (default %(default)s)"
    )
    data.add_argument(
        "--pope", nargs="+", default=None, help="your POPE-format question files (split read from the name)"
    )
    data.add_argument("--images", default=None, help="folder of the images your POPE / COCO files name")
    data.add_argument("--instances", default=None, help="COCO-format instances file (CHAIR ground truth)")
    data.add_argument("--captions", default=None, help="COCO-format captions file (CHAIR ground truth)")
    data.add_argument("--n-images", type=positive_int, default=300, help="images drawn for CHAIR (default %(default)s)")
    data.add_argument("--seed", type=seed_int, default=1, help="seed of the CHAIR image draw (default %(default)s)")
    data.add_argument(
        "--caption-prompt", default=None, help="CHAIR prompt (default 'Please describe this image in detail.')"
    )
    data.add_argument(
        "--pope-max-new-tokens",
        type=max_new_tokens_int,
        default=16,
        help="generation budget of a POPE answer (default %(default)s)",
    )
    data.add_argument(
        "--chair-max-new-tokens",
        type=max_new_tokens_int,
        default=512,
        help="generation budget of a CHAIR caption (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="rows per generate call (default %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default 1 on cpu: small models run fastest unthreaded on shared cores)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16", "auto"),
        help="model dtype (default %(default)s)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own code (off by default)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run, interrupt_note=INTERRUPTED_RESUMABLE)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlm_guard.cli.checks import (
        check_device,
        check_head_map_folder,
        check_model_argument,
        check_output_file,
        check_output_folder,
    )
    from vlm_guard.tuning.search import file_tuning_data, synthetic_tuning_data

    # numbers were checked by the parser; the places and names here, before the data and the model load
    if args.out:
        check_output_folder(args.out)
    if args.state:
        check_output_file(args.state, "--state")
    check_head_map_folder(args.head_map)
    for flag, path in (
        ("--instances", args.instances),
        ("--captions", args.captions),
        *(("--pope", p) for p in args.pope or ()),
    ):
        if path and not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if args.images and not Path(args.images).expanduser().is_dir():
        raise FileNotFoundError(f"--images {args.images}: no such folder")
    check_device(args.device)
    check_model_argument(args.model)
    if args.profiles is not None:
        from vlm_guard.settings import PROFILES

        names = [p.strip().lower() for p in args.profiles.split(",") if p.strip()]
        unknown = [p for p in names if p not in PROFILES]
        if unknown or not names:
            raise ValueError(f"--profiles {args.profiles!r}: choose from {','.join(PROFILES)}")
        if args.pope or args.instances or args.captions:
            raise ValueError(
                "--profiles tunes on the synthetic world's tuning and confirmation seeds; drop --pope / "
                "--instances / --captions (file data is tuned without --profiles)"
            )
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.profiles is not None:
        return _run_profiles(args)
    files = bool(args.pope or args.instances or args.captions)
    if files:
        data = file_tuning_data(
            args.pope or (),
            args.images,
            args.instances,
            args.captions,
            n_images=args.n_images,
            seed=args.seed,
            caption_prompt=args.caption_prompt,
            pope_max_new_tokens=args.pope_max_new_tokens,
            chair_max_new_tokens=args.chair_max_new_tokens,
        )
    else:
        from vlm_guard.synthetic.worlds import world_for_model_argument

        world = world_for_model_argument(args.model)
        if args.model is not None and world.name != "shapes":
            logger.warning(
                "no --pope / --instances given: tuning %s on the synthetic %s world; for a real model pass "
                "your own POPE-format and COCO-format files",
                args.model,
                world.name,
            )
        data = synthetic_tuning_data(args.n_questions, args.n_captions, args.world_seed, world=world.name)
    from vlm_guard.parallel import data_parallel

    parallel = data_parallel(args.device)  # one process unless launched by torchrun / accelerate launch
    try:
        return _run_on(args, data, parallel)
    finally:
        parallel.close()


def _run_on(args: argparse.Namespace, data, parallel) -> int:
    from vlm_guard.defaults import DEFAULT_MODEL_DIR
    from vlm_guard.eval.runner import weights_digest
    from vlm_guard.settings import tuned_report
    from vlm_guard.tuning.search import tune

    model, processor, name, head_map, out = _model_and_head_map(args, parallel.device(args.device))
    weights = weights_digest(args.model or DEFAULT_MODEL_DIR)
    if parallel.is_main:
        print(
            f"tuning {name} on {data.name}; methods {','.join(_method_list(args.methods))}; budget {args.budget:g} min; output {out}"
            + (f"; {parallel.world_size} processes" if parallel.distributed else "")
        )
    result = tune(
        model,
        processor,
        head_map,
        methods=_method_list(args.methods),
        data=data,
        out_dir=out,
        state_path=args.state,
        budget_minutes=args.budget,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        combine_methods=not args.no_combine,
        weights_sha256_16=weights,
        parallel=parallel,
        **({} if args.confirm_items is None else {"confirm_items": args.confirm_items}),
    )
    if not parallel.is_main:
        return 0  # rank 0 wrote the tuned map and prints the report
    print("\n".join(tuned_report(result.head_map)))
    if not result.complete:
        print(
            f"the budget ran out before the search finished: settings chosen from the largest finished rung; "
            f"rerun with a larger --budget to continue from {out / 'tune_state.json'}"
        )
    print(f"tuned head map written to {out} (table: {out / 'tuning.md'})")
    return 0


def _run_profiles(args: argparse.Namespace) -> int:
    """``--profiles``: :func:`vlm_guard.tuning.profiles.tune_profiles` on the synthetic tuning and confirmation seeds."""
    from vlm_guard.calibration.head_map import HeadMap
    from vlm_guard.defaults import DEFAULT_MODEL_DIR
    from vlm_guard.eval.runner import weights_digest
    from vlm_guard.settings import tuned_report
    from vlm_guard.synthetic.worlds import world_for_model_argument
    from vlm_guard.tuning.profiles import tune_profiles
    from vlm_guard.tuning.search import BudgetExhausted

    model, processor, name, head_map, out = _model_and_head_map(args, args.device)
    world = world_for_model_argument(args.model).name
    print(
        f"tuning the task profiles {args.profiles} of {name} on the synthetic {world} world; budget {args.budget:g} "
        f"min; output {out}"
    )
    try:
        tuned = tune_profiles(
            model,
            processor,
            head_map,
            profiles=args.profiles.split(","),
            out_dir=out,
            n_items=max(args.n_questions, args.n_captions),
            budget_minutes=args.budget,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            weights_sha256_16=weights_digest(args.model or DEFAULT_MODEL_DIR),
            world=world,
            methods=None if set(_method_list(args.methods)) == set(TUNABLE_METHODS) else _method_list(args.methods),
        )
    except BudgetExhausted:
        print(
            f"the budget of {args.budget:g} min ran out; everything measured is saved: rerun the same command with a "
            f"larger --budget to continue"
        )
        return 1
    tuned_map = HeadMap.from_pretrained(out)
    print("\n".join(tuned_report(tuned_map)))
    print(f"tuned head map written to {out} (table: {out / 'tuning.md'}); profiles: {', '.join(tuned['profiles'])}")
    return 0


def _method_list(methods) -> list[str]:
    """``args.methods`` as a list (the parser gives a list; the default is the comma-separated text)."""
    return _methods(methods) if isinstance(methods, str) else list(methods)


def _model_and_head_map(args: argparse.Namespace, device):
    """The model named by ``--model``, its head map (``--head-map`` checked against it, else the cached or shipped
    one) and the output folder (``--out``, else the model's head-map cache folder)."""
    from vlm_guard.calibration.head_map import HeadMap, cache_folder
    from vlm_guard.eval.runner import load_model
    from vlm_guard.models import get_adapter

    model, processor, name = load_model(
        args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype, device=device
    )
    adapter = get_adapter(model, processor)
    if args.head_map:
        head_map = HeadMap.from_pretrained(args.head_map)
        head_map.check_compatible(adapter)
    else:
        from vlm_guard.wrapper import _find_cached_head_map

        head_map = _find_cached_head_map(model, processor)
        if head_map is None:
            raise ValueError(
                f"no head map for {name}: run `vlm-guard calibrate --model ... --out DIR` and pass --head-map DIR"
            )
    out = Path(args.out) if args.out else cache_folder(adapter.describe())
    return model, processor, name, head_map, out
