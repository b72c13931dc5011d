"""Each mission method's setting for default model v3's held-out table, read from its caption-profile tuning.

    .venv/bin/python docs/results/tuned_settings_v3.py runs/tune_profiles_v3 docs/results/v3/tuned_settings.json

Reads ``<tune folder>/<method>/head_map.json`` (written by ``docs/results/tune_v3.sh``: ``vlm-guard tune --profiles
caption --methods <method>`` on the tuning seed 910001, confirmation seed 910002) and picks, per method, by a rule
fixed before the held-out scenes are seen:

1. the setting the tuner shipped (it confirmed on the separate split), else
2. the full rung's best setting with a significant CHAIR_I gain and recall kept (it did not confirm), else
3. the full or pilot rung's best point gain with recall kept (no significant gain anywhere), else none: the method
   has no setting that lowered CHAIR_I with recall kept, and it enters the table at its released values only.

PAI (a baseline, not a mission method) is picked by the same rule when ``<tune folder>/pai`` exists.

Writes the ``--settings`` file of ``vlm-guard eval`` (``{"<method>@tuned": {...}}``, and ``all@tuned`` with the
trio's picks when VHR, VAR and GIFT all have one) and, beside it, ``<name>.why.json``: the reason for each pick.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ("gift", "vhr", "var", "pai")  # PAI: the baseline, tuned the same way for the reference row


def pick(section: dict) -> tuple[dict | None, str]:
    """``(settings, why)`` for one method's caption profile (the tuned section's ``profiles.caption``)."""
    if section.get("settings"):
        return section["settings"], f"shipped by the tuner: {section['decision']}"
    rows = section.get("table") or []

    def best(rung: str, significant: bool):
        chosen = None
        for row in rows:
            judgement = row["judgement"]
            if row["rung"] != rung or not judgement["kept"] or judgement["gain"] <= 0:
                continue
            if significant and not judgement["significant"]:
                continue
            if chosen is None or judgement["gain"] > chosen["judgement"]["gain"]:
                chosen = row
        return chosen

    for rung, significant, how in (
        ("full", True, "full rung's best significant gain, not confirmed"),
        ("full", False, "full rung's best point gain (not significant)"),
        ("pilot", False, "pilot rung's best point gain (not significant)"),
    ):
        row = best(rung, significant)
        if row is not None:
            o = row["judgement"]["objective"]
            return row["methods"], (
                f"{how}: {row['label']} CHAIR_I {o['diff']:+.1f} [{o['low']:+.1f}, {o['high']:+.1f}] on n={row['n']} "
                f"tuning captions; tuner: {section['decision']}"
            )
    return None, f"no setting lowered CHAIR_I with recall kept; tuner: {section['decision']}"


def main(folder: str, out: str) -> int:
    from vlm_guard.fileio import atomic_write_json

    settings, why = {}, {}
    for method in METHODS:
        path = Path(folder) / method / "head_map.json"
        if not path.is_file():
            why[method] = f"not tuned yet ({path} missing)"
            continue
        section = json.loads(path.read_text())["tuned"]["profiles"]["caption"]
        chosen, reason = pick(section)
        why[method] = reason
        if chosen:
            settings[f"{method}@tuned"] = chosen
    trio = [settings.get(f"{m}@tuned") for m in ("vhr", "var", "gift")]
    if all(trio):
        settings["all@tuned"] = {name: values for part in trio for name, values in part.items()}
    atomic_write_json(out, settings, indent=1)
    atomic_write_json(Path(out).with_suffix(".why.json"), why, indent=1)
    print(json.dumps({"settings": settings, "why": why}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main(sys.argv[1], sys.argv[2]))
