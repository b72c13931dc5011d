"""What tuning minimises, computed from compact per-item results.

Objective (lower is better), on the tuning split only:

    score = CHAIR_I (%) + adversarial POPE error (%)

(when the tuning data has no adversarial split, the mean POPE error over the splits it has; with only captions or
only questions, the part that exists). A setting is *feasible* when, against greedy decoding on the same items,

- neither part of the score gets worse: CHAIR_I and the scored POPE error are each at most greedy's (a setting
  may not buy fewer POPE errors with more hallucinated caption objects, or the reverse),
- CHAIR object recall drops by at most :data:`MAX_RECALL_DROP` points, and
- POPE accuracy on every other split (random, popular) drops by at most :data:`MAX_POPE_DROP` points.

Infeasible settings rank after every feasible one. A method *gains* when its best feasible setting scores at least
:data:`MIN_GAIN` below greedy; only such methods enter the default combination.

Per-item results are compact dicts: POPE ``{"c": 1 if correct, "y": 1 if answered yes}``; captions
``{"m": mentions, "h": hallucinated mentions, "g": ground-truth objects, "r": recalled objects}``.

Example:
    >>> metrics({"pope/adversarial": [{"c": 1, "y": 0}, {"c": 0, "y": 1}], "chair": [{"m": 4, "h": 1, "g": 2, "r": 2}]})
    {'pope/adversarial': {'error': 50.0, 'yes_ratio': 50.0, 'n': 2}, 'chair': {'chair_i': 25.0, 'chair_s': 100.0, 'recall': 100.0, 'n': 1}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

MAX_RECALL_DROP = 2.0
"""Points of CHAIR object recall a feasible setting may lose against greedy."""
MAX_POPE_DROP = 1.0
"""Points of accuracy a feasible setting may lose on a POPE split that is not in the score."""
MIN_GAIN = 0.25
"""Points of score a setting must gain over greedy to count as helping (about one POPE answer in 300 plus a
little): below that a difference is noise on a tuning split of a few hundred items. A larger method set must also
score at least this much below a smaller one to be chosen as the default."""

OBJECTIVE_TEXT = (
    f"minimise CHAIR_I + adversarial POPE error (%), subject to CHAIR_I <= greedy, adversarial POPE error "
    f"<= greedy, CHAIR recall >= greedy - {MAX_RECALL_DROP:g} points and random/popular POPE accuracy >= "
    f"greedy - {MAX_POPE_DROP:g} points"
)


def compact_result(kind: str, record: Mapping) -> dict:
    """The compact result of one scored record (see the module docstring)."""
    if kind == "pope":
        return {"c": int(bool(record.get("correct"))), "y": int(record.get("prediction") == "yes")}
    return {
        "m": int(record["n_mentions"]),
        "h": int(record["n_hallucinated"]),
        "g": int(record["n_gt_objects"]),
        "r": int(record["n_recalled"]),
    }


def metrics(results: Mapping[str, Sequence[dict]]) -> dict[str, dict]:
    """Metrics (in %) per task from compact results: POPE ``error``, ``yes_ratio``; CHAIR ``chair_i``, ``chair_s``,
    ``recall``; each with its ``n``."""
    out: dict[str, dict] = {}
    for task, items in results.items():
        items = list(items)
        n = len(items)
        if task.startswith("pope"):
            correct = sum(item["c"] for item in items)
            out[task] = {
                "error": 100.0 * (1 - correct / n) if n else 0.0,
                "yes_ratio": 100.0 * sum(item["y"] for item in items) / n if n else 0.0,
                "n": n,
            }
        else:
            mentions = sum(item["m"] for item in items)
            hallucinated = sum(item["h"] for item in items)
            gt = sum(item["g"] for item in items)
            recalled = sum(item["r"] for item in items)
            out[task] = {
                "chair_i": 100.0 * hallucinated / mentions if mentions else 0.0,
                "chair_s": 100.0 * sum(1 for item in items if item["h"]) / n if n else 0.0,
                "recall": 100.0 * recalled / gt if gt else 0.0,
                "n": n,
            }
    return out


def score(task_metrics: Mapping[str, dict]) -> float:
    """The objective (see the module docstring)."""
    pope = {task: m for task, m in task_metrics.items() if task.startswith("pope")}
    value = 0.0
    if "pope/adversarial" in pope:
        value += pope["pope/adversarial"]["error"]
    elif pope:
        value += sum(m["error"] for m in pope.values()) / len(pope)
    if "chair" in task_metrics:
        value += task_metrics["chair"]["chair_i"]
    return value


def violations(task_metrics: Mapping[str, dict], greedy_metrics: Mapping[str, dict]) -> list[str]:
    """Why a setting is infeasible against greedy on the same items (empty: feasible)."""
    problems = []
    if "chair" in task_metrics and "chair" in greedy_metrics:
        rise = task_metrics["chair"]["chair_i"] - greedy_metrics["chair"]["chair_i"]
        if rise > 1e-9:
            problems.append(f"CHAIR_I +{rise:.1f}")
        drop = greedy_metrics["chair"]["recall"] - task_metrics["chair"]["recall"]
        if drop > MAX_RECALL_DROP:
            problems.append(f"recall -{drop:.1f}")
    scored = "pope/adversarial" if "pope/adversarial" in task_metrics else None
    pope_parts = [scored] if scored else [t for t in task_metrics if t.startswith("pope")]
    own_error = [task_metrics[t]["error"] for t in pope_parts if t in greedy_metrics]
    base_error = [greedy_metrics[t]["error"] for t in pope_parts if t in greedy_metrics]
    if own_error and sum(own_error) / len(own_error) - sum(base_error) / len(base_error) > 1e-9:
        problems.append(f"POPE error +{sum(own_error) / len(own_error) - sum(base_error) / len(base_error):.1f}")
    for task, m in task_metrics.items():
        if task.startswith("pope") and task != scored and task in greedy_metrics and scored is not None:
            drop = m["error"] - greedy_metrics[task]["error"]
            if drop > MAX_POPE_DROP:
                problems.append(f"{task} acc -{drop:.1f}")
    return problems


def rank_key(score_value: float, problems: Sequence[str]) -> tuple[int, float]:
    """Sort key: feasible settings first, then by score."""
    return (1 if problems else 0, score_value)


__all__ = [
    "MAX_RECALL_DROP",
    "MAX_POPE_DROP",
    "MIN_GAIN",
    "OBJECTIVE_TEXT",
    "compact_result",
    "metrics",
    "score",
    "violations",
    "rank_key",
]
