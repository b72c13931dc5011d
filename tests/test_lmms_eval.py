"""lmms-eval integration (vlm_guard.integrations.lmms_eval): `lmms-eval --model vlm_guard` on local POPE / CHAIR
files written by `vlm-guard export-lmms`, against `vlm-guard eval` on the same items, on the 3.6M test fixture.

The end-to-end checks run lmms-eval's own command once (a config file with three runs: plain, guarded, and one whose
generate fails) and `vlm-guard eval synthetic --compare 'none;vhr@tuned'` once, on 4 questions per POPE split and
2 captions, batch size 2 in both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the lmms-eval command

pytest.importorskip("lmms_eval", reason="the lmms-eval extra is not installed (pip install -e '.[lmms-eval]')")

from vlm_guard.integrations.lmms_eval import MODEL_CLASS_PATH, MODEL_NAME, export, settings, tasks  # noqa: E402  # noqa: E402

N_QUESTIONS = 4
N_CAPTIONS = 2
BATCH = 2
THREADS = "2"  # the same torch thread count in both processes (float reductions may depend on it)
POPE_TASKS = [export.pope_task_name(split) for split in export.POPE_SPLITS]
RUNS = {"plain": "none", "guarded": "auto"}


def _auto_label() -> str:
    """What methods=auto runs on the fixture, as a `vlm-guard eval` method set: the tuned set of its shipped head
    map, with the tuned values (``vhr@tuned`` for the shipped map)."""
    from vlm_guard.defaults import load_fixture
    from vlm_guard.settings import default_methods
    from vlm_guard.wrapper import wrap

    methods, _ = default_methods(wrap(*load_fixture()).head_map)
    return "+".join(methods) + "@tuned" if methods else "none"


VLM_GUARD_LABELS = {"plain": "none", "guarded": _auto_label()}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmms_export")
    manifest = export.export_synthetic(folder, N_QUESTIONS, N_CAPTIONS, world="shapes")
    return folder, manifest


def _lmms_eval_command() -> list[str]:
    script = Path(sys.executable).with_name("lmms-eval")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"]


@pytest.fixture(scope="module")
def lmms_runs(exported, tmp_path_factory):
    """lmms-eval's CLI, once, with three runs: plain, guarded (methods=auto) and one whose generate raises (PAI with
    num_beams=2, which vlm_guard refuses)."""
    folder, _ = exported
    out = tmp_path_factory.mktemp("lmms_out")
    common = {
        "model": MODEL_NAME,
        "include_path": str(folder),
        "batch_size": BATCH,
        "log_samples": True,
        "tasks": f"{export.POPE_GROUP},{export.CHAIR_TASK}",
    }
    runs = [
        {**common, "model_args": f"pretrained=default,methods={methods}", "output_path": str(out / name)}
        for name, methods in RUNS.items()
    ]
    runs.append(
        {
            **common,
            "model_args": "pretrained=default,methods=pai",
            "gen_kwargs": "num_beams=2",
            "tasks": POPE_TASKS[0],
            "output_path": str(out / "failing"),
        }
    )
    config = out / "runs.yaml"
    config.write_text(json.dumps(runs))  # JSON is YAML
    env = {
        **os.environ,
        "OMP_NUM_THREADS": THREADS,
        "MKL_NUM_THREADS": THREADS,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out / "datasets"),
        "VLM_GUARD_DEFAULT_MODEL": "fixture",
        "WANDB_MODE": "disabled",
    }
    completed = subprocess.run(
        [*_lmms_eval_command(), "--config", str(config)], cwd=out, env=env, capture_output=True, text=True, timeout=600
    )
    output = completed.stdout + completed.stderr
    for name in RUNS:
        assert list((out / name).rglob("*_results.json")), f"lmms-eval run {name!r} wrote no results:\n{output[-4000:]}"
    return out, output, completed.returncode


@pytest.fixture(scope="module")
def vlm_guard_runs(tmp_path_factory):
    """`vlm-guard eval synthetic` on the same items, plain and with the tuned VHR set."""
    import torch

    from vlm_guard.cli import main

    out = tmp_path_factory.mktemp("vlm_guard_eval") / "syn.jsonl"
    threads = torch.get_num_threads()
    try:
        code = main(
            [
                "eval",
                "synthetic",
                "--world",
                "shapes",
                "--n-questions",
                str(N_QUESTIONS),
                "--n-captions",
                str(N_CAPTIONS),
                "--batch-size",
                str(BATCH),
                "--compare",
                ";".join(VLM_GUARD_LABELS.values()),
                "--out",
                str(out),
                "--threads",
                THREADS,
                "--no-progress",
                "--n-resamples",
                "10",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


def _results(run_dir: Path) -> dict:
    files = sorted(run_dir.rglob("*_results.json"))
    assert len(files) == 1, f"expected one results file in {run_dir}, found {files}"
    return json.loads(files[0].read_text())


def _samples(run_dir: Path, task: str) -> list[dict]:
    files = sorted(run_dir.rglob(f"*_samples_{task}.jsonl"))
    assert len(files) == 1, f"expected one samples file of {task} in {run_dir}, found {files}"
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda row: row["doc_id"])


def _records(out: Path, label: str) -> dict[str, list[dict]]:
    from vlm_guard.eval.records import read_records
    from vlm_guard.eval.runner import results_paths

    by_task: dict[str, list[dict]] = {}
    for record in read_records(results_paths(out, label)[0]):
        by_task.setdefault(record["task"], []).append(record)
    return by_task


def _summary(out: Path, label: str) -> dict:
    from vlm_guard.eval.runner import results_paths

    return json.loads(results_paths(out, label)[1].read_text())


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("run", sorted(RUNS))
def test_lmms_eval_answers_equal_vlm_guard_eval_item_by_item(run, exported, lmms_runs, vlm_guard_runs):
    out, _, _ = lmms_runs
    records = _records(vlm_guard_runs, VLM_GUARD_LABELS[run])
    for split, task in zip(export.POPE_SPLITS, POPE_TASKS):
        samples = _samples(out / run, task)
        expected = records[f"pope/{split}"]
        assert len(samples) == len(expected) == N_QUESTIONS
        for sample, record in zip(samples, expected):
            assert sample["accuracy"]["answer"] == sample["filtered_resps"] == record["answer"], (task, sample)
            assert sample["accuracy"]["label"] == record["label"]
            assert sample["accuracy"]["prediction"] == record["prediction"]
    if run == "guarded":  # the check has power: the methods change answers on these items
        plain = _records(vlm_guard_runs, VLM_GUARD_LABELS["plain"])
        assert any(a["answer"] != b["answer"] for task in records for a, b in zip(records[task], plain[task]))
    samples = _samples(out / run, export.CHAIR_TASK)
    expected = {record["id"]: record for record in records["chair"]}
    assert len(samples) == len(expected) == N_CAPTIONS
    for sample in samples:
        entry = sample["chair_s"]
        record = expected[entry["image_id"]]
        assert entry["caption"] == record["answer"]
        assert entry["mentions"] == record["mentions"] and entry["hallucinated"] == record["hallucinated"]


@pytest.mark.parametrize("run", sorted(RUNS))
def test_lmms_eval_metrics_equal_vlm_guard_eval(run, lmms_runs, vlm_guard_runs):
    out, output, _ = lmms_runs
    results = _results(out / run)["results"]
    metrics = _summary(vlm_guard_runs, VLM_GUARD_LABELS[run])["metrics"]
    checked = 0
    for split, task in zip(export.POPE_SPLITS, POPE_TASKS):
        ours = metrics[f"pope/{split}"]
        for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            assert results[task][f"{name},none"] == pytest.approx(ours[name]["point"], abs=1e-12), (task, name)
            checked += 1
        assert results[task]["unclear_share,none"] == pytest.approx(ours["unclear_share"], abs=1e-12)
    for name in ("chair_s", "chair_i", "recall"):
        assert results[export.CHAIR_TASK][f"{name},none"] == pytest.approx(metrics["chair"][name]["point"], abs=1e-12)
        checked += 1
    assert checked == 18
    # the printed table holds the same numbers (4 decimals)
    table = output.split(f"pretrained=default,methods={RUNS[run]})", 1)[1].split("Throughput Summary", 1)[0]
    for name in ("accuracy", "f1", "yes_ratio"):
        line = next(row for row in table.splitlines() if POPE_TASKS[2] in row and f"|{name} " in row)
        printed = float(line.split("|")[6])
        assert printed == pytest.approx(metrics["pope/adversarial"][name]["point"], abs=5e-5), line


def test_the_guarded_run_runs_the_methods_vlm_guard_eval_ran(lmms_runs, vlm_guard_runs):
    """methods=auto resolves to the fixture head map's tuned VHR, with the values `vlm-guard eval` used; the model
    info (describe_settings, head-map digest) is in the run's log."""
    _, output, _ = lmms_runs
    decoder = json.JSONDecoder()  # the log line may end in colour codes
    infos = [
        decoder.raw_decode(line.split("vlm_guard model info: ", 1)[1])[0]
        for line in output.splitlines()
        if "vlm_guard model info: " in line
    ]
    by_methods = {info["methods"]: info for info in infos}
    assert set(by_methods) == {"none", "auto", "pai"}
    guarded = by_methods["auto"]
    tuned_set = guarded["head_map"]["tuned_default_methods"]
    assert tuned_set and guarded["active_methods"] == tuned_set and by_methods["none"]["active_methods"] == []
    summary = _summary(vlm_guard_runs, VLM_GUARD_LABELS["guarded"])
    for method in tuned_set:
        assert guarded["guard_config"][method] == summary["config"]["guard_config"][method]
    assert any(line.startswith(f"{tuned_set[0]}:") and "(tuned)" in line for line in guarded["settings"])
    assert guarded["head_map"]["digest"] and len(guarded["head_map"]["digest"]) == 16


def test_a_failing_generate_fails_the_run_instead_of_scoring_empty_answers(lmms_runs):
    out, output, _ = lmms_runs
    assert "GenerationFailed" in output and "num_beams=2 is not supported" in output
    assert not list((out / "failing").rglob("*_results.json"))  # nothing was scored
    assert not list((out / "failing").rglob("*_samples_*.jsonl"))


# ---------------------------------------------------------------------------------------------- registration
def test_lmms_eval_finds_the_model_through_the_entry_point():
    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    resolved = MODEL_REGISTRY_V2.resolve(MODEL_NAME)
    assert (resolved.model_type, resolved.class_path) == ("chat", MODEL_CLASS_PATH)
    assert get_model(MODEL_NAME).__name__ == "VLMGuardModel"


# ---------------------------------------------------------------------------------------------- the model, in process
@pytest.fixture(scope="module")
def lmms_model():
    from vlm_guard.integrations.lmms_eval.model import VLMGuardModel

    return VLMGuardModel(pretrained="default", methods="vhr+gift", batch_size=2, **{"gift.alpha": 3, "vhr.alpha": 1.5})


def _requests(images, questions, gen_kwargs, task="t", split="test"):
    from lmms_eval.api.instance import Instance

    def to_messages(doc):
        return [
            {
                "role": "user",
                "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["question"]}],
            }
        ]

    docs = [{"image": image, "question": question} for image, question in zip(images, questions)]
    requests = [
        Instance(
            request_type="generate_until",
            arguments=("", to_messages, dict(gen_kwargs), index, task, split),
            idx=0,
            metadata={"task": task, "doc_id": index, "repeats": 1},
        )
        for index in range(len(docs))
    ]
    return {task: {split: docs}}, requests


def _scenes(count):
    from vlm_guard.eval.synthetic import synthetic_world
    from vlm_guard.synthetic.worlds import world_kind

    kind = world_kind("shapes")
    scenes = synthetic_world(900001, False, kind)
    return [kind.render(scenes.scene(index)) for index in range(count)]


def test_model_settings_and_info(lmms_model):
    info = lmms_model.model_info
    assert info["active_methods"] == ["vhr", "gift"]
    assert info["guard_config"]["gift"]["alpha"] == 3.0 and info["guard_config"]["vhr"]["alpha"] == 1.5
    assert lmms_model.guarded.settings_sources["gift"]["alpha"] == "config"
    assert any(line.startswith("gift:") and "alpha=3" in line.replace(" ", "") for line in info["settings"]), info
    assert info["head_map"]["digest"] is not None


def test_batched_generation_equals_vlm_guard_generate_answers(lmms_model):
    """Three documents in batches of two (left-padded rows of different lengths) give the answers of
    vlm_guard.eval.runner.generate_answers on the same batches; max_new_tokens and stop strings are honoured."""
    from vlm_guard.eval.runner import chat_prompt, generate_answers

    images = _scenes(3)
    questions = ["describe the image", "is there a moon ?", "describe the image in a few words please"]
    task_dict, requests = _requests(images, questions, {"max_new_tokens": 6, "temperature": 0, "until": []})
    lmms_model.task_dict = task_dict
    answers = [result.text for result in lmms_model.generate_until(requests)]
    prompts = [chat_prompt(lmms_model.processor, question) for question in questions]
    expected = generate_answers(
        lmms_model.guarded, lmms_model.processor, images[:2], prompts[:2], 6
    ) + generate_answers(lmms_model.guarded, lmms_model.processor, images[2:], prompts[2:], 6)
    assert answers == expected  # a budget other than 6 would give other (longer) answers
    stop = " " + answers[0].split()[1]
    task_dict, requests = _requests(images[:1], questions[:1], {"max_new_tokens": 6, "until": [stop]})
    lmms_model.task_dict = task_dict
    assert lmms_model.generate_until(requests)[0].text == answers[0].split(stop, 1)[0].strip() != answers[0]


def test_a_failing_generate_raises_in_process(lmms_model, monkeypatch):
    from vlm_guard.integrations.lmms_eval.model import GenerationFailed

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    task_dict, requests = _requests(_scenes(1), ["is there a moon ?"], {"max_new_tokens": 2})
    lmms_model.task_dict = task_dict
    monkeypatch.setattr(lmms_model.guarded, "generate", broken)
    with pytest.raises(GenerationFailed, match="device lost"):
        lmms_model.generate_until(requests)


def test_loglikelihood_and_multi_round_are_refused_clearly(lmms_model):
    with pytest.raises(NotImplementedError, match="generate_until"):
        lmms_model.loglikelihood([])
    with pytest.raises(NotImplementedError, match="one turn"):
        lmms_model.generate_until_multi_round([])


def test_documents_with_other_than_one_image_are_refused(lmms_model):
    task_dict, requests = _requests(_scenes(1), ["q"], {"max_new_tokens": 2})

    def two_images(doc):
        image = _scenes(1)[0]
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image", "url": image},
                    {"type": "image", "url": image},
                    {"type": "text", "text": "q"},
                ],
            }
        ]

    request = requests[0]
    request.arguments = ("", two_images, *request.arguments[2:])
    lmms_model.task_dict = task_dict
    with pytest.raises(ValueError, match="2 images"):
        lmms_model.generate_until([request])


# ---------------------------------------------------------------------------------------------- model arguments
def test_model_arguments_split_and_convert():
    assert settings.split_model_args({"methods": "vhr+gift", "gift.alpha": 3}) == ("vhr+gift", {"gift": {"alpha": 3}})
    assert settings.field_value("vhr", "target_layers", "2-4+6") == [2, 3, 4, 6]
    assert settings.field_value("vhr", "target_layers", 5) == [5]
    assert settings.field_value("vhr", "target_layers", "none") is None
    assert settings.field_value("gift", "alpha", 3) == 3.0 and settings.field_value("gift", "use_spacy", True) is True
    with pytest.raises(ValueError, match="unknown model argument 'temperature'"):
        settings.split_model_args({"temperature": 1})
    with pytest.raises(ValueError, match="unknown method 'gitf'"):
        settings.split_model_args({"gitf.alpha": 1})
    with pytest.raises(ValueError, match="has no field 'alpah'"):
        settings.field_value("gift", "alpah", 1)
    with pytest.raises(ValueError, match="layer list"):
        settings.field_value("vhr", "target_layers", "4-2")
    with pytest.raises(ValueError, match="must be a number"):
        settings.field_value("gift", "alpha", "strong")


def test_method_sets_mean_what_they_mean_for_vlm_guard_eval():
    from vlm_guard.eval.runner import guard_config_for

    released = settings.guard_config("vhr+gift", {})
    assert released.to_dict() == guard_config_for("vhr+gift").to_dict()
    assert released.vhr.explicit_fields >= {"alpha"}  # released values pinned: a head map's tuned values do not apply
    tuned = settings.guard_config("vhr@tuned", {})
    assert "alpha" not in tuned.vhr.explicit_fields
    fielded = settings.guard_config("gift", {"gift": {"alpha": 2}})
    assert fielded.gift.alpha == 2.0 and "alpha" in fielded.gift.explicit_fields
    assert settings.guard_config("auto", {}, head_map=None).enabled_methods == ["pai"]  # untuned default
    assert settings.guard_config("none", {}).enabled_methods == []
    with pytest.raises(ValueError, match="add gift to methods"):
        settings.guard_config("vhr", {"gift": {"alpha": 2}})
    with pytest.raises(ValueError, match="unknown method"):
        settings.guard_config("vhr+foo", {})


def test_generation_kwargs_are_honoured_or_refused():
    from vlm_guard.integrations.lmms_eval.model import cut_at_stop, generation_settings

    assert generation_settings({"max_new_tokens": 8, "temperature": 0, "top_p": 0.5, "until": ["\n\n"]}) == (
        {"do_sample": False, "num_beams": 1},
        8,
        ["\n\n"],
    )
    sampled, tokens, until = generation_settings({"temperature": 0.7, "top_p": 0.9, "num_beams": 1})
    assert sampled == {"do_sample": True, "num_beams": 1, "temperature": 0.7, "top_p": 0.9} and until == []
    assert tokens == 128  # the model's default when the task sets none
    assert generation_settings({"until": "END"})[2] == ["END"]
    with pytest.raises(ValueError, match="stop_sequences"):
        generation_settings({"stop_sequences": ["x"]}, "task/test#0")
    assert cut_at_stop(" A cat.\n\nA dog.", ["\n\n"]) == "A cat."


# ---------------------------------------------------------------------------------------------- tasks and export
def test_pope_scoring_is_vlm_guards_not_exact_match():
    from vlm_guard.eval.pope import pope_metrics

    answers = ["Yes.", "No, there is not.", "yes", "There is a cat.", "NO!"]
    labels = ["yes", "no", "no", "yes", "yes"]
    items = [
        tasks.pope_process_results({"question_id": i, "label": label}, [answer])["accuracy"]
        for i, (answer, label) in enumerate(zip(answers, labels))
    ]
    reference = pope_metrics(answers, labels)
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert getattr(tasks, f"pope_{name}")(items) == reference[name]
    assert tasks.pope_accuracy(items) == 0.6  # "Yes." counts as yes (exact match would score it wrong)
    assert tasks.pope_yes_ratio(items) == 0.6  # the model's answers, not the labels (2 of 5 labels are no)
    assert tasks.pope_unclear_share(items) == 0.2  # "There is a cat." holds no yes/no word
    with pytest.raises(ValueError, match="label 'maybe'"):
        tasks.pope_process_results({"question_id": 1, "label": "maybe"}, ["yes"])


def test_chair_scoring_is_vlm_guard_eval_chair():
    from vlm_guard.eval.chair import chair_metrics, score_caption

    docs = [
        {"image_id": 1, "gt_objects": ["dog"], "vocabulary": "coco"},
        {"image_id": 2, "gt_objects": ["cat", "person"], "vocabulary": "coco"},
    ]
    captions = ["A dog and a cat on a sofa.", "A man holds a kitten."]
    items = [tasks.chair_process_results(doc, [caption])["chair_i"] for doc, caption in zip(docs, captions)]
    reference = chair_metrics([score_caption(caption, doc["gt_objects"]) for doc, caption in zip(docs, captions)])
    for name, function in (
        ("chair_s", tasks.chair_s),
        ("chair_i", tasks.chair_i),
        ("recall", tasks.chair_recall),
        ("mean_length", tasks.chair_mean_length),
    ):
        assert function(items) == reference[name]
    world_item = tasks.chair_process_results(
        {"image_id": "s", "gt_objects": ["house"], "vocabulary": "shapes"}, ["a red house , a green tree ."]
    )["chair_s"]
    assert world_item["hallucinated"] == [["tree", "tree"]]
    with pytest.raises(ValueError, match="vocabulary 'lvis'"):
        tasks.chair_process_results({"image_id": 3, "gt_objects": [], "vocabulary": "lvis"}, ["a dog"])


def test_export_writes_the_synthetic_items_in_the_pope_and_chair_layouts(exported):
    from lmms_eval.utils import load_yaml_config

    from vlm_guard.cli.eval import synthetic_tasks
    from vlm_guard.eval.pope import load_pope_questions

    folder, manifest = exported
    assert manifest["tasks"] == [export.POPE_GROUP, *POPE_TASKS, export.CHAIR_TASK]
    expected = {
        task.name: task
        for task in synthetic_tasks(
            N_QUESTIONS, N_CAPTIONS, world="shapes", chair_max_new_tokens=manifest["max_new_tokens"]["chair"]
        )
    }
    for split in export.POPE_SPLITS:
        questions = load_pope_questions(folder / "pope" / f"coco_pope_{split}.json")  # vlm-guard eval pope reads it
        items = expected[f"pope/{split}"].items
        assert [(q.text, q.label) for q in questions] == [(item.prompt, item.fields["label"]) for item in items]
        assert all((folder / "images" / q.image).is_file() for q in questions)
    rows = [json.loads(line) for line in (folder / "chair" / "chair.jsonl").read_text().splitlines()]
    assert [row["gt_objects"] for row in rows] == [item.fields["gt_objects"] for item in expected["chair"].items]
    config = load_yaml_config(str(folder / f"{POPE_TASKS[0]}.yaml"))
    assert config["task"] == POPE_TASKS[0] and config["process_results"] is tasks.pope_process_results
    assert config["generation_kwargs"]["max_new_tokens"] == 4 and config["generation_kwargs"]["until"] == []
    assert Path(config["lmms_eval_specific_kwargs"]["default"]["image_root"]) == (folder / "images").resolve()
    chair = load_yaml_config(str(folder / f"{export.CHAIR_TASK}.yaml"))
    assert chair["lmms_eval_specific_kwargs"]["default"]["prompt"] == "describe the image"


def test_export_replaces_an_earlier_export_and_refuses_bad_counts(tmp_path):
    export.export_synthetic(tmp_path, 2, 1, world="shapes")
    manifest = export.export_synthetic(tmp_path, 0, 1, world="shapes")
    assert manifest["tasks"] == [export.CHAIR_TASK]
    assert (
        not (tmp_path / f"{POPE_TASKS[0]}.yaml").exists() and not (tmp_path / "pope" / "coco_pope_random.json").exists()
    )
    with pytest.raises(ValueError, match="n_questions must be a whole number"):
        export.export_synthetic(tmp_path, -1, 1, world="shapes")
    with pytest.raises(ValueError, match="nothing to export"):
        export.export_synthetic(tmp_path, 0, 0, world="shapes")


def test_export_pope_copies_official_files(tmp_path, exported):
    folder, _ = exported
    manifest = export.export_pope(
        tmp_path / "out",
        [folder / "pope" / "coco_pope_random.json"],
        folder / "images",
        prompt_suffix=" Answer yes or no.",
        limit=2,
    )
    assert manifest["questions"] == {"random": 2}
    assert manifest["tasks"] == [export.POPE_GROUP, POPE_TASKS[0]]
    text = (tmp_path / "out" / f"{POPE_TASKS[0]}.yaml").read_text()
    assert "post_prompt: ' Answer yes or no.'" in text and "max_new_tokens: 16" in text
    with pytest.raises(ValueError, match="split is read from the file name"):
        shutil.copy(folder / "pope" / "coco_pope_random.json", tmp_path / "questions.json")
        export.export_pope(tmp_path / "out2", [tmp_path / "questions.json"], folder / "images")


def test_export_lmms_command(tmp_path, capsys):
    from vlm_guard.cli import main

    assert (
        main(
            [
                "export-lmms",
                "synthetic",
                "--out",
                str(tmp_path / "x"),
                "--n-questions",
                "2",
                "--n-captions",
                "0",
                "--world",
                "shapes",
                "--splits",
                "adversarial",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "--include_path" in printed and "vlm-guard eval synthetic --world shapes" in printed
    assert (tmp_path / "x" / f"{POPE_TASKS[2]}.yaml").is_file() and not (
        tmp_path / "x" / "vlm_guard_chair.yaml"
    ).exists()
    assert main(["export-lmms", "synthetic", "--out", str(tmp_path / "y"), "--splits", "sideways"]) == 2
    assert "splits must be among" in capsys.readouterr().err
