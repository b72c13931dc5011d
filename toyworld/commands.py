"""``python -m toyworld toy ...``: the parsers of the commands that train, report and ship the embedded models (standard
library only: ``vlm_guard.synthetic`` imports PIL and numpy when imported; the work is done by
:mod:`toyworld.cli`, imported when a command runs).

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
from collections.abc import Callable

from vlm_guard.cli.arguments import deferred, non_negative_int, positive_float, positive_int, seed_int, share

RESUME_NOTE = "interrupted: rerun the same command with --resume to continue from the last checkpoint"


def _checked(function: str, files: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> Callable:
    """``toyworld.cli.<function>`` after the output paths named in ``files`` / ``folders`` (attribute
    names; unset ones skipped) are checked: the work is not started for a place it cannot write its result to."""
    run = deferred("toyworld.cli", function)

    def checked(args: argparse.Namespace) -> int:
        from vlm_guard.cli.checks import check_output_file, check_output_folder

        for name in files:
            if getattr(args, name, None):
                check_output_file(getattr(args, name), "--" + name.replace("_", "-"))
        for name in folders:
            if getattr(args, name, None):
                check_output_folder(getattr(args, name), "--" + name.replace("_", "-"))
        return run(args)

    checked.__name__ = function
    return checked


def register(subparsers) -> None:
    toy = subparsers.add_parser("toy", help="synthetic world: train/report/ship the embedded default models")
    commands = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    toy.set_defaults(func=lambda args: (toy.print_help(), 2)[1])

    train = commands.add_parser("train", help="train the toy LLaVA from scratch on CPU (deterministic, resumable)")
    train.add_argument("--out", default="runs/toy", help="run folder (default %(default)s)")
    train.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    train.add_argument(
        "--preset",
        choices=("default", "tiny"),
        default="default",
        help="model size: default (~3.6M params) or tiny (for tests)",
    )
    # step counts and mixture default to the shipped recipe (see TrainConfig)
    train.add_argument("--seed", type=seed_int, default=0, help="training seed (default %(default)s)")
    for stage in ("vision", "lm", "align", "finetune", "qa"):
        train.add_argument(f"--{stage}-steps", type=non_negative_int, default=None, help=f"steps of the {stage} stage")
    train.add_argument("--batch", type=positive_int, default=None, help="multimodal batch size (default 32)")
    train.add_argument(
        "--lm-turns", type=positive_int, default=None, help="captions packed per LM-pretraining sequence"
    )
    train.add_argument("--lm-lr", type=positive_float, default=None, help="LM-pretraining learning rate")
    train.add_argument(
        "--question-fraction",
        type=share,
        default=None,
        help="share of yes/no rows in the multimodal stages, in [0, 1] (default 0.5)",
    )
    train.add_argument(
        "--pair-prob", type=share, default=None, help="partner co-occurrence in training scenes, in [0, 1]"
    )
    train.add_argument("--checkpoint-every", type=positive_int, default=None, help="steps between checkpoints")
    train.add_argument(
        "--threads", type=positive_int, default=1, help="torch CPU threads (part of the recipe; default %(default)s)"
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--ship",
        action="store_true",
        help="copy the final model into vlm_guard/assets/default_model and write its report",
    )
    train.set_defaults(func=_checked("_train", folders=("out",)), interrupt_note=RESUME_NOTE)

    report = commands.add_parser("report", help="measure a toy model: caption F1, partner hallucination, sinks")
    report.add_argument("--model", default=None, help="model folder (default: the shipped default model)")
    report.add_argument(
        "--out",
        default=None,
        help="JSON path (default: <model>/training_report.json for your own model "
        "folder, ./training_report.json for the shipped model: the installed package is never written)",
    )
    report.add_argument(
        "--scenes", type=positive_int, default=300, help="held-out scenes per measurement (default %(default)s)"
    )
    report.set_defaults(func=_checked("_report", files=("out",)))

    ship = commands.add_parser("ship", help="copy a trained model folder into the package assets and report it")
    ship.add_argument("--model", required=True, help="folder written by `toy train` (e.g. runs/toy/final)")
    ship.add_argument(
        "--scenes", type=positive_int, default=300, help="held-out scenes of the report (default %(default)s)"
    )
    ship.set_defaults(func=deferred("toyworld.cli", "_ship"))

    export = commands.add_parser("export", help="export the latest checkpoint of a run (finished or not)")
    export.add_argument("--run", default="runs/toy", help="run folder written by `toy train` (default %(default)s)")
    export.add_argument("--out", default=None, help="destination (default <run>/export)")
    export.set_defaults(func=_checked("_export", folders=("out",)))

    checker = commands.add_parser("train-checker", help="train the open_clip grounding checker on the world")
    checker.add_argument("--out", default="runs/checker", help="run folder (default %(default)s)")
    checker.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default 600)")
    checker.add_argument("--seed", type=seed_int, default=0, help="training seed (default %(default)s)")
    checker.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default %(default)s)")
    checker.add_argument("--ship", action="store_true", help="copy into vlm_guard/assets/checker")
    checker.set_defaults(func=_checked("_train_checker", folders=("out",)))

    v2_train = commands.add_parser(
        "v2-train",
        help="train default model v2 (own vision tower + projector + "
        "adapters on the pretrained SmolLM2-135M-Instruct); deterministic, resumable",
    )
    v2_train.add_argument("--out", default="runs/v2", help="run folder (default %(default)s)")
    v2_train.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    v2_train.add_argument("--seed", type=seed_int, default=0, help="training seed (default %(default)s)")
    for stage in ("vision", "prealign", "align", "instruct"):
        v2_train.add_argument(
            f"--{stage}-steps", type=non_negative_int, default=None, help=f"steps of the {stage} stage"
        )
    v2_train.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default 1)")
    v2_train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    v2_train.set_defaults(func=_checked("_v2_train", folders=("out",)), interrupt_note=RESUME_NOTE)

    v2_export = commands.add_parser("v2-export", help="export the latest checkpoint of a v2 run (finished or not)")
    v2_export.add_argument("--run", default="runs/v2", help="run folder (default %(default)s)")
    v2_export.add_argument("--out", default=None, help="destination (default <run>/export)")
    v2_export.set_defaults(func=_checked("_v2_export", folders=("out",)))

    v2_report = commands.add_parser("v2-report", help="measure default model v2 on held-out scenes (issue 12 bars)")
    v2_report.add_argument("--model", required=True, help="folder with v2_weights.safetensors (final or export)")
    v2_report.add_argument("--out", default=None, help="JSON path (default <model>/v2_report.json)")
    v2_report.add_argument("--scenes", type=positive_int, default=100, help="held-out scenes (default %(default)s)")
    v2_report.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    v2_report.add_argument(
        "--prior", default=None, help="JSON written by `toy v2-prior --out` to include (the LM's partner preference)"
    )
    v2_report.set_defaults(func=_checked("_v2_report", files=("out",)))

    v2_prior = commands.add_parser("v2-prior", help="the LM's own preference for each partner (text only)")
    v2_prior.add_argument("--out", default=None, help="JSON path (default: print only)")
    v2_prior.set_defaults(func=_checked("_v2_prior", files=("out",)))

    examples = commands.add_parser("examples", help="render the example images shipped with the package")
    examples.add_argument("--out", default=None, help="folder (default vlm_guard/assets/examples)")
    examples.set_defaults(func=_checked("_examples", folders=("out",)))


__all__ = ["register"]
