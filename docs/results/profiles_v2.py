"""Held-out rows of the default model's task profiles: each profile's shipped setting on the reported scenes.

    nice -n 5 .venv/bin/python docs/results/profiles_v2.py            # v2; resumable: rerun to continue
    nice -n 5 .venv/bin/python docs/results/profiles_v2.py --model v3 --tasks chair   # v3, its caption columns

``--model v3`` does the same for default model v3 on its everyday_v3 world (``docs/results/v3``, the head map shipped
for v3); ``--tasks chair`` keeps the caption columns (what ``TASKS=chair docs/results/run_synthetic_v3.sh`` ran).

Reads the shipped v2 head map's ``tuned.profiles`` (written by ``vlm-guard tune --profiles`` on the tuning seed
910001, winners confirmed on 910002), runs each profile's setting on the held-out everyday scenes (seed 900001,
unbiased, 300 captions and 300 questions per POPE split: the items of ``docs/results/v2/synthetic.md``) into
``docs/results/v2/profiles.<label>.jsonl`` (or reuses the row of ``synthetic.md`` that ran exactly that setting, after
regenerating a sample of its items with the current code), and compares it item by item with the greedy records of that table
(``synthetic.none.jsonl``; first checked to be reproduced token for token by the current code on a sample), with
paired 95 % bootstrap intervals (1000 resamples, seed 0). A profile whose setting is "no method" is greedy itself
(with every method off the guarded model is token-identical to ``generate``): its row is greedy's, Δ = 0.

Writes ``docs/results/v2/profiles.summary.json``, ``docs/results/v2/profiles.md`` (the table) and, beside the
shipped map, ``held_out.json`` (what ``vlm-guard caption`` prints as the held-out effect line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL = "v2"
WORLDS = {"v2": "everyday", "v3": "everyday_v3"}
OUT = ROOT / "docs/results/v2"
GREEDY = OUT / "synthetic.none.jsonl"
N = 300
SEED = 900001
POPE = ("pope/random", "pope/popular", "pope/adversarial")


def _use_model(model: str) -> None:
    """Point the module at default model ``model``'s results folder (``docs/results/<model>``)."""
    global MODEL, OUT, GREEDY
    MODEL, OUT = model, ROOT / "docs/results" / model
    GREEDY = OUT / "synthetic.none.jsonl"


def _shipped_map_folder() -> Path:
    found = sorted((ROOT / "vlm_guard/assets/head_maps").glob(f"default-{MODEL}-*"))
    if not found:
        raise SystemExit(
            f"no head map is shipped for default model {MODEL} (vlm_guard/assets/head_maps/default-{MODEL}-*)"
        )
    return found[0]


def _records_by_task(path: Path) -> dict[str, dict[str, dict]]:
    from vlm_guard.eval.records import read_records

    out: dict[str, dict[str, dict]] = {}
    for record in read_records(path):
        if "task" in record and "id" in record:
            out.setdefault(record["task"], {})[record["id"]] = record
    return out


def _label(profile: str, settings: dict) -> str:
    return f"{'+'.join(sorted(settings)) or 'none'}@{profile}"


def _config(settings: dict):
    from vlm_guard.tuning.space import Candidate

    return Candidate(settings).guard_config()


def _table_row_with(config) -> Path | None:
    """A records file of ``synthetic.md`` (same scenes, same items) whose run used exactly ``config`` (its
    fingerprint's ``guard_config.*``), e.g. ``synthetic.pai.jsonl`` for PAI at its released values."""
    wanted = {f"guard_config.{name}": None for name in ("vhr", "var", "gift", "pai", "vcd")}
    for name in config.enabled_methods:
        wanted.pop(f"guard_config.{name}")
        for key, value in getattr(config, name).to_dict().items():
            wanted[f"guard_config.{name}.{key}"] = value
    for path in sorted(OUT.glob("synthetic.*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            first = json.loads(handle.readline())
        fingerprint = first.get("fingerprint", {})
        got = {key: value for key, value in fingerprint.items() if key.startswith("guard_config.")}
        if got == wanted:
            return path
    return None


def _verify_greedy(model, processor, tasks, greedy: dict, sample: int) -> dict:
    """Regenerate the first ``sample`` items of every task with the current code: they must equal the records
    (``model`` may be a guarded model running a setting: then its records are checked)."""
    from vlm_guard.eval.images import ImageLoader
    from vlm_guard.eval.runner import chat_prompt, generate_answers

    loader = ImageLoader()
    checked = mismatched = 0
    for task in tasks:
        items = task.items[:sample]
        images = [loader.load(item.image, name=item.image_name) for item in items]
        answers = generate_answers(
            model, processor, images, [chat_prompt(processor, item.prompt) for item in items], task.max_new_tokens
        )
        for item, answer in zip(items, answers):
            checked += 1
            mismatched += answer != greedy[task.name][item.item_id]["answer"]
    return {"checked": checked, "mismatched": mismatched}


def _compact(task: str, record: dict) -> dict:
    from vlm_guard.tuning.objective import compact_result

    return compact_result("pope" if task.startswith("pope") else "chair", record)


def compare(own: dict[str, dict[str, dict]], greedy: dict[str, dict[str, dict]]) -> dict:
    """Paired intervals per column (own - greedy, points) on the items both have."""
    from vlm_guard.tuning.profiles import paired

    columns = {}
    for task, records in own.items():
        ids = [i for i in records if i in greedy.get(task, {})]
        a = [_compact(task, records[i]) for i in ids]
        b = [_compact(task, greedy[task][i]) for i in ids]
        metrics = ("chair_i", "chair_s", "recall") if task == "chair" else ("accuracy",)
        for metric in metrics:
            columns[f"{task}:{metric}"] = paired(a, b, metric)
    return columns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verify", type=int, default=8, help="greedy items per task regenerated as a check (0: off)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--model", choices=sorted(WORLDS), default="v2", help="which shipped default model (default v2)"
    )
    parser.add_argument("--tasks", default="pope,chair", help="pope,chair (default) or chair: the columns to compare")
    args = parser.parse_args()
    kinds = tuple(kind.strip() for kind in args.tasks.split(",") if kind.strip())
    if not kinds or set(kinds) - {"pope", "chair"}:
        raise SystemExit(f"--tasks={args.tasks!r}: give pope, chair or pope,chair")
    _use_model(args.model)
    import os

    os.environ["VLM_GUARD_DEFAULT_MODEL"] = args.model
    import torch

    torch.set_num_threads(1)
    from vlm_guard.calibration.head_map import HeadMap
    from vlm_guard.cli.eval import synthetic_tasks
    from vlm_guard.defaults import load_default
    from vlm_guard.eval.images import ImageLoader
    from vlm_guard.eval.runner import code_digest, prepare_processor, run_method_set
    from vlm_guard.fileio import atomic_write_json, atomic_write_text
    from vlm_guard.settings import validate_tuned
    from vlm_guard.wrapper import wrap

    folder = _shipped_map_folder()
    head_map = HeadMap.from_pretrained(folder)
    tuned = validate_tuned(head_map.tuned, str(folder / "head_map.json"))
    if "profiles" not in tuned:
        raise SystemExit(f"{folder} holds no task profiles: run `vlm-guard tune --profiles caption,answer` first")
    model, processor = load_default()
    prepare_processor(processor)
    tasks = synthetic_tasks(N, N, world_seed=SEED, world=WORLDS[MODEL], kinds=kinds)
    tasks = sorted(tasks, key=lambda task: task.name != "chair")  # captions first: the caption profile's column
    greedy = _records_by_task(GREEDY)
    missing = [t.name for t in tasks if len(greedy.get(t.name, {})) < N]
    if missing:
        raise SystemExit(f"{GREEDY} lacks greedy items of {missing}: run docs/results/run_synthetic_{MODEL}.sh first")
    check = _verify_greedy(model, processor, tasks, greedy, args.verify) if args.verify else {"checked": 0}
    print(f"greedy records reproduced by the current code: {check}")
    if check.get("mismatched"):
        raise SystemExit(
            f"the greedy records are not reproduced by the current code: rerun run_synthetic_{MODEL}.sh's "
            "greedy row before comparing"
        )
    guarded = wrap(model, processor, None, head_map)
    code = code_digest()["sha256_16"]
    rows = []
    try:
        for profile, section in tuned["profiles"].items():
            if profile != "caption" and "pope" not in kinds:
                continue  # an answer profile without its POPE columns
            settings = section.get("settings") or {}
            label = _label(profile, settings)
            row = {"profile": profile, "label": label, "settings": settings, "decision": section.get("decision")}
            reuse = _table_row_with(_config(settings)) if settings else None
            if reuse is not None:
                guarded.set_config(_config(settings))
                reused = _records_by_task(reuse)
                own_tasks = [t for t in tasks if profile == "caption" or t.name != "chair"]
                row_check = _verify_greedy(guarded, processor, own_tasks, reused, args.verify) if args.verify else {}
                print(f"{profile}: reusing {reuse.name} (the same setting in synthetic.md); reproduced: {row_check}")
                if row_check.get("mismatched"):
                    reuse = None
            if reuse is not None:
                own = {task.name: reused[task.name] for task in own_tasks}
                row["columns"] = compare(own, greedy)
                row["records"] = reuse.name
                row["reproduced"] = row_check
            elif settings:
                # the caption setting on every column (what it costs on answers too); the answer setting on POPE
                run_tasks = tasks if profile == "caption" else [t for t in tasks if t.name != "chair"]
                run = run_method_set(
                    guarded,
                    processor,
                    run_tasks,
                    label,
                    OUT / f"profiles.{label}.jsonl",
                    ImageLoader(),
                    batch_size=args.batch_size,
                    progress=False,
                    config=_config(settings),
                    code=code,
                    fingerprint_extra={"profile": profile},
                )
                own = {task: {r["id"]: r for r in records} for task, records in run.records.items()}
                row["columns"] = compare(own, greedy)
                row["records"] = f"profiles.{label}.jsonl"
            else:
                row["columns"] = compare(greedy, greedy)  # no method: greedy itself, token-identical
                row["records"] = GREEDY.name
                row["note"] = (
                    "no method: the guarded model is the plain model (token-identical), so this row is greedy's"
                )
            rows.append(row)
    finally:
        guarded.unwrap()
    summary = {
        "seed": SEED,
        "n": N,
        "greedy_records": GREEDY.name,
        "greedy_check": check,
        "head_map": folder.name,
        "method_code": code,
        "rows": rows,
        "intervals": "paired 95 % percentile bootstrap against greedy on the same items, 1000 resamples, seed 0",
    }
    atomic_write_json(OUT / "profiles.summary.json", summary, indent=1)
    atomic_write_text(OUT / "profiles.md", markdown(summary))
    held_out = {"source": f"docs/results/{MODEL}/profiles.summary.json", "seed": SEED, "profiles": {}}
    for row in rows:
        held_out["profiles"][row["profile"]] = {
            "settings": row["settings"],
            "columns": row["columns"],
            "line": effect_line(row),
        }
    atomic_write_json(folder / "held_out.json", held_out, indent=1)
    print(markdown(summary))
    return 0


def _iv(c: dict) -> str:
    return f"{c['diff']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"


def effect_line(row: dict) -> str:
    """The line ``vlm-guard caption`` prints: the held-out effect of a profile's shipped setting."""
    c = row["columns"]
    what = (
        ", ".join(f"{m} " + " ".join(f"{k}={v}" for k, v in vals.items()) for m, vals in row["settings"].items())
        or "no method"
    )
    if row["profile"] == "caption":
        chair = c["chair:chair_i"]
        return (
            f"held-out effect of the caption profile ({what}): CHAIR_I {chair['greedy']:.1f} -> {chair['own']:.1f} "
            f"({_iv(chair)} points, paired 95 % interval), recall {_iv(c['chair:recall'])}; n = {chair['n']} "
            f"captions of unseen scenes ({WORLDS[MODEL]} seed {SEED}; docs/results/{MODEL}/profiles.md)"
        )
    parts = ", ".join(f"{t.split('/')[1]} {_iv(c[f'{t}:accuracy'])}" for t in POPE if f"{t}:accuracy" in c)
    n = c.get("pope/adversarial:accuracy", {}).get("n", "?")
    return (
        f"held-out effect of the answer profile ({what}): POPE accuracy {parts} points (paired 95 % intervals); "
        f"n = {n} questions per split ({WORLDS[MODEL]} seed {SEED}; docs/results/{MODEL}/profiles.md)"
    )


def markdown(summary: dict) -> str:
    lines = [
        f"## Default model {MODEL}: task profiles on held-out scenes",
        "",
        f"{WORLDS[MODEL]} world seed {summary['seed']} (never used for calibration or tuning), n = {summary['n']} captions "
        f"and {summary['n']} questions per POPE split; Δ = the profile's shipped setting minus greedy on the same "
        f"items, {summary['intervals']}; **bold** = significant. Greedy: `{summary['greedy_records']}` (the "
        f"greedy row of `synthetic.md`; {summary['greedy_check'].get('checked', 0)} of its items regenerated by "
        f"the current code, {summary['greedy_check'].get('mismatched', 0)} differ). Head map "
        f"`{summary['head_map']}`; method code `{summary['method_code']}`. Generated by `profiles_v2.py`.",
        "",
        "| profile | shipped setting | CHAIR_I Δ | CHAIR_S Δ | recall Δ | POPE random acc Δ | popular Δ | adversarial Δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = (
        "chair:chair_i",
        "chair:chair_s",
        "chair:recall",
        "pope/random:accuracy",
        "pope/popular:accuracy",
        "pope/adversarial:accuracy",
    )
    for row in summary["rows"]:
        what = (
            "; ".join(f"{m} " + ", ".join(f"{k}={v}" for k, v in vals.items()) for m, vals in row["settings"].items())
            or "no method (greedy)"
        )
        cells = []
        for key in keys:
            c = row["columns"].get(key)
            if c is None:
                cells.append("-")
                continue
            significant = c["low"] > 0 or c["high"] < 0
            text = f"{c['own']:.1f} ({_iv(c)})"
            cells.append(f"**{text}**" if significant else text)
        lines.append(f"| {row['profile']} | {what} | " + " | ".join(cells) + " |")
    lines.append("")
    greedy = summary["rows"][0]["columns"] if summary["rows"] else {}
    if greedy:
        lines.append("Greedy: " + ", ".join(f"{k} {c['greedy']:.1f}" for k, c in greedy.items()) + ".")
        lines.append("")
    for row in summary["rows"]:
        reproduced = row.get("reproduced")
        source = (
            f" Records: `{row['records']}`"
            + (
                f" (a row of `synthetic.md` with exactly this setting; {reproduced.get('checked', 0)} of its items regenerated "
                f"by the current code, {reproduced.get('mismatched', 0)} differ)"
                if reproduced
                else ""
            )
            + "."
        )
        lines.append(f"- `{row['profile']}`: {row.get('decision') or ''} {row.get('note') or ''}".rstrip() + source)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
