"""POPE: Polling-based Object Probing Evaluation (Li et al., EMNLP 2023).

One question file per split (``coco_pope_random.json``, ``coco_pope_popular.json``,
``coco_pope_adversarial.json``), each a JSON-lines file with one object per line::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}

A free-form model answer is reduced to "yes"/"no" by the rule of the released ``evaluate.py``: keep the text
before the first ``'.'``, and answer "no" when that first sentence contains the word "no" or "not", else "yes".
Metrics take "yes" as the positive class: accuracy, precision, recall, F1 and the yes-ratio of the predictions.

Everything here is a small pure function; reading files is kept apart from computing metrics.

Example:
    >>> pope_metrics(["Yes, there is.", "No.", "There is a dog.", "There is no cat."],
    ...              ["yes", "no", "no", "no"])["accuracy"]
    0.75
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
"""The three POPE negative-sampling splits, in the order papers report them."""

PARSE_RULES: tuple[str, ...] = ("words", "released")
"""Answer-parse rules accepted by :func:`parse_pope_answer`."""

POPE_METRIC_NAMES: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio")

COUNT_NAMES: tuple[str, ...] = ("tp", "fp", "tn", "fn")
"""Column order of :func:`pope_item_counts` (one-hot per item)."""

_REQUIRED_KEYS: tuple[str, ...] = ("question_id", "image", "text", "label")
_WORD_PATTERN = re.compile(r"[a-z0-9']+")
_QUESTION_PATTERN = re.compile(r"^\s*is there an? (?P<object>.+?) in the ima\w*\s*\?\s*$", re.IGNORECASE)
NEGATION_WORDS = frozenset({"no", "not"})
"""The words that make the ``"words"`` rule answer "no"."""


def answer_words(text: str) -> list[str]:
    """The words the ``"words"`` rule reads: runs of letters, digits and apostrophes after lower-casing.

    Example:
        >>> answer_words("No, it's NOT.")
        ['no', "it's", 'not']
    """
    return _WORD_PATTERN.findall(text.lower())


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question, as read from an official question file.

    Attributes:
        question_id: The file's ``question_id`` (an int in the official files).
        image: Image file name, e.g. ``"COCO_val2014_000000310196.jpg"``.
        text: The question, e.g. ``"Is there a snowboard in the image?"``.
        label: Ground-truth answer, ``"yes"`` or ``"no"``.
    """

    question_id: int | str
    image: str
    text: str
    label: str

    @property
    def object_name(self) -> str | None:
        """The probed object parsed from ``"Is there a {object} in the image?"``, or None if the text differs."""
        match = _QUESTION_PATTERN.match(self.text)
        return match.group("object").strip() if match else None


def load_pope_questions(path: str | os.PathLike) -> list[PopeQuestion]:
    """Read an official POPE question file (JSON lines).

    Blank lines are skipped. Every other line must be a JSON object with ``question_id``, ``image``, ``text`` and
    ``label`` (``"yes"``/``"no"``, case-insensitive; stored lower-case). Question ids must be unique.

    Args:
        path: Path to e.g. ``coco_pope_random.json``.

    Returns:
        The questions in file order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: For a malformed line, naming the file and the 1-based line number.

    Example:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = Path(tmp.name) / "coco_pope_random.json"
        >>> line = {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
        ...         "text": "Is there a snowboard in the image?", "label": "Yes"}
        >>> _ = path.write_text(json.dumps(line) + "\\n")
        >>> questions = load_pope_questions(path)
        >>> questions[0].label, questions[0].object_name
        ('yes', 'snowboard')
        >>> tmp.cleanup()
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"POPE question file not found: {str(path)!r}. Expected an official split file such as "
            f"'coco_pope_random.json' (JSON lines with question_id, image, text, label)."
        )
    questions: list[PopeQuestion] = []
    seen_ids: dict[int | str, int] = {}
    with path.open("r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where}: not valid JSON ({error.msg} at column {error.colno}): {line.strip()[:120]!r}. "
                    f"POPE question files hold one JSON object per line."
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object per line, got {type(obj).__name__}: {obj!r:.120}.")
            missing = [key for key in _REQUIRED_KEYS if key not in obj]
            if missing:
                raise ValueError(
                    f"{where}: missing key(s) {missing}; each line needs {list(_REQUIRED_KEYS)}, got {sorted(obj)}."
                )
            label = obj["label"]
            if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
                raise ValueError(f"{where}: label must be 'yes' or 'no', got {label!r}.")
            question_id = obj["question_id"]
            if not isinstance(question_id, (int, str)) or isinstance(question_id, bool):
                raise ValueError(f"{where}: question_id must be an int or a string, got {question_id!r}.")
            if question_id in seen_ids:
                raise ValueError(
                    f"{where}: duplicate question_id {question_id!r} (first seen on line {seen_ids[question_id]})."
                )
            seen_ids[question_id] = line_number
            if not isinstance(obj["text"], str) or not isinstance(obj["image"], str):
                raise ValueError(f"{where}: 'image' and 'text' must be strings, got {obj['image']!r}, {obj['text']!r}.")
            questions.append(
                PopeQuestion(question_id=question_id, image=obj["image"], text=obj["text"], label=label.strip().lower())
            )
    if not questions:
        raise ValueError(f"POPE question file {str(path)!r} holds no questions.")
    logger.info("Read %d POPE questions from %s", len(questions), path)
    return questions


def pope_question_file(directory: str | os.PathLike, split: str, dataset: str = "coco") -> Path:
    """Path of one official split file inside ``directory``: ``{dataset}_pope_{split}.json``.

    Args:
        directory: Folder holding the POPE files.
        split: One of :data:`POPE_SPLITS`.
        dataset: Dataset prefix of the file name (``"coco"``, ``"aokvqa"``, ``"gqa"``).

    Returns:
        The path (not checked for existence; :func:`load_pope_questions` does that).

    Example:
        >>> pope_question_file("pope", "adversarial").name
        'coco_pope_adversarial.json'
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"split must be one of {POPE_SPLITS}, got {split!r}.")
    return Path(directory) / f"{dataset}_pope_{split}.json"


def pope_split_from_path(path: str | os.PathLike) -> str | None:
    """The split named in a question-file name (``coco_pope_popular.json`` -> ``"popular"``), or None.

    Example:
        >>> pope_split_from_path("data/coco_pope_random.json")
        'random'
    """
    stem = Path(path).stem.lower()
    for split in POPE_SPLITS:
        if stem.endswith(f"_{split}") or stem == split:
            return split
    return None


def first_sentence(text: str) -> str:
    """Text before the first ``'.'`` (the whole text when there is none), as the released POPE code does.

    Example:
        >>> first_sentence("Yes. There is no cat.")
        'Yes'
    """
    return text.split(".", 1)[0]


def parse_pope_answer(text: str, rule: str = "words") -> str:
    """Reduce a free-form answer to ``"yes"`` or ``"no"`` with the POPE rule.

    Both rules keep only the first sentence (text before the first ``'.'``) and answer ``"no"`` when it contains
    the word "no" or "not", else ``"yes"`` (so an empty or evasive answer counts as "yes", as in the released code).

    - ``"words"`` (default, the rule's meaning): words are runs of letters, digits and apostrophes after
      lower-casing, so "No," "NO!" "not." "Not sure" all count; "cannot", "don't", "nope", "none" do not.
    - ``"released"``: the exact released ``evaluate.py`` behaviour: drop commas, split on single spaces, and
      look for the exact tokens ``"No"``, ``"no"``, ``"not"``. It misses "Not", "NO", "no!" and "no" followed
      by a newline. Use it to reproduce published numbers bit for bit.

    Args:
        text: The model's answer.
        rule: ``"words"`` or ``"released"``.

    Returns:
        ``"yes"`` or ``"no"``.

    Example:
        >>> parse_pope_answer("No, there is not.")
        'no'
        >>> parse_pope_answer("Yes, there is a dog. There is no cat.")
        'yes'
    """
    if not isinstance(text, str):
        raise ValueError(f"answer must be a string, got {type(text).__name__}: {text!r:.80}.")
    sentence = first_sentence(text)
    if rule == "words":
        return "no" if any(word in NEGATION_WORDS for word in answer_words(sentence)) else "yes"
    if rule == "released":
        tokens = sentence.replace(",", "").split(" ")
        return "no" if ("No" in tokens or "not" in tokens or "no" in tokens) else "yes"
    raise ValueError(f"rule must be one of {PARSE_RULES}, got {rule!r}.")


def _normalise_labels(labels: Sequence[str]) -> list[str]:
    normalised = []
    for index, label in enumerate(labels):
        value = label.strip().lower() if isinstance(label, str) else None
        if value not in ("yes", "no"):
            raise ValueError(f"labels[{index}] must be 'yes' or 'no', got {label!r}.")
        normalised.append(value)
    return normalised


def pope_item_counts(predictions: Sequence[str], labels: Sequence[str], rule: str = "words") -> np.ndarray:
    """Per-item confusion counts, one-hot in the columns :data:`COUNT_NAMES` (tp, fp, tn, fn).

    Summing rows and calling :func:`pope_metrics_from_totals` gives :func:`pope_metrics`; this is the fast input
    for bootstrap statistics (see :func:`pope_metric_fn`).

    Args:
        predictions: Free-form answers (parsed with :func:`parse_pope_answer`; "yes"/"no" parse to themselves).
        labels: Ground-truth "yes"/"no", same length.
        rule: Parse rule, see :func:`parse_pope_answer`.

    Returns:
        Array of shape ``[n_items, 4]``, dtype int64.

    Example:
        >>> pope_item_counts(["yes", "no"], ["no", "no"]).tolist()
        [[0, 1, 0, 0], [0, 0, 1, 0]]
    """
    if len(predictions) != len(labels):
        raise ValueError(
            f"predictions and labels differ in length ({len(predictions)} vs {len(labels)}); pass one answer per question."
        )
    label_values = _normalise_labels(labels)
    counts = np.zeros((len(label_values), 4), dtype=np.int64)  # [n_items, (tp, fp, tn, fn)]
    for index, (prediction, label) in enumerate(zip(predictions, label_values)):
        predicted_yes = parse_pope_answer(prediction, rule=rule) == "yes"
        label_yes = label == "yes"
        column = (0 if label_yes else 1) if predicted_yes else (3 if label_yes else 2)
        counts[index, column] = 1
    return counts


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def pope_metrics_from_totals(totals: np.ndarray) -> dict[str, np.ndarray]:
    """POPE metrics from summed counts; vectorised over leading axes.

    Zero denominators give 0.0 (precision with no "yes" predictions, recall with no "yes" labels, F1 when
    precision + recall is 0, everything when there are no items), never NaN.

    Args:
        totals: Array ``[..., 4]`` of summed (tp, fp, tn, fn).

    Returns:
        Dict of arrays with shape ``totals.shape[:-1]``: accuracy, precision, recall, f1, yes_ratio.

    Example:
        >>> round(float(pope_metrics_from_totals(np.array([2, 1, 1, 0]))["precision"]), 4)
        0.6667
    """
    totals = np.asarray(totals, dtype=np.float64)
    if totals.shape[-1:] != (4,):
        raise ValueError(f"totals must have a last axis of size 4 (tp, fp, tn, fn), got shape {totals.shape}.")
    tp, fp, tn, fn = (totals[..., column] for column in range(4))
    n = tp + fp + tn + fn
    precision = _safe_divide(tp, tp + fp)
    recall = _safe_divide(tp, tp + fn)
    return {
        "accuracy": _safe_divide(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _safe_divide(2 * precision * recall, precision + recall),
        "yes_ratio": _safe_divide(tp + fp, n),
    }


def pope_metrics(predictions: Sequence[str], labels: Sequence[str], rule: str = "words") -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class.

    Args:
        predictions: Free-form model answers (or already "yes"/"no"), one per question.
        labels: Ground-truth "yes"/"no", same order.
        rule: Parse rule, see :func:`parse_pope_answer`.

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "yes_ratio"}`` as floats in [0, 1] (0.0 for a zero
        denominator), plus the integer counts ``"tp", "fp", "tn", "fn"`` and ``"n"``.

    Example:
        >>> m = pope_metrics(["Yes.", "No.", "Yes.", "No."], ["yes", "yes", "no", "no"])
        >>> (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"])
        (0.5, 0.5, 0.5, 0.5, 0.5)
    """
    counts = pope_item_counts(predictions, labels, rule=rule)
    totals = counts.sum(axis=0)
    metrics = {name: float(value) for name, value in pope_metrics_from_totals(totals).items()}
    metrics.update({name: int(value) for name, value in zip(COUNT_NAMES, totals)})
    metrics["n"] = int(counts.shape[0])
    return metrics


def pope_metric_fn(name: str):
    """A bootstrap-ready metric over :func:`pope_item_counts` rows (for :mod:`vlm_guard.eval.stats`).

    Args:
        name: One of :data:`POPE_METRIC_NAMES`.

    Returns:
        A :class:`~vlm_guard.eval.stats.TotalsMetric`.

    Example:
        >>> from vlm_guard.eval.stats import bootstrap_ci
        >>> counts = pope_item_counts(["yes", "no"] * 50, ["yes"] * 100)
        >>> bootstrap_ci(counts, pope_metric_fn("recall"), n_resamples=200)[0]
        0.5
    """
    from vlm_guard.eval.stats import TotalsMetric

    return TotalsMetric.pick("pope", name, POPE_METRIC_NAMES, pope_metrics_from_totals)


def align_answers(
    questions: Sequence[PopeQuestion], answers_by_id: Mapping[int | str, str], allow_missing: bool = False
) -> tuple[list[str], list[str], list[int | str]]:
    """Pair answers with questions by ``question_id`` (the released code pairs by line order, which breaks
    silently when a run skipped or reordered items).

    Args:
        questions: From :func:`load_pope_questions`.
        answers_by_id: ``question_id`` -> model answer. Keys are matched as given, then as strings.
        allow_missing: Skip questions without an answer (logged) instead of raising.

    Returns:
        ``(predictions, labels, question_ids)`` in question order.

    Example:
        >>> qs = [PopeQuestion(1, "a.jpg", "Is there a dog in the image?", "yes")]
        >>> align_answers(qs, {1: "Yes."})
        (['Yes.'], ['yes'], [1])
    """
    by_string = {str(key): value for key, value in answers_by_id.items()}
    predictions, labels, ids, missing = [], [], [], []
    for question in questions:
        if question.question_id in answers_by_id:
            answer = answers_by_id[question.question_id]
        elif str(question.question_id) in by_string:
            answer = by_string[str(question.question_id)]
        else:
            missing.append(question.question_id)
            continue
        predictions.append(answer)
        labels.append(question.label)
        ids.append(question.question_id)
    if missing:
        if not allow_missing:
            raise ValueError(
                f"{len(missing)} of {len(questions)} questions have no answer (first ids: {missing[:5]}); finish the "
                f"run or pass allow_missing=True to score the answered subset."
            )
        logger.warning("Scoring %d of %d POPE questions; %d have no answer.", len(ids), len(questions), len(missing))
    return predictions, labels, ids


def yes_no_counts(answers: Iterable[str], rule: str = "words") -> dict[str, int]:
    """How many answers parse to "yes" and to "no" (a quick bias check).

    Example:
        >>> yes_no_counts(["Yes", "No", "Not sure"])
        {'yes': 1, 'no': 2}
    """
    counts = {"yes": 0, "no": 0}
    for answer in answers:
        counts[parse_pope_answer(answer, rule=rule)] += 1
    return counts
