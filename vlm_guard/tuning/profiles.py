"""``vlm-guard tune --profiles caption,answer``: one tuned setting per task profile, judged by paired intervals.

A method that helps long captions may cost yes/no answers (PAI on the default model: CHAIR_I -4.9 but adversarial
POPE accuracy -3.3), so a head map carries one setting per *task profile* (:data:`~vlm_guard.settings.PROFILES`):

- ``caption`` (free-form descriptions): minimise CHAIR_I; constraint: CHAIR object recall within
  :data:`~vlm_guard.tuning.objective.MAX_RECALL_DROP` points of greedy;
- ``answer`` (short answers: yes/no, VQA): maximise adversarial POPE accuracy; constraint: no POPE split
  significantly worse than greedy.

Every decision reads a **paired 95 % bootstrap interval** against greedy decoding on the same items
(:func:`vlm_guard.eval.stats.paired_bootstrap`, 1000 resamples), never a bare point difference:

- a *gain* counts when its interval excludes 0 on the good side;
- a constraint is *broken* when the interval shows a loss beyond its tolerance (the interval's good end is past the
  tolerance), and *kept* when, in addition, the point estimate is within it.

Search (per profile, :func:`tune_profiles`):

1. **pilot rung** (:data:`PILOT_ITEMS` items per task): greedy and every candidate of the profile
   (:func:`vlm_guard.tuning.space.profile_candidates`: a short list of each method's released setting, the parts and
   presets its papers ablate, e.g. PAI's attention half alone with ``gamma=1``). Candidates with no gain at all
   (point estimate <= 0: one that is not better on the pilot items is not worth the full rung's cost) or with a
   broken constraint are dropped; the best :data:`KEEP` by the point gain go on;
2. **rung size from the effect to resolve**: a paired interval's half-width shrinks as 1/sqrt(n), so the n at which
   a change of :data:`TARGET_EFFECT` points (2 points of CHAIR_I, or of adversarial POPE accuracy) is significant is
   ``n = n_pilot * (w_pilot / TARGET_EFFECT)^2``, with ``w_pilot`` the largest half-width among the survivors at
   the pilot (this model's per-item variance of the paired difference). The full rung has that many items
   (at least the pilot's, at most the items the tuning data has); the table records ``w_pilot`` and ``n``;
3. **full rung**: the survivors on ``n`` items (a prefix: the pilot items are reused). The candidates with a
   significant gain and every constraint kept are ranked by their point gain; within :data:`COST_TIE` points the
   one with fewer forward passes per token wins (PAI's attention half runs one, its contrast two);
4. **confirmation on a separate split** (:data:`CONFIRM_SEED`, scenes never used above nor reported): greedy and the
   winner on ``n`` items. Only a winner whose gain is significant there with every constraint kept is shipped;
   else the next-ranked candidate is confirmed (at most :data:`MAX_CONFIRM` tries), else the profile ships no method
   (greedy), and the table says why.

Every per-item result is kept in resumable JSON states (``<out>/tune_profiles_state.tuning.json`` and
``...confirmation.json``; atomic writes): an interrupted run resumes where it stopped when the same command is rerun.
The head map's ``tuned`` section then holds ``profiles`` (see :func:`vlm_guard.settings.validate_tuned`), and
``tuning.md`` the per-profile table: every candidate's gain and cost with intervals, at each rung.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlm_guard.tuning import objective
from vlm_guard.tuning.space import Candidate, forward_passes, profile_candidates

logger = logging.getLogger(__name__)

TARGET_EFFECT = 2.0
"""Points (CHAIR_I, or adversarial POPE accuracy) the full rung must resolve: its paired interval's half-width."""
PILOT_ITEMS = {"caption": 60, "answer": 100}
"""Items per task on the pilot rung (answer: per POPE split)."""
KEEP = 2
"""Candidates promoted from the pilot to the full rung (the full rung costs KEEP + 1 runs of n items: on the shared
2-core machine of the default model's retune, a third would have cost 20 more minutes)."""
COST_TIE = 0.5
"""Points of gain within which the cheaper candidate (fewer forward passes per token) wins."""
MAX_CONFIRM = 2
"""Winners tried on the confirmation split, best first."""
CONFIRM_SEED = 910002
"""World seed of the confirmation split (never reported; the reported seed is 900001, tuning 910001)."""
N_RESAMPLES = 1000
STATE_FORMAT = "vlm_guard.tune_profiles_state"
POPE_SPLITS = ("pope/random", "pope/popular", "pope/adversarial")


# ---------------------------------------------------------------------------------------------- metrics
def _counts(items: Sequence[dict], metric: str) -> np.ndarray:
    """Per-item count rows of a compact result list for one metric (see :mod:`vlm_guard.tuning.objective`)."""
    if metric == "chair_i":
        rows = [(item["h"], item["m"]) for item in items]
    elif metric == "recall":
        rows = [(item["r"], item["g"]) for item in items]
    elif metric == "chair_s":
        rows = [(1 if item["h"] else 0, 1) for item in items]
    elif metric == "accuracy":
        rows = [(item["c"], 1) for item in items]
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def _ratio(totals: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals[..., 1] > 0, 100.0 * totals[..., 0] / np.maximum(totals[..., 1], 1e-300), 0.0)


def paired(own: Sequence[dict], base: Sequence[dict], metric: str) -> dict:
    """Paired bootstrap of ``metric(own) - metric(base)`` in points, on the same items (compact results).

    Example:
        >>> a = [{"c": 1}] * 90 + [{"c": 0}] * 10
        >>> b = [{"c": 1}] * 70 + [{"c": 0}] * 30
        >>> r = paired(a, b, "accuracy"); round(r["diff"], 1), r["low"] > 0
        (20.0, True)
    """
    from vlm_guard.eval.stats import TotalsMetric, paired_bootstrap

    result = paired_bootstrap(
        _counts(own, metric), _counts(base, metric), TotalsMetric(_ratio, name=metric), n_resamples=N_RESAMPLES, seed=0
    )
    return {
        "diff": round(float(result["diff"]), 3),
        "low": round(float(result["low"]), 3),
        "high": round(float(result["high"]), 3),
        "own": round(float(result["metric_a"]), 3),
        "greedy": round(float(result["metric_b"]), 3),
        "n": int(result["n"]),
    }


def _half_width(interval: dict) -> float:
    return (interval["high"] - interval["low"]) / 2.0


# ---------------------------------------------------------------------------------------------- judgement
def judge(profile: str, own: dict[str, list], base: dict[str, list]) -> dict:
    """Gain and constraints of one candidate against greedy on the same items (``{task: compact results}``).

    Returns a dict: ``objective`` (the interval of the objective metric, in points, sign as measured), ``gain``
    (points, positive = better), ``significant`` (the gain's interval excludes 0 on the good side), ``worse``
    (significantly worse on the objective), ``constraints`` ``{name: interval}``, ``broken`` (constraint names whose
    interval shows a loss beyond the tolerance), ``kept`` (every constraint's point estimate within its tolerance and
    none broken), and ``extra`` (other metrics' intervals, for the table).
    """
    if profile == "caption":
        chair_i = paired(own["chair"], base["chair"], "chair_i")
        recall = paired(own["chair"], base["chair"], "recall")
        chair_s = paired(own["chair"], base["chair"], "chair_s")
        tolerance = objective.MAX_RECALL_DROP
        broken = ["recall"] if recall["high"] < -tolerance else []
        kept = not broken and recall["diff"] >= -tolerance
        return {
            "objective": chair_i,
            "objective_name": "CHAIR_I",
            "gain": round(-chair_i["diff"], 3),
            "significant": chair_i["high"] < 0,
            "worse": chair_i["low"] > 0,
            "constraints": {"recall": recall},
            "broken": broken,
            "kept": kept,
            "extra": {"CHAIR_S": chair_s},
        }
    if profile == "answer":
        splits = {task: paired(own[task], base[task], "accuracy") for task in POPE_SPLITS if task in own}
        main = splits["pope/adversarial"]
        broken = [task for task, interval in splits.items() if interval["high"] < 0]
        return {
            "objective": main,
            "objective_name": "adversarial POPE accuracy",
            "gain": main["diff"],
            "significant": main["low"] > 0,
            "worse": main["high"] < 0,
            "constraints": {task: interval for task, interval in splits.items() if task != "pope/adversarial"},
            "broken": broken,
            "kept": not broken,
            "extra": {},
        }
    from vlm_guard.settings import PROFILES

    raise ValueError(f"unknown task profile {profile!r}; profiles are {list(PROFILES)}")


def full_rung_size(
    pilot_n: int, pilot_half_widths: Sequence[float], max_items: int, target: float = TARGET_EFFECT
) -> dict:
    """Items of the full rung: the n at which a ``target``-point change is significant, from the pilot's widest
    paired interval (half-widths shrink as 1/sqrt(n)); between ``pilot_n`` and ``max_items``.

    Example:
        >>> full_rung_size(60, [3.9, 2.5], 600)["n"]   # 60 * (3.9 / 2)^2 = 228.2
        229
    """
    widest = max(pilot_half_widths) if pilot_half_widths else 0.0
    needed = math.ceil(pilot_n * (widest / target) ** 2 - 1e-9) if widest > 0 else pilot_n
    n = max(pilot_n, min(max_items, needed))
    return {
        "n": int(n),
        "needed": int(needed),
        "pilot_n": int(pilot_n),
        "pilot_half_width": round(widest, 3),
        "target_effect": target,
        "capped": needed > max_items,
        "rule": f"n = {pilot_n} * ({widest:.2f} / {target:g})^2 = {needed}"
        + (f", capped at the {max_items} items of the tuning data" if needed > max_items else ""),
    }


def rank(rows: list[dict]) -> list[dict]:
    """Rows with a significant gain and every constraint kept, best first: by point gain; within
    :data:`COST_TIE` points of the best, fewer forward passes per token first."""
    good = [row for row in rows if row["judgement"]["significant"] and row["judgement"]["kept"]]
    good.sort(key=lambda row: -row["judgement"]["gain"])
    if not good:
        return []
    best = good[0]["judgement"]["gain"]
    near = [row for row in good if row["judgement"]["gain"] >= best - COST_TIE]
    near.sort(key=lambda row: (row["passes"], -row["judgement"]["gain"]))
    return near + [row for row in good if row not in near]


# ---------------------------------------------------------------------------------------------- the search
def profile_tasks(profile: str) -> tuple[str, ...]:
    return ("chair",) if profile == "caption" else POPE_SPLITS


class _Split:
    """One data split (tuning or confirmation): its tasks and its resumable per-item results."""

    def __init__(
        self, guarded, processor, data, path: Path | None, identity: dict, batch_size: int, budget, progress: bool
    ):
        from vlm_guard.tuning.search import TuningState, _Search

        self.data = data
        self.state = TuningState(path, identity)
        self.state.data.setdefault("seconds", {})
        self.state.data["plan"] = {"rungs": [{task.name: 0 for task in data.tasks}]}
        self.search = _Search(guarded, processor, data, self.state, budget.seconds, batch_size, False)
        self.search.spent_before = budget.spent()
        self.budget = budget
        self.progress = progress
        self.tasks = {task.name: task for task in data.tasks}

    def run(self, candidate: Candidate, sizes: dict[str, int]) -> None:
        """Generate ``candidate`` on the first ``sizes[task]`` items of each task it has not done (timed)."""
        from vlm_guard.tuning.search import BudgetExhausted

        self.state.data["plan"] = {"rungs": [{name: sizes.get(name, 0) for name in self.tasks}]}
        before = {name: len(self.state.results(candidate, name)) for name in sizes}
        started = time.perf_counter()
        self.search.spent_before = self.budget.spent()
        self.search.started = time.monotonic()
        try:
            self.search.evaluate(candidate, 0)
        except BudgetExhausted:
            self._record_seconds(candidate, before, time.perf_counter() - started)
            self.budget.add(time.perf_counter() - started)
            raise
        seconds = time.perf_counter() - started
        self.budget.add(seconds)
        self._record_seconds(candidate, before, seconds)
        if self.progress and seconds > 1:
            logger.info("%s: %s items in %.0f s", candidate.label, {n: sizes[n] for n in sizes}, seconds)

    def _record_seconds(self, candidate: Candidate, before: dict, seconds: float) -> None:
        new = sum(len(self.state.results(candidate, name)) - before[name] for name in before)
        if new:
            entry = self.state.data["seconds"].setdefault(candidate.key, [0.0, 0])
            entry[0] = round(entry[0] + seconds, 3)
            entry[1] += new
        self.state.save(force=True)

    def items(self, candidate: Candidate, task: str, n: int) -> list[dict]:
        done = self.state.results(candidate, task)
        return [done[item.item_id] for item in self.tasks[task].items[:n] if item.item_id in done]

    def aligned(self, candidate: Candidate, greedy: Candidate, tasks: Sequence[str], n: int) -> tuple[dict, dict]:
        own, base = {}, {}
        for task in tasks:
            mine, ref = self.state.results(candidate, task), self.state.results(greedy, task)
            ids = [
                item.item_id
                for item in self.tasks[task].items[:n]
                if item.item_id in mine
                and item.item_id in ref
                and "skip" not in mine[item.item_id]
                and "skip" not in ref[item.item_id]
            ]
            own[task] = [mine[i] for i in ids]
            base[task] = [ref[i] for i in ids]
        return own, base

    def seconds_per_item(self, candidate: Candidate) -> float | None:
        entry = self.state.data["seconds"].get(candidate.key)
        return entry[0] / entry[1] if entry and entry[1] else None


class _Budget:
    def __init__(self, minutes: float, spent: float):
        self.seconds = minutes * 60.0
        self._spent = spent

    def spent(self) -> float:
        return self._spent

    def add(self, seconds: float) -> None:
        self._spent += seconds


def _row(split: _Split, profile: str, candidate: Candidate, greedy: Candidate, n: int, rung: str) -> dict:
    own, base = split.aligned(candidate, greedy, profile_tasks(profile), n)
    judgement = judge(profile, own, base)
    own_s, base_s = split.seconds_per_item(candidate), split.seconds_per_item(greedy)
    return {
        "rung": rung,
        "label": candidate.label,
        "band": candidate.band,
        "methods": candidate.methods,
        "n": min(len(v) for v in own.values()),
        "passes": forward_passes(candidate),
        "time_ratio": round(own_s / base_s, 2) if own_s and base_s else None,
        "judgement": judgement,
    }


def tune_profiles(
    model,
    processor,
    head_map,
    *,
    profiles: Sequence[str] = ("caption", "answer"),
    out_dir=None,
    n_items: int = 600,
    budget_minutes: float = 120.0,
    batch_size: int = 32,
    progress: bool = True,
    weights_sha256_16: str | None = None,
    world: str | None = None,
    pilot_items: dict | None = None,
    tuning_seed: int | None = None,
    confirm_seed: int = CONFIRM_SEED,
    methods: Sequence[str] | None = None,
) -> dict:
    """Tune each task profile (see the module docstring) and return the head map's new ``tuned`` section (also
    saved with ``tuning.md`` into ``out_dir`` when given).

    Args:
        model, processor: the plain model and its processor.
        head_map: its calibrated head map (a copy gets the ``tuned`` section).
        profiles: profiles to tune (``caption``, ``answer``).
        out_dir: folder for the tuned map, ``tuning.md`` and the resumable states.
        n_items: items per task the tuning data (and the confirmation split) offers: the most a rung can use.
        budget_minutes: time budget, earlier runs of the same states included; when it runs out the states are
            saved and :class:`~vlm_guard.tuning.search.BudgetExhausted` is raised (rerun to continue).
        pilot_items: ``{profile: items}`` of the pilot rung (default :data:`PILOT_ITEMS`).
        tuning_seed, confirm_seed: world seeds of the tuning and the confirmation split (never 900001).
        methods: tune these methods only, each over its strength ladder
            (:func:`~vlm_guard.tuning.space.profile_candidates`); None: the profile's own candidate list.
    """
    import copy

    from vlm_guard.eval.runner import prepare_processor
    from vlm_guard.eval.synthetic import EVAL_SEED, TUNING_SEED
    from vlm_guard.settings import PROFILES, validate_tuned
    from vlm_guard.tuning.search import synthetic_tuning_data
    from vlm_guard.version import __version__
    from vlm_guard.wrapper import wrap

    profiles = [p.strip().lower() for p in profiles if p.strip()]
    unknown = [p for p in profiles if p not in PROFILES]
    if unknown or not profiles:
        raise ValueError(f"profiles {profiles!r}: choose from {list(PROFILES)}")
    tuning_seed = TUNING_SEED if tuning_seed is None else int(tuning_seed)
    if confirm_seed in (EVAL_SEED, tuning_seed):
        raise ValueError(
            f"confirmation seed {confirm_seed} must differ from the reported seed {EVAL_SEED} and the "
            f"tuning seed {tuning_seed}"
        )
    if head_map is None:
        raise ValueError("tuning needs the model's head map: run `vlm-guard calibrate` first and pass it")
    pilot_items = {**PILOT_ITEMS, **(pilot_items or {})}
    if world is None:
        from vlm_guard.synthetic.worlds import world_for_model

        world = world_for_model(model).name
    tuning = synthetic_tuning_data(n_items, n_items, tuning_seed, world=world)
    confirmation = synthetic_tuning_data(n_items, n_items, confirm_seed, world=world)
    prepare_processor(processor)
    guarded = wrap(model, processor, None, head_map)
    out = Path(out_dir) if out_dir is not None else None
    identity = {
        "fingerprint_hash": head_map.fingerprint_hash,
        "weights_sha256_16": weights_sha256_16,
        "kind": "profiles",
    }
    states = {}
    for name, data in (("tuning", tuning), ("confirmation", confirmation)):
        path = out / f"tune_profiles_state.{name}.json" if out is not None else None
        states[name] = (path, {**identity, "tuning_data": data.description})
    budget = _Budget(budget_minutes, 0.0)
    splits = {
        name: _Split(guarded, processor, data, states[name][0], states[name][1], batch_size, budget, progress)
        for name, data in (("tuning", tuning), ("confirmation", confirmation))
    }
    budget.add(max(float(s.state.data.get("elapsed_s", 0.0)) for s in splits.values()))  # each records the total
    greedy = Candidate({})
    results: dict[str, dict] = {}
    try:
        for profile in profiles:
            results[profile] = _tune_one(
                profile, splits, guarded, greedy, head_map, pilot_items[profile], n_items, methods
            )
    finally:
        for split in splits.values():
            split.state.data["elapsed_s"] = round(budget.spent(), 1)
            split.state.save(force=True)
        guarded.unwrap()
    tuned = {
        "format": "profiles",
        "profiles": results,
        "default_profile": "caption" if "caption" in results else profiles[0],
        "tuning_data": {"name": tuning.name, **tuning.description},
        "confirmation_data": {
            "name": confirmation.name.replace("(tuning)", "(confirmation)"),
            **confirmation.description,
        },
        "search": {
            "kind": "paired-interval racing",
            "target_effect": TARGET_EFFECT,
            "keep": KEEP,
            "cost_tie": COST_TIE,
            "n_resamples": N_RESAMPLES,
            "elapsed_s": round(budget.spent(), 1),
        },
        "weights_sha256_16": weights_sha256_16,
        "library_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tuned = validate_tuned(tuned, "the tuned section written by tune_profiles")
    if out is not None:
        from vlm_guard.tuning.report import profiles_markdown

        result_map = copy.copy(head_map)
        result_map.tuned = tuned
        result_map.save_pretrained(out)
        from vlm_guard.fileio import atomic_write_text

        atomic_write_text(out / "tuning.md", profiles_markdown(tuned))
    return tuned


def _tune_one(
    profile: str,
    splits: dict,
    guarded,
    greedy: Candidate,
    head_map,
    pilot_n: int,
    n_items: int,
    methods: Sequence[str] | None = None,
) -> dict:
    from vlm_guard.settings import PROFILES

    tasks = profile_tasks(profile)
    tuning = splits["tuning"]
    candidates, skipped = [], {}
    for candidate in profile_candidates(profile, head_map.num_layers, head_map, methods):
        guarded.set_config(candidate.guard_config())
        if not guarded.interventions:
            skipped[candidate.label] = (
                "builds no intervention on this model (e.g. VAR without sink dimensions): not run"
            )
            continue
        candidates.append(candidate)
    guarded.set_config("none")
    table: list[dict] = []
    # 1. pilot
    pilot_sizes = {task: pilot_n for task in tasks}
    tuning.run(greedy, pilot_sizes)
    for candidate in candidates:
        tuning.run(candidate, pilot_sizes)
    pilot_rows = [_row(tuning, profile, c, greedy, pilot_n, "pilot") for c in candidates]
    table.extend(pilot_rows)
    alive = [row for row in pilot_rows if row["judgement"]["gain"] > 0 and not row["judgement"]["broken"]]
    alive.sort(key=lambda row: -row["judgement"]["gain"])
    alive = alive[:KEEP]
    for row in pilot_rows:
        row["promoted"] = row in alive
    # 2. the full rung's size from the pilot's interval widths
    sizing = full_rung_size(
        pilot_n,
        [_half_width(row["judgement"]["objective"]) for row in alive]
        or [_half_width(row["judgement"]["objective"]) for row in pilot_rows],
        n_items,
    )
    n = sizing["n"]
    # 3. full rung
    full_sizes = {task: n for task in tasks}
    if alive:
        tuning.run(greedy, full_sizes)
    by_label = {c.label: c for c in candidates}
    for row in alive:
        tuning.run(by_label[row["label"]], full_sizes)
    full_rows = [_row(tuning, profile, by_label[row["label"]], greedy, n, "full") for row in alive]
    table.extend(full_rows)
    ranked = rank(full_rows)
    # 4. confirmation on the separate split
    confirmation = splits["confirmation"]
    chosen, decision = None, None
    tries = []
    for row in ranked[:MAX_CONFIRM]:
        confirmation.run(greedy, full_sizes)
        confirmation.run(by_label[row["label"]], full_sizes)
        confirm_row = _row(confirmation, profile, by_label[row["label"]], greedy, n, "confirmation")
        table.append(confirm_row)
        tries.append(row["label"])
        if confirm_row["judgement"]["significant"] and confirm_row["judgement"]["kept"]:
            chosen = confirm_row
            break
    if chosen is not None:
        j = chosen["judgement"]
        decision = (
            f"{chosen['label']}: {j['objective_name']} {_interval_text(j['objective'])} on the confirmation "
            f"split (n={chosen['n']}), constraints kept"
        )
        settings = {name: dict(values) for name, values in chosen["methods"].items()}
        methods = sorted(settings)
    else:
        settings, methods = {}, []
        if not ranked:
            decision = (
                f"no candidate gained significantly with its constraints kept on the full rung (n={n}): "
                "greedy (no method) ships"
            )
        else:
            decision = (
                f"the full rung's winner(s) {tries} did not confirm on the separate split (n={n}): "
                "greedy (no method) ships"
            )
    return {
        "description": PROFILES[profile],
        "settings": settings,
        "default_methods": methods,
        "decision": decision,
        "chosen_row": chosen,
        "rungs": {"pilot": pilot_n, "full": n, "confirmation": n, "sizing": sizing},
        "skipped": skipped,
        "objective": _objective_text(profile),
        "table": table,
    }


def _objective_text(profile: str) -> str:
    if profile == "caption":
        return (
            f"lower CHAIR_I significantly (paired 95 % interval < 0), CHAIR recall within "
            f"{objective.MAX_RECALL_DROP:g} points of greedy"
        )
    return "raise adversarial POPE accuracy significantly, no POPE split significantly worse than greedy"


def _interval_text(interval: dict) -> str:
    return f"{interval['diff']:+.1f} [{interval['low']:+.1f}, {interval['high']:+.1f}]"


__all__ = [
    "TARGET_EFFECT",
    "PILOT_ITEMS",
    "KEEP",
    "COST_TIE",
    "MAX_CONFIRM",
    "CONFIRM_SEED",
    "paired",
    "judge",
    "full_rung_size",
    "rank",
    "tune_profiles",
]
