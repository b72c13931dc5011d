"""Evaluation harness: benchmark metrics (POPE, CHAIR), bootstrap statistics and resumable result files.

Each benchmark is one module of small pure functions; file reading is kept apart from metric computation.

Example:
    >>> from vlm_guard.eval import pope_metrics
    >>> pope_metrics(["Yes.", "No, there is not."], ["yes", "no"])["accuracy"]
    1.0
"""

from vlm_guard.eval.chair import (
    ChairGroundTruth,
    ChairVocabulary,
    chair_item_counts,
    chair_metric_fn,
    chair_metrics,
    extract_objects,
    score_caption,
)
from vlm_guard.eval.pope import (
    POPE_SPLITS,
    PopeQuestion,
    load_pope_questions,
    parse_pope_answer,
    pope_item_counts,
    pope_metric_fn,
    pope_metrics,
)
from vlm_guard.eval.records import (
    FileBusyError,
    ResultsWriter,
    RunMismatchError,
    read_header,
    read_records,
    read_summary,
    write_summary,
)
from vlm_guard.eval.stats import TotalsMetric, bootstrap_ci, paired_bootstrap

__all__ = [
    "ChairGroundTruth",
    "ChairVocabulary",
    "chair_item_counts",
    "chair_metric_fn",
    "chair_metrics",
    "extract_objects",
    "score_caption",
    "POPE_SPLITS",
    "PopeQuestion",
    "load_pope_questions",
    "parse_pope_answer",
    "pope_item_counts",
    "pope_metric_fn",
    "pope_metrics",
    "ResultsWriter",
    "RunMismatchError",
    "FileBusyError",
    "read_header",
    "read_records",
    "read_summary",
    "write_summary",
    "TotalsMetric",
    "bootstrap_ci",
    "paired_bootstrap",
]
