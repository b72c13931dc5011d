"""POPE: answer-parse rule, metrics by hand, question-file reading, and an end-to-end run from files."""

import json
import math

import pytest

from vlm_guard.eval.pope import (
    PopeQuestion,
    align_answers,
    first_sentence,
    load_pope_questions,
    parse_pope_answer,
    pope_item_counts,
    pope_metrics,
    pope_metrics_from_totals,
    pope_question_file,
    pope_split_from_path,
    yes_no_counts,
)

# (answer, "words" rule, "released" rule = exact released evaluate.py behaviour)
PARSE_CASES = [
    ("No, there is not.", "no", "no"),
    ("Yes.", "yes", "yes"),
    ("Yes", "yes", "yes"),
    ("There is no dog.", "no", "no"),
    ("Not sure", "no", "yes"),  # released code looks for "not" / "no" / "No" only
    ("I cannot see a dog.", "yes", "yes"),  # "cannot" is not the word "not"
    ("no.", "no", "no"),
    ("Nope", "yes", "yes"),
    ("", "yes", "yes"),  # empty / evasive answers count as yes
    ("yes, no", "no", "no"),  # no '.', so the whole text is the first sentence
    ("Yes, there is a dog. There is no cat.", "yes", "yes"),  # only the first sentence counts
    ("There is a dog. No", "yes", "yes"),
    ("NO", "no", "yes"),
    ("No!", "no", "yes"),
    ("No\nThere is nothing.", "no", "yes"),
    ("There is a notebook, not a dog.", "no", "no"),
    ("There is a notebook.", "yes", "yes"),  # "notebook" contains "not" but is not the word
    ("Is there a nose? None.", "yes", "yes"),
    ("The answer is no", "no", "no"),
    ("It is not.", "no", "no"),
    ("Don't know", "yes", "yes"),
]


@pytest.mark.parametrize("answer, expected_words, expected_released", PARSE_CASES)
def test_parse_rule_cases(answer, expected_words, expected_released):
    assert parse_pope_answer(answer) == expected_words
    assert parse_pope_answer(answer, rule="words") == expected_words
    assert parse_pope_answer(answer, rule="released") == expected_released


def test_parse_is_idempotent_on_yes_no():
    for value in ("yes", "no", "Yes", "No"):
        assert parse_pope_answer(value) == value.lower()


def test_parse_rejects_bad_rule_and_type():
    with pytest.raises(ValueError, match="rule must be one of"):
        parse_pope_answer("Yes", rule="official")
    with pytest.raises(ValueError, match="answer must be a string"):
        parse_pope_answer(None)


def test_first_sentence():
    assert first_sentence("Yes. No.") == "Yes"
    assert first_sentence("no dot here") == "no dot here"
    assert first_sentence(".") == ""


def test_metrics_by_hand():
    # items: TP, FP, TN, FN, TP
    predictions = ["Yes, there is.", "Yes.", "No.", "There is no cat in the image.", "yes"]
    labels = ["yes", "no", "no", "yes", "yes"]
    metrics = pope_metrics(predictions, labels)
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"], metrics["n"]) == (2, 1, 1, 1, 5)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["yes_ratio"] == pytest.approx(3 / 5)


def test_metrics_asymmetric_case():
    # tp=1, fp=3, tn=0, fn=0: precision 1/4, recall 1, f1 = 2*(1/4)/(5/4) = 0.4
    metrics = pope_metrics(["yes"] * 4, ["yes", "no", "no", "no"])
    assert metrics["precision"] == pytest.approx(0.25)
    assert metrics["recall"] == pytest.approx(1.0)
    assert metrics["f1"] == pytest.approx(0.4)
    assert metrics["accuracy"] == pytest.approx(0.25)
    assert metrics["yes_ratio"] == pytest.approx(1.0)


def test_zero_denominators_give_zero_not_nan():
    # no "yes" predictions: precision has 0/0
    metrics = pope_metrics(["No."] * 3, ["yes", "no", "no"])
    assert metrics["precision"] == 0.0 and metrics["recall"] == 0.0 and metrics["f1"] == 0.0
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    # no "yes" labels: recall has 0/0
    metrics = pope_metrics(["No."] * 2, ["no", "no"])
    assert metrics["recall"] == 0.0 and metrics["accuracy"] == 1.0 and metrics["yes_ratio"] == 0.0
    # nothing at all
    metrics = pope_metrics([], [])
    assert metrics["n"] == 0
    assert all(metrics[name] == 0.0 for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
    assert not any(math.isnan(value) for value in metrics.values())


def test_released_rule_changes_metrics():
    metrics_words = pope_metrics(["Not sure", "NO"], ["no", "no"])
    metrics_released = pope_metrics(["Not sure", "NO"], ["no", "no"], rule="released")
    assert metrics_words["accuracy"] == 1.0
    assert metrics_released["accuracy"] == 0.0


def test_item_counts_and_totals_agree():
    counts = pope_item_counts(["yes", "no", "no", "yes"], ["yes", "yes", "no", "no"])
    assert counts.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]]
    from_totals = pope_metrics_from_totals(counts.sum(axis=0))
    assert float(from_totals["f1"]) == pytest.approx(0.5)
    # vectorised over a leading axis
    batch = pope_metrics_from_totals(counts[None].repeat(3, axis=0).sum(axis=1))
    assert batch["accuracy"].shape == (3,)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="differ in length"):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match=r"labels\[1\] must be 'yes' or 'no', got 'maybe'"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])


def test_yes_no_counts():
    assert yes_no_counts(["Yes", "No", "Not sure", ""]) == {"yes": 2, "no": 2}


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _question(question_id, image, obj, label):
    return json.dumps(
        {"question_id": question_id, "image": image, "text": f"Is there a {obj} in the image?", "label": label}
    )


def test_load_questions_official_format(tmp_path):
    path = _write_lines(
        tmp_path / "coco_pope_random.json",
        [
            _question(1, "COCO_val2014_000000310196.jpg", "snowboard", "yes"),
            _question(2, "COCO_val2014_000000310196.jpg", "dining table", "no"),
            "",
            _question(3, "COCO_val2014_000000210789.jpg", "person", "yes"),
        ],
    )
    questions = load_pope_questions(path)
    assert [q.question_id for q in questions] == [1, 2, 3]
    assert questions[1] == PopeQuestion(
        2, "COCO_val2014_000000310196.jpg", "Is there a dining table in the image?", "no"
    )
    assert questions[1].object_name == "dining table"
    assert pope_split_from_path(path) == "random"


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"question_id": 3, "image": "a.jpg", "text": "Is there a cat', "not valid JSON"),
        ('{"question_id": 3, "image": "a.jpg", "text": "Is there a cat?"}', r"missing key\(s\) \['label'\]"),
        (
            '{"question_id": 3, "image": "a.jpg", "text": "Is there a cat?", "label": "maybe"}',
            "label must be 'yes' or 'no'",
        ),
        ('{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}', "duplicate question_id 1"),
        ('["not", "an", "object"]', "expected a JSON object"),
    ],
)
def test_load_questions_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = _write_lines(
        tmp_path / "coco_pope_adversarial.json",
        [_question(1, "a.jpg", "dog", "yes"), _question(2, "a.jpg", "cat", "no"), bad_line],
    )
    with pytest.raises(ValueError, match=message) as error:
        load_pope_questions(path)
    assert "coco_pope_adversarial.json:3" in str(error.value)


def test_load_questions_missing_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_pope_popular.json"):
        load_pope_questions(tmp_path / "coco_pope_popular.json")
    empty = tmp_path / "coco_pope_popular.json"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no questions"):
        load_pope_questions(empty)


def test_split_helpers(tmp_path):
    assert pope_question_file(tmp_path, "popular").name == "coco_pope_popular.json"
    assert pope_question_file(tmp_path, "random", dataset="gqa").name == "gqa_pope_random.json"
    assert pope_split_from_path("x/coco_pope_adversarial.json") == "adversarial"
    assert pope_split_from_path("x/other.json") is None
    with pytest.raises(ValueError, match="split must be one of"):
        pope_question_file(tmp_path, "hard")


def test_align_answers_by_id():
    questions = [
        PopeQuestion(1, "a.jpg", "Is there a dog in the image?", "yes"),
        PopeQuestion(2, "a.jpg", "Is there a cat in the image?", "no"),
    ]
    assert align_answers(questions, {2: "No.", 1: "Yes."}) == (["Yes.", "No."], ["yes", "no"], [1, 2])
    assert align_answers(questions, {"1": "Yes.", "2": "No."})[2] == [1, 2]  # string keys from JSON
    with pytest.raises(ValueError, match="1 of 2 questions have no answer"):
        align_answers(questions, {1: "Yes."})
    assert align_answers(questions, {1: "Yes."}, allow_missing=True) == (["Yes."], ["yes"], [1])


def test_end_to_end_from_files(tmp_path):
    """Question file + answer file in the official formats -> metrics computed by hand."""
    split_dir = tmp_path / "pope"
    split_dir.mkdir()
    objects_labels = [("dog", "yes"), ("cat", "no"), ("car", "yes"), ("bus", "no"), ("sink", "yes"), ("kite", "no")]
    _write_lines(
        pope_question_file(split_dir, "popular"),
        [_question(i + 1, f"COCO_val2014_{i:012d}.jpg", obj, label) for i, (obj, label) in enumerate(objects_labels)],
    )
    # answers as a model writes them (llava-style answer file: question_id + text), one per line, out of order
    answers = {
        1: "Yes, there is a dog.",
        2: "No, there is no cat.",
        3: "No.",
        4: "Yes, a bus.",
        5: "There is a sink. No soap.",
        6: "not that I can see",
    }
    answer_file = tmp_path / "answers.jsonl"
    _write_lines(
        answer_file,
        [json.dumps({"question_id": qid, "text": text}) for qid, text in sorted(answers.items(), reverse=True)],
    )
    questions = load_pope_questions(pope_question_file(split_dir, "popular"))
    answers_by_id = {}
    for line in answer_file.read_text().splitlines():
        record = json.loads(line)
        answers_by_id[record["question_id"]] = record["text"]
    predictions, labels, ids = align_answers(questions, answers_by_id)
    assert ids == [1, 2, 3, 4, 5, 6]
    metrics = pope_metrics(predictions, labels)
    # 1 TP, 2 TN, 3 FN, 4 FP, 5 TP, 6 TN
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (2, 1, 2, 1)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["yes_ratio"] == pytest.approx(3 / 6)
