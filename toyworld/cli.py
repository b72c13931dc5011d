"""``python -m toyworld toy ...``: train, report and ship the embedded toy models (the parsers: :mod:`toyworld.commands`).

Commands:
    python -m toyworld toy train --out runs/toy [--resume] [--preset default|tiny] [--ship]
    python -m toyworld toy export --run runs/toy [--out runs/toy/export]     (latest checkpoint, finished or not)
    python -m toyworld toy ship --model runs/toy/final                        (copy into the package + report)
    python -m toyworld toy report --model runs/toy/final [--out report.json]
    python -m toyworld toy train-checker --out runs/checker [--ship]
    python -m toyworld toy examples [--out vlm_guard/assets/examples]
    python -m toyworld toy v2-train --out runs/v2 [--resume] [--instruct-steps N]   (default model v2, SmolLM2 backbone)
    python -m toyworld toy v2-export --run runs/v2 [--out runs/v2/export]
    python -m toyworld toy v2-report --model runs/v2/final [--out report.json] [--scenes N]
    python -m toyworld toy v2-prior [--out prior.json]       (the LM's own preference for each partner)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from vlm_guard.fileio import atomic_folder, atomic_write_json, atomic_write_text

# the parsers of these commands live in toyworld.commands (importing this package imports PIL and numpy)


def _train(args: argparse.Namespace) -> int:
    from toyworld.shapes.train import TINY_SPEC, TrainConfig, train

    config = TrainConfig(out_dir=args.out, seed=args.seed, threads=args.threads)
    if args.preset == "tiny":
        config.spec = TINY_SPEC
    for stage in ("vision", "lm", "align", "finetune", "qa"):
        value = getattr(args, f"{stage}_steps")
        if value is not None:
            setattr(config, f"{stage}_steps", value)
    if args.batch is not None:
        config.multimodal_batch = args.batch
    if args.lm_turns is not None:
        config.lm_turns = args.lm_turns
    if args.lm_lr is not None:
        config.lm_lr = args.lm_lr
    if args.question_fraction is not None:
        config.question_fraction = args.question_fraction
    if args.pair_prob is not None:
        config.pair_prob = args.pair_prob
    if args.checkpoint_every is not None:
        config.checkpoint_every = args.checkpoint_every
    config.__post_init__()
    final = train(config, resume=args.resume, progress=not args.no_progress)
    print(f"model written to {final}")
    if args.ship:
        return _ship(argparse.Namespace(model=str(final), scenes=300))
    return 0


def _export(args: argparse.Namespace) -> int:
    from toyworld.shapes.train import export_checkpoint

    print(f"exported to {export_checkpoint(args.run, args.out)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from toyworld.shapes.report import build_report
    from vlm_guard.defaults import DEFAULT_MODEL_DIR

    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    out = Path(args.out) if args.out else default_report_path(model_dir)
    report = build_report(model_dir, scenes=args.scenes)
    atomic_write_json(out, report, indent=1, allow_nan=True)
    print(json.dumps(report["summary"], indent=1))
    print(f"report written to {out}")
    return 0


def default_report_path(model_dir: Path) -> Path:
    """Where ``toy report`` writes without ``--out``: beside the model, unless the model lies inside the installed
    package (the shipped default), then ``training_report.json`` in the current folder (``toy ship`` is the one
    command that writes into the package)."""
    package = Path(__file__).resolve().parent.parent
    if Path(model_dir).resolve().is_relative_to(package):
        return Path("training_report.json")
    return Path(model_dir) / "training_report.json"


def _ship(args: argparse.Namespace) -> int:
    from toyworld.shapes.report import build_report
    from vlm_guard.defaults import DEFAULT_MODEL_DIR

    source = Path(args.model)
    if not (source / "model.safetensors").exists():
        raise FileNotFoundError(f"{source} holds no model.safetensors; pass the folder written by `toy train`")
    # the new folder is built and measured under a temporary name beside the shipped one, then swapped in: a failure
    # (a bad model, a full disk, Ctrl-C during the report) leaves the previously shipped model as it was
    DEFAULT_MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(DEFAULT_MODEL_DIR) as temporary:
        copy_files(source, temporary)
        report = build_report(temporary, scenes=args.scenes)
        atomic_write_json(temporary / "training_report.json", report, indent=1, allow_nan=True)
    print(json.dumps(report["summary"], indent=1))
    print(f"shipped {source} to {DEFAULT_MODEL_DIR}")
    return 0


def copy_files(source: Path, folder: Path) -> None:
    """Copy every file under ``source`` into the existing ``folder`` (same relative paths). Only the contents are
    copied, not permissions: a read-only source still gives files the new folder can finish and replace."""
    for path in sorted(Path(source).rglob("*")):
        if path.is_file():
            target = folder / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def _train_checker(args: argparse.Namespace) -> int:
    from toyworld.checker import CheckerTrainConfig, ship_checker, train_checker

    config = CheckerTrainConfig(out_dir=args.out, seed=args.seed, threads=args.threads)
    if args.steps is not None:
        config.steps = args.steps
    folder = train_checker(config)
    print(f"checker written to {folder}")
    if args.ship:
        print(f"shipped to {ship_checker(folder)}")
    return 0


def _examples(args: argparse.Namespace) -> int:
    from vlm_guard.synthetic.examples import write_examples

    folder = write_examples(Path(args.out) if args.out else None)
    print(f"examples written to {folder}")
    return 0


def _v2_train(args: argparse.Namespace) -> int:
    from toyworld.everyday.train import STAGES, V2TrainConfig, train

    config = V2TrainConfig(out_dir=args.out, seed=args.seed)
    for stage in STAGES:
        value = getattr(args, f"{stage}_steps")
        if value is not None:
            setattr(config, f"{stage}_steps", value)
    if args.threads is not None:
        config.threads = args.threads
    config.__post_init__()
    final = train(config, resume=args.resume, progress=not args.no_progress)
    print(f"v2 weights written to {final}")
    return 0


def _v2_export(args: argparse.Namespace) -> int:
    from toyworld.everyday.train import export_checkpoint

    print(f"exported to {export_checkpoint(args.run, args.out)}")
    return 0


def _v2_report(args: argparse.Namespace) -> int:
    import torch

    from toyworld.everyday.report import build_v2_report
    from vlm_guard.synthetic.everyday.assemble import assemble

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    model, processor = assemble(model_dir)
    prior = json.loads(Path(args.prior).read_text()) if args.prior else None
    report = build_v2_report(model, processor, scenes=args.scenes, prior=prior)
    training = json.loads((model_dir / "v2_config.json").read_text()).get("training", {})
    report["training"] = {k: v for k, v in training.items() if k != "losses"}
    out = Path(args.out) if args.out else model_dir / "v2_report.json"
    atomic_write_json(out, report, indent=1, allow_nan=True)
    print(
        json.dumps(
            {
                "must_show": report["must_show"],
                "captions": report["captions"],
                "pope": {k: v["accuracy"] for k, v in report["pope"].items()},
            },
            indent=1,
        )
    )
    print(f"report written to {out}")
    return 0


def _v2_prior(args: argparse.Namespace) -> int:
    from vlm_guard.synthetic.everyday.lm import load_language_model
    from vlm_guard.synthetic.everyday.prior import partner_preference

    lm, tokenizer = load_language_model()
    table = partner_preference(lm, tokenizer)
    text = json.dumps(table, indent=1)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0
