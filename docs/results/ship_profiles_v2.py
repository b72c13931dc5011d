"""Put the task profiles tuned for a shipped default model (v2, or v3 with ``--model v3``) into its shipped head map.

    .venv/bin/python docs/results/ship_profiles_v2.py runs/tune_profiles_v2 [runs/tune_profiles_v2_answer ...]
    .venv/bin/python docs/results/ship_profiles_v2.py --model v3 runs/tune_profiles_v3

Each argument is an ``--out`` folder of ``vlm-guard tune --profiles ...`` (the profiles may be tuned by separate runs,
e.g. ``--profiles caption`` and ``--profiles answer`` side by side). Their ``tuned.profiles`` are merged (a profile
in two folders is refused) and written as the ``tuned`` section of
``vlm_guard/assets/head_maps/default-<model>-*/head_map.json`` (only that key changes; atomic write), with ``tuning.md``
(every candidate's gain and cost with intervals, per profile) beside it; the tuning states are copied to
``docs/results/<model>/profiles_tune/`` (the raw per-item results).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(folders: list[str]) -> int:
    model = "v2"
    if folders[:1] == ["--model"]:
        if len(folders) < 2 or folders[1] not in ("v2", "v3"):
            raise SystemExit("--model takes v2 or v3")
        model, folders = folders[1], folders[2:]
    from vlm_guard.calibration.head_map import HeadMap
    from vlm_guard.fileio import atomic_write_json, atomic_write_text
    from vlm_guard.settings import validate_tuned
    from vlm_guard.tuning.report import profiles_markdown

    if not folders:
        raise SystemExit(__doc__)
    found = sorted((ROOT / "vlm_guard/assets/head_maps").glob(f"default-{model}-*"))
    if not found:
        raise SystemExit(
            f"no head map is shipped for default model {model} (vlm_guard/assets/head_maps/default-{model}-*)"
        )
    shipped = found[0]
    merged: dict = {}
    for folder in map(Path, folders):
        tuned = validate_tuned(
            json.loads((folder / "head_map.json").read_text())["tuned"], str(folder / "head_map.json")
        )
        if "profiles" not in tuned:
            raise SystemExit(f"{folder} holds no task profiles (tuned without --profiles)")
        if not merged:
            merged = {**tuned, "profiles": {}}
        for name, section in tuned["profiles"].items():
            if name in merged["profiles"]:
                raise SystemExit(f"profile {name!r} is in two of {folders}; pass each profile once")
            merged["profiles"][name] = {
                **section,
                "tuning_data": tuned["tuning_data"],
                "confirmation_data": tuned["confirmation_data"],
                "elapsed_s": tuned["search"]["elapsed_s"],
            }
    merged["default_profile"] = "caption" if "caption" in merged["profiles"] else next(iter(merged["profiles"]))
    merged["search"] = {
        **merged["search"],
        "elapsed_s": round(sum(s["elapsed_s"] for s in merged["profiles"].values()), 1),
    }
    merged = validate_tuned(merged, "the merged tuned section")
    path = shipped / "head_map.json"
    data = json.loads(path.read_text())
    data["tuned"] = merged
    atomic_write_json(path, data, indent=2)
    HeadMap.from_pretrained(shipped)  # it loads (schema, tensors digest)
    atomic_write_text(shipped / "tuning.md", profiles_markdown(merged))
    for old in shipped.glob("tune_*.png"):  # curves of the single-profile search this replaces
        old.unlink()
    states = ROOT / f"docs/results/{model}/profiles_tune"
    states.mkdir(parents=True, exist_ok=True)
    for folder in map(Path, folders):
        for state in folder.glob("tune_profiles_state.*.json"):
            shutil.copyfile(state, states / f"{folder.name}.{state.name}")
    print(f"shipped profiles {sorted(merged['profiles'])} into {path}")
    for name, section in merged["profiles"].items():
        print(f"  {name}: {section['settings'] or 'no method'} -- {section['decision']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
