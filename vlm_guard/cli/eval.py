"""``vlm-guard eval {pope,chair,synthetic}``: run a benchmark, resumably, with one or several method sets.

Usage::

    vlm-guard eval synthetic --out docs/results/synthetic.jsonl --compare "none;vhr;var;gift;all;pai;vcd"
    vlm-guard eval pope --pope-dir data/pope --images coco/val2014 --model llava-hf/llava-1.5-7b-hf \\
        --methods vhr --out runs/pope.jsonl
    vlm-guard eval chair --images coco/val2014 --instances annotations/instances_val2014.json \\
        --captions annotations/captions_val2014.json --limit 500 --out runs/chair.jsonl

Nothing is downloaded: the benchmark files and images are arguments. Records go to ``--out`` (one JSON line per
item, written as it finishes; a rerun skips finished items), the summary to ``<out stem>.summary.json``. With
``--compare`` each method set gets ``<out stem>.<methods>.jsonl`` and its summary, and the comparison goes to
``<out stem>.summary.json`` and the markdown table ``<out stem>.md`` (also printed).

Exit codes: 0 done; 2 bad arguments or input; 130 interrupted (rerun to resume); 3
(:data:`~vlm_guard.eval.following.EXIT_PROMPT_NOT_FOLLOWED`) the model did not follow a task's prompt (more than
``--max-unclear`` of its outputs are not yes/no answers, or not captions; see :mod:`vlm_guard.eval.following`): the
task's numbers are withheld from the table and flagged ``followed_prompt: false`` in the summary. With ``--compare``
only the greedy baseline's tasks set code 3.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vlm_guard.cli.arguments import (
    INTERRUPTED_RESUMABLE,
    WORLD_CAPTION_TOKENS,
    add_allow_pickle_argument,
    add_threads_argument,
    apply_threads,
    max_new_tokens_int,
    positive_int,
    seed_int,
    share,
)
from vlm_guard.eval.following import EXIT_PROMPT_NOT_FOLLOWED, MAX_UNCLEAR_SHARE
from vlm_guard.eval.tasks import DEFAULT_CHAIR_PROMPT, DEFAULT_MAX_NEW_TOKENS, chair_task, pope_tasks, synthetic_tasks
from vlm_guard.synthetic.worlds import WORLD_NAMES, WORLDS_HELP

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="run POPE / CHAIR / the synthetic benchmark, resumably")
    commands = parser.add_subparsers(dest="eval_command", metavar="BENCHMARK")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    pope = commands.add_parser("pope", help="POPE on COCO: official question files + val2014 images")
    _common(pope, f"default {DEFAULT_MAX_NEW_TOKENS['pope']}")
    pope.add_argument(
        "--questions",
        nargs="+",
        default=None,
        help="official question files (e.g. coco_pope_random.json ...); the split is read from the name",
    )
    pope.add_argument("--pope-dir", default=None, help="folder holding coco_pope_{random,popular,adversarial}.json")
    pope.add_argument("--splits", default="random,popular,adversarial", help="splits to run with --pope-dir")
    pope.add_argument("--images", required=True, help="folder of the images the questions name (COCO val2014)")
    pope.add_argument(
        "--prompt-suffix",
        default="",
        help="text appended to each question (e.g. ' Answer with one word.'); default none",
    )
    pope.set_defaults(func=_run_pope, interrupt_note=INTERRUPTED_RESUMABLE)

    chair = commands.add_parser("chair", help="CHAIR on COCO val2014: captions scored against instances + captions")
    _common(chair, f"default {DEFAULT_MAX_NEW_TOKENS['chair']}")
    chair.add_argument("--images", required=True, help="folder of COCO val2014 images")
    chair.add_argument("--instances", required=True, help="instances_val2014.json")
    chair.add_argument("--captions", required=True, help="captions_val2014.json")
    chair.add_argument(
        "--n-images", type=positive_int, default=500, help="random images drawn with --seed (default %(default)s)"
    )
    chair.add_argument(
        "--prompt", default=DEFAULT_CHAIR_PROMPT, help=f"caption prompt (default {DEFAULT_CHAIR_PROMPT!r})"
    )
    chair.set_defaults(func=_run_chair, interrupt_note=INTERRUPTED_RESUMABLE)

    synthetic = commands.add_parser("synthetic", help="POPE- and CHAIR-style benchmark on held-out toy-world scenes")
    _common(
        synthetic,
        f"default: {DEFAULT_MAX_NEW_TOKENS['synthetic_pope']} for the yes/no questions; for the captions "
        "the world's budget, " + ", ".join(f"{tokens} {name}" for name, tokens in WORLD_CAPTION_TOKENS.items()),
    )
    synthetic.add_argument(
        "--n-questions", type=positive_int, default=500, help="questions per POPE split (default %(default)s)"
    )
    synthetic.add_argument(
        "--n-captions", type=positive_int, default=500, help="scenes to caption (default %(default)s)"
    )
    synthetic.add_argument(
        "--world-seed",
        type=seed_int,
        default=None,
        help="world seed (default 900001, the reported held-out seed; 910001 is for tuning)",
    )
    synthetic.add_argument("--biased", action="store_true", help="training-like biased scenes instead of unbiased")
    synthetic.add_argument(
        "--world",
        default="auto",
        choices=["auto", *WORLD_NAMES],
        help="which synthetic world (default: the model's own, everyday for other models). " + WORLDS_HELP,
    )
    synthetic.add_argument("--tasks", default="pope,chair", help="'pope', 'chair' or both (default)")
    synthetic.set_defaults(func=_run_synthetic, interrupt_note=INTERRUPTED_RESUMABLE)

    images = commands.add_parser(
        "synthetic-images", help="render synthetic scenes as PNGs (e.g. tuning-seed scenes for `vlm-guard calibrate`)"
    )
    images.add_argument("--out", required=True, help="folder to write scene_XXXXXX.png into")
    images.add_argument("--n", type=positive_int, default=200, help="number of scenes (default %(default)s)")
    images.add_argument(
        "--world-seed",
        type=seed_int,
        default=None,
        help="world seed (default 910001, the tuning seed: never the reported one)",
    )
    images.add_argument("--biased", action="store_true", help="training-like biased scenes")
    images.add_argument(
        "--world",
        default="auto",
        choices=["auto", *WORLD_NAMES],
        help="which synthetic world (default: the default model's). " + WORLDS_HELP,
    )
    images.set_defaults(func=_write_synthetic_images)


def _common(parser: argparse.ArgumentParser, max_new_tokens_default: str) -> None:
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the shipped default model)")
    parser.add_argument(
        "--methods",
        default="none",
        help="method set: any of vhr,var,gift,pai,vcd | all (vhr,var,gift) | auto (the tuned set) | none (default)",
    )
    parser.add_argument(
        "--compare",
        default=None,
        help="several method sets on the same items, ';'-separated, e.g. 'none;vhr;var;gift;all;pai;vcd'",
    )
    parser.add_argument("--limit", type=positive_int, default=None, help="at most N items per task / split")
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="rows per generate call (default %(default)s)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=max_new_tokens_int,
        default=None,
        help=f"generation budget in tokens ({max_new_tokens_default})",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="results .jsonl (resumable); with --compare, every method set's "
        "records together (each set also gets <out stem>.<methods>.jsonl, which a rerun resumes)",
    )
    parser.add_argument(
        "--seed", type=seed_int, default=0, help="seed of the bootstrap and of image sampling (default %(default)s)"
    )
    parser.add_argument("--head-map", default=None, help="folder of a calibrated head map (default: the cached one)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    add_allow_pickle_argument(parser)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16", "auto"),
        help="model dtype (default %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument(
        "--n-resamples", type=positive_int, default=1000, help="bootstrap resamples (default %(default)s)"
    )
    add_threads_argument(parser)
    parser.add_argument(
        "--settings",
        default=None,
        help="JSON file giving method sets of --compare / --methods explicit settings, "
        '{"<method set>": {"<method>": {"<field>": value}}}, e.g. {"gift@tuned": {"gift": {"alpha": 1.0}}}; '
        "fields not named resolve as usual (the head map's tuned value for an @tuned set, else the released default)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--max-unclear",
        type=share,
        default=MAX_UNCLEAR_SHARE,
        help="largest share of outputs that may not answer the prompt (POPE: no yes/no word; CHAIR: "
        f"not a caption) before a task's numbers are withheld and the command exits "
        f"{EXIT_PROMPT_NOT_FOLLOWED} (a share in [0, 1]; default %(default)s; 1 turns the check off)",
    )


# ---------------------------------------------------------------------------------------------- running
def _method_sets(args) -> list[str]:
    from vlm_guard.eval.runner import method_label, parse_compare

    if args.compare:
        return parse_compare(args.compare)
    return [method_label(args.methods)]


def settings_configs(path: str | None, method_sets: list[str]) -> tuple[dict, dict]:
    """``({label: GuardConfig}, {label: settings})`` from ``--settings FILE`` (empty without it).

    Each key must be one of ``method_sets`` and name exactly that set's methods (``all``: vhr, var, gift); each value
    is ``{method: {field: value}}``, checked by the method's config (unknown fields and bad values are refused with
    one line). The named fields become explicit, so a head map's tuned values do not replace them.
    """
    if not path:
        return {}, {}
    import json

    from vlm_guard.eval.runner import guard_config_for
    from vlm_guard.tuning.space import Candidate

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--settings {path}: no such file; give a JSON file of per-method-set settings") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--settings {path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f'--settings {path}: expected a JSON object like {{"gift@tuned": {{"gift": {{"alpha": 1.0}}}}}}'
        )
    configs, settings = {}, {}
    for label, methods in data.items():
        if label not in method_sets:
            raise ValueError(
                f"--settings {path}: {label!r} is not a method set of this run ({'; '.join(method_sets)}); "
                "name the sets of --compare / --methods"
            )
        wanted = guard_config_for(label).enabled_methods
        if not isinstance(methods, dict) or sorted(methods) != sorted(wanted):
            raise ValueError(
                f"--settings {path}: {label!r} must give settings for exactly its methods {wanted}, "
                f"got {sorted(methods) if isinstance(methods, dict) else methods!r}"
            )
        if not all(isinstance(values, dict) for values in methods.values()):
            raise ValueError(f"--settings {path}: {label!r}: each method's settings must be an object of fields")
        try:
            config = Candidate({name: dict(values) for name, values in methods.items()}).guard_config()
            config.validate()
        except (TypeError, ValueError) as error:
            raise ValueError(f"--settings {path}: {label!r}: {error}") from None
        configs[label], settings[label] = config, methods
    return configs, settings


def _load_head_map(args):
    if not args.head_map:
        return None
    from vlm_guard.calibration.head_map import HeadMap

    return HeadMap.from_pretrained(args.head_map)


FINGERPRINT_KEYS = ("benchmark", "world", "world_seed", "bias", "prompt", "prompt_suffix", "prompts")
"""run_config fields that identify the data and prompts: part of each records file's fingerprint."""

INTERRUPTED_MESSAGE = INTERRUPTED_RESUMABLE  # printed by vlm_guard.cli.main on Ctrl-C / SIGTERM (exit 130)


def _scored_items(result: dict) -> int:
    from vlm_guard.eval.records import read_summary

    try:
        first = result["method_sets"][0]
        return int(read_summary(first["summary"])["n"])
    except (KeyError, IndexError, ValueError, FileNotFoundError):
        return -1


def _check_out_first(args) -> None:
    """``--out`` checked before anything is read or imported (a folder, /dev/null, a read-only place)."""
    from vlm_guard.cli.checks import check_output_file

    check_output_file(args.out)


def _execute(args, tasks, loader, run_config: dict) -> int:
    from vlm_guard.cli.checks import check_device, check_head_map_folder, check_model_argument, check_output_file
    from vlm_guard.eval.runner import results_paths

    apply_threads(args)
    method_sets = _method_sets(args)
    check_output_file(args.out)  # before the model loads: a folder, a read-only place
    for label in method_sets:
        check_output_file(results_paths(args.out, label if args.compare else None)[0])
    check_device(args.device)
    check_model_argument(args.model)
    check_head_map_folder(args.head_map)
    configs, settings = settings_configs(getattr(args, "settings", None), method_sets)
    if settings:
        run_config = {**run_config, "settings": settings}
    from vlm_guard.parallel import data_parallel

    parallel = data_parallel(args.device)  # one process unless launched by torchrun / accelerate launch
    try:
        return _execute_on(args, tasks, loader, run_config, method_sets, configs, parallel)
    finally:
        parallel.close()


def _execute_on(args, tasks, loader, run_config: dict, method_sets: list[str], configs: dict, parallel) -> int:
    from vlm_guard.cli.checks import model_load_error
    from vlm_guard.defaults import default_model_dir
    from vlm_guard.eval.runner import load_model, run_benchmark, weights_digest

    head_map = _load_head_map(args)  # a corrupt map: refused before the model loads
    try:
        model, processor, model_name = load_model(
            args.model,
            trust_remote_code=args.trust_remote_code,
            dtype=args.dtype,
            device=parallel.device(args.device),
            allow_pickle=args.allow_pickle,
        )
    except OSError as error:
        raise model_load_error(args.model, error) from None
    run_config = {
        "model": model_name,
        "do_sample": False,
        "num_beams": 1,
        "dtype": args.dtype,
        "weights_sha256_16": weights_digest(args.model or default_model_dir()),
        "head_map_dir": args.head_map,
        **run_config,
    }
    result = run_benchmark(
        model,
        processor,
        tasks,
        method_sets,
        args.out,
        loader=loader,
        head_map=head_map,
        batch_size=args.batch_size,
        seed=args.seed,
        n_resamples=args.n_resamples,
        progress=not args.no_progress,
        run_config=run_config,
        compare=bool(args.compare),
        configs=configs or None,
        fingerprint_extra={key: run_config[key] for key in FINGERPRINT_KEYS if key in run_config},
        parallel=parallel,
        max_unclear=args.max_unclear,
        prompt_fixes=_prompt_fixes(run_config),
    )
    if not parallel.is_main:
        return 0  # rank 0 merged this rank's records and prints the result
    scored = _scored_items(result)
    if scored == 0 and loader.n_skipped:
        example = next(iter(loader.skipped.items()))
        raise ValueError(
            f"no item could be run: all {loader.n_skipped} images were skipped (e.g. {example[0]}: "
            f"{example[1]}); check --images."
        )
    if args.compare:
        _write_compared_records(args.out, result)
    print(result["markdown"])
    skipped = loader.n_skipped
    if skipped:
        print(f"{skipped} unreadable image(s) skipped (listed in {result['summary_path']}).")
    print(f"summary: {result['summary_path']}")
    if result.get("markdown_path"):
        print(f"table: {result['markdown_path']}")
    if args.compare:
        print(f"records of every method set: {args.out}")
    return _prompt_exit_code(result, compared=bool(args.compare))


def _write_compared_records(out, result: dict) -> None:
    """``--out`` of a comparison: every method set's records, in method-set order, one JSON line each (each record
    names its ``methods``), written atomically. The per-set files stay the ones a rerun resumes from; this file has
    no run header, so it is never taken for one of them."""
    import json

    from vlm_guard.eval.records import read_records
    from vlm_guard.fileio import atomic_write_text

    lines = [
        json.dumps(record, allow_nan=False)
        for method_set in result["method_sets"]
        for record in read_records(method_set["records"])
    ]
    atomic_write_text(out, "".join(line + "\n" for line in lines))


def _prompt_fixes(run_config: dict) -> dict[str, str]:
    """What the prompt-following warning tells the user to do, per task kind, for this benchmark's options."""
    if run_config.get("benchmark") == "synthetic":
        prompts = run_config.get("prompts", {})
        return {
            "pope": f"the synthetic questions are fixed ({prompts.get('pope')!r}); use a model that answers "
            "them with yes or no (e.g. the shipped default model)",
            "chair": f"the synthetic caption prompt is fixed ({prompts.get('chair')!r}); use a model that "
            "captions (e.g. the shipped default model)",
        }
    return {
        "pope": "ask for a yes/no answer, e.g. --prompt-suffix ' Please answer yes or no.', or use a model "
        "that answers the question with yes or no",
        "chair": "pass a caption prompt this model follows with --prompt (e.g. 'Describe this image.'), or use "
        "a model that captions",
    }


def _prompt_exit_code(result: dict, compared: bool) -> int:
    """:data:`EXIT_PROMPT_NOT_FOLLOWED` when the numbers the run exists for are withheld: any task of a single run,
    or a task of the greedy baseline of a comparison (a method set that breaks the answers is a result: its cells
    say "prompt not followed" and the other rows stand), else 0."""
    import sys

    failed = [entry for entry in result.get("prompt_not_followed", []) if not compared or entry["methods"] == "none"]
    if not failed:
        return 0
    tasks = ", ".join(sorted({entry["task"] for entry in failed}))
    print(
        f"vlm-guard eval: the model did not follow the prompt of {tasks}: no numbers for it (see the warning "
        f"above; the summary marks it followed_prompt: false); exit code {EXIT_PROMPT_NOT_FOLLOWED}.",
        file=sys.stderr,
    )
    return EXIT_PROMPT_NOT_FOLLOWED


def _run_pope(args) -> int:
    _check_out_first(args)
    from vlm_guard.eval.images import ImageLoader
    from vlm_guard.eval.pope import pope_question_file

    if not args.questions and not args.pope_dir:
        raise ValueError("pass --questions coco_pope_random.json ... or --pope-dir DIR holding the official files.")
    files = list(args.questions or [])
    if args.pope_dir:
        files += [pope_question_file(args.pope_dir, split.strip()) for split in args.splits.split(",") if split.strip()]
    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS["pope"]
    tasks = pope_tasks(files, limit=args.limit, max_new_tokens=max_new_tokens, prompt_suffix=args.prompt_suffix)
    loader = ImageLoader(args.images)
    names = sorted({item.image_name for task in tasks for item in task.items})
    if names and not any(loader.path_of(name).is_file() for name in names):
        raise ValueError(
            f"none of the {len(names)} images the questions name is in --images {args.images} (e.g. "
            f"{names[0]}); pass the folder that holds them (COCO val2014)."
        )
    run_config = {
        "benchmark": "pope",
        "question_files": [str(path) for path in files],
        "images": args.images,
        "max_new_tokens": max_new_tokens,
        "prompt_suffix": args.prompt_suffix,
        "limit": args.limit,
        "title": "POPE",
    }
    return _execute(args, tasks, loader, run_config)


def _run_chair(args) -> int:
    _check_out_first(args)
    from vlm_guard.eval.images import ImageLoader

    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS["chair"]
    task = chair_task(
        args.images,
        args.instances,
        args.captions,
        args.n_images,
        args.seed,
        args.prompt,
        max_new_tokens=max_new_tokens,
        limit=args.limit,
    )
    loader = ImageLoader(args.images)
    run_config = {
        "benchmark": "chair",
        "images": args.images,
        "instances": args.instances,
        "captions": args.captions,
        "n_images": args.n_images,
        "prompt": args.prompt,
        "max_new_tokens": max_new_tokens,
        "limit": args.limit,
        "title": "CHAIR",
    }
    return _execute(args, [task], loader, run_config)


def _run_synthetic(args) -> int:
    _check_out_first(args)
    from vlm_guard.eval.images import ImageLoader
    from vlm_guard.eval.synthetic import EVAL_SEED
    from vlm_guard.synthetic.worlds import world_for_model_argument

    world = world_for_model_argument(args.model, args.world)
    kinds = [kind.strip() for kind in args.tasks.split(",") if kind.strip()]
    bad = [kind for kind in kinds if kind not in ("pope", "chair")]
    if bad or not kinds:
        raise ValueError(f"--tasks must name 'pope' and/or 'chair', got {args.tasks!r}.")
    n_questions = args.n_questions if args.limit is None else min(args.n_questions, args.limit)
    n_captions = args.n_captions if args.limit is None else min(args.n_captions, args.limit)
    pope_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS["synthetic_pope"]
    chair_tokens = args.max_new_tokens or world.caption_tokens
    world_seed = EVAL_SEED if args.world_seed is None else args.world_seed
    tasks = synthetic_tasks(
        n_questions,
        n_captions,
        world_seed=world_seed,
        bias=args.biased,
        pope_max_new_tokens=pope_tokens,
        chair_max_new_tokens=chair_tokens,
        kinds=kinds,
        world=world,
    )
    run_config = {
        "benchmark": "synthetic",
        "world": world.name,
        "world_seed": world_seed,
        "bias": args.biased,
        "n_questions_per_split": n_questions,
        "n_captions": n_captions,
        "max_new_tokens": {"pope": pope_tokens, "chair": chair_tokens},
        "prompts": {"pope": world.pope_template, "chair": world.caption_prompt},
        "limit": args.limit,
        "title": f"Synthetic benchmark ({world.name} world, seed {world_seed}, "
        f"{'biased' if args.biased else 'unbiased'} scenes)",
    }
    return _execute(args, tasks, ImageLoader(), run_config)


def _write_synthetic_images(args) -> int:
    from vlm_guard.cli.checks import check_output_folder
    from vlm_guard.eval.synthetic import TUNING_SEED, synthetic_world
    from vlm_guard.synthetic.worlds import world_for_model_argument

    seed = TUNING_SEED if args.world_seed is None else args.world_seed
    folder = check_output_folder(args.out)
    kind = world_for_model_argument(getattr(args, "model", None), args.world)
    scenes = synthetic_world(seed, args.biased, kind)
    from vlm_guard.fileio import atomic_path

    for index in range(args.n):  # each image whole or absent: a failure keeps the previous file of that name
        with atomic_path(folder / f"scene_{index:06d}.png") as temporary:
            kind.render(scenes.scene(index)).save(temporary, format="PNG")
    print(
        f"wrote {args.n} scenes of the {kind.name} world, seed {seed} ({'biased' if args.biased else 'unbiased'}) "
        f"to {folder}"
    )
    return 0
