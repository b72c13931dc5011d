"""The method sets (``--compare`` rows) of a results table run with a head map: ``python table_rows.py HEAD_MAP_JSON``.

Used by ``run_synthetic.sh`` (the 3.6M fixture) and ``run_synthetic_v2.sh`` (default model v2). Without tuned settings
in the map: greedy and every method at its released defaults. With them: greedy, one ``<method>@tuned`` row per
method that kept tuned settings, VHR+VAR+GIFT tuned (``all@tuned``, only when both VHR and GIFT kept tuned settings:
otherwise it would be the released trio under a "tuned" name), the tuned default set when it is not one of those rows,
then the released rows.
"""

from __future__ import annotations

import json
import sys

METHODS = ("vhr", "var", "gift", "pai", "vcd")
RELEASED = ["vhr", "var", "gift", "all", "pai", "vcd"]


def rows(head_map: dict) -> list[str]:
    tuned = head_map.get("tuned") or {}
    if not tuned:
        return ["none", *RELEASED]
    settings = tuned.get("settings") or {}
    compare = ["none", *(f"{m}@tuned" for m in METHODS if m in settings)]
    if "vhr" in settings and "gift" in settings:
        compare.append("all@tuned")
    default = list(tuned.get("default_methods") or [])
    if default and default != ["vhr", "var", "gift"] and f"{'+'.join(default)}@tuned" not in compare:
        compare.append(f"{','.join(default)}@tuned")
    return compare + RELEASED


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print(";".join(rows(json.load(handle))))
