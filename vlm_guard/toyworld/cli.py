"""``vlm-guard toy ...``: train, report and ship the embedded toy models.

Commands:
    vlm-guard toy train --out runs/toy [--resume] [--preset default|tiny] [--ship]
    vlm-guard toy export --run runs/toy [--out runs/toy/export]     (latest checkpoint, finished or not)
    vlm-guard toy ship --model runs/toy/final                        (copy into the package + report)
    vlm-guard toy report --model runs/toy/final [--out report.json]
    vlm-guard toy train-checker --out runs/checker [--ship]
    vlm-guard toy examples [--out vlm_guard/assets/examples]
    vlm-guard toy v2-train --out runs/v2 [--resume] [--instruct-steps N]   (default model v2, SmolLM2 backbone)
    vlm-guard toy v2-export --run runs/v2 [--out runs/v2/export]
    vlm-guard toy v2-report --model runs/v2/final [--out report.json] [--scenes N]
    vlm-guard toy v2-prior [--out prior.json]       (the LM's own preference for each partner)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def register(subparsers) -> None:
    toy = subparsers.add_parser("toy", help="synthetic world: train/report/ship the embedded default models")
    commands = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    toy.set_defaults(func=lambda args: (toy.print_help(), 2)[1])

    train = commands.add_parser("train", help="train the toy LLaVA from scratch on CPU (deterministic, resumable)")
    train.add_argument("--out", default="runs/toy", help="run folder (default runs/toy)")
    train.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    train.add_argument("--preset", choices=("default", "tiny"), default="default",
                       help="model size: default (~3.6M params) or tiny (for tests)")
    # step counts and mixture default to the shipped recipe (see TrainConfig)
    train.add_argument("--seed", type=int, default=0)
    for stage in ("vision", "lm", "align", "finetune", "qa"):
        train.add_argument(f"--{stage}-steps", type=int, default=None, help=f"steps of the {stage} stage")
    train.add_argument("--batch", type=int, default=None, help="multimodal batch size (default 32)")
    train.add_argument("--lm-turns", type=int, default=None, help="captions packed per LM-pretraining sequence")
    train.add_argument("--lm-lr", type=float, default=None, help="LM-pretraining learning rate")
    train.add_argument("--question-fraction", type=float, default=None,
                       help="share of yes/no rows in the multimodal stages (default 0.3)")
    train.add_argument("--pair-prob", type=float, default=None, help="partner co-occurrence in training scenes")
    train.add_argument("--checkpoint-every", type=int, default=None)
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads (part of the recipe)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--ship", action="store_true",
                       help="copy the final model into vlm_guard/assets/default_model and write its report")
    train.set_defaults(func=_train)

    report = commands.add_parser("report", help="measure a toy model: caption F1, partner hallucination, sinks")
    report.add_argument("--model", default=None, help="model folder (default: the shipped default model)")
    report.add_argument("--out", default=None, help="JSON path (default: <model>/training_report.json for your own model "
                        "folder, ./training_report.json for the shipped model: the installed package is never written)")
    report.add_argument("--scenes", type=int, default=300, help="held-out scenes per measurement")
    report.set_defaults(func=_report)

    ship = commands.add_parser("ship", help="copy a trained model folder into the package assets and report it")
    ship.add_argument("--model", required=True, help="folder written by `toy train` (e.g. runs/toy/final)")
    ship.add_argument("--scenes", type=int, default=300)
    ship.set_defaults(func=_ship)

    export = commands.add_parser("export", help="export the latest checkpoint of a run (finished or not)")
    export.add_argument("--run", default="runs/toy", help="run folder written by `toy train`")
    export.add_argument("--out", default=None, help="destination (default <run>/export)")
    export.set_defaults(func=_export)

    checker = commands.add_parser("train-checker", help="train the open_clip grounding checker on the world")
    checker.add_argument("--out", default="runs/checker")
    checker.add_argument("--steps", type=int, default=None)
    checker.add_argument("--seed", type=int, default=0)
    checker.add_argument("--threads", type=int, default=2)
    checker.add_argument("--ship", action="store_true", help="copy into vlm_guard/assets/checker")
    checker.set_defaults(func=_train_checker)

    v2_train = commands.add_parser("v2-train", help="train default model v2 (own vision tower + projector + "
                                   "adapters on the pretrained SmolLM2-135M-Instruct); deterministic, resumable")
    v2_train.add_argument("--out", default="runs/v2", help="run folder (default runs/v2)")
    v2_train.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    v2_train.add_argument("--seed", type=int, default=0)
    for stage in ("vision", "prealign", "align", "instruct"):
        v2_train.add_argument(f"--{stage}-steps", type=int, default=None, help=f"steps of the {stage} stage")
    v2_train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    v2_train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    v2_train.set_defaults(func=_v2_train)

    v2_export = commands.add_parser("v2-export", help="export the latest checkpoint of a v2 run (finished or not)")
    v2_export.add_argument("--run", default="runs/v2")
    v2_export.add_argument("--out", default=None, help="destination (default <run>/export)")
    v2_export.set_defaults(func=_v2_export)

    v2_report = commands.add_parser("v2-report", help="measure default model v2 on held-out scenes (issue 12 bars)")
    v2_report.add_argument("--model", required=True, help="folder with v2_weights.safetensors (final or export)")
    v2_report.add_argument("--out", default=None, help="JSON path (default <model>/v2_report.json)")
    v2_report.add_argument("--scenes", type=int, default=100, help="held-out scenes (default 100)")
    v2_report.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    v2_report.add_argument("--prior", default=None,
                           help="JSON written by `toy v2-prior --out` to include (the LM's partner preference)")
    v2_report.set_defaults(func=_v2_report)

    v2_prior = commands.add_parser("v2-prior", help="the LM's own preference for each partner (text only)")
    v2_prior.add_argument("--out", default=None, help="JSON path (default: print only)")
    v2_prior.set_defaults(func=_v2_prior)

    examples = commands.add_parser("examples", help="render the example images shipped with the package")
    examples.add_argument("--out", default=None, help="folder (default vlm_guard/assets/examples)")
    examples.set_defaults(func=_examples)


def _train(args: argparse.Namespace) -> int:
    from .train import TINY_SPEC, TrainConfig, train

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
    from .train import export_checkpoint

    print(f"exported to {export_checkpoint(args.run, args.out)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ..defaults import DEFAULT_MODEL_DIR
    from .report import build_report

    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    out = Path(args.out) if args.out else default_report_path(model_dir)
    report = build_report(model_dir, scenes=args.scenes)
    out.write_text(json.dumps(report, indent=1))
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
    from ..defaults import DEFAULT_MODEL_DIR
    from .report import build_report

    source = Path(args.model)
    if not (source / "model.safetensors").exists():
        raise FileNotFoundError(f"{source} holds no model.safetensors; pass the folder written by `toy train`")
    if DEFAULT_MODEL_DIR.exists():
        shutil.rmtree(DEFAULT_MODEL_DIR)
    shutil.copytree(source, DEFAULT_MODEL_DIR)
    report = build_report(DEFAULT_MODEL_DIR, scenes=args.scenes)
    (DEFAULT_MODEL_DIR / "training_report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    print(f"shipped {source} to {DEFAULT_MODEL_DIR}")
    return 0


def _train_checker(args: argparse.Namespace) -> int:
    from ..grounding.train import CheckerTrainConfig, ship_checker, train_checker

    config = CheckerTrainConfig(out_dir=args.out, seed=args.seed, threads=args.threads)
    if args.steps is not None:
        config.steps = args.steps
    folder = train_checker(config)
    print(f"checker written to {folder}")
    if args.ship:
        print(f"shipped to {ship_checker(folder)}")
    return 0


def _examples(args: argparse.Namespace) -> int:
    from .examples import write_examples

    folder = write_examples(Path(args.out) if args.out else None)
    print(f"examples written to {folder}")
    return 0


def _v2_train(args: argparse.Namespace) -> int:
    from .everyday.train import STAGES, V2TrainConfig, train

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
    from .everyday.train import export_checkpoint

    print(f"exported to {export_checkpoint(args.run, args.out)}")
    return 0


def _v2_report(args: argparse.Namespace) -> int:
    import torch

    from .everyday.assemble import assemble
    from .everyday.report import build_v2_report

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    model, processor = assemble(model_dir)
    prior = json.loads(Path(args.prior).read_text()) if args.prior else None
    report = build_v2_report(model, processor, scenes=args.scenes, prior=prior)
    training = json.loads((model_dir / "v2_config.json").read_text()).get("training", {})
    report["training"] = {k: v for k, v in training.items() if k != "losses"}
    out = Path(args.out) if args.out else model_dir / "v2_report.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({"must_show": report["must_show"], "captions": report["captions"],
                      "pope": {k: v["accuracy"] for k, v in report["pope"].items()}}, indent=1))
    print(f"report written to {out}")
    return 0


def _v2_prior(args: argparse.Namespace) -> int:
    from .everyday.lm import load_language_model
    from .everyday.prior import partner_preference

    lm, tokenizer = load_language_model()
    table = partner_preference(lm, tokenizer)
    text = json.dumps(table, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0
