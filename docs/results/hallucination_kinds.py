"""Which hallucinations each method removes: absent *partners* (the language prior's kind: "fork ... knife") or other
absent objects, from the held-out descriptions of ``vlm-guard eval synthetic --compare ...``.

    .venv/bin/python docs/results/hallucination_kinds.py docs/results/v3/synthetic.jsonl [--world everyday_v3]

Reads ``<out stem>.<label>.jsonl`` for every method set of the comparison (the ``metrics`` of ``<out stem>.summary.json``);
each CHAIR record holds its scene's objects and the hallucinated mentions. A hallucinated object is a *partner* when
the world pairs it with an object of the scene (``partner_of``), else *other*. Per method set, per 100 descriptions:
partner and other hallucinated mentions (what CHAIR_I counts), and the share of descriptions naming at least one
absent partner; each with a paired 95 % percentile bootstrap interval of its difference from greedy over the same
descriptions (1000 resamples, seed 0). Writes ``<out stem>.kinds.md`` and ``<out stem>.kinds.json`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def caption_counts(records: list[dict], partner_of) -> dict[str, tuple[int, int, int]]:
    """``{item id: (partner mentions, other mentions, names an absent partner)}`` for the CHAIR records."""
    counts = {}
    for record in records:
        if record.get("task") != "chair":
            continue
        present = set(record["gt_objects"])
        partners = {partner_of(obj) for obj in present} - {None}
        kinds = [kind in partners for _, kind in record["hallucinated"]]
        counts[record["id"]] = (sum(kinds), len(kinds) - sum(kinds), int(any(kinds)))
    return counts


def paired_interval(ours: list[float], greedy: list[float]) -> tuple[float, float, float]:
    """Mean difference and its 95 % percentile bootstrap interval (items resampled in pairs; the project's
    :func:`vlm_guard.eval.stats.paired_bootstrap`, 1000 resamples, seed 0, as ``synthetic.md``'s intervals)."""
    from vlm_guard.eval.stats import paired_bootstrap

    result = paired_bootstrap(ours, greedy, lambda values: sum(values) / len(values))
    return result["diff"], result["low"], result["high"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the --out of the comparison (e.g. docs/results/v3/synthetic.jsonl)")
    parser.add_argument("--world", default="everyday_v3", help="the world of the scenes (default everyday_v3)")
    args = parser.parse_args(argv)
    from vlm_guard.eval.records import read_records
    from vlm_guard.fileio import atomic_write_json, atomic_write_text
    from vlm_guard.synthetic.worlds import world_kind

    partner_of = world_kind(args.world).partner_of
    out = Path(args.out)
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    summary = json.loads(stem.with_name(stem.name + ".summary.json").read_text())
    labels = list(summary["metrics"])  # the comparison's method sets, greedy ("none") first
    per_label = {}
    for label in labels:
        path = stem.with_name(f"{stem.name}.{label}.jsonl")
        if path.is_file():
            per_label[label] = caption_counts(read_records(path), partner_of)  # the header line has no "task"
    if "none" not in per_label:
        raise SystemExit(f"{stem}.none.jsonl: greedy's records are needed for the paired differences")
    greedy = per_label["none"]
    rows, table = {}, []
    for label, counts in per_label.items():
        shared = sorted(set(counts) & set(greedy))
        row = {"n": len(shared)}
        for index, name in enumerate(("partner_mentions", "other_mentions", "names_absent_partner")):
            ours = [100.0 * counts[item][index] for item in shared]
            base = [100.0 * greedy[item][index] for item in shared]
            diff, low, high = paired_interval(ours, base)
            row[name] = {
                "per_100": round(sum(ours) / len(shared), 1),
                "diff": round(diff, 1),
                "low": round(low, 1),
                "high": round(high, 1),
            }
        rows[label] = row

        def cell(values, first=label == "none"):
            text = f"{values['per_100']:.1f}"
            if first:
                return text
            mark = " **better**" if values["high"] < 0 else " **worse**" if values["low"] > 0 else " n.s."
            return f"{text} (Δ {values['diff']:+.1f} [{values['low']:+.1f}, {values['high']:+.1f}]{mark})"

        table.append(
            f"| {label} | {row['n']} | {cell(row['partner_mentions'])} | {cell(row['other_mentions'])} | "
            f"{cell(row['names_absent_partner'])} |"
        )
    markdown = "\n".join(
        [
            f"## Which hallucinations each method removes ({args.world}, `{out}`)",
            "",
            "Per 100 held-out descriptions: hallucinated mentions of an absent *partner* of a scene object (the "
            "language prior's kind), of any *other* absent object, and the descriptions (in %) naming at least one "
            "absent partner. Δ: paired 95 % bootstrap interval against greedy on the same descriptions; n.s. = the "
            "interval contains 0. Made by `docs/results/hallucination_kinds.py`.",
            "",
            "| method set | n | partner mentions | other mentions | descriptions naming an absent partner (%) |",
            "|---|---|---|---|---|",
            *table,
            "",
        ]
    )
    atomic_write_text(stem.with_name(stem.name + ".kinds.md"), markdown)
    atomic_write_json(stem.with_name(stem.name + ".kinds.json"), rows, indent=1)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
