"""`vlm-guard eval ...`: registration, argument errors, and a tiny synthetic comparison run."""

import pytest
from test_eval_runner import model_args

from vlm_guard.cli import build_parser, main
from vlm_guard.cli.eval import synthetic_tasks
from vlm_guard.eval.records import read_records, read_summary
from vlm_guard.eval.synthetic import EVAL_SEED


def test_eval_is_registered_with_its_benchmarks():
    parser = build_parser()
    args = parser.parse_args(["eval", "synthetic", "--out", "x.jsonl", "--compare", "none;vhr", "--limit", "3"])
    assert args.eval_command == "synthetic" and args.limit == 3 and args.compare == "none;vhr"
    assert args.methods == "none" and args.batch_size == 8 and args.seed == 0 and args.model is None
    args = parser.parse_args(
        ["eval", "pope", "--pope-dir", "d", "--images", "i", "--out", "o.jsonl", "--methods", "all"]
    )
    assert args.methods == "all" and args.head_map is None and not args.trust_remote_code
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "chair", "--out", "o.jsonl"])  # --images/--instances/--captions required


def test_argument_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval", "pope", "--images", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "--questions" in capsys.readouterr().err
    assert main(["eval", "synthetic", "--tasks", "vqa", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "--tasks" in capsys.readouterr().err
    missing = tmp_path / "coco_pope_random.json"
    assert (
        main(
            ["eval", "pope", "--questions", str(missing), "--images", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err


def test_synthetic_tasks_shape():
    tasks = synthetic_tasks(n_questions=6, n_captions=3)
    assert [task.name for task in tasks] == ["pope/random", "pope/popular", "pope/adversarial", "chair"]
    assert all(len(task.items) == (3 if task.name == "chair" else 6) for task in tasks)
    adversarial = tasks[2].items
    assert all(item.fields["kind"] == "absent_partner" for item in adversarial if item.fields["label"] == "no")
    assert adversarial[0].prompt.startswith("is there a ") and tasks[3].items[0].prompt == "describe the image"
    assert tasks[3].items[0].image().size == (64, 64)  # rendered on demand


def test_synthetic_compare_run(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "syn.jsonl"
    args = [
        "eval",
        "synthetic",
        *model_args(tmp_path_factory),
        "--limit",
        "2",
        "--compare",
        "vhr",
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--n-resamples",
        "50",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| greedy |" in printed and "| VHR |" in printed and "table:" in printed
    records = read_records(tmp_path / "syn.vhr.jsonl")
    assert sorted({r["task"] for r in records}) == ["chair", "pope/adversarial", "pope/popular", "pope/random"]
    assert len(records) == 2 * 3 + 2
    summary = read_summary(tmp_path / "syn.summary.json")
    assert summary["config"]["world_seed"] == EVAL_SEED and summary["config"]["bias"] is False
    assert (tmp_path / "syn.md").read_text().count("\n| ") >= 3


def test_synthetic_images_are_tuning_seed_scenes(tmp_path):
    from PIL import Image

    from vlm_guard.eval.synthetic import TUNING_SEED, synthetic_world
    from vlm_guard.synthetic.world import render

    assert main(["eval", "synthetic-images", "--out", str(tmp_path), "--n", "3"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"scene_{i:06d}.png" for i in range(3)]
    expected = render(synthetic_world(TUNING_SEED).scene(2))
    assert list(Image.open(tmp_path / "scene_000002.png").convert("RGB").getdata()) == list(expected.getdata())


def test_settings_file_gives_a_method_set_explicit_values(tmp_path, tmp_path_factory, capsys):
    """--settings: a method set of --compare runs the values the file names (recorded in its records' fingerprint
    and in the summary); a file naming another set, other methods, an unknown field or a bad value is refused with
    one line before the model loads."""
    import json

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"gift@tuned": {"gift": {"alpha": 1.5}}}))
    out = tmp_path / "syn.jsonl"
    base = ["eval", "synthetic", *model_args(tmp_path_factory), "--limit", "1", "--tasks", "chair"]
    base += ["--max-new-tokens", "3", "--no-progress", "--n-resamples", "20", "--out", str(out)]
    assert main([*base, "--compare", "none;gift@tuned", "--settings", str(settings)]) == 0
    capsys.readouterr()
    header = json.loads((tmp_path / "syn.gift@tuned.jsonl").read_text().splitlines()[0])
    assert header["fingerprint"]["guard_config.gift.alpha"] == 1.5
    assert read_summary(tmp_path / "syn.summary.json")["config"]["settings"] == {"gift@tuned": {"gift": {"alpha": 1.5}}}
    if not model_args(
        tmp_path_factory
    ):  # the shipped model: its map without tuned settings still runs the file's values
        import shutil

        from vlm_guard.calibration.shipped import SHIPPED_HEAD_MAPS

        untuned = tmp_path / "untuned_map"
        shutil.copytree(sorted(SHIPPED_HEAD_MAPS.glob("default_model-*"))[0], untuned)
        meta = json.loads((untuned / "head_map.json").read_text())
        meta.pop("tuned", None)
        (untuned / "head_map.json").write_text(json.dumps(meta))
        out2 = str(tmp_path / "syn2.jsonl")
        argv = [
            *base[:-1],
            out2,
            "--compare",
            "none;gift@tuned",
            "--settings",
            str(settings),
            "--head-map",
            str(untuned),
        ]
        assert main(argv) == 0, capsys.readouterr().err
        capsys.readouterr()
        header = json.loads((tmp_path / "syn2.gift@tuned.jsonl").read_text().splitlines()[0])
        assert header["fingerprint"]["guard_config.gift.alpha"] == 1.5
    bad = {
        "other set": {"vhr@tuned": {"vhr": {"alpha": 1.1}}},
        "other methods": {"gift@tuned": {"vhr": {"alpha": 1.1}}},
        "unknown field": {"gift@tuned": {"gift": {"strength": 1.0}}},
        "bad value": {"gift@tuned": {"gift": {"alpha": -1.0}}},
        "not an object": ["gift"],
    }
    for case, content in bad.items():
        settings.write_text(json.dumps(content))
        assert main([*base, "--compare", "none;gift@tuned", "--settings", str(settings)]) == 2, case
        err = capsys.readouterr().err
        assert "--settings" in err and len(err.strip().splitlines()) == 1, (case, err)
    assert main([*base, "--compare", "none;gift@tuned", "--settings", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
