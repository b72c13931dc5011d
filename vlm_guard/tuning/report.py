"""The tuning table as markdown (``tuning.md`` beside the tuned head map).

Example:
    >>> import json
    >>> from pathlib import Path
    >>> import vlm_guard
    >>> shipped = Path(vlm_guard.__file__).parent / "assets" / "head_maps"
    >>> tuned = json.loads(next(shipped.glob("default_model-*/head_map.json")).read_text())["tuned"]   # head_map.tuned
    >>> print(tuning_markdown(tuned))
    ## Tuning (vlm-guard tune)
    ...
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
    lines.append(
        f"Search: {search.get('kind', '?')} (eta {search.get('eta', '?')}), rungs {search.get('rungs')}, "
        f"{'complete' if search.get('complete') else 'stopped by the budget'}, {search.get('elapsed_s', '?')} s "
        f"of a {search.get('budget_minutes', '?')} min budget."
    )
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
    lines.append(
        "| stage | rung | setting | score | greedy | CHAIR_I | CHAIR_S | recall | adv err | pop err | rand err | feasible |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in tuned.get("table", []):
        m = row.get("metrics", {})
        lines.append(
            f"| {row.get('stage')} | {row.get('rung')} | {row.get('label')} | {row.get('score'):.2f} | "
            f"{row.get('greedy_score'):.2f} | {_cell(m, 'chair', 'chair_i')} | {_cell(m, 'chair', 'chair_s')} | "
            f"{_cell(m, 'chair', 'recall')} | {_cell(m, 'pope/adversarial', 'error')} | {_cell(m, 'pope/popular', 'error')} | "
            f"{_cell(m, 'pope/random', 'error')} | {'yes' if row.get('feasible') else ', '.join(row.get('violations', []))} |"
        )
    return "\n".join(lines) + "\n"


def _iv(interval: dict | None) -> str:
    if not interval:
        return "-"
    return f"{interval['diff']:+.1f} [{interval['low']:+.1f}, {interval['high']:+.1f}]"


def profiles_markdown(tuned: dict) -> str:
    """The per-profile tuning table (``tuning.md`` of a map tuned with ``--profiles``): per profile, the decision,
    how the rung sizes were chosen, and every candidate's gain and cost with paired 95 % intervals at each rung."""
    data, confirm = tuned.get("tuning_data", {}), tuned.get("confirmation_data", {})
    search = tuned.get("search", {})
    lines = [
        "## Tuning per task profile (vlm-guard tune --profiles)",
        "",
        f"Tuning data: {data.get('name', '?')}; confirmation split: {confirm.get('name', '?')}. "
        f"Every difference is against greedy decoding on the same items, with a paired 95 % bootstrap interval "
        f"({search.get('n_resamples', '?')} resamples); 'sig.' = the interval excludes 0. Cost: forward passes "
        f"per generated token (structural) and the measured time per item against greedy (noisy on a shared "
        f"CPU). Default profile: {tuned.get('default_profile')}. {search.get('elapsed_s', '?')} s in all.",
        "",
    ]
    for name, section in tuned.get("profiles", {}).items():
        rungs = section.get("rungs", {})
        sizing = rungs.get("sizing", {})
        lines += [
            f"### Profile `{name}`: {section.get('description', '')}",
            "",
            f"Objective: {section.get('objective', '?')}."
            + (
                f" Tuning data: {section['tuning_data'].get('name')} ({section['tuning_data'].get('n_captions')} "
                f"captions, {section['tuning_data'].get('n_questions_per_split')} questions per POPE split "
                f"available)."
                if isinstance(section.get("tuning_data"), dict)
                else ""
            ),
            "",
            f"Shipped: **{', '.join(f'{m} ' + ', '.join(f'{k}={v}' for k, v in vals.items()) for m, vals in section.get('settings', {}).items()) or 'no method (greedy)'}** "
            f"-- {section.get('decision', '')}",
            "",
            f"Rungs: pilot {rungs.get('pilot')} items per task; full rung {rungs.get('full')} "
            f"({sizing.get('rule', '?')}: the n at which a {sizing.get('target_effect', '?')}-point change is "
            f"significant, from the widest paired interval of the candidates promoted from the pilot); "
            f"confirmation {rungs.get('confirmation')} items on the separate split.",
            "",
        ]
        for label, reason in (section.get("skipped") or {}).items():
            lines.append(f"- {label}: {reason}")
        if section.get("skipped"):
            lines.append("")
        constraint_names = sorted({c for row in section.get("table", []) for c in row["judgement"]["constraints"]})
        extra_names = sorted({c for row in section.get("table", []) for c in row["judgement"].get("extra", {})})
        header = (
            ["rung", "setting", "n", "objective Δ [95 %]", "greedy", "sig. gain"]
            + [f"{c} Δ" for c in constraint_names]
            + [f"{c} Δ" for c in extra_names]
            + ["passes", "time", "verdict"]
        )
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in section.get("table", []):
            j = row["judgement"]
            verdict = []
            if j["broken"]:
                verdict.append("broken: " + ", ".join(j["broken"]))
            elif not j["kept"]:
                verdict.append("constraint not kept")
            if j["worse"]:
                verdict.append("significantly worse")
            if row.get("rung") == "pilot":
                verdict.append("promoted" if row.get("promoted") else "dropped")
            cells = [
                row["rung"],
                row["label"],
                str(row["n"]),
                _iv(j["objective"]),
                f"{j['objective']['greedy']:.1f}",
                "yes" if j["significant"] else "no",
            ]
            cells += [_iv(j["constraints"].get(c)) for c in constraint_names]
            cells += [_iv(j.get("extra", {}).get(c)) for c in extra_names]
            cells += [
                f"{row['passes']}x",
                "-" if row.get("time_ratio") is None else f"{row['time_ratio']:.2f}x",
                "; ".join(verdict) or "ok",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


__all__ = ["tuning_markdown", "profiles_markdown"]
