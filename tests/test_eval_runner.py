"""End-to-end POPE and CHAIR runs on a tiny fixture in the official formats, built here: records, resume,
skipped images and summary fields; plus the runner's and report's small helpers."""

import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_guard.cli import main
from vlm_guard.defaults import DEFAULT_MODEL_DIR
from vlm_guard.eval.chair import ChairGroundTruth, score_caption
from vlm_guard.eval.images import ImageLoader
from vlm_guard.eval.records import read_records, read_summary
from vlm_guard.eval.report import comparison_markdown, paired_vs_baseline, task_metrics
from vlm_guard.eval.runner import EvalTask, method_label, parse_compare, results_paths
from vlm_guard.version import __version__

IMAGE_NAMES = [f"COCO_val2014_{image_id:012d}.png" for image_id in (11, 22, 33)]
CORRUPT_NAME = "COCO_val2014_000000000044.png"
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]


def model_args(tmp_path_factory) -> list[str]:
    """The shipped default model when present (it is small), else a tiny random toy LLaVA with its processor."""
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        return []
    return ["--model", str(tiny_model_dir(tmp_path_factory))]


_TINY = {}


def tiny_model_dir(tmp_path_factory) -> Path:
    if "dir" not in _TINY:
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
        folder = tmp_path_factory.mktemp("tiny_llava")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        _TINY["dir"] = folder
    return _TINY["dir"]


@pytest.fixture(scope="module")
def coco_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    images = root / "val2014"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in IMAGE_NAMES:
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(images / name)
    (images / CORRUPT_NAME).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    questions = []
    for index, name in enumerate(IMAGE_NAMES + [CORRUPT_NAME]):
        questions.append(
            {"question_id": 2 * index + 1, "image": name, "text": "Is there a dog in the image?", "label": "yes"}
        )
        questions.append(
            {"question_id": 2 * index + 2, "image": name, "text": "Is there a cat in the image?", "label": "no"}
        )
    pope_file = root / "coco_pope_random.json"
    pope_file.write_text("\n".join(json.dumps(q) for q in questions) + "\n")
    all_names = IMAGE_NAMES + [CORRUPT_NAME]
    image_entries = [{"id": int(name[-16:-4]), "file_name": name} for name in all_names]
    instances = {
        "images": image_entries,
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 18},
            {"id": 2, "image_id": 22, "category_id": 1},
            {"id": 3, "image_id": 44, "category_id": 17},
        ],
        "categories": CATEGORIES,
    }
    captions = {
        "images": image_entries,
        "annotations": [
            {"id": 10 + i, "image_id": entry["id"], "caption": caption}
            for i, (entry, caption) in enumerate(
                zip(image_entries, ["A dog on grass.", "A man.", "A red kite in the sky.", "A cat."])
            )
        ],
    }
    (root / "instances_val2014.json").write_text(json.dumps(instances))
    (root / "captions_val2014.json").write_text(json.dumps(captions))
    return root


COMMON = ["--max-new-tokens", "3", "--batch-size", "2", "--no-progress", "--n-resamples", "50"]


def test_pope_end_to_end_resume_and_skips(coco_fixture, tmp_path, tmp_path_factory):
    out = tmp_path / "pope.jsonl"
    args = [
        "eval",
        "pope",
        *model_args(tmp_path_factory),
        "--questions",
        str(coco_fixture / "coco_pope_random.json"),
        "--images",
        str(coco_fixture / "val2014"),
        "--out",
        str(out),
        *COMMON,
        "--max-unclear",
        "1",
    ]  # the fixture does not answer yes/no here (see test_eval_following.py)
    assert main(args) == 0
    records = read_records(out)
    # 8 questions; the 2 on the corrupt image are skipped, not fatal
    assert sorted(r["question_id"] for r in records) == [1, 2, 3, 4, 5, 6]
    assert all(r["id"] == f"random/{r['question_id']}" and r["task"] == "pope/random" for r in records)
    assert all(r["prediction"] in ("yes", "no") and isinstance(r["answer"], str) for r in records)
    assert all(r["methods"] == "none" and r["label"] in ("yes", "no") for r in records)
    _, summary_path = results_paths(out, None)
    summary = read_summary(summary_path)
    assert summary["n"] == 6 and summary["seed"] == 0
    assert summary["vlm_guard_version"] == __version__
    assert summary["transformers_version"] == metadata.version("transformers")
    assert summary["config"]["guard_config"]["vhr"] is None and "vlm_guard_version" in summary["config"]["guard_config"]
    assert summary["config"]["do_sample"] is False and summary["config"]["max_new_tokens"] == 3
    assert summary["extra"]["skipped_images"] == 1 and CORRUPT_NAME in summary["extra"]["skipped"]
    task = summary["extra"]["tasks"]["pope/random"]
    assert (task["items"], task["scored"], task["written"], task["skipped"]) == (8, 6, 6, 2)
    accuracy = summary["metrics"]["pope/random"]["accuracy"]
    assert accuracy["low"] <= accuracy["point"] <= accuracy["high"]
    assert accuracy["point"] == pytest.approx(np.mean([r["correct"] for r in records]))

    # rerun: nothing new is written, the skip is still counted
    before = out.read_bytes()
    assert main(args) == 0
    assert out.read_bytes() == before
    task = read_summary(summary_path)["extra"]["tasks"]["pope/random"]
    assert (task["done_before"], task["written"], task["skipped"]) == (6, 0, 2)

    # an interrupted run (two records lost, last line truncated) resumes with only the missing items
    lines = before.decode().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:10])
    assert main(args) == 0
    resumed = read_records(out)
    assert [r["id"] for r in resumed[:3]] == [r["id"] for r in records[:3]]
    assert sorted(r["question_id"] for r in resumed) == [1, 2, 3, 4, 5, 6]


def test_chair_end_to_end(coco_fixture, tmp_path, tmp_path_factory):
    out = tmp_path / "chair.jsonl"
    args = [
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
    assert main(args) == 0
    records = read_records(out)
    assert sorted(r["image_id"] for r in records) == [11, 22, 33]
    ground_truth = ChairGroundTruth.from_coco(
        coco_fixture / "instances_val2014.json", coco_fixture / "captions_val2014.json"
    )
    assert ground_truth.objects[33] == frozenset({"kite"})
    for record in records:
        expected = score_caption(record["answer"], ground_truth.objects_for(record["image_id"]))
        assert {key: record[key] for key in expected} == expected
    summary = read_summary(results_paths(out, None)[1])
    assert summary["n"] == 3 and summary["extra"]["skipped_images"] == 1
    assert set(summary["metrics"]["chair"]) >= {"chair_s", "chair_i", "recall", "mean_length", "n"}
    before = out.read_bytes()
    assert main(args) == 0
    assert out.read_bytes() == before


def test_compare_writes_one_file_per_method_set_and_a_table(coco_fixture, tmp_path, tmp_path_factory):
    out = tmp_path / "cmp.jsonl"
    args = [
        "eval",
        "pope",
        *model_args(tmp_path_factory),
        "--questions",
        str(coco_fixture / "coco_pope_random.json"),
        "--images",
        str(coco_fixture / "val2014"),
        "--out",
        str(out),
        "--compare",
        "vhr",
        "--limit",
        "4",
        *COMMON,
        "--max-unclear",
        "1",
    ]
    assert main(args) == 0
    none_records = read_records(tmp_path / "cmp.none.jsonl")
    vhr_records = read_records(tmp_path / "cmp.vhr.jsonl")
    assert (
        [r["id"] for r in none_records]
        == [r["id"] for r in vhr_records]
        == ["random/1", "random/2", "random/3", "random/4"]
    )
    summary = read_summary(tmp_path / "cmp.summary.json")
    assert summary["config"]["method_sets"] == ["none", "vhr"]
    assert summary["metrics"]["vhr"]["vs_greedy"]["pope/random"]["accuracy"]["n"] == 4
    assert read_summary(tmp_path / "cmp.vhr.summary.json")["config"]["guard_config"]["vhr"]["alpha"] == 2.0
    markdown = (tmp_path / "cmp.md").read_text()
    assert "| greedy |" in markdown and "| VHR |" in markdown and "Δ" in markdown


def test_image_loader_skips_and_counts(coco_fixture):
    loader = ImageLoader(coco_fixture / "val2014")
    assert loader.load(IMAGE_NAMES[0]).mode == "RGB"
    assert loader.load(CORRUPT_NAME) is None and loader.load(CORRUPT_NAME) is None
    assert loader.load("missing.png") is None
    assert loader.n_skipped == 2 and "file not found" in loader.skipped["missing.png"]
    with pytest.raises(FileNotFoundError, match="image folder"):
        ImageLoader(coco_fixture / "nope")


def test_labels_and_paths():
    assert method_label("VHR, var") == "vhr+var" and method_label("none") == "none"
    assert parse_compare("vhr;var,gift;none;all") == ["none", "vhr", "var+gift", "all"]
    with pytest.raises(ValueError, match="names no method"):
        parse_compare(" ; ")
    assert [p.name for p in results_paths("r/x.jsonl", None)] == ["x.jsonl", "x.summary.json"]
    with pytest.raises(ValueError, match="duplicate"):
        EvalTask("pope/random", "pope", [_item("a"), _item("a")], lambda item, answer: {}, 4)


def _item(item_id):
    from vlm_guard.eval.runner import EvalItem

    return EvalItem(item_id=item_id, prompt="q", image="x.png", image_name="x.png")


def _pope_records(correct):
    return [
        {"id": str(i), "answer": ("yes" if ok else "no"), "label": "yes"}
        if i % 2 == 0
        else {"id": str(i), "answer": ("no" if ok else "yes"), "label": "no"}
        for i, ok in enumerate(correct)
    ]


def test_paired_comparison_separates_signal_from_noise():
    task = EvalTask("pope/random", "pope", [], lambda item, answer: {}, 4)
    baseline = {"pope/random": _pope_records([i % 2 == 0 for i in range(200)])}  # 50% accuracy
    better = {"pope/random": _pope_records([True] * 200)}
    one_flip = {"pope/random": _pope_records([i % 2 == 0 or i == 1 for i in range(200)])}
    strong = paired_vs_baseline(better, baseline, [task], n_resamples=200)["pope/random"]["accuracy"]
    assert strong["significant"] and strong["diff"] == pytest.approx(0.5)
    weak = paired_vs_baseline(one_flip, baseline, [task], n_resamples=200)["pope/random"]["accuracy"]
    assert not weak["significant"] and weak["diff"] == pytest.approx(0.005)
    metrics = task_metrics("pope", baseline["pope/random"], n_resamples=200)
    assert metrics["accuracy"]["low"] < 0.5 < metrics["accuracy"]["high"] and metrics["n"] == 200
    summary = {
        "seed": 0,
        "config": {"n_resamples": 200},
        "extra": {
            "skipped_images": 0,
            "comparison": {
                "tasks": {"pope/random": 200},
                "method_sets": [
                    {"label": "none", "name": "greedy", "guard_config": {}, "metrics": {"pope/random": metrics}},
                    {
                        "label": "vhr",
                        "name": "VHR",
                        "guard_config": {"vhr": {"alpha": 2.0}},
                        "inactive_methods": [],
                        "metrics": {
                            "pope/random": metrics,
                            "vs_greedy": {"pope/random": {"accuracy": weak, "f1": strong}},
                        },
                    },
                ],
            },
        },
    }
    markdown = comparison_markdown(summary)
    assert "Δ +0.5 [" in markdown and "n.s." in markdown and "**Δ +50.0" in markdown
    assert "alpha=2.0" in markdown
