"""Files the project reads back are checked against their schema: a damaged or edited field is a one-line error that
names the file (and line) and the field, never a silent drop or a traceback. Eval records here; tune state and head
map JSON fields below."""

import json

import pytest
from test_eval_runner import tiny_model_dir

from vlm_guard.cli import main
from vlm_guard.eval.records import read_numbered_records, read_summary


def _eval(out, model_dir, tasks="pope"):
    return [
        "eval",
        "synthetic",
        "--tasks",
        tasks,
        "--limit",
        "2",
        "--no-progress",
        "--n-resamples",
        "20",
        "--max-new-tokens",
        "2",
        "--max-unclear",
        "1",
        "--out",
        str(out),
        "--model",
        str(model_dir),
    ]


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def _fixed_code_digest():
    """The method code's digest is part of a run's identity; pin it so that edits to the source tree made while
    these tests run (a developer saving a file) do not turn a resume into a refusal."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("vlm_guard.eval.runner.code_digest", lambda: {"sha256_16": "0" * 16, "files": 0})
        yield


@pytest.fixture(scope="module")
def pope_run(tmp_path_factory):
    """A finished 6-item POPE run (2 items of each split) and its lines."""
    folder = tmp_path_factory.mktemp("pope_run")
    model_dir = tiny_model_dir(tmp_path_factory)
    out = folder / "syn.jsonl"
    assert main(_eval(out, model_dir)) == 0
    return out, model_dir, out.read_text(encoding="utf-8").splitlines()


def _with_record_edit(out, lines, index, change):
    """Write the run's file back with record line ``index`` (1-based line of the file) changed."""
    record = json.loads(lines[index - 1])
    change(record)
    edited = list(lines)
    edited[index - 1] = json.dumps(record)
    out.write_text("\n".join(edited) + "\n", encoding="utf-8")
    return record


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("task", "pope/randomm", "field 'task' 'pope/randomm', not a task of this run"),  # repro turn3/05
        ("task", "pope/popular", "field 'task' 'pope/popular', but item"),  # another task of the run
        ("task", None, "field 'task' None"),
        ("task", ["pope/random"], "field 'task' ['pope/random']"),
        ("id", 3.5, "field 'id' is 3.5"),
        ("id", True, "field 'id' is True"),
        ("id", {"a": 1}, "field 'id' is {'a': 1}"),
        ("prompt", 7, "field 'prompt' 7, not a string"),
        ("answer", None, "field 'answer' None, not a string"),
        ("label", "maybe", "field 'label' 'maybe', not 'yes' or 'no'"),
        ("label", 1, "field 'label' 1"),
    ],
)
def test_an_edited_record_is_refused_naming_the_line_and_the_field(pope_run, capsys, field, value, expected):
    out, model_dir, lines = pope_run
    try:
        _with_record_edit(out, lines, 2, lambda record: record.__setitem__(field, value))
        capsys.readouterr()
        assert main(_eval(out, model_dir)) == 2
        err = _error_line(capsys.readouterr().err)
        assert f"{out}:2:" in err and expected in err, err
    finally:
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_an_unedited_file_still_resumes(pope_run):
    out, model_dir, lines = pope_run
    assert main(_eval(out, model_dir)) == 0
    assert out.read_text(encoding="utf-8").splitlines() == lines
    assert read_summary(out.with_name("syn.summary.json"))["metrics"]["pope/random"]["n"] == 2


def test_a_truncated_last_line_is_redone_on_resume(pope_run):
    """A kill in the middle of a write leaves half a line: the resume drops it and redoes that item."""
    out, model_dir, lines = pope_run
    try:
        out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")
        assert main(_eval(out, model_dir)) == 0
        numbered = read_numbered_records(out)
        assert len(numbered) == 6 and [line for line, _ in numbered] == list(range(2, 8))
        assert read_summary(out.with_name("syn.summary.json"))["n"] == 6
    finally:
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("n_mentions", -1, "field 'n_mentions' -1, not a non-negative integer"),
        ("n_words", 2.5, "field 'n_words' 2.5"),
        ("n_recalled", "1", "field 'n_recalled' '1'"),
        ("n_hallucinated", 10_000, "field 'n_hallucinated' 10000 larger than 'n_mentions'"),
    ],
)
def test_an_edited_chair_count_is_refused(tmp_path, tmp_path_factory, capsys, field, value, expected):
    out = tmp_path / "chair.jsonl"
    model_dir = tiny_model_dir(tmp_path_factory)
    assert main(_eval(out, model_dir, tasks="chair")) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    _with_record_edit(out, lines, 2, lambda record: record.__setitem__(field, value))
    capsys.readouterr()
    assert main(_eval(out, model_dir, tasks="chair")) == 2
    err = _error_line(capsys.readouterr().err)
    assert f"{out}:2:" in err and expected in err, err


# ---------------------------------------------------------------------------------------------- tune state files
def _state(tmp_path):
    from vlm_guard.tuning.search import STATE_VERSION
    from vlm_guard.tuning.space import Candidate

    greedy, vhr = Candidate({}), Candidate({"vhr": {"alpha": 0.5}})
    identity = {"fingerprint_hash": "abc", "data": "synthetic"}
    data = {
        "format": "vlm_guard.tune_state",
        "version": STATE_VERSION,
        "identity": identity,
        "elapsed_s": 3.5,
        "plan": {"rungs": [{"pope/random": 2, "chair": 2}], "scale": 1.0},
        "trials": {
            candidate.key: {
                "label": candidate.label,
                "methods": candidate.methods,
                "band": "",
                "items": {
                    "pope/random": {"a": {"c": 1, "y": 0}, "b": {"skip": 1}},
                    "chair": {"s": {"m": 3, "h": 1, "g": 2, "r": 2}},
                },
            }
            for candidate in (greedy, vhr)
        },
    }
    return tmp_path / "tune_state.json", identity, data, vhr.key


def test_a_valid_tune_state_resumes_and_saves_atomically(tmp_path, monkeypatch):
    import errno

    from vlm_guard import fileio
    from vlm_guard.tuning.search import TuningState

    path, identity, data, _ = _state(tmp_path)
    path.write_text(json.dumps(data))
    state = TuningState(path, identity)
    assert state.resumed and state.data == data
    state.data["elapsed_s"] = 99.0

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", disk_full)
    with pytest.raises(OSError):
        state.save(force=True)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == data and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    state.save(force=True)
    assert TuningState(path, identity).data["elapsed_s"] == 99.0


def _set(data, dotted, value, key):
    """Set ``data[...]`` at a path like ``trials.KEY.items.pope/random.a.c`` (KEY: the vhr setting's key)."""
    parts = [key if part == "KEY" else part for part in dotted.split("|")]
    target = data
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if value is _DELETE:
        del target[parts[-1]]
    elif isinstance(target, list):
        target[int(parts[-1])] = value
    else:
        target[parts[-1]] = value


_DELETE = object()


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("trials|KEY|items|pope/random|a|c", 2, "field trials['{KEY}'].items['pope/random']['a'].c is 2, not 0 or 1"),
        ("trials|KEY|items|pope/random|a|c", "1", ".c is '1', not 0 or 1"),
        ("trials|KEY|items|pope/random|a|c", True, ".c is true, not 0 or 1"),
        ("trials|KEY|items|pope/random|a", {"c": 1}, '[\'a\'] is {"c": 1}, not {"skip": 1} or a POPE result'),
        ("trials|KEY|items|pope/random|a", [1, 0], "['a'] is [1, 0], not an object"),
        ("trials|KEY|items|chair|s|h", 5, "['s'].h is 5, larger than m (3)"),
        ("trials|KEY|items|chair|s|m", -1, "['s'].m is -1, not a non-negative integer"),
        ("trials|KEY|items|pope/random", [], "items['pope/random'] is [], not an object"),
        ("trials|KEY|items", None, ".items is null"),
        (
            "trials|KEY|methods",
            {"vhr": {"alpha": 2.0}},
            '.methods is {"vhr": {"alpha": 2.0}}, not the setting its key names',
        ),
        ("trials|KEY|label", 3, ".label is 3, not a string"),
        ("trials|KEY", "done", "field trials['{KEY}'] is 'done'"),
        ("trials", [], "field trials is [], not an object"),
        ("trials", _DELETE, "field trials is missing"),
        ("plan", [], "field plan is [], not null or an object"),
        ("plan|rungs", [], "field plan.rungs is []"),
        ("plan|rungs|0|chair", -2, "field plan.rungs[0]['chair'] is -2, not a non-negative integer"),
        ("plan|rungs|0|chair", 1.5, "field plan.rungs[0]['chair'] is 1.5"),
        ("elapsed_s", "10", "field elapsed_s is '10', not a non-negative number"),
        ("elapsed_s", -1, "field elapsed_s is -1"),
        ("version", 0, "field version is 0, not a positive integer"),
        ("version", 99, "field version is 99, newer than this vlm_guard reads"),
        ("seconds", {"KEY": [1.0]}, "field seconds['KEY'] is [1.0], not [seconds >= 0, items >= 0]"),
    ],
)
def test_a_damaged_tune_state_is_refused_naming_the_file_and_field(tmp_path, field, value, expected):
    from vlm_guard.tuning.search import TuningState

    path, identity, data, key = _state(tmp_path)
    _set(data, field, value, key)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        TuningState(path, identity)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected.replace("{KEY}", key) in message, message
    assert "\n" not in message and ("delete it" in message or "upgrade" in message)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[1, 2]", "is not a vlm_guard tuning state"),
        ('{"format": "vlm_guard.tune_state", "trials": {', "not a readable tuning state"),
    ],
)
def test_a_tune_state_that_is_not_an_object_is_refused(tmp_path, text, expected):
    from vlm_guard.tuning.search import TuningState

    path = tmp_path / "tune_state.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=expected):
        TuningState(path, {"fingerprint_hash": "abc"})


# ---------------------------------------------------------------------------------------------- head map JSON fields
@pytest.fixture(scope="module")
def shipped_map_folder(tmp_path_factory):
    """A copy of a head map shipped with the package (no model needed)."""
    from pathlib import Path

    import vlm_guard
    from vlm_guard.calibration import HeadMap

    shipped = sorted((Path(vlm_guard.__file__).parent / "assets" / "head_maps").glob("*/head_map.json"))
    assert shipped, "no shipped head map"
    return HeadMap.from_pretrained(shipped[0].parent).save_pretrained(tmp_path_factory.mktemp("map") / "map")


def _edited_map(folder, tmp_path, path, value):
    import shutil

    from vlm_guard.calibration.head_map import JSON_FILE

    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    data = json.loads((copy / JSON_FILE).read_text())
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    (copy / JSON_FILE).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("library_version",), 3, "field library_version is 3, not a string"),
        (("fingerprint",), [], "field fingerprint is [], not an object"),
        (("fingerprint", "family"), 7, "field fingerprint.family is 7, not a string"),
        (("fingerprint", "weights_digest"), ["a"], 'field fingerprint.weights_digest is ["a"], not a string'),
        (("fingerprint", "num_kv_heads"), 0, "field fingerprint.num_kv_heads is 0, not a positive integer"),
        (("fingerprint", "hidden_size"), 1.5, "field fingerprint.hidden_size is 1.5, not a positive integer"),
        (("fingerprint", "num_layers"), True, "field fingerprint.num_layers is true, not a positive integer"),
        (("calibration",), [], "field calibration is [], not an object"),
        (("vhd", "distance"), "manhattan", "field vhd.distance is \"manhattan\", not one of ['sq_l2', 'l2', 'cosine']"),
        (("vhd", "outlier_filter"), None, "field vhd.outlier_filter is null, not one of"),
        (("vhd", "vhr_heads"), {}, "field vhd.vhr_heads has no entry for layers [0, 1"),
        (("sinks", "sink_dims"), [1.5], "field sinks.sink_dims is [1.5], not a list of hidden dimensions"),
        (("sinks", "sink_dims"), {}, "field sinks.sink_dims is {}, not a list"),
        (("sinks", "sink_dim_ratios"), "x", 'field sinks.sink_dim_ratios is "x", not a list of numbers'),
        (("sinks", "source"), "guess", "field sinks.source is \"guess\", not one of ['auto', 'override']"),
        (("sinks", "threshold"), -1, "field sinks.threshold is -1, not a positive number"),
        (("sinks", "min_ratio"), True, "field sinks.min_ratio is true, not a positive number"),
        (("sinks", "threshold"), _DELETE, "field sinks.threshold is missing"),
        (("image_centric",), [], "field image_centric is [], not null or an object"),
        (("image_centric", "rho"), "high", 'field image_centric.rho is "high", not a non-negative number'),
        (("image_centric", "layers"), [99], "field image_centric.layers is [99], not a list of layer indices"),
        (
            ("image_centric", "centric_fraction"),
            [],
            "field image_centric.centric_fraction has 0 entries, not one per layer",
        ),
        (("gift", "saliency_layer"), 1.5, "field gift.saliency_layer is 1.5, not null or a layer index"),
        (("gift", "saliency_layer"), True, "field gift.saliency_layer is true"),
        (("gift", "enhance_layers"), {}, "field gift.enhance_layers is {}, not a list of layer indices"),
        (("gift", "layer_shift"), [1, 2], "field gift.layer_shift has 2 entries, not one per layer"),
        (("gift",), _DELETE, "field gift is missing"),
    ],
)
def test_a_damaged_head_map_field_is_refused_naming_the_file_and_field(
    shipped_map_folder, tmp_path, path, value, expected
):
    from vlm_guard.calibration import HeadMap, HeadMapFileError
    from vlm_guard.calibration.head_map import JSON_FILE

    folder = _edited_map(shipped_map_folder, tmp_path, path, value)
    if path == ("image_centric",) and HeadMap.from_pretrained(shipped_map_folder).image_centric is None:
        pytest.skip("the shipped map has no image-centric statistics")
    with pytest.raises(HeadMapFileError) as error:
        HeadMap.from_pretrained(folder)
    message = str(error.value)
    assert message.startswith(f"{folder / JSON_FILE}: ") and expected in message, message
    assert "\n" not in message and "re-run `vlm-guard calibrate`" in message


@pytest.mark.parametrize(
    "tensor, shape, expected",
    [
        ("vhd_mean", None, "has no tensor 'vhd_mean'"),
        (
            "vhd_std",
            (3, 2),
            "tensor 'vhd_std' has shape [3, 2], but the JSON's fingerprint.num_layers and num_heads say",
        ),
        ("vhd_selection_frequency", (7,), "tensor 'vhd_selection_frequency' has shape [7]"),
        ("sink_dim_profile", (5,), "tensor 'sink_dim_profile' has shape [5], but the JSON's fingerprint.hidden_size"),
    ],
)
def test_a_tensor_that_disagrees_with_the_fingerprint_is_refused(shipped_map_folder, tmp_path, tensor, shape, expected):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from vlm_guard.calibration import HeadMap, HeadMapFileError
    from vlm_guard.calibration.head_map import JSON_FILE, TENSOR_FILE
    from vlm_guard.fileio import sha256_file

    folder = tmp_path / "edited"
    shutil.copytree(shipped_map_folder, folder)
    tensors = load_file(str(folder / TENSOR_FILE))
    if shape is None:
        del tensors[tensor]
    else:
        tensors[tensor] = torch.zeros(shape)
    save_file(tensors, str(folder / TENSOR_FILE))
    data = json.loads((folder / JSON_FILE).read_text())
    data["tensors_sha256"] = sha256_file(folder / TENSOR_FILE)  # a pair that agrees on the digest, not on the shapes
    (folder / JSON_FILE).write_text(json.dumps(data))
    with pytest.raises(HeadMapFileError) as error:
        HeadMap.from_pretrained(folder)
    message = str(error.value)
    assert message.startswith(f"{folder / TENSOR_FILE} ") and expected in message, message


# ---------------------------------------------------------------------------------------------- summaries, configs
@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("n", "6", "field 'n' is '6', not a non-negative integer"),
        ("n", -1, "field 'n' is '-1'"),
        ("n", True, "field 'n' is 'True'"),
        ("metrics", [], "field 'metrics' is '[]', not an object"),
        ("seed", 1.5, "field 'seed' is '1.5', not an integer or null"),
        ("config", None, "field 'config' is 'None', not an object"),
        ("extra", _DELETE, "field 'extra' is missing"),
    ],
)
def test_a_damaged_summary_is_refused_naming_the_field(tmp_path, field, value, expected):
    from vlm_guard.eval.records import write_summary

    path = tmp_path / "run.summary.json"
    data = write_summary(path, {"methods": "vhr"}, {"pope/random": {"n": 6}}, seed=0, n=6)
    if value is _DELETE:
        del data[field]
    else:
        data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        read_summary(path)
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value), str(error.value)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda data: data["vhr"].__setitem__("alpha", "x"), "VHRConfig.alpha must be a number, got 'x'"),
        (lambda data: data["gift"].__setitem__("bogus", 1), "GIFTConfig: unknown field(s) ['bogus']"),
        (lambda data: data.__setitem__("var", 5), "GuardConfig.var must be a VARConfig"),
    ],
)
def test_a_damaged_guard_config_file_names_the_file_and_field(tmp_path, change, expected):
    from vlm_guard.config import GuardConfig

    path = tmp_path / "config.json"
    GuardConfig.from_methods("vhr,var,gift").save(path)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        GuardConfig.load(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, message


def test_deeply_nested_json_is_a_one_line_error_in_every_reader(tmp_path):
    from vlm_guard.eval.chair import ChairGroundTruth, ChairVocabulary
    from vlm_guard.eval.records import ResultsWriter
    from vlm_guard.tuning.search import TuningState

    deep = "[" * 100_000 + "]" * 100_000
    records = tmp_path / "run.jsonl"
    records.write_text('{"id": "a", "answer": "yes"}\n' + deep + "\n")
    summary = tmp_path / "run.summary.json"
    summary.write_text(deep)
    state = tmp_path / "tune_state.json"
    state.write_text(deep)
    cache = tmp_path / "chair.json"
    cache.write_text(deep)
    readers = {
        records: lambda: ResultsWriter(records),
        summary: lambda: read_summary(summary),
        state: lambda: TuningState(state, {}),
        cache: lambda: ChairGroundTruth.from_json(cache, ChairVocabulary.load()),
    }
    for path, read in readers.items():
        with pytest.raises(ValueError) as error:
            read()
        assert str(path) in str(error.value) and "\n" not in str(error.value), str(error.value)
