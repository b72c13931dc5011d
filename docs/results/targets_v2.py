"""The issue-13 targets, checked on the held-out table of the default model v2 (``synthetic.summary.json``).

Appends (or replaces) a "Targets" section in ``synthetic.md``; every verdict is computed here from the summary, none
typed in. Run by ``run_synthetic_v2.sh`` after the table; by hand: ``python docs/results/targets_v2.py docs/results/v2``.

Targets:
1. no tuned row is significantly worse than greedy on any column (paired 95 % bootstrap interval below 0 for a
   higher-is-better column, above 0 for CHAIR_S / CHAIR_I);
2. VHR+VAR+GIFT tuned lowers CHAIR_I by >= 20 % relative;
3. ... and adversarial POPE errors (1 - accuracy) by >= 10 % relative;
4. ... with CHAIR object recall within 2 points of greedy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LOWER_IS_BETTER = {"chair_s", "chair_i"}
COLUMNS = [
    ("pope/random", "accuracy"),
    ("pope/random", "f1"),
    ("pope/popular", "accuracy"),
    ("pope/popular", "f1"),
    ("pope/adversarial", "accuracy"),
    ("pope/adversarial", "f1"),
    ("chair", "chair_s"),
    ("chair", "chair_i"),
    ("chair", "recall"),
]
MARK = "\n## Targets (issue 13)\n"


def _worse(paired: dict, metric: str) -> bool:
    if not paired.get("significant"):
        return False
    return paired["diff"] > 0 if metric in LOWER_IS_BETTER else paired["diff"] < 0


def targets(summary: dict) -> list[str]:
    metrics = summary["metrics"]
    greedy = metrics["none"]
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    tuned = [name for name in metrics if name.endswith("@tuned")]
    worse = []
    for name in tuned:
        broken = [
            task
            for task in ("pope/random", "pope/popular", "pope/adversarial", "chair")
            if metrics[name].get(task, {}).get("followed_prompt", True) is False
        ]
        worse.extend(f"{name} {task.split('/')[-1]}: prompt not followed" for task in broken)
        for task, metric in COLUMNS:
            paired = metrics[name].get("vs_greedy", {}).get(task, {}).get(metric)
            if paired is not None and _worse(paired, metric):
                worse.append(
                    f"{name} {task.split('/')[-1]} {metric} {100 * paired['diff']:+.1f} "
                    f"[{100 * paired['low']:+.1f}, {100 * paired['high']:+.1f}]"
                )
    lines.append(
        f"| no tuned row significantly worse than greedy on any column ({len(tuned)} rows) | "
        f"{'; '.join(worse) if worse else 'none worse'} | {'missed' if worse else 'met'} |"
    )
    trio = metrics.get("all@tuned")
    if trio is None:
        lines.append(
            "| VHR+VAR+GIFT tuned: CHAIR_I -20 %, adversarial POPE errors -10 %, recall within 2 points | no "
            "all@tuned row: tuning kept no setting for VHR and GIFT (none passed its constraints), so there is "
            "no tuned trio on this model | missed |"
        )
        return lines
    if any(
        trio.get(task, {}).get("followed_prompt", True) is False for task in trio if isinstance(trio.get(task), dict)
    ):
        lines.append(
            "| VHR+VAR+GIFT tuned | its outputs do not follow the prompts (cells withheld in the table) | missed |"
        )
        return lines
    g_ci, t_ci = greedy["chair"]["chair_i"]["point"], trio["chair"]["chair_i"]["point"]
    rel_ci = (t_ci - g_ci) / g_ci if g_ci else float("nan")
    lines.append(
        f"| VHR+VAR+GIFT tuned: CHAIR_I -20 % relative | {100 * g_ci:.1f} -> {100 * t_ci:.1f} "
        f"({100 * rel_ci:+.0f} %) | {'met' if rel_ci <= -0.20 else 'missed'} |"
    )
    g_err = 1 - greedy["pope/adversarial"]["accuracy"]["point"]
    t_err = 1 - trio["pope/adversarial"]["accuracy"]["point"]
    rel_err = (t_err - g_err) / g_err if g_err else float("nan")
    lines.append(
        f"| VHR+VAR+GIFT tuned: adversarial POPE errors -10 % relative | {100 * g_err:.1f} -> {100 * t_err:.1f} "
        f"({100 * rel_err:+.0f} %) | {'met' if rel_err <= -0.10 else 'missed'} |"
    )
    g_rec, t_rec = greedy["chair"]["recall"]["point"], trio["chair"]["recall"]["point"]
    drop = 100 * (g_rec - t_rec)
    lines.append(
        f"| VHR+VAR+GIFT tuned: object recall within 2 points | {100 * g_rec:.1f} -> {100 * t_rec:.1f} "
        f"({-drop:+.1f} points) | {'met' if drop <= 2.0 else 'missed'} |"
    )
    return lines


def main(folder: str) -> int:
    folder_path = Path(folder)
    summary = json.loads((folder_path / "synthetic.summary.json").read_text())
    table = folder_path / "synthetic.md"
    text = table.read_text()
    section = "\n".join(targets(summary))
    table.write_text(text.split(MARK)[0].rstrip("\n") + "\n" + MARK + "\n" + section + "\n")
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/v2"))
