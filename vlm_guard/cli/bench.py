"""``vlm-guard bench``: its parser (standard library only; :mod:`vlm_guard.eval.bench`, which does the work and
documents every measure, imports torch and transformers when imported)."""

from __future__ import annotations

import argparse

from vlm_guard.cli.arguments import DTYPE_NAMES, deferred, int_range, non_negative_int, positive_int

DESCRIPTION = "vlm-guard bench: latency and memory of every decoding method against plain generate."
MIN_LONG_PROMPT = 1024
"""The shortest --long-prompt (576 of its tokens are image tokens), 0 skipping the pass."""


def _long_prompt(text: str) -> int:
    value = non_negative_int(text)
    if 0 < value < MIN_LONG_PROMPT:
        raise argparse.ArgumentTypeError(
            f"{value} is out of range: 0 (skip) or an integer >= {MIN_LONG_PROMPT} (576 of the tokens are image tokens)"
        )
    return value


_long_prompt.__name__ = "int"
_long_prompt.checked = True  # a checked numeric type, like arguments.Number (tests/test_cli_arguments.py)


def run(args: argparse.Namespace) -> int:
    """Checks the output paths and the device, then runs :func:`vlm_guard.eval.bench._command`."""
    from vlm_guard.cli.checks import check_device, check_output_file

    for flag, path in (("--out", args.out), ("--markdown", args.markdown)):
        if path:
            check_output_file(path, flag)
    check_device(args.device)
    return deferred("vlm_guard.eval.bench", "_command")(args)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="latency and memory of each decoding method vs plain generate", description=DESCRIPTION
    )
    parser.add_argument(
        "--model",
        choices=("both", "default", "random", "default-v2", "fixture", "all", "none"),
        default="both",
        help="which models to time (default %(default)s): default: the shipped default model, "
        "vlm_guard.load_default() (v3; $VLM_GUARD_DEFAULT_MODEL=v2 or fixture picks another); random: a random "
        "LLaVA-1.5-shaped model (576 image tokens; see --hidden-size, --layers); both: default and random; "
        "default-v2: v2 from --v2-weights; fixture: the 3.6M test fixture; all: the fixture, v2 and the random "
        "model (the table of docs/results/bench.md); none: only the long-prompt memory pass",
    )
    parser.add_argument(
        "--v2-weights",
        default=None,
        help="with --model default-v2 or all: folder of v2_weights.safetensors (default: the shipped one)",
    )
    parser.add_argument(
        "--long-prompt",
        type=_long_prompt,
        default=8192,
        help="peak memory of every configuration at a prompt of this many tokens on a small random "
        f"LLaVA-shaped model, each in a fresh process (0: skip; else >= {MIN_LONG_PROMPT}; "
        "default %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="timed repetitions per configuration (interleaved; default %(default)s)",
    )
    parser.add_argument(
        "--new-tokens",
        type=int_range(2, 1 << 20, note="decode latency needs two steps"),
        default=16,
        help="tokens generated per run (>= 2; default %(default)s)",
    )
    parser.add_argument("--batch", type=positive_int, default=1, help="prompts per batch (default %(default)s)")
    parser.add_argument(
        "--hidden-size", type=positive_int, default=1024, help="random model: text width (default %(default)s)"
    )
    parser.add_argument(
        "--layers", type=positive_int, default=6, help="random model: text layers (default %(default)s)"
    )
    parser.add_argument(
        "--heads", type=positive_int, default=32, help="random model: attention heads (default %(default)s)"
    )
    parser.add_argument(
        "--vocab-size",
        type=positive_int,
        default=4096,
        help="random model: vocabulary (scaled down like the width; default %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="float32",
        help="model dtype (float16 for a GPU run; the methods' explicit rows stay fp32; default %(default)s)",
    )
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="bench.json", help="JSON report path ('' to skip; default %(default)s)")
    parser.add_argument("--markdown", default="", help="also write the tables as markdown to this path")
    parser.set_defaults(func=run)


__all__ = ["register", "run"]
