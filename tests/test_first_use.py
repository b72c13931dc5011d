"""First use (issue 17, item 16): the README's Python example runs as written, its command synopses list every
required flag, and `toy report` leaves the installed package alone by default."""

import re
import shlex
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _code_block(language: str, after_heading: str) -> str:
    section = README.split(after_heading, 1)[1]
    match = re.search(rf"```{language}\n(.*?)```", section, flags=re.S)
    assert match, f"no {language} block after {after_heading!r}"
    return match.group(1)


def test_readme_python_example_runs_as_written(capsys):
    code = _code_block("python", "## Use")
    assert code.count("max_new_tokens=64") == 2
    namespace: dict = {}
    exec(
        compile(code.replace("max_new_tokens=64", "max_new_tokens=8"), "README.md", "exec"), namespace
    )  # shorter, same code  # noqa: S102 - the README's own example
    output_ids, plain_ids, inputs = namespace["output_ids"], namespace["plain_ids"], namespace["inputs"]
    assert output_ids.shape[0] == 1 and output_ids.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(output_ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert plain_ids.shape[0] == 1
    assert capsys.readouterr().out.strip()  # the decoded answer is printed
    assert "apply_chat_template" in code


def _subparser(parser, name):
    for action in parser._actions:
        if getattr(action, "choices", None) and isinstance(action.choices, dict) and name in action.choices:
            return action.choices[name]
    return None


def test_readme_command_synopses_list_every_required_flag():
    from vlm_guard.cli import build_parser

    parser = build_parser()
    lines = [line for line in _code_block("text", "## Commands").splitlines() if line.startswith("vlm-guard ")]
    seen = set()
    for line in lines:
        words = shlex.split(line.replace("(", " ").replace(")", " ").replace("|", " "))[1:]
        command, path = parser, []
        for word in words:
            child = _subparser(command, word)
            if child is None:
                break
            command, path = child, [*path, word]
        assert path, f"README synopsis {line!r} names no command"
        seen.add(" ".join(path))
        required = [action.option_strings for action in command._actions if action.option_strings and action.required]
        missing = [options[0] for options in required if not any(option in words for option in options)]
        assert missing == [], f"README synopsis of `vlm-guard {' '.join(path)}` omits required {missing}"
    for benchmark in ("pope", "chair", "synthetic"):
        assert f"eval {benchmark}" in seen


def test_toy_report_does_not_write_into_the_installed_package(tmp_path, monkeypatch):
    import toyworld.shapes.report as report_module
    from toyworld import main
    from vlm_guard.defaults import DEFAULT_MODEL_DIR

    shipped = DEFAULT_MODEL_DIR / "training_report.json"
    before = shipped.read_bytes() if shipped.exists() else None
    monkeypatch.setattr(report_module, "build_report", lambda model_dir, scenes=300: {"summary": {"stub": 1}})
    monkeypatch.chdir(tmp_path)
    assert main(["toy", "report", "--scenes", "1"]) == 0
    assert (tmp_path / "training_report.json").is_file()
    assert (shipped.read_bytes() if shipped.exists() else None) == before
    own = tmp_path / "my_model"
    own.mkdir()
    assert main(["toy", "report", "--model", str(own), "--scenes", "1"]) == 0
    assert (own / "training_report.json").is_file()  # a model folder of your own gets its report beside it
