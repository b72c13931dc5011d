"""Prompt-following check of the evaluation: POPE answers with no yes/no word and CHAIR outputs that are not
captions are counted; past ``--max-unclear`` the task is marked ``followed_prompt: false``, its numbers are withheld
from the tables, one warning names the share, examples and the fix, and ``vlm-guard eval`` exits 3.

The end-to-end runs stub ``generate_answers`` (the model is the small fixture, but its answers are set here), so
each run's outputs, and hence the expected shares, are known exactly."""

import json
import logging
from pathlib import Path

import pytest
from test_eval_runner import coco_fixture, model_args  # noqa: F401  (fixture)

import vlm_guard.eval.runner as runner
from vlm_guard.cli import main
from vlm_guard.eval.following import (
    EXIT_PROMPT_NOT_FOLLOWED,
    MAX_UNCLEAR_SHARE,
    chair_following,
    is_caption,
    not_followed_message,
    pope_answer_is_clear,
    pope_following,
)
from vlm_guard.eval.records import read_header, read_records, read_summary
from vlm_guard.eval.report import comparison_markdown, method_metrics, single_markdown, task_metrics
from vlm_guard.eval.runner import EvalTask, results_paths

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--max-new-tokens", "3", "--batch-size", "2", "--no-progress", "--n-resamples", "50"]


# ---------------------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize(
    "answer, clear",
    [
        ("Yes, there is a dog in the image.", True),
        ("No.", True),
        ("NO!", True),
        ("There is no cat in the image.", True),  # the parse rule's negation, inside the first sentence
        ("I do not see one", True),
        ("yeah", True),
        ("There is a dog in the image.", False),  # read as "yes" by the rule, but says neither
        ("a red ball and a blue cup", False),  # a caption
        ("nope", False),  # read as "yes" by the rule: unclear
        ("", False),
        ("A.\nB", False),
        ("There is a dog. Yes.", False),  # the rule reads the first sentence only
        ("yesterday", False),  # words, not substrings
    ],
)
def test_pope_answer_is_clear(answer, clear):
    assert pope_answer_is_clear(answer) is clear


@pytest.mark.parametrize(
    "text, caption",
    [
        ("A dog on the grass.", True),
        ("a red house , a blue tree", True),
        ("The image shows no people, only a kitchen.", True),
        ("yes", False),
        ("No.", False),
        ("Yes, there is.", False),
        ("nope, a cat", False),
        ("", False),
        ("Kitchen.", False),  # one word
        ("  .  ", False),
    ],
)
def test_is_caption(text, caption):
    assert is_caption(text) is caption


def test_share_threshold_and_examples():
    answers = ["Yes.", "a red ball", "No.", "a red ball", "a blue cup"]  # 3 of 5 unclear
    check = pope_following(answers)
    assert check["n_unclear"] == 3 and check["unclear_share"] == pytest.approx(0.6) and check["n"] == 5
    assert check["followed_prompt"] is False and check["max_unclear"] == MAX_UNCLEAR_SHARE == 0.5
    assert check["unclear_examples"] == ["a red ball", "a blue cup"]  # distinct, in run order, at most 2
    assert pope_following(answers, max_unclear=0.6)["followed_prompt"] is True  # the limit itself is allowed
    assert pope_following(answers[:4])["followed_prompt"] is True  # exactly half: followed
    assert pope_following(["a red ball"] * 9, max_unclear=1)["followed_prompt"] is True  # 1: the check is off
    assert pope_following([]) == {
        "followed_prompt": True,
        "unclear_share": 0.0,
        "n_unclear": 0,
        "unclear_examples": [],
        "n": 0,
        "max_unclear": 0.5,
    }
    assert chair_following(["yes", "no", "A dog on the grass."])["unclear_share"] == pytest.approx(2 / 3)
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="max_unclear"):
            pope_following(answers, max_unclear=bad)


def test_message_names_share_examples_and_fix():
    check = pope_following(["a red ball", "a red ball", "a blue cup", "Yes."])
    message = not_followed_message("pope/random", check, fix="add --prompt-suffix")
    assert message.startswith("pope/random: the model does not answer yes/no")
    assert "75% of its 4 answers" in message and "'a red ball', 'a blue cup'" in message
    assert "Fix: add --prompt-suffix" in message and "--max-unclear 0.5" in message and "\n" not in message
    with_method = not_followed_message("chair", chair_following(["yes"]), methods="vhr")
    assert "with 'vhr' does not caption" in with_method and "--methods none" in with_method
    assert "--methods none" not in not_followed_message(
        "chair", chair_following(["yes"]), methods="vhr", baseline_followed=False
    )


# ---------------------------------------------------------------------------------------------- summaries, tables
def _pope_records(answers, labels):
    return [{"id": str(i), "answer": answer, "label": label} for i, (answer, label) in enumerate(zip(answers, labels))]


def test_task_metrics_flag_the_task_and_keep_the_numbers():
    labels = ["yes", "no"] * 4
    captions = task_metrics("pope", _pope_records(["a red ball on a table"] * 8, labels), n_resamples=20)
    assert captions["followed_prompt"] is False and captions["unclear_share"] == 1.0 and captions["n_unclear"] == 8
    assert captions["accuracy"]["point"] == 0.5 and captions["yes_ratio"]["point"] == 1.0  # what the rule makes of it
    answered = task_metrics("pope", _pope_records(["Yes, there is.", "No."] * 4, labels), n_resamples=20)
    assert answered["followed_prompt"] is True and answered["unclear_share"] == 0.0
    assert answered["accuracy"]["point"] == 1.0 and answered["unclear_examples"] == []
    strict = task_metrics("pope", _pope_records(["Yes.", "maybe"] * 4, labels), n_resamples=20, max_unclear=0.25)
    assert strict["followed_prompt"] is False and strict["unclear_share"] == 0.5


def _chair_records(captions):
    return [
        {
            "id": str(i),
            "answer": caption,
            "n_hallucinated": 0,
            "n_mentions": 0,
            "n_recalled": 0,
            "n_gt_objects": 1,
            "n_words": len(caption.split()),
        }
        for i, caption in enumerate(captions)
    ]


def test_tables_withhold_a_task_whose_prompt_was_not_followed():
    tasks = [
        EvalTask("pope/random", "pope", [], lambda item, answer: {}, 4),
        EvalTask("chair", "chair", [], lambda item, answer: {}, 4),
    ]
    labels = ["yes", "no"] * 10
    records = {"pope/random": _pope_records(["Yes.", "No."] * 10, labels), "chair": _chair_records(["yes", "no"] * 10)}
    metrics = method_metrics(records, tasks, n_resamples=20)
    assert metrics["pope/random"]["followed_prompt"] is True and metrics["chair"]["followed_prompt"] is False
    table = single_markdown(metrics)
    row = table.splitlines()[2]
    assert row.startswith("| 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] |")  # POPE: shown
    assert row.count("prompt not followed (100.0% unclear)") == 3  # CHAIR_S, CHAIR_I, recall: withheld
    assert "random 0.0, chair 100.0" in table and "⚠ Prompt not followed" in table and "'yes', 'no'" in table

    # a comparison: greedy follows, the method set breaks the POPE answers
    broken = method_metrics({"pope/random": _pope_records(["a red ball"] * 20, labels)}, tasks[:1], n_resamples=20)
    followed = method_metrics({"pope/random": records["pope/random"]}, tasks[:1], n_resamples=20)
    summary = {
        "seed": 0,
        "config": {"n_resamples": 20},
        "extra": {
            "skipped_images": 0,
            "comparison": {
                "tasks": {"pope/random": 20},
                "method_sets": [
                    {"label": "none", "name": "greedy", "guard_config": {}, "metrics": followed},
                    {"label": "vhr", "name": "VHR", "guard_config": {}, "inactive_methods": [], "metrics": broken},
                ],
            },
        },
    }
    lines = comparison_markdown(summary).splitlines()
    greedy_row = next(line for line in lines if line.startswith("| greedy |"))
    vhr_row = next(line for line in lines if line.startswith("| VHR |"))
    assert "100.0 [100.0, 100.0]" in greedy_row and "not followed" not in greedy_row
    assert vhr_row == "| VHR | prompt not followed (100.0% unclear) | prompt not followed (100.0% unclear) |"
    assert any("greedy: random 0.0; VHR: random 100.0" in line for line in lines)
    assert any(line.startswith("⚠ Prompt not followed") and "VHR pope/random" in line for line in lines)


def test_shipped_results_keep_their_numbers():
    """The check adds fields and changes no number: the committed greedy summary is recomputed from its records."""
    records_path = ROOT / "docs/results/synthetic.none.jsonl"
    summary = read_summary(ROOT / "docs/results/synthetic.none.summary.json")
    by_task = {}
    for record in read_records(records_path):
        by_task.setdefault(record["task"], []).append(record)
    tasks = [
        EvalTask(name, "pope" if name.startswith("pope") else "chair", [], lambda item, answer: {}, 4)
        for name in summary["metrics"]
    ]
    metrics = method_metrics(by_task, tasks, seed=summary["seed"], n_resamples=summary["config"]["n_resamples"])
    for name, stored in summary["metrics"].items():
        assert {key: metrics[name][key] for key in stored} == stored, name
        assert metrics[name]["followed_prompt"] is True, name


# ---------------------------------------------------------------------------------------------- the command
def _table_row(printed: str) -> str:
    """The first row of the first markdown table printed."""
    lines = printed.splitlines()
    return lines[next(index for index, line in enumerate(lines) if line.startswith("|---")) + 1]


def _stub(monkeypatch, answer):
    """Make ``generate_answers`` answer ``answer(prompt, model)`` for each row."""

    def generate(model, processor, images, prompts, max_new_tokens, **kwargs):
        return [answer(prompt, model) for prompt in prompts]

    monkeypatch.setattr(runner, "generate_answers", generate)


def _pope_argv(coco, out, tmp_path_factory, *extra):
    return [
        "eval",
        "pope",
        *model_args(tmp_path_factory),
        "--questions",
        str(coco / "coco_pope_random.json"),
        "--images",
        str(coco / "val2014"),
        "--out",
        str(out),
        *COMMON,
        *extra,
    ]


def test_pope_answered_with_captions_is_withheld_and_exits_3(
    coco_fixture,
    tmp_path,
    tmp_path_factory,  # noqa: F811
    monkeypatch,
    capsys,
    caplog,
):
    _stub(monkeypatch, lambda prompt, model: "a dog and a kite on the grass")
    out = tmp_path / "pope.jsonl"
    with caplog.at_level(logging.WARNING, logger="vlm_guard.eval.runner"):
        assert main(_pope_argv(coco_fixture, out, tmp_path_factory)) == EXIT_PROMPT_NOT_FOLLOWED == 3
    printed = capsys.readouterr()
    warnings = [record.getMessage() for record in caplog.records if "yes/no" in record.getMessage()]
    assert len(warnings) == 1  # one message: share, example, fix
    assert "pope/random: the model does not answer yes/no" in warnings[0] and "100% of its 6 answers" in warnings[0]
    assert "'a dog and a kite on the grass'" in warnings[0] and "--prompt-suffix" in warnings[0]
    assert "the model did not follow the prompt of pope/random" in printed.err and "exit code 3" in printed.err
    assert _table_row(printed.out) == "| " + " | ".join(["prompt not followed (100.0% unclear)"] * 2) + " |"
    metrics = read_summary(results_paths(out, None)[1])["metrics"]["pope/random"]
    assert metrics["followed_prompt"] is False and metrics["unclear_share"] == 1.0 and metrics["n_unclear"] == 6
    assert read_summary(results_paths(out, None)[1])["config"]["max_unclear"] == 0.5

    # the threshold is no part of the records' fingerprint: the same file resumes with the check off, and passes
    header = read_header(out)
    before = out.read_bytes()
    assert main(_pope_argv(coco_fixture, out, tmp_path_factory, "--max-unclear", "1")) == 0
    assert out.read_bytes() == before and read_header(out) == header
    summary = read_summary(results_paths(out, None)[1])
    assert summary["metrics"]["pope/random"]["followed_prompt"] is True
    assert summary["metrics"]["pope/random"]["unclear_share"] == 1.0  # still reported
    assert main(_pope_argv(coco_fixture, out, tmp_path_factory, "--max-unclear", "2")) == 2
    assert "argument --max-unclear: 2 is out of range: a number in [0, 1]" in capsys.readouterr().err


def test_pope_answered_yes_no_is_reported_normally(
    coco_fixture,
    tmp_path,
    tmp_path_factory,
    monkeypatch,  # noqa: F811
    capsys,
):
    # the fixture's questions: dog (label yes), cat (label no); one unclear answer in six
    answers = iter(["Yes, there is a dog.", "No.", "Yes.", "There is a cat.", "yes", "no"])
    _stub(monkeypatch, lambda prompt, model: next(answers))
    out = tmp_path / "pope.jsonl"
    assert main(_pope_argv(coco_fixture, out, tmp_path_factory)) == 0
    printed = capsys.readouterr()
    assert "not followed" not in printed.out + printed.err
    assert "random 16.7." in printed.out  # the unclear share beside the numbers
    metrics = read_summary(results_paths(out, None)[1])["metrics"]["pope/random"]
    assert metrics["followed_prompt"] is True and metrics["n_unclear"] == 1
    assert metrics["unclear_share"] == pytest.approx(1 / 6) and metrics["unclear_examples"] == ["There is a cat."]
    assert metrics["accuracy"]["point"] == pytest.approx(5 / 6)  # "There is a cat." is read as "yes" (label no)


def test_chair_answered_with_yes_no_is_withheld(
    coco_fixture,
    tmp_path,
    tmp_path_factory,
    monkeypatch,  # noqa: F811
    capsys,
    caplog,
):
    _stub(monkeypatch, lambda prompt, model: "Yes.")
    out = tmp_path / "chair.jsonl"
    argv = [
        "eval",
        "chair",
        *model_args(tmp_path_factory),
        "--images",
        str(coco_fixture / "val2014"),
        "--instances",
        str(coco_fixture / "instances_val2014.json"),
        "--captions",
        str(coco_fixture / "captions_val2014.json"),
        "--n-images",
        "10",
        "--out",
        str(out),
        *COMMON,
    ]
    with caplog.at_level(logging.WARNING, logger="vlm_guard.eval.runner"):
        assert main(argv) == 3
    printed = capsys.readouterr()
    warning = next(record.getMessage() for record in caplog.records if "Fix:" in record.getMessage())
    assert warning.startswith("chair: the model does not caption the image") and "100% of its 3 outputs" in warning
    assert "--prompt" in warning and "'Yes.'" in warning
    assert printed.out.count("prompt not followed") >= 3 and "exit code 3" in printed.err
    metrics = read_summary(results_paths(out, None)[1])["metrics"]["chair"]
    assert metrics["followed_prompt"] is False and metrics["unclear_share"] == 1.0

    _stub(monkeypatch, lambda prompt, model: "A dog on the grass next to a kite.")
    out = tmp_path / "chair_ok.jsonl"
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv) == 0
    metrics = read_summary(results_paths(out, None)[1])["metrics"]["chair"]
    assert metrics["followed_prompt"] is True and metrics["unclear_share"] == 0.0


def _synthetic_argv(out, tmp_path_factory, *extra):
    return [
        "eval",
        "synthetic",
        *model_args(tmp_path_factory),
        "--limit",
        "2",
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--n-resamples",
        "20",
        *extra,
    ]


def test_synthetic_benchmark_checks_every_task(tmp_path, tmp_path_factory, monkeypatch, capsys, caplog):
    def answer(prompt, model):
        return "a red house , a blue tree" if "is there" in prompt else "yes"  # the two prompts swapped

    _stub(monkeypatch, answer)
    out = tmp_path / "syn.jsonl"
    with caplog.at_level(logging.WARNING, logger="vlm_guard.eval.runner"):
        assert main(_synthetic_argv(out, tmp_path_factory)) == 3
    messages = [record.getMessage() for record in caplog.records if "Fix:" in record.getMessage()]
    assert [message.split(":", 1)[0] for message in messages] == [
        "pope/random",
        "pope/popular",
        "pope/adversarial",
        "chair",
    ]
    assert all("the synthetic" in message and "fixed" in message for message in messages)
    metrics = read_summary(results_paths(out, None)[1])["metrics"]
    assert all(metrics[task]["followed_prompt"] is False for task in metrics)
    row = _table_row(capsys.readouterr().out)
    assert row.count("prompt not followed") == 9 and "[" not in row  # no interval anywhere in the table row


def test_synthetic_comparison_withholds_only_the_broken_method_set(tmp_path, tmp_path_factory, monkeypatch, capsys):
    def answer(prompt, model):
        if model.guard_config.vhr is not None:  # VHR breaks the answers (as seen on default model v2)
            return "A.\nB" if "is there" in prompt else ""
        return "yes" if "is there" in prompt else "a red house , a blue tree"

    _stub(monkeypatch, answer)
    out = tmp_path / "syn.jsonl"
    assert main(_synthetic_argv(out, tmp_path_factory, "--compare", "vhr")) == 0  # the baseline followed
    printed = capsys.readouterr().out
    greedy_row = next(line for line in printed.splitlines() if line.startswith("| greedy |"))
    vhr_row = next(line for line in printed.splitlines() if line.startswith("| VHR |"))
    assert "not followed" not in greedy_row and vhr_row.count("prompt not followed (100.0% unclear)") == 9
    summary = read_summary(tmp_path / "syn.summary.json")
    assert [(e["methods"], e["task"]) for e in summary["extra"]["comparison"]["prompt_not_followed"]] == [
        ("vhr", "pope/random"),
        ("vhr", "pope/popular"),
        ("vhr", "pope/adversarial"),
        ("vhr", "chair"),
    ]
    assert summary["metrics"]["none"]["chair"]["followed_prompt"] is True
    assert summary["metrics"]["vhr"]["chair"]["followed_prompt"] is False
    assert json.loads(json.dumps(summary))  # JSON-ready


def test_the_fixture_follows_the_synthetic_prompts(tmp_path, tmp_path_factory, capsys):
    """No stub: the shipped test fixture answers its world's questions with yes/no and captions its scenes."""
    if model_args(tmp_path_factory):
        pytest.skip("the test fixture is not installed (a random tiny model follows no prompt)")
    out = tmp_path / "syn.jsonl"
    assert main(_synthetic_argv(out, tmp_path_factory)) == 0
    metrics = read_summary(results_paths(out, None)[1])["metrics"]
    assert all(metrics[task]["followed_prompt"] is True for task in metrics), metrics
