"""Metrics with bootstrap intervals per task, paired comparisons against greedy, and markdown tables.

Input: records as written by :func:`vlm_guard.eval.runner.run_items`, grouped by task name (``"pope/<split>"``
or ``"chair"``). POPE records need ``answer`` and ``label``; CHAIR records need the count fields of
:func:`vlm_guard.eval.chair.score_caption`.

Every metric is ``{"point", "low", "high"}`` (95% percentile bootstrap over items by default). A paired
comparison resamples the same items for both method sets (:func:`vlm_guard.eval.stats.paired_bootstrap`);
a difference whose interval contains 0 is reported as "n.s." (inside the resampling noise).

Each task's metrics also hold the prompt-following check of :mod:`vlm_guard.eval.following` (``followed_prompt``,
``unclear_share``...); the tables show "prompt not followed" instead of the numbers of a task that failed it.

Example:
    >>> records = {"pope/random": [{"id": "1", "answer": "yes", "label": "yes"},
    ...                            {"id": "2", "answer": "no", "label": "yes"}]}
    >>> task_metrics("pope", records["pope/random"], n_resamples=50)["accuracy"]["point"]
    0.5
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlm_guard.eval.chair import CHAIR_METRIC_NAMES, chair_item_counts, chair_metric_fn
from vlm_guard.eval.following import MAX_UNCLEAR_SHARE, task_following
from vlm_guard.eval.pope import POPE_METRIC_NAMES, pope_item_counts, pope_metric_fn
from vlm_guard.eval.stats import bootstrap_ci, paired_bootstrap

logger = logging.getLogger(__name__)

METRIC_NAMES: dict[str, tuple[str, ...]] = {"pope": POPE_METRIC_NAMES, "chair": CHAIR_METRIC_NAMES}
"""Every metric computed per task kind (all with intervals)."""

HEADLINE_METRICS: dict[str, tuple[str, ...]] = {"pope": ("accuracy", "f1"), "chair": ("chair_s", "chair_i", "recall")}
"""Metrics shown in tables and compared against greedy."""

COLUMN_NAMES = {"accuracy": "acc", "f1": "F1", "chair_s": "CHAIR_S", "chair_i": "CHAIR_I", "recall": "recall"}

LOWER_IS_BETTER = frozenset({"chair_s", "chair_i"})


def task_kind(task_name: str) -> str:
    """``"pope"`` for ``"pope/<split>"``, ``"chair"`` for ``"chair"``.

    Example:
        >>> task_kind("pope/adversarial")
        'pope'
    """
    kind = task_name.split("/", 1)[0]
    if kind not in METRIC_NAMES:
        raise ValueError(f"task name {task_name!r} should start with one of {sorted(METRIC_NAMES)}.")
    return kind


def item_counts(kind: str, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Per-item count rows of a task (the input of the bootstrap metrics)."""
    if kind == "pope":
        return pope_item_counts([record["answer"] for record in records], [record["label"] for record in records])
    if kind == "chair":
        return chair_item_counts(records)
    raise ValueError(f"kind must be one of {sorted(METRIC_NAMES)}, got {kind!r}.")


def _metric_fn(kind: str, name: str):
    return pope_metric_fn(name) if kind == "pope" else chair_metric_fn(name)


def task_metrics(
    kind: str,
    records: Sequence[Mapping[str, Any]],
    seed: int = 0,
    n_resamples: int = 1000,
    max_unclear: float = MAX_UNCLEAR_SHARE,
) -> dict:
    """Every metric of a task with its bootstrap interval, ``n``, and the prompt-following check.

    Args:
        kind: ``"pope"`` or ``"chair"``.
        records: The task's records (``answer`` plus the score fields).
        seed: Bootstrap seed.
        n_resamples: Bootstrap resamples.
        max_unclear: Largest share of outputs that do not answer the prompt before the task is marked
            ``followed_prompt: False`` (see :mod:`vlm_guard.eval.following`).

    Returns:
        ``{metric: {"point", "low", "high"}, ..., "n": n, "followed_prompt": bool, "unclear_share": float,
        "n_unclear", "unclear_examples", "max_unclear"}``; with no records only ``{"n": 0}``. The metrics are computed
        either way; a task with ``followed_prompt`` False must not be reported as a result (the tables withhold it).
    """
    if not records:
        return {"n": 0}
    counts = item_counts(kind, records)
    metrics: dict[str, Any] = {}
    for name in METRIC_NAMES[kind]:
        point, low, high = bootstrap_ci(counts, _metric_fn(kind, name), n_resamples=n_resamples, seed=seed)
        metrics[name] = {"point": point, "low": low, "high": high}
    metrics["n"] = len(records)
    check = task_following(kind, records, max_unclear)
    check.pop("n")
    metrics.update(check)
    return metrics


def followed_prompt(task_metrics_: Mapping[str, Any]) -> bool:
    """False when a task's metrics say its prompt was not followed (metrics without the check count as followed).

    Example:
        >>> followed_prompt({"n": 3, "followed_prompt": False}), followed_prompt({"n": 0})
        (False, True)
    """
    return task_metrics_.get("followed_prompt", True) is not False


def method_metrics(
    records_by_task: Mapping[str, Sequence[Mapping]],
    tasks: Sequence[Any],
    seed: int = 0,
    n_resamples: int = 1000,
    max_unclear: float = MAX_UNCLEAR_SHARE,
) -> dict:
    """:func:`task_metrics` for every task (``tasks`` give the order and names)."""
    return {
        task.name: task_metrics(
            task_kind(task.name),
            records_by_task.get(task.name, []),
            seed=seed,
            n_resamples=n_resamples,
            max_unclear=max_unclear,
        )
        for task in tasks
    }


def paired_vs_baseline(
    records_by_task: Mapping[str, Sequence[Mapping]],
    baseline_by_task: Mapping[str, Sequence[Mapping]],
    tasks: Sequence[Any],
    seed: int = 0,
    n_resamples: int = 1000,
) -> dict:
    """Paired bootstrap of each headline metric, method minus baseline, on the items both runs scored.

    Returns:
        ``{task: {metric: paired_bootstrap result}, ...}`` with ``n`` per task (the shared items).
    """
    result: dict[str, Any] = {}
    for task in tasks:
        kind = task_kind(task.name)
        method = {record["id"]: record for record in records_by_task.get(task.name, [])}
        baseline = {record["id"]: record for record in baseline_by_task.get(task.name, [])}
        shared = [item_id for item_id in baseline if item_id in method]
        if not shared:
            result[task.name] = {"n": 0}
            continue
        if len(shared) < max(len(method), len(baseline)):
            logger.warning(
                "%s: comparing on the %d items both runs scored (method %d, baseline %d)",
                task.name,
                len(shared),
                len(method),
                len(baseline),
            )
        counts_a = item_counts(kind, [method[item_id] for item_id in shared])
        counts_b = item_counts(kind, [baseline[item_id] for item_id in shared])
        entry: dict[str, Any] = {}
        for name in HEADLINE_METRICS[kind]:
            entry[name] = paired_bootstrap(
                counts_a, counts_b, _metric_fn(kind, name), n_resamples=n_resamples, seed=seed
            )
        entry["n"] = len(shared)
        result[task.name] = entry
    return result


# ---------------------------------------------------------------------------------------------- markdown
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _interval(metric: Mapping[str, Any]) -> str:
    return f"{_pct(metric['point'])} [{_pct(metric['low'])}, {_pct(metric['high'])}]"


MIN_ITEMS_FOR_VERDICT = 30
"""Fewest shared items for which a comparison cell says better / worse. The percentile bootstrap has no small-sample
correction: its 95% interval is about ``1.96 * sqrt((n-1)/n) / t(0.975, n-1)`` of the t interval's width, 0.82 at
n=10, 0.91 at 20, 0.94 at 30 (within 6% from 30 on), and at n=4 four same-direction differences make an interval of
width 0, "significant", where an exact sign test gives p=0.125. Below this the cell says "too few items"."""


def _delta(paired: Mapping[str, Any], name: str, n: int | None = None) -> str:
    diff, low, high = (100 * paired[key] for key in ("diff", "low", "high"))
    text = f"Δ {diff:+.1f} [{low:+.1f}, {high:+.1f}]"
    if n is not None and n < MIN_ITEMS_FOR_VERDICT:
        return text + f" too few items (n={n}, need >= {MIN_ITEMS_FOR_VERDICT})"
    if not paired["significant"]:
        return text + " n.s."
    better = (diff < 0) if name in LOWER_IS_BETTER else (diff > 0)
    return f"**{text}** {'better' if better else 'worse'}"


def _columns(task_names: Sequence[str]) -> list[tuple[str, str]]:
    return [(task, name) for task in task_names for name in HEADLINE_METRICS[task_kind(task)]]


def _column_title(task: str, name: str) -> str:
    prefix = task.split("/", 1)[1] + " " if "/" in task else "CHAIR " if name == "recall" else ""
    return f"{prefix}{COLUMN_NAMES[name]}"


NOT_FOLLOWED_CELL = "prompt not followed"
"""Table cell of a task whose prompt the model did not follow (see :mod:`vlm_guard.eval.following`)."""

FOLLOWING_TEXT = (
    "Outputs that do not answer the prompt, in % (POPE: no yes/no word in the first sentence, which the "
    "parse rule counts as 'yes'; CHAIR: not a caption)"
)


def _task_label(task: str) -> str:
    return task.split("/", 1)[1] if "/" in task else task


def _not_followed_cell(task_metrics_: Mapping[str, Any]) -> str:
    return f"{NOT_FOLLOWED_CELL} ({_pct(task_metrics_.get('unclear_share'))}% unclear)"


def _following_shares(metrics: Mapping[str, Any], task_names: Sequence[str]) -> str | None:
    """``"random 0.0, popular 1.3, chair 0.0"`` (unclear shares in %), or None when no task holds the check."""
    parts = [
        f"{_task_label(task)} {_pct(metrics[task]['unclear_share'])}"
        for task in task_names
        if "unclear_share" in metrics.get(task, {})
    ]
    return ", ".join(parts) if parts else None


def _withheld_line(entries: Sequence[tuple[str, str, Mapping[str, Any]]]) -> str:
    """The warning under a table listing the (method set, task) cells withheld because the prompt was not followed."""
    described = []
    for method_name, task, task_metrics_ in entries:
        examples = ", ".join(repr(text[:40]) for text in task_metrics_.get("unclear_examples") or [])
        who = f"{method_name} " if method_name else ""
        described.append(
            f"{who}{task} ({_pct(task_metrics_.get('unclear_share'))}% of outputs"
            + (f", e.g. {examples}" if examples else "")
            + ")"
        )
    return (
        "⚠ Prompt not followed, numbers withheld (they would measure the parse rule, not the model): "
        + "; ".join(described)
        + ". The summary JSON marks these tasks `followed_prompt: false`."
    )


def single_markdown(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """One method set's headline metrics as a markdown table (values in %, 95% intervals).

    A task whose prompt the model did not follow shows :data:`NOT_FOLLOWED_CELL` instead of numbers, with a warning
    line under the table; the share of outputs that do not answer the prompt is listed for every task.
    """
    task_names = [task for task in metrics if task != "vs_greedy"]
    columns = _columns(task_names)
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(_column_title(task, name) for task, name in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    cells = [
        (_interval(metrics[task][name]) if followed_prompt(metrics[task]) else _not_followed_cell(metrics[task]))
        if name in metrics[task]
        else "–"
        for task, name in columns
    ]
    lines.append("| " + " | ".join(cells) + " |")
    shares = _following_shares(metrics, task_names)
    if shares:
        lines += ["", f"{FOLLOWING_TEXT}: {shares}."]
    withheld = [("", task, metrics[task]) for task in task_names if not followed_prompt(metrics[task])]
    if withheld:
        lines += ["", _withheld_line(withheld)]
    return "\n".join(lines) + "\n"


def comparison_markdown(summary: Mapping[str, Any], title: str | None = None) -> str:
    """The comparison table of a summary written by :func:`vlm_guard.eval.runner.run_benchmark`.

    One row per method set; each cell holds the metric (in %) with its 95% bootstrap interval and, below it,
    the paired difference against greedy with its interval ("n.s." when the interval contains 0; bold with
    better/worse when it does not). A task whose prompt a method set did not follow shows
    :data:`NOT_FOLLOWED_CELL` instead (no difference is shown against a baseline that did not follow it). Followed
    by the share of outputs that do not answer the prompt, the withheld tasks, the items per task, each method
    set's hyper-parameters, the methods that built no intervention on this model, and the versions that produced
    the numbers.
    """
    comparison = summary["extra"]["comparison"]
    method_sets = comparison["method_sets"]
    task_names = list(comparison["tasks"])
    columns = _columns(task_names)
    config = summary.get("config", {})
    lines: list[str] = []
    if title:
        lines += [f"## {title}", ""]
    lines.append(
        "Values in %, 95% percentile bootstrap intervals over items "
        f"({config.get('n_resamples', '?')} resamples, seed {summary.get('seed')}). "
        "Δ: paired bootstrap difference against greedy on the same items; n.s. = the interval contains 0 "
        "(a difference inside the resampling noise); too few items = fewer than "
        f"{MIN_ITEMS_FOR_VERDICT} shared items, no verdict. CHAIR_S / CHAIR_I: lower is better."
    )
    lines.append("")
    lines.append("| method | " + " | ".join(_column_title(task, name) for task, name in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for method_set in method_sets:
        metrics = method_set["metrics"]
        name = method_set["name"]
        inactive_methods = method_set.get("inactive_methods") or []
        if inactive_methods and not method_set.get("active_methods"):
            cells = ["untestable on this model"] * len(columns)
            lines.append(f"| {name} ⚠ | " + " | ".join(cells) + " |")
            continue
        if inactive_methods:
            name += f" ⚠ {'/'.join(m.upper() for m in inactive_methods)} inactive"
        cells = []
        for task, metric_name in columns:
            task_metrics_ = metrics.get(task, {})
            if metric_name in task_metrics_ and not followed_prompt(task_metrics_):
                cells.append(_not_followed_cell(task_metrics_))
                continue
            cell = _interval(task_metrics_[metric_name]) if metric_name in task_metrics_ else "–"
            paired = metrics.get("vs_greedy", {}).get(task, {}).get(metric_name)
            if paired is not None and followed_prompt(method_sets[0]["metrics"].get(task, {})):
                cell += "<br>" + _delta(paired, metric_name, metrics["vs_greedy"][task].get("n"))
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    following = [(m["name"], _following_shares(m["metrics"], task_names)) for m in method_sets]
    following = [(name, shares) for name, shares in following if shares]
    if following:
        lines.append("")
        lines.append(f"{FOLLOWING_TEXT}: " + "; ".join(f"{name}: {shares}" for name, shares in following) + ".")
    withheld = [
        (m["name"], task, m["metrics"][task])
        for m in method_sets
        for task in task_names
        if task in m["metrics"] and not followed_prompt(m["metrics"][task])
    ]
    if withheld:
        lines.append("")
        lines.append(_withheld_line(withheld))
    lines.append("")
    lines.append(
        "Items per task: "
        + ", ".join(f"{task} {n}" for task, n in comparison["tasks"].items())
        + f"; unreadable images skipped: {summary['extra'].get('skipped_images', 0)}."
    )
    mixed = [m["name"] for m in method_sets if len(m.get("record_method_code") or {}) > 1]
    if mixed:
        lines.append("")
        lines.append(
            "⚠ Records of " + ", ".join(mixed) + " come from more than one version of the method code "
            "(a resumed run after a code change); delete those files and rerun for clean numbers."
        )
    inactive = [(m["name"], m["inactive_methods"]) for m in method_sets if m.get("inactive_methods")]
    if inactive:
        head_map = config.get("head_map") or {}
        lines.append("")
        lines.append(
            "⚠ Methods that built no intervention on this model, so they could not be tested here (this says "
            "nothing about whether they work on models where they apply): "
            + "; ".join(f"{name}: {', '.join(methods)}" for name, methods in inactive)
            + f". Head map: {'none' if not head_map else 'sink_dims=' + str(head_map.get('sink_dims'))}. "
            "VAR needs sink dimensions (massive activations, |x_d|/rms >= tau/2 on the first token); a "
            "hidden size below 400 cannot reach tau=20 at all. Rows with a method inactive measure the other "
            "methods of the set only."
        )
    lines.append("")
    lines.append("Hyper-parameters (library defaults unless stated):")
    lines.append("")
    for method_set in method_sets:
        guard_config = method_set["guard_config"]
        parts = [
            f"{method}: {_format_params(params)}"
            for method, params in guard_config.items()
            if method != "vlm_guard_version" and params is not None
        ]
        lines.append(f"- {method_set['name']}: " + ("; ".join(parts) if parts else "plain greedy decoding"))
    lines.append("")
    generation = {
        key: config[key]
        for key in (
            "model",
            "world_seed",
            "bias",
            "do_sample",
            "max_new_tokens",
            "batch_size",
            "head_map_dir",
            "weights_sha256_16",
            "method_code",
        )
        if key in config
    }
    lines.append(
        "Run: "
        + ", ".join(f"{key}={value}" for key, value in generation.items())
        + f"; vlm_guard {summary.get('vlm_guard_version')}, transformers {summary.get('transformers_version')}, "
        f"torch {summary.get('torch_version')}."
    )
    return "\n".join(lines) + "\n"


def _format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items())


__all__ = [
    "METRIC_NAMES",
    "HEADLINE_METRICS",
    "task_kind",
    "item_counts",
    "task_metrics",
    "followed_prompt",
    "NOT_FOLLOWED_CELL",
    "method_metrics",
    "paired_vs_baseline",
    "single_markdown",
    "comparison_markdown",
]
