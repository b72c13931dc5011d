"""`vlm-guard eval` on few items (issue 28 item 5): no better/worse verdict below a minimum n, the ``--out`` file is
written under ``--compare``, and the defaults ``--help`` states are the ones that run."""

import json
import re

import pytest
from test_eval_runner import model_args

from toyworld import build_parser
from vlm_guard.cli import main
from vlm_guard.cli.arguments import number_actions
from vlm_guard.eval.records import read_records
from vlm_guard.eval.report import MIN_ITEMS_FOR_VERDICT, _delta

SIGNIFICANT = {"diff": 0.25, "low": 0.25, "high": 0.25, "significant": True}


def test_no_verdict_below_the_minimum_number_of_items():
    few = _delta(SIGNIFICANT, "accuracy", 4)
    assert f"too few items (n=4, need >= {MIN_ITEMS_FOR_VERDICT})" in few
    assert "better" not in few and "worse" not in few and "**" not in few
    enough = _delta(SIGNIFICANT, "accuracy", MIN_ITEMS_FOR_VERDICT)
    assert enough.endswith("better") and "too few" not in enough
    assert _delta(SIGNIFICANT, "chair_i", 300).endswith("worse")


def test_the_minimum_keeps_the_bootstrap_interval_near_the_t_interval():
    """The reason for the minimum (eval/report.py): from n=30 on the percentile interval is >= 0.94 of the t interval's
    width; at n=20 it is not."""
    from statistics import NormalDist

    def t_quantile(df: int) -> float:  # Cornish-Fisher expansion of t(0.975, df), accurate to 1e-3 from df >= 5
        z = NormalDist().inv_cdf(0.975)
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)

    def ratio(n: int) -> float:
        return NormalDist().inv_cdf(0.975) * ((n - 1) / n) ** 0.5 / t_quantile(n - 1)

    assert ratio(MIN_ITEMS_FOR_VERDICT) >= 0.94 > ratio(20)


@pytest.mark.slow
def test_compare_on_few_items_writes_out_and_gives_no_verdict(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "syn.jsonl"
    argv = [
        "eval",
        "synthetic",
        *model_args(tmp_path_factory),
        "--limit",
        "4",
        "--compare",
        "none;vhr",
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--n-resamples",
        "50",
        "--max-unclear",
        "1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "better" not in printed.replace("lower is better", "") and "worse" not in printed
    assert f"too few items (n=4, need >= {MIN_ITEMS_FOR_VERDICT})" in printed
    assert f"records of every method set: {out}" in printed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["methods"] for r in records] == ["none"] * 16 + ["vhr"] * 16
    assert records == read_records(tmp_path / "syn.none.jsonl") + read_records(tmp_path / "syn.vhr.jsonl")
    assert main(argv) == 0  # a rerun resumes from the per-set files and writes --out again
    assert [json.loads(line) for line in out.read_text().splitlines()] == records


HELP_DEFAULT = re.compile(r"default:? (-?\d+(?:\.\d+)?)\b")


@pytest.mark.parametrize(
    "path, action",
    [
        (path, action)
        for path, action in number_actions(build_parser())
        if action.help
        and HELP_DEFAULT.search(action.help % {"default": action.default} if "%(" in action.help else action.help)
        and isinstance(action.default, (int, float))
        and not isinstance(action.default, bool)
    ],
    ids=lambda value: value if isinstance(value, tuple) else getattr(value, "dest", ""),
)
def test_help_states_the_default_that_runs(path, action):
    text = action.help % {"default": action.default} if "%(" in action.help else action.help
    stated = HELP_DEFAULT.search(text).group(1)
    assert float(stated) == float(action.default), (
        f"{' '.join(path)} {action.option_strings}: help says {stated}, runs {action.default}"
    )


def test_eval_help_gives_each_benchmarks_generation_budget():
    from vlm_guard.cli.eval import DEFAULT_MAX_NEW_TOKENS
    from vlm_guard.synthetic.worlds import world_kind

    parser = build_parser()
    helps = {}
    for path, action in number_actions(parser):
        if "--max-new-tokens" in action.option_strings and path[0] == "eval":
            helps[path[1]] = action.help
    assert f"default {DEFAULT_MAX_NEW_TOKENS['pope']}" in helps["pope"]
    assert f"default {DEFAULT_MAX_NEW_TOKENS['chair']}" in helps["chair"]
    assert f"{DEFAULT_MAX_NEW_TOKENS['synthetic_pope']} for the yes/no questions" in helps["synthetic"]
    for world in ("everyday", "shapes"):
        assert f"{world_kind(world).caption_tokens} {world}" in helps["synthetic"]


def _help_of(path, flag):
    for found_path, action in number_actions(build_parser()):
        if found_path == path and flag in action.option_strings:
            return action.help
    raise AssertionError(f"no {flag} in {path}")


def test_help_of_options_defaulting_to_a_config_states_the_configs_value():
    """Options whose default is None take their value from a config class; the help must quote that value."""
    from toyworld.checker import CheckerTrainConfig
    from toyworld.shapes.train import TrainConfig
    from vlm_guard.demo.inputs import MEGABYTE, DemoLimits

    limits, recipe = DemoLimits(), TrainConfig()
    expected = {
        (("demo",), "--max-new-tokens"): limits.max_new_tokens,
        (("demo",), "--max-upload-mb"): limits.max_upload_bytes // MEGABYTE,
        (("demo",), "--queue-size"): limits.queue_size,
        (("demo",), "--max-sessions"): limits.max_sessions,
        (("demo",), "--session-ttl"): limits.session_ttl_seconds,
        (("toy", "train"), "--batch"): recipe.multimodal_batch,
        (("toy", "train"), "--question-fraction"): recipe.question_fraction,
        (("toy", "train-checker"), "--steps"): CheckerTrainConfig().steps,
    }
    for (path, flag), value in expected.items():
        stated = HELP_DEFAULT.search(_help_of(path, flag)).group(1)
        assert float(stated) == float(value), f"{' '.join(path)} {flag}: help says {stated}, the config says {value}"
