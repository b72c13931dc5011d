"""The scripts under docs/results that turn result files into the numbers the docs quote: which hallucinations a
method removes (partner vs other absent objects), and which tuned setting of each method enters v3's held-out table."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs/results" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(item, objects, hallucinated):
    return {"id": item, "task": "chair", "gt_objects": objects, "hallucinated": [[w, w] for w in hallucinated]}


def test_partner_hallucinations_are_told_from_other_absent_objects():
    kinds = _script("hallucination_kinds")
    partners = {"fork": "knife", "knife": "fork", "cup": "saucer", "saucer": "cup"}.get
    records = [
        _record("a", ["fork", "ball"], ["knife", "knife", "moon"]),  # 2 partner mentions, 1 other
        _record("b", ["cup"], ["moon"]),  # the cup's partner is not named: other only
        _record("c", ["ball"], []),
        {"id": "p", "task": "pope/random", "gt_objects": ["fork"], "hallucinated": []},  # not a caption: ignored
    ]
    assert kinds.caption_counts(records, partners) == {"a": (2, 1, 1), "b": (0, 1, 0), "c": (0, 0, 0)}


def test_paired_interval_is_exact_for_a_constant_shift_and_straddles_zero_for_noise():
    kinds = _script("hallucination_kinds")
    greedy = [float(v % 5) for v in range(200)]
    diff, low, high = kinds.paired_interval([v - 1.0 for v in greedy], greedy)
    assert (diff, low, high) == pytest.approx((-1.0, -1.0, -1.0))
    noisy = [v + (1.0 if i % 2 else -1.0) for i, v in enumerate(greedy)]
    diff, low, high = kinds.paired_interval(noisy, greedy)
    assert diff == pytest.approx(0.0) and low < 0 < high


def test_kinds_table_from_a_comparison_folder(tmp_path):
    kinds = _script("hallucination_kinds")
    scenes = [(["fork", "ball"], ["knife"]), (["cup", "ball"], ["saucer", "moon"])] * 20
    greedy = [_record(f"s{i}", objects, named) for i, (objects, named) in enumerate(scenes)]
    guarded = [
        _record(f"s{i}", objects, [w for w in named if w == "moon"]) for i, (objects, named) in enumerate(scenes)
    ]
    for label, records in (("none", greedy), ("pai", guarded)):
        (tmp_path / f"syn.{label}.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "syn.summary.json").write_text(json.dumps({"metrics": {"none": {}, "pai": {}}}))
    assert kinds.main([str(tmp_path / "syn.jsonl"), "--world", "everyday_v3"]) == 0
    rows = json.loads((tmp_path / "syn.kinds.json").read_text())
    assert rows["none"]["partner_mentions"]["per_100"] == 100.0  # one partner per description
    assert rows["pai"]["partner_mentions"] == {"per_100": 0.0, "diff": -100.0, "low": -100.0, "high": -100.0}
    assert rows["pai"]["other_mentions"]["diff"] == 0.0
    assert "| pai | 40 | 0.0 (Δ -100.0 [-100.0, -100.0] **better**)" in (tmp_path / "syn.kinds.md").read_text()


def _row(rung, label, diff, significant, kept=True):
    return {
        "rung": rung,
        "label": label,
        "methods": {label.split()[0]: {"alpha": float(label.split("=")[1])}},
        "n": 60,
        "judgement": {
            "kept": kept,
            "gain": -diff,
            "significant": significant,
            "objective": {"diff": diff, "low": diff - 1, "high": diff + 1},
        },
    }


def test_tuned_setting_pick_follows_its_written_order():
    picks = _script("tuned_settings_v3")
    shipped = {"settings": {"vhr": {"alpha": 1.1}}, "decision": "confirmed", "table": []}
    assert picks.pick(shipped)[0] == {"vhr": {"alpha": 1.1}}
    rows = [
        _row("pilot", "vhr alpha=3", -5.0, True),  # pilot only: below the full rung's significant gain
        _row("full", "vhr alpha=1.5", -0.5, False),
        _row("full", "vhr alpha=1.25", -1.5, True),
        _row("full", "vhr alpha=2", -4.0, True, kept=False),  # recall broken: never picked
    ]
    chosen, why = picks.pick({"settings": {}, "decision": "not confirmed", "table": rows})
    assert chosen == {"vhr": {"alpha": 1.25}} and why.startswith("full rung's best significant gain")
    chosen, why = picks.pick({"settings": {}, "decision": "none", "table": rows[:2]})
    assert chosen == {"vhr": {"alpha": 1.5}} and "point gain" in why
    assert picks.pick({"settings": {}, "decision": "none", "table": [rows[3]]})[0] is None
