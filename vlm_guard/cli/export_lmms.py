"""``vlm-guard export-lmms {synthetic,pope,chair}``: data folders for lmms-eval's ``--include_path``.

Usage::

    vlm-guard export-lmms synthetic --out runs/lmms_synthetic --n-questions 300 --n-captions 100
    lmms-eval --model vlm_guard --model_args pretrained=default,methods=auto \\
        --include_path runs/lmms_synthetic --tasks vlm_guard_pope,vlm_guard_chair --batch_size 8 --output_path out/

    vlm-guard export-lmms pope --pope-dir data/pope --images coco/val2014 --out runs/lmms_coco
    vlm-guard export-lmms chair --images coco/val2014 --instances annotations/instances_val2014.json \\
        --captions annotations/captions_val2014.json --out runs/lmms_coco

Only argparse and the checked argument types are imported here; the export runs in :mod:`vlm_guard.integrations.lmms_eval.export`.
"""

from __future__ import annotations

import argparse

from vlm_guard.cli.arguments import max_new_tokens_int, non_negative_int, positive_int, seed_int
from vlm_guard.synthetic.worlds import WORLD_NAMES, WORLDS_HELP


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-lmms", help="write POPE / CHAIR items and their task configs for `lmms-eval --model vlm_guard`"
    )
    commands = parser.add_subparsers(dest="export_command", metavar="SOURCE")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    synthetic = commands.add_parser("synthetic", help="the synthetic benchmark's items (`vlm-guard eval synthetic`'s)")
    synthetic.add_argument("--out", required=True, help="folder to write (pass it to lmms-eval --include_path)")
    synthetic.add_argument(
        "--n-questions", type=non_negative_int, default=300, help="questions per POPE split (default 300; 0: none)"
    )
    synthetic.add_argument(
        "--n-captions", type=non_negative_int, default=100, help="scenes to caption (default 100; 0: none)"
    )
    synthetic.add_argument("--splits", default="random,popular,adversarial", help="POPE splits (default all three)")
    synthetic.add_argument(
        "--world-seed",
        type=seed_int,
        default=None,
        help="world seed (default 900001, the held-out seed of the reported numbers)",
    )
    synthetic.add_argument("--biased", action="store_true", help="training-like biased scenes")
    synthetic.add_argument(
        "--world",
        default="auto",
        choices=["auto", *WORLD_NAMES],
        help="which world (default: the --model's, the default model's without it). " + WORLDS_HELP,
    )
    synthetic.add_argument("--model", default=None, help="the model whose world to use (default: the default model)")
    synthetic.set_defaults(func=_run_synthetic)

    pope = commands.add_parser("pope", help="official POPE question files and their images")
    pope.add_argument("--out", required=True, help="folder to write")
    pope.add_argument("--questions", nargs="+", default=None, help="question files (coco_pope_random.json ...)")
    pope.add_argument("--pope-dir", default=None, help="folder holding coco_pope_{random,popular,adversarial}.json")
    pope.add_argument("--images", required=True, help="folder of the images the questions name (COCO val2014)")
    pope.add_argument("--prompt-suffix", default="", help="text appended to each question (as `vlm-guard eval pope`)")
    pope.add_argument("--max-new-tokens", type=max_new_tokens_int, default=None, help="generation budget (default 16)")
    pope.add_argument("--limit", type=positive_int, default=None, help="at most N questions per split")
    pope.set_defaults(func=_run_pope)

    chair = commands.add_parser("chair", help="`vlm-guard eval chair`'s COCO images with their ground truth")
    chair.add_argument("--out", required=True, help="folder to write")
    chair.add_argument("--images", required=True, help="folder of COCO val2014 images")
    chair.add_argument("--instances", required=True, help="instances_val2014.json")
    chair.add_argument("--captions", required=True, help="captions_val2014.json")
    chair.add_argument("--n-images", type=positive_int, default=500, help="images drawn with --seed (default 500)")
    chair.add_argument(
        "--seed", type=seed_int, default=0, help="seed of the draw (default 0, as `vlm-guard eval chair`)"
    )
    chair.add_argument(
        "--prompt", default=None, help="caption prompt (default 'Please describe this image in detail.')"
    )
    chair.add_argument(
        "--max-new-tokens", type=max_new_tokens_int, default=None, help="generation budget (default 512)"
    )
    chair.set_defaults(func=_run_chair)


def _print_usage(out: str, tasks: list[str]) -> None:
    print(f"wrote {', '.join(tasks)} to {out}")
    print(
        f"run: lmms-eval --model vlm_guard --model_args pretrained=default,methods=none --include_path {out} "
        f"--tasks {','.join(task for task in tasks if not task.startswith('vlm_guard_pope_'))} "
        f"--batch_size 8 --output_path OUT"
    )


def _run_synthetic(args: argparse.Namespace) -> int:
    from vlm_guard.cli.checks import check_output_folder
    from vlm_guard.integrations.lmms_eval.export import export_synthetic
    from vlm_guard.synthetic.worlds import world_for_model_argument

    check_output_folder(args.out)
    splits = [split.strip() for split in args.splits.split(",") if split.strip()]
    world = world_for_model_argument(args.model, args.world)
    manifest = export_synthetic(
        args.out,
        args.n_questions,
        args.n_captions,
        world=world,
        world_seed=args.world_seed,
        biased=args.biased,
        splits=splits,
    )
    print(
        f"{manifest['world']} world, seed {manifest['world_seed']}: {manifest['n_questions_per_split']} questions "
        f"per split ({', '.join(manifest['splits']) or 'none'}), {manifest['n_captions']} captions, "
        f"{manifest['n_images']} images"
    )
    print(f"the same items in vlm-guard: {manifest['vlm_guard_eval_command']}")
    _print_usage(args.out, manifest["tasks"])
    return 0


def _run_pope(args: argparse.Namespace) -> int:
    from vlm_guard.cli.checks import check_output_folder
    from vlm_guard.eval.pope import POPE_SPLITS, pope_question_file
    from vlm_guard.integrations.lmms_eval.export import export_pope

    if not args.questions and not args.pope_dir:
        raise ValueError("pass --questions coco_pope_random.json ... or --pope-dir DIR holding the official files.")
    files = list(args.questions or [])
    if args.pope_dir:
        files += [pope_question_file(args.pope_dir, split) for split in POPE_SPLITS]
    check_output_folder(args.out)
    manifest = export_pope(
        args.out,
        files,
        args.images,
        prompt_suffix=args.prompt_suffix,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
    )
    _print_usage(args.out, manifest["tasks"])
    return 0


def _run_chair(args: argparse.Namespace) -> int:
    from vlm_guard.cli.checks import check_output_folder
    from vlm_guard.integrations.lmms_eval.export import export_coco_chair

    check_output_folder(args.out)
    manifest = export_coco_chair(
        args.out,
        args.images,
        args.instances,
        args.captions,
        n_images=args.n_images,
        seed=args.seed,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
    )
    _print_usage(args.out, manifest["tasks"])
    return 0
