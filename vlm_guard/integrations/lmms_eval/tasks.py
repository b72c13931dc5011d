"""lmms-eval task functions for local POPE and CHAIR files, scored by :mod:`vlm_guard.eval`.

The task configs (``templates/pope.yaml``, ``templates/chair.yaml``, completed per data folder by
:mod:`vlm_guard.integrations.lmms_eval.export`) name these functions with ``!function
vlm_guard.integrations.lmms_eval.tasks.<name>``, so they work wherever the package is installed.

POPE documents are lines of an official question file (``coco_pope_random.json``: ``question_id``, ``image``,
``text``, ``label``); the lmms-lab POPE layout (``question``, ``answer``, a decoded ``image``) is read too. An
answer is reduced to yes/no with :func:`vlm_guard.eval.pope.parse_pope_answer` (the POPE rule on the first
sentence: "no"/"not" -> no, else yes), not by exact match, and ``yes_ratio`` is the share of the model's answers
that read as yes. ``unclear_share`` is the share of answers whose first sentence holds no yes/no word
(:func:`vlm_guard.eval.following.pope_answer_is_clear`): a model that does not answer the question shows it there.

CHAIR documents are lines of ``chair.jsonl``: ``image_id``, ``image``, ``gt_objects`` (the image's ground-truth
objects) and ``vocabulary`` (``"coco"``: the 80 COCO categories and synonyms of :mod:`vlm_guard.eval.chair`; a
synthetic world's name, e.g. ``"everyday"``: that world's objects, :func:`vlm_guard.eval.synthetic.
score_synthetic_caption`). CHAIR_S, CHAIR_I, recall and mean length are :func:`vlm_guard.eval.chair.chair_metrics`
over the captions.

Every metric is the same function of the same answers as in ``vlm-guard eval``'s summary, so the two agree to the
last digit on the same answers.

Example:
    >>> pope_process_results({"label": "no", "question_id": 1}, ["No, there is none."])["accuracy"]["prediction"]
    'no'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_CHAIR_PROMPT = "Please describe this image in detail."
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unclear_share")
CHAIR_METRICS = ("chair_s", "chair_i", "recall", "mean_length", "unclear_share")


# ---------------------------------------------------------------------------------------------- documents
def doc_to_visual(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> list:
    """The document's image, as one RGB PIL image in a list, read by :func:`vlm_guard.images.load_image`.

    ``image`` is a file name under the task's ``image_root`` (an absolute folder written by the export), an
    absolute path, or an already decoded image (the lmms-lab layout).

    Raises:
        FileNotFoundError: the image is not there (the run stops: a missing image is not scored as a wrong answer).
    """
    from vlm_guard.images import load_image

    image = doc.get("image")
    if image is None:
        raise ValueError(f"document {_doc_name(doc)} has no 'image'; POPE and CHAIR documents need one.")
    if not isinstance(image, (str, Path)):
        return [load_image(image)]
    root = (lmms_eval_specific_kwargs or {}).get("image_root") or ""
    path = Path(root) / image if root else Path(image)
    if not path.is_file():
        raise FileNotFoundError(
            f"image {image!r} of document {_doc_name(doc)} is not in {root or 'the working folder'}"
            f" ({path}); set image_root in the task's lmms_eval_specific_kwargs to the image "
            f"folder, or rerun `vlm-guard export-lmms`."
        )
    return [load_image(path)]


def _doc_name(doc: Mapping[str, Any]) -> str:
    for key in ("question_id", "image_id", "image"):
        if isinstance(doc.get(key), (str, int)):
            return f"{key}={doc[key]!r}"
    return "(no id)"


def pope_doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """``pre_prompt + question + post_prompt`` (``post_prompt`` is ``vlm-guard eval pope --prompt-suffix``)."""
    kwargs = lmms_eval_specific_kwargs or {}
    question = doc.get("text", doc.get("question"))
    if not isinstance(question, str):
        raise ValueError(f"POPE document {_doc_name(doc)} has no question ('text' or 'question').")
    return f"{kwargs.get('pre_prompt', '')}{question}{kwargs.get('post_prompt', '')}"


def pope_doc_to_target(doc: Mapping[str, Any]) -> str:
    """The ground truth, ``"yes"`` or ``"no"``."""
    return _pope_label(doc)


def _pope_label(doc: Mapping[str, Any]) -> str:
    label = doc.get("label", doc.get("answer"))
    if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
        raise ValueError(f"POPE document {_doc_name(doc)} has label {label!r}; it must be 'yes' or 'no'.")
    return label.strip().lower()


def chair_doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """The caption prompt: the task's ``prompt`` (default ``"Please describe this image in detail."``)."""
    return str((lmms_eval_specific_kwargs or {}).get("prompt") or DEFAULT_CHAIR_PROMPT)


# ---------------------------------------------------------------------------------------------- POPE scoring
def pope_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict:
    """One entry per POPE metric: the answer, its yes/no reading and the label (aggregated below)."""
    from vlm_guard.eval.pope import parse_pope_answer

    answer = _answer_text(results)
    entry = {
        "question_id": doc.get("question_id"),
        "answer": answer,
        "prediction": parse_pope_answer(answer),
        "label": _pope_label(doc),
    }
    return {name: entry for name in POPE_METRICS}


def _answer_text(results: Sequence[Any]) -> str:
    if not results:
        raise ValueError("the model returned no answer for a document; an empty result list cannot be scored.")
    answer = results[0]
    if not isinstance(answer, str):
        raise ValueError(f"the model returned {type(answer).__name__} instead of a text answer: {answer!r:.80}.")
    return answer


def _pope_metric(items: Sequence[Mapping[str, Any]], name: str) -> float:
    from vlm_guard.eval.pope import pope_metrics

    return pope_metrics([item["answer"] for item in items], [item["label"] for item in items])[name]


def pope_accuracy(items):
    """Share of answers whose yes/no reading equals the label."""
    return _pope_metric(items, "accuracy")


def pope_precision(items):
    """Of the answers read as yes, the share whose label is yes."""
    return _pope_metric(items, "precision")


def pope_recall(items):
    """Of the questions labelled yes, the share answered yes."""
    return _pope_metric(items, "recall")


def pope_f1(items):
    """Harmonic mean of precision and recall."""
    return _pope_metric(items, "f1")


def pope_yes_ratio(items):
    """Share of the model's answers read as yes (not of the labels)."""
    return _pope_metric(items, "yes_ratio")


def pope_unclear_share(items):
    """Share of answers whose first sentence holds no yes/no word."""
    from vlm_guard.eval.following import pope_following

    return float(pope_following([item["answer"] for item in items], max_unclear=1.0)["unclear_share"])


# ---------------------------------------------------------------------------------------------- CHAIR scoring
def chair_score(doc: Mapping[str, Any], caption: str) -> dict:
    """The CHAIR record of ``caption`` against the document's ``gt_objects`` in its ``vocabulary``."""
    gt_objects = doc.get("gt_objects")
    if not isinstance(gt_objects, (list, tuple)):
        raise ValueError(
            f"CHAIR document {_doc_name(doc)} needs 'gt_objects' (a list of object names), got {gt_objects!r:.80}."
        )
    vocabulary = str(doc.get("vocabulary") or "coco")
    if vocabulary == "coco":
        from vlm_guard.eval.chair import score_caption

        return score_caption(caption, list(gt_objects))
    from vlm_guard.eval.synthetic import score_synthetic_caption
    from vlm_guard.synthetic.worlds import WORLD_NAMES

    if vocabulary not in WORLD_NAMES:
        raise ValueError(
            f"CHAIR document {_doc_name(doc)} has vocabulary {vocabulary!r}; use 'coco' or a synthetic "
            f"world ({', '.join(WORLD_NAMES)})."
        )
    return score_synthetic_caption(caption, list(gt_objects), vocabulary)


def chair_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict:
    """One entry per CHAIR metric: the caption and its CHAIR record (mentions, hallucinations, counts)."""
    caption = _answer_text(results)
    record = chair_score(doc, caption)
    entry = {"image_id": doc.get("image_id"), "caption": caption, **record}
    return {name: entry for name in CHAIR_METRICS}


def _chair_metric(items: Sequence[Mapping[str, Any]], name: str) -> float:
    from vlm_guard.eval.chair import chair_metrics

    return chair_metrics(items)[name]


def chair_s(items):
    """Share of captions with at least one hallucinated object."""
    return _chair_metric(items, "chair_s")


def chair_i(items):
    """Hallucinated object mentions / all object mentions."""
    return _chair_metric(items, "chair_i")


def chair_recall(items):
    """Ground-truth objects mentioned / ground-truth objects (per caption, summed)."""
    return _chair_metric(items, "recall")


def chair_mean_length(items):
    """Mean caption length in words."""
    return _chair_metric(items, "mean_length")


def chair_unclear_share(items):
    """Share of outputs that are not captions (fewer than 2 words, or starting with a yes/no word)."""
    from vlm_guard.eval.following import chair_following

    return float(chair_following([item["caption"] for item in items], max_unclear=1.0)["unclear_share"])
