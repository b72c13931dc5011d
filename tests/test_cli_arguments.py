"""Every command-line argument is checked before any work (issue 23 item 3): every numeric option of every command
has a checked type (a new option declared with a bare ``int`` / ``float`` fails here), each refuses NaN, infinities,
text and values outside its range with one line naming the option, the value and the range; output paths that are not
regular files are refused before a model loads; light copies of constants agree with the modules they mirror."""

import argparse
import dataclasses
import math
import os

import pytest

from toyworld import build_parser
from vlm_guard.cli import COMMAND_MODULES
from vlm_guard.cli import main as _main
from vlm_guard.cli.arguments import Number, number_actions


def main(argv):
    """``vlm-guard`` and, for ``toy ...``, the repository's training commands (``python -m toyworld``)."""
    return _main(argv, modules=[*COMMAND_MODULES, "toyworld.commands"])


PARSER = build_parser()
ACTIONS = [
    (path, action)
    for path, action in number_actions(PARSER)
    if action.option_strings and action.nargs != 0 and not isinstance(action, argparse._HelpAction)
]


def _numeric(action) -> bool:
    default_is_number = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
    return (
        action.type in (int, float)
        or isinstance(action.type, Number)
        or getattr(action.type, "checked", False)
        or (action.type is None and default_is_number)
    )


NUMERIC = [(path, action) for path, action in ACTIONS if _numeric(action)]
IDS = [" ".join(path + (action.option_strings[-1],)) for path, action in NUMERIC]


def test_the_parser_reaches_every_command():
    commands = {path for path, _ in ACTIONS}
    for expected in [
        ("calibrate",),
        ("tune",),
        ("caption",),
        ("bench",),
        ("demo",),
        ("eval", "synthetic"),
        ("eval", "pope"),
        ("eval", "chair"),
        ("eval", "synthetic-images"),
        ("toy", "train"),
    ]:
        assert expected in commands
    assert len(NUMERIC) >= 40  # every numeric option of every command is tested below


@pytest.mark.parametrize("path, action", NUMERIC, ids=IDS)
def test_numeric_option_has_a_checked_type(path, action):
    assert action.type not in (int, float) and action.type is not None, (
        f"{' '.join(path)} {action.option_strings[-1]} is declared with type={getattr(action.type, '__name__', None)}: "
        "use a checked type from vlm_guard.cli.arguments (positive_int, int_range, share, ...)"
    )


def _bad_values(kind: Number | None) -> list[str]:
    values = ["nan", "inf", "1e999", "abc", ""]
    if kind is None:  # a checked type of its own (bench --long-prompt): the generic bad values only
        return values + ["-5"]
    if kind.minimum is not None:
        below = kind.minimum - 1 if kind.kind is int else kind.minimum - 0.5
        values.append(str(int(below)) if kind.kind is int else repr(below))
        if kind.strict_minimum:
            values.append(str(kind.minimum))
    if kind.maximum is not None:
        above = kind.maximum + 1 if kind.kind is int else kind.maximum + 0.5
        values.append(str(int(above)) if kind.kind is int else repr(above))
    if kind.kind is int:
        values.append("2.5")
    return values


@pytest.mark.parametrize("path, action", NUMERIC, ids=IDS)
def test_numeric_option_refuses_bad_values_in_one_line(path, action, capsys):
    flag = action.option_strings[-1]
    kind = action.type if isinstance(action.type, Number) else None
    for value in _bad_values(kind):
        if value.startswith("-") and not value[1:2].isdigit():
            continue
        with pytest.raises(SystemExit) as stopped:
            PARSER.parse_args([*path, flag, value])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert flag in lines[0] and (value.strip() in lines[0] or value == ""), err
        if kind is not None and value not in ("", "abc"):
            assert kind.describe() in lines[0], err
    if action.default is not None and kind is not None:
        assert kind.allows(action.default), f"{flag}'s default {action.default} is outside its own range"


def test_good_values_pass_and_defaults_are_converted():
    args = PARSER.parse_args(["eval", "synthetic", "--out", "o.jsonl", "--batch-size", "3", "--max-unclear", "0.25"])
    assert args.batch_size == 3 and args.max_unclear == 0.25
    assert PARSER.parse_args(["tune", "--methods", "vhr,GIFT"]).methods == ["vhr", "gift"]
    assert PARSER.parse_args(["calibrate", "--images", "x", "--out", "y", "--sink-dims", "5, 7"]).sink_dims == [5, 7]


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["tune", "--methods", "vhr,nope"], "--methods: 'vhr,nope' must name methods from vhr,var,gift,pai,vcd"),
        (
            ["calibrate", "--images", "x", "--out", "y", "--sink-dims", "a,b"],
            "--sink-dims: 'a,b' is not comma-separated",
        ),
        (["calibrate", "--images", "x", "--out", "y", "--sink-dims", "3,-1"], "negative dimension(s) [-1]"),
        (["bench", "--long-prompt", "100"], "--long-prompt: 100 is out of range: 0 (skip) or an integer >= 1024"),
        (["eval", "synthetic", "--out", "o", "--batch-size", "0"], "--batch-size: 0 is out of range: an integer >= 1"),
        (["eval", "synthetic", "--out", "o", "--max-unclear", "nan"], "--max-unclear: nan is not a number in [0, 1]"),
        (["demo", "--port", "70000"], "--port: 70000 is out of range: an integer in [1, 65535]"),
        (["tune", "--budget", "-inf"], "--budget: expected one argument"),
    ],
)
def test_bad_text_arguments_are_refused_while_parsing(argv, shown, capsys):
    with pytest.raises(SystemExit):
        PARSER.parse_args(argv)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and shown in err, err
    assert "see vlm-guard" in err and "--help" in err


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: a refused argument must be refused before it."""
    import vlm_guard.cli.calibrate as heads_cli
    import vlm_guard.eval.runner as runner
    import vlm_guard.models.loading as loading

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module, name in ((runner, "load_model"), (heads_cli, "load_model"), (loading, "load_model")):
        monkeypatch.setattr(module, name, loaded)


def _special_files(tmp_path):
    link = tmp_path / "link_to_null.jsonl"
    link.symlink_to(os.devnull)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "missing" / "x")
    return {
        "/dev/null": (os.devnull, "is a character device, not a regular file"),
        "link": (str(link), "is a link to a character device"),
        "fifo": (str(fifo), "is a named pipe, not a regular file"),
        "dangling": (str(dangling), "is a link to nothing"),
    }


@pytest.mark.parametrize("which", ["/dev/null", "link", "fifo", "dangling"])
@pytest.mark.parametrize(
    "command",
    [
        ["eval", "synthetic", "--out", "{out}"],
        ["eval", "synthetic", "--compare", "none;vhr", "--out", "{out}"],
        ["tune", "--state", "{out}", "--out", "{tmp}/tuned"],
        ["bench", "--out", "{out}"],
        ["bench", "--out", "", "--markdown", "{out}"],
        ["toy", "report", "--out", "{out}"],
        ["toy", "v2-prior", "--out", "{out}"],
    ],
)
def test_output_that_is_not_a_regular_file_is_refused_before_any_work(which, command, tmp_path, capsys, no_model_load):
    out, message = _special_files(tmp_path)[which]
    argv = [part.format(out=out, tmp=tmp_path) for part in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err, err


def test_light_copies_match_the_modules_they_mirror():
    import vlm_guard.calibration.head_map as head_map
    import vlm_guard.cli.heads as light
    from vlm_guard.cli.arguments import DTYPE_NAMES, WORLD_CAPTION_TOKENS
    from vlm_guard.cli.tune import TUNABLE_METHODS
    from vlm_guard.config import _method_config_class
    from vlm_guard.models.loading import DTYPE_NAMES as LOADING_DTYPES
    from vlm_guard.settings import UNTUNED_DEFAULT_METHODS
    from vlm_guard.synthetic.worlds import WORLD_NAMES, world_kind
    from vlm_guard.tuning.space import TUNABLE_METHODS as SPACE_METHODS

    assert DTYPE_NAMES == LOADING_DTYPES
    assert tuple(TUNABLE_METHODS) == tuple(SPACE_METHODS)
    assert tuple(light.UNTUNED_DEFAULT_METHODS) == tuple(UNTUNED_DEFAULT_METHODS)
    assert set(WORLD_CAPTION_TOKENS) == set(WORLD_NAMES)
    for name, tokens in WORLD_CAPTION_TOKENS.items():
        assert world_kind(name).caption_tokens == tokens
    for key in ("FORMAT_NAME", "FORMAT_VERSION", "JSON_FILE", "TENSOR_FILE", "TENSORS_DIGEST_KEY", "MAX_JSON_BYTES"):
        assert getattr(light, key) == getattr(head_map, key), key
    for method, defaults in light.RELEASED_DEFAULTS.items():
        config = _method_config_class(method)()
        actual = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
        assert list(actual) == list(defaults) and actual == defaults, method


def test_number_type_describes_its_range():
    from vlm_guard.cli.arguments import float_range, int_range, positive_float, share

    assert int_range(1, 4096).describe() == "an integer in [1, 4096]"
    assert positive_float.describe() == "a number > 0"
    assert share("1") == 1.0 and share("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match="out of range: a number > 0"):
        positive_float("0")
    with pytest.raises(argparse.ArgumentTypeError, match="is not a number in"):
        float_range(0.0, 1.0)("nan")
    assert math.isfinite(positive_float("1e300"))


@pytest.mark.parametrize(
    "command, shown",
    [
        (
            ["eval", "synthetic", "--out", "{tmp}/o.jsonl", "--head-map", "{tmp}/no_map"],
            "--head-map {tmp}/no_map: no such folder",
        ),
        (
            ["eval", "synthetic", "--out", "{tmp}/o.jsonl", "--head-map", "{tmp}"],
            "holds no head_map.json or head_map.safetensors",
        ),
        (["tune", "--head-map", "{tmp}/no_map"], "--head-map {tmp}/no_map: no such folder"),
        (["caption", "--head-map", "{tmp}/no_map"], "--head-map {tmp}/no_map: no such folder"),
        (["demo", "--head-map", "{tmp}/no_map", "--port", "1"], "--head-map {tmp}/no_map: no such folder"),
        (["tune", "--pope", "{tmp}/missing_random.json"], "--pope {tmp}/missing_random.json: no such file"),
        (
            ["tune", "--images", "{tmp}/no_images", "--instances", "{tmp}/i.json"],
            "--instances {tmp}/i.json: no such file",
        ),
        (["calibrate", "--images", "{tmp}/empty", "--out", "{tmp}/map"], "the folder holds no file ending in"),
    ],
)
def test_missing_inputs_are_refused_before_the_model_loads(command, shown, tmp_path, capsys, no_model_load):
    (tmp_path / "empty").mkdir()
    argv = [part.format(tmp=tmp_path) for part in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert shown.format(tmp=tmp_path) in err, err


def test_the_shipped_model_runs_on_one_cpu_thread_unless_told_otherwise():
    """caption / eval / demo: 1 torch thread for the shipped default model on the CPU (2 threads took 12x longer per
    caption while another process held a core), torch's default for a user's model or another device, --threads wins."""
    from vlm_guard.cli.arguments import cpu_threads

    def ns(**kwargs):
        return argparse.Namespace(**{"threads": None, "device": "cpu", "model": None, **kwargs})

    assert cpu_threads(ns()) == 1
    assert cpu_threads(ns(threads=3)) == 3
    assert cpu_threads(ns(model="llava-hf/llava-1.5-7b-hf")) is None
    assert cpu_threads(ns(device="cuda")) is None
    assert cpu_threads(ns(device="cuda", threads=2)) == 2
    for command in (["caption"], ["eval", "synthetic", "--out", "x.jsonl"], ["demo"]):
        args = PARSER.parse_args([*command, "--threads", "2"])
        assert args.threads == 2, command


def test_caption_sets_one_thread_for_the_shipped_model():
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["caption", "--methods", "none", "--max-new-tokens", "2"]) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert main(["caption", "--methods", "none", "--max-new-tokens", "2", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
