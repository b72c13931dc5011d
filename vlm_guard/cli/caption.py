"""``vlm-guard caption``: the plain and the guarded caption of one image, side by side.

Example:
    vlm-guard caption                                   # a bundled example, shipped default model, the caption profile
    vlm-guard caption --all-examples --check            # every bundled example, hallucinations counted
    vlm-guard caption vlm_guard/assets/examples_v3/scene002_no_moon.png --check
    vlm-guard caption photo.jpg --methods vhr,gift --check
    vlm-guard caption photo.jpg --model llava-hf/llava-1.5-7b-hf --compare
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path

from vlm_guard.cli.arguments import (
    DTYPE_NAMES,
    WORLD_CAPTION_TOKENS,
    add_allow_pickle_argument,
    add_threads_argument,
    apply_threads,
    int_range,
    plain_description,
)

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Please describe this image in detail."
"""The prompt for models other than the shipped ones (CHAIR's wording); a shipped model gets its world's."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "caption",
        help="caption an image with and without the guard",
        description=plain_description(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", nargs="?", help="image file (default: a bundled example image)")
    parser.add_argument("--model", help="hub id or local folder (default: the shipped default model)")
    parser.add_argument(
        "--prompt",
        default=None,
        help=f"instruction (default: {DEFAULT_PROMPT!r}; 'describe the image' for the 3.6M test fixture)",
    )
    parser.add_argument(
        "--methods",
        default="auto",
        help="vhr,var,gift,pai,vcd | all (vhr,var,gift) | none | auto (default: the set `vlm-guard tune` chose "
        "for this model's caption profile, else PAI at its released settings)",
    )
    parser.add_argument("--compare", action="store_true", help="also caption with each method alone")
    parser.add_argument(
        "--all-examples",
        action="store_true",
        help="caption every bundled example and count hallucinated objects, plain vs guarded",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="mark each object a description names that the grounding checker does not find in the image",
    )
    parser.add_argument(
        "--checker",
        help="open_clip model for --check on real images, as NAME:PRETRAINED "
        "(e.g. ViT-B-32:laion2b_s34b_b79k; the weights must be available locally). "
        "Default: the shipped checker, trained on the synthetic world",
    )
    parser.add_argument("--head-map", help="head map folder from `vlm-guard calibrate` (default: the cache)")
    parser.add_argument(
        "--max-new-tokens",
        type=int_range(1, 4096),
        default=None,
        help="generation budget in tokens, 1..4096 (default: the shipped model's caption budget, as in the "
        f"benchmark: {WORLD_CAPTION_TOKENS['everyday_v3']} for default model v3, {WORLD_CAPTION_TOKENS['everyday']} "
        f"for v2, {WORLD_CAPTION_TOKENS['shapes']} for the test fixture; 64 for other models)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    add_threads_argument(parser)
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="model dtype (default: the checkpoint's own; float32 for the shipped default model)",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    add_allow_pickle_argument(parser)
    parser.set_defaults(func=run)


def _load_image(path: str | None, world: str | None = None):
    """``(RGB image, path)`` through :func:`vlm_guard.images.load_image`; a bundled example of ``world`` when
    ``path`` is None."""
    from vlm_guard.images import ImageLoadError, display_name, load_image

    if path is None:
        from vlm_guard.defaults import examples_dir

        folder = examples_dir(world)
        candidates = sorted(folder.glob("*.png"))
        if not candidates:
            raise ValueError(f"no image given and no bundled examples in {folder}; pass an image path")
        # the first scene where the plain model hallucinates (examples.json "kind": "trap"), else the first by name
        traps = [folder / name for name, kind in _example_kinds(world).items() if kind == "trap"]
        path = str(next((trap for trap in traps if trap in candidates), candidates[0]))
        print(f"image: {display_name(path)} (bundled example)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"image {display_name(path)!r} does not exist; pass the path of a PNG or JPEG file")
    try:
        return load_image(path), path
    except ImageLoadError as error:
        raise ValueError(str(error)) from None


def _caption(guarded, processor, image, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    import torch

    from vlm_guard.models.loading import chat_prompt

    inputs = processor(images=[image], text=[chat_prompt(processor, prompt, fallback=True)], return_tensors="pt").to(
        guarded.device
    )
    start = time.perf_counter()
    with torch.no_grad():
        output = guarded.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return processor.decode(new_tokens, skip_special_tokens=True).strip(), seconds


def run(args: argparse.Namespace) -> int:
    import vlm_guard
    from vlm_guard import GuardConfig
    from vlm_guard.models.loading import load_model

    if args.max_new_tokens is not None and (args.max_new_tokens < 1 or args.max_new_tokens > 4096):
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} is out of range; allowed range is [1, 4096]")
    from vlm_guard.settings import default_methods, parse_auto

    auto, task = parse_auto(args.methods)
    task = task or TASK
    config = None if auto else GuardConfig.from_methods(args.methods)
    if args.all_examples and args.image:
        raise ValueError(
            f"--all-examples captions the bundled examples; drop the image argument {args.image!r} or the flag"
        )
    from vlm_guard.synthetic.worlds import world_for_model_argument

    world = world_for_model_argument(args.model)
    images = _bundled_examples(world.name) if args.all_examples else [_load_image(args.image, world.name)]
    from vlm_guard.cli.checks import check_device, check_head_map_folder, check_model_argument, model_load_error

    check_device(args.device)
    check_model_argument(args.model)
    check_head_map_folder(args.head_map)
    apply_threads(args)
    try:
        model, processor = load_model(
            args.model,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
            allow_pickle=args.allow_pickle,
        )
    except OSError as error:  # from_pretrained: an id that is neither a folder nor in the local cache
        raise model_load_error(args.model, error) from None
    prompt = args.prompt or world.caption_prompt
    head_map = None
    if args.head_map:
        from vlm_guard.calibration.head_map import HeadMap

        head_map = HeadMap.from_pretrained(args.head_map)
    if args.max_new_tokens is None:
        args.max_new_tokens = world.caption_tokens if args.model is None else 64
    # a caption is a free-form description: the head map's caption profile fills the unset fields
    guarded = vlm_guard.wrap(model, processor, f"auto:{task}" if auto else config, head_map=head_map, task=task)
    config = guarded.guard_config
    if auto:
        methods, reason = default_methods(guarded.head_map, task)
        print(f"methods: {','.join(methods) or 'none'} ({reason})")
        if not methods:
            print(
                "  so the guarded caption is the plain one; the tuning table (`vlm-guard heads show` on the model's head "
                "map) says what each method cost; --methods NAME,... runs them anyway"
            )
    for line in guarded.describe_settings():
        print(f"settings {line}")
    checker = _checker(args, world.name) if args.check else None
    truth = _example_truth(world.name) if args.all_examples or args.image is None or args.check else {}
    kinds = _example_kinds(world.name) if args.all_examples else {}
    totals: dict[str, list[int]] = {"plain": [0, 0], "guarded": [0, 0]}  # [flagged by the checker, not in the scene]
    print(f"prompt: {prompt}")
    for image, path in images:
        if args.all_examples:
            kind = {"trap": " (the plain model hallucinates here)", "right": " (the plain model is right here)"}
            print(f"\nimage: {Path(path).name}{kind.get(kinds.get(Path(path).name), '')}")
        rows = _rows(args, guarded, processor, config, image, prompt)
        width = max(len(name) for name, _, _ in rows)
        for name, text, seconds in rows:
            print(f"{name:<{width}}  [{seconds:5.2f}s]  {text}")
        records = {}
        for which, (name, text, _) in (("plain", rows[0]), ("guarded", rows[-1])):
            if checker is not None:
                mentions = checker.check(image, text)
                flagged = [m for m in mentions if m.flagged]
                summary = ", ".join(f"{m.word} ({m.score:.2f})" for m in flagged) or "none"
                print(f"flagged in {name}: {summary}")
                totals[which][0] += len(flagged)
            key = _truth_key(path, truth, args.image is not None, world.name)
            if key is not None:
                from vlm_guard.eval.synthetic import score_synthetic_caption

                record = score_synthetic_caption(text, truth[key], world)
                records[which] = record
                totals[which][1] += record["n_hallucinated"]
                print(f"not in the scene ({name}): {mention_counts(word for word, _ in record['hallucinated'])}")
        if len(rows) > 1:
            print(what_changed(rows[0][1], rows[-1][1], records.get("plain"), records.get("guarded")))
        if args.check and checker is None and _truth_key(path, truth, args.image is not None, world.name) is None:
            print(
                f"not checked: {Path(path).name} is not a bundled example (no ground truth) and the shipped grounding "
                f"checker knows the shapes world only; pass --checker NAME:PRETRAINED to check a real image"
            )
    if args.all_examples:
        print(
            f"\nall {len(images)} bundled examples: hallucinated object mentions (not in the scene's ground truth) "
            f"plain {totals['plain'][1]}, guarded {totals['guarded'][1]}"
            + (
                f"; flagged by the checker plain {totals['plain'][0]}, guarded {totals['guarded'][0]}"
                if checker
                else ""
            )
        )
    if auto:
        from vlm_guard.calibration.shipped import held_out_line

        line = held_out_line(guarded.head_map, task, config, folder=args.head_map)
        if line:
            print(line)
    return 0


def mention_counts(words) -> str:
    """The words in first-mention order, each with its number of mentions when above one (``"none"`` when empty).

    Example:
        >>> mention_counts(["cup", "moon", "cup", "cup"])
        'cup (3 mentions), moon'
    """
    counts = Counter(words)  # first-seen order
    return ", ".join(f"{word} ({n} mentions)" if n > 1 else word for word, n in counts.items()) or "none"


def what_changed(plain: str, guarded: str, plain_record: dict | None, guarded_record: dict | None) -> str:
    """One line saying what the guard changed in a caption: the objects not in the scene it dropped or added and the
    scene objects named by each (when the scene's objects are known), or that the captions are the same.

    Example:
        >>> what_changed("a fork and a knife", "a fork", {"hallucinated": [("knife", "knife")], "n_recalled": 1,
        ...     "n_gt_objects": 2}, {"hallucinated": [], "n_recalled": 1, "n_gt_objects": 2})
        'what changed: objects not in the scene dropped: knife; added: none; scene objects named 1/2 -> 1/2'
    """
    if plain.strip() == guarded.strip():
        return "what changed: nothing (the guarded caption is the plain one)"
    if plain_record is None or guarded_record is None:
        return "what changed: the wording (no ground truth for this image, so objects are not counted)"
    before = {word for word, _ in plain_record["hallucinated"]}
    after = {word for word, _ in guarded_record["hallucinated"]}
    dropped, added = sorted(before - after), sorted(after - before)
    return (
        f"what changed: objects not in the scene dropped: {', '.join(dropped) or 'none'}; "
        f"added: {', '.join(added) or 'none'}; scene objects named {plain_record['n_recalled']}/"
        f"{plain_record['n_gt_objects']} -> {guarded_record['n_recalled']}/{guarded_record['n_gt_objects']}"
    )


def _bundled_examples(world: str | None = None) -> list:
    from vlm_guard.defaults import examples_dir

    folder = examples_dir(world)
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise ValueError(f"no bundled examples in {folder}; reinstall vlm-guard with its package data")
    return [_load_image(str(path)) for path in paths]


TASK = "caption"
"""The task profile a caption runs with (:data:`vlm_guard.settings.PROFILES`)."""


def _truth_key(path: str, truth: dict, given: bool, world: str | None = None) -> str | None:
    """The bundled example ``path`` is (its file name when it lies in the examples folder, or when its bytes equal a
    bundled example's: a copy), else None."""
    name = Path(path).name
    if not given:
        return name if name in truth else None
    from vlm_guard.defaults import examples_dir

    try:
        folder = examples_dir(world)
        if name in truth and Path(path).resolve().parent == folder.resolve():
            return name
        from vlm_guard.fileio import sha256_file

        digest = sha256_file(path)
        return next(
            (entry for entry in truth if (folder / entry).is_file() and sha256_file(folder / entry) == digest), None
        )
    except (OSError, ValueError):
        return None


def _example_kinds(world: str | None = None) -> dict[str, str]:
    """``{file name: "trap" | "right"}`` of the bundled examples that record how they were chosen."""
    import json

    from vlm_guard.defaults import examples_dir

    try:
        entries = json.loads((examples_dir(world) / "examples.json").read_text())
        return {entry["file"]: entry["kind"] for entry in entries if isinstance(entry, dict) and "kind" in entry}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _example_truth(world: str | None = None) -> dict[str, list[str]]:
    """``{file name: object types}`` of the bundled examples of ``world`` (``examples.json``)."""
    import json

    from vlm_guard.defaults import examples_dir

    try:
        entries = json.loads((examples_dir(world) / "examples.json").read_text())
    except (OSError, ValueError) as error:
        logger.warning("no ground truth for the bundled examples (%s): hallucinations are not counted", error)
        return {}
    return {entry["file"]: list(entry["types"]) for entry in entries}


def _rows(args, guarded, processor, config, image, prompt) -> list[tuple[str, str, float]]:
    from vlm_guard import GuardConfig

    rows: list[tuple[str, str, float]] = []
    with guarded.disabled():
        rows.append(("plain", *_caption(guarded, processor, image, prompt, args.max_new_tokens)))
    label = ",".join(intervention.name for intervention in guarded.interventions) or "none"  # the methods that run
    if args.compare and len(config.enabled_methods) > 1:
        for name in config.enabled_methods:
            guarded.set_config(GuardConfig(**{name: getattr(config, name)}))
            if not guarded.interventions:
                print(f"{name}: switched off on this model (see the warning above)")
                continue
            rows.append((name, *_caption(guarded, processor, image, prompt, args.max_new_tokens)))
        guarded.set_config(config)
    rows.append((f"guarded ({label})", *_caption(guarded, processor, image, prompt, args.max_new_tokens)))
    return rows


def _checker(args, world: str = "shapes"):
    """The grounding checker for ``--check``: ``--checker`` when given; else the shipped one, which knows the
    shapes world only (``None`` for other worlds: their bundled examples are counted against ground truth)."""
    from vlm_guard.grounding import GroundingChecker

    if args.checker:
        name, _, pretrained = args.checker.partition(":")
        return GroundingChecker.from_open_clip(name, pretrained or None)
    if world != "shapes":
        print(
            f"check: the shipped grounding checker knows the shapes world only; the {world} examples are counted "
            "against their ground truth (pass --checker NAME:PRETRAINED for real images)"
        )
        return None
    if args.model is not None:
        logger.warning("--check without --checker uses the synthetic-world checker, which only knows toy objects")
    return GroundingChecker.default()
