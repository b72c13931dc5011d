"""The tuning table as markdown (``tuning.md`` beside the tuned head map).

Example:
    >>> print(tuning_markdown(head_map.tuned))   # doctest: +SKIP
"""

from __future__ import annotations


def _cell(metrics: dict, task: str, key: str) -> str:
    value = metrics.get(task, {}).get(key)
    return "-" if value is None else f"{value:.1f}"


def tuning_markdown(tuned: dict) -> str:
    """Chosen settings, the default method set, and every (setting, rung) measured."""
    lines = ["## Tuning (vlm-guard tune)", ""]
    data = tuned.get("tuning_data", {})
    lines.append(f"Tuning data: {data.get('name', '?')}. Objective: {tuned.get('objective', {}).get('text', '?')}.")
    search = tuned.get("search", {})
    lines.append(f"Search: {search.get('kind', '?')} (eta {search.get('eta', '?')}), rungs {search.get('rungs')}, "
                 f"{'complete' if search.get('complete') else 'stopped by the budget'}, {search.get('elapsed_s', '?')} s "
                 f"of a {search.get('budget_minutes', '?')} min budget.")
    lines.append("")
    lines.append(f"Default method set: **{','.join(tuned.get('default_methods') or []) or 'none'}**")
    lines.append("")
    lines.append("| method | tuned settings | gain on the tuning data |")
    lines.append("|---|---|---|")
    for name, values in tuned.get("settings", {}).items():
        text = ", ".join(f"{k}={v}" for k, v in values.items())
        lines.append(f"| {name} | {text} | {tuned.get('gain', {}).get(name, '')} |")
    for name, reason in (tuned.get("skipped") or {}).items():
        lines.append(f"| {name} | released defaults | {reason} |")
    lines.append("")
    lines.append("| stage | rung | setting | score | greedy | CHAIR_I | CHAIR_S | recall | adv err | pop err | rand err | feasible |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in tuned.get("table", []):
        m = row.get("metrics", {})
        lines.append(
            f"| {row.get('stage')} | {row.get('rung')} | {row.get('label')} | {row.get('score'):.2f} | "
            f"{row.get('greedy_score'):.2f} | {_cell(m, 'chair', 'chair_i')} | {_cell(m, 'chair', 'chair_s')} | "
            f"{_cell(m, 'chair', 'recall')} | {_cell(m, 'pope/adversarial', 'error')} | {_cell(m, 'pope/popular', 'error')} | "
            f"{_cell(m, 'pope/random', 'error')} | {'yes' if row.get('feasible') else ', '.join(row.get('violations', []))} |")
    return "\n".join(lines) + "\n"


__all__ = ["tuning_markdown"]
