"""``vlm_guard.tune``: choose each method's strength and layer band for one model on a tuning split.

Search (budgeted successive halving, :data:`ETA` = 3, three rungs):

1. greedy decoding is run on every rung's items (the reference of the constraints, see
   :mod:`vlm_guard.tuning.objective`);
2. per method, every setting of its grid (:func:`vlm_guard.tuning.space.method_candidates`) runs on the smallest rung
   (1/9 of the items); the best third (by the objective, feasible first) goes on to 1/3 of the items, and the best
   third of those to all of them. Rungs are run for all methods before the next rung starts, so a budget that runs
   out still leaves every method a measured choice;
3. the methods whose best setting beats greedy on all items (by at least ``objective.MIN_GAIN`` points) are combined (every subset of two or more, plus the
   paper trio VHR+VAR+GIFT of whatever can run) at their tuned settings, halving again from the middle rung;
4. confirmation (``confirm_items``, default :data:`CONFIRM_ITEMS`): greedy, each method's best feasible setting and
   the best combination run again on a larger rung (``confirm_items`` items per task, all of them when the tuning
   data has fewer). Successive halving picks its winners on small rungs, where a loss of one or two points of
   accuracy is invisible; a winner that breaks a constraint on the confirmation rung is not shipped (the method keeps
   its released defaults, the table says why). The settings and the default set are chosen from this rung;
5. the default method set is the smallest single method or combination that beats greedy by ``MIN_GAIN`` and
   scores within ``MIN_GAIN`` of the best such set; none when nothing does.

Items of a smaller rung are a prefix of a larger one, so a setting promoted to the next rung only runs the items it
has not seen. Every per-item result is kept in a JSON state file (atomic writes, every few seconds and at the end
of each setting), so an interrupted run resumes where it stopped: rerun the same command.

Data-parallel (``torchrun`` / ``accelerate launch``, see :mod:`vlm_guard.parallel`): each setting's pending items are
dealt out over the ranks by batches and every rank's results are added to every rank's state, so all ranks rank the
settings alike; rank 0 sizes the plan and writes the state and the tuned map.

Budget: ``budget_minutes`` bounds the whole tuning (time already spent by earlier runs of the same state counts). The
first run measures greedy's cost per item and shrinks the item counts (never below :data:`MIN_ITEMS` per task on the
smallest rung) so that the estimated cost of the plan fits; when the budget still runs out, the settings are chosen
from the largest rung that finished.

Example (not run: generates for every setting tried, minutes to hours)::

    model, processor = vlm_guard.load_default()
    result = vlm_guard.tune(model, processor, head_map, out_dir="maps/default-tuned")
    result.head_map.tuned["default_methods"]
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_guard.config import ALL_METHODS
from vlm_guard.tuning import objective
from vlm_guard.tuning.space import TUNABLE_METHODS, Candidate, combine, method_candidates

logger = logging.getLogger(__name__)

ETA = 3
"""Successive-halving factor: each rung keeps the best 1/ETA and runs ETA times more items."""
RUNGS = 3
MIN_ITEMS = 8
"""Fewest items per task on the smallest rung."""
COST_OVERHEAD = 1.7
"""Guarded settings cost about this much more than greedy per item (extra prefills, contrast passes)."""
STATE_VERSION = 1
CONFIRM_ITEMS = 300
"""Items per task of the confirmation rung (the last rung's winners measured again; 0 switches it off). 300 items
give a paired interval of about +-2 points on a POPE split: the size at which the reported tables see a loss."""
SAVE_EVERY_S = 5.0
PAPER_TRIO = ALL_METHODS
"""The paper methods (those ``"all"`` switches on), tuned together for the reports."""


class BudgetExhausted(Exception):
    """Raised inside the search when the time budget is spent (the state is saved first)."""


# ---------------------------------------------------------------------------------------------- tuning data
@dataclass
class TuningData:
    """The tuning split: tasks (POPE splits and / or a caption task), their image loader and a description.

    Attributes:
        name: Short description shown in reports ("synthetic world seed 910001 (tuning)").
        tasks: :class:`~vlm_guard.eval.runner.EvalTask` list; items are used as prefixes.
        loader: :class:`~vlm_guard.eval.images.ImageLoader` for the items' images.
        description: JSON-ready fields recorded in the head map (seed, files, sizes).
    """

    name: str
    tasks: list
    loader: Any
    description: dict = field(default_factory=dict)


def synthetic_tuning_data(
    n_questions: int = 600, n_captions: int = 600, seed: int | None = None, world: str | None = None
) -> TuningData:
    """POPE-style splits and captions of a synthetic world's **tuning** seed (910001), never the reported one.
    ``world``: ``"everyday"`` or ``"shapes"`` (the model's own world: see ``vlm_guard.synthetic.worlds``;
    ``None``: the default model's).

    Raises:
        ValueError: ``seed`` is the reported seed 900001.
    """
    from vlm_guard.eval.images import ImageLoader
    from vlm_guard.eval.synthetic import EVAL_SEED, TUNING_SEED
    from vlm_guard.eval.tasks import DEFAULT_MAX_NEW_TOKENS, synthetic_tasks

    seed = TUNING_SEED if seed is None else int(seed)
    if seed == EVAL_SEED:
        raise ValueError(
            f"seed {seed} is the reported benchmark's world seed; tune on {TUNING_SEED} (or another unreported seed)"
        )
    from vlm_guard.synthetic.worlds import world_kind

    world = world_kind(world).name
    tasks = synthetic_tasks(
        n_questions,
        n_captions,
        world_seed=seed,
        pope_max_new_tokens=DEFAULT_MAX_NEW_TOKENS["synthetic_pope"],
        world=world,
    )
    return TuningData(
        f"synthetic {world} world seed {seed} (tuning)",
        tasks,
        ImageLoader(),
        {
            "kind": "synthetic",
            "world": world,
            "world_seed": seed,
            "n_questions_per_split": n_questions,
            "n_captions": n_captions,
        },
    )


def file_tuning_data(
    pope_files: Sequence[str] = (),
    images: str | None = None,
    instances: str | None = None,
    captions: str | None = None,
    n_images: int = 300,
    seed: int = 1,
    caption_prompt: str | None = None,
    pope_max_new_tokens: int = 16,
    chair_max_new_tokens: int = 512,
) -> TuningData:
    """The user's own POPE-format question files and / or COCO-format caption annotations (the loaders of
    ``vlm-guard eval``). Use files and images that are not the ones you report on."""
    from vlm_guard.eval.images import ImageLoader
    from vlm_guard.eval.tasks import DEFAULT_CHAIR_PROMPT, chair_task, pope_tasks

    if not images:
        raise ValueError("tuning on files needs --images, the folder the POPE questions and COCO annotations name")
    tasks = list(pope_tasks(list(pope_files), max_new_tokens=pope_max_new_tokens)) if pope_files else []
    for task, path in zip(tasks, pope_files):
        _check_images_present(task, path, images)
    if instances or captions:
        if not (instances and captions):
            raise ValueError("CHAIR tuning data needs both --instances and --captions (COCO-format annotation files)")
        tasks.append(
            chair_task(
                images,
                instances,
                captions,
                n_images,
                seed,
                caption_prompt or DEFAULT_CHAIR_PROMPT,
                max_new_tokens=chair_max_new_tokens,
            )
        )
    if not tasks:
        raise ValueError("no tuning data: pass POPE-format files (--pope FILE ...) and/or COCO --instances/--captions")
    return TuningData(
        f"user files ({', '.join(t.name for t in tasks)})",
        tasks,
        ImageLoader(images),
        {
            "kind": "files",
            "pope_files": [str(p) for p in pope_files],
            "images": str(images),
            "instances": instances,
            "captions": captions,
            "n_images": n_images,
            "seed": seed,
        },
    )


def _check_images_present(task, path, images) -> None:
    """Refuse a POPE file none of whose images is in ``images`` (tuning on zero items would ship a setting chosen
    on nothing); warn when some are missing (those questions are skipped)."""
    from vlm_guard.eval.images import ImageLoader

    loader = ImageLoader(images)
    names = sorted({str(item.image_name) for item in task.items})
    missing = [name for name in names if not loader.path_of(name).is_file()]
    if names and len(missing) == len(names):
        raise ValueError(
            f"--pope {path}: none of its {len(names)} images (e.g. {missing[0]}) is in --images {images}; "
            "pass the image folder the questions name (POPE files built from train2014 name train2014 "
            "images)"
        )
    if missing:
        logger.warning(
            "%s: %d of its %d images are not in %s; their questions are skipped", path, len(missing), len(names), images
        )


# ---------------------------------------------------------------------------------------------- state
class TuningState:
    """Per-item results of every setting tried, kept in a JSON file (written atomically)."""

    def __init__(self, path: str | os.PathLike | None, identity: dict):
        self.path = Path(path) if path else None
        self.identity = identity
        self.data = {
            "format": "vlm_guard.tune_state",
            "version": STATE_VERSION,
            "identity": identity,
            "plan": None,
            "elapsed_s": 0.0,
            "trials": {},
        }
        self._last_save = 0.0
        self.writer = True  # False on data-parallel ranks other than 0: they read the state, rank 0 writes it
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
                raise ValueError(
                    f"{self.path} is not a readable tuning state ({error}); delete it to start over"
                ) from None
            if not isinstance(loaded, dict) or loaded.get("format") != "vlm_guard.tune_state":
                raise ValueError(f"{self.path} is not a vlm_guard tuning state; pass another --state path")
            if loaded.get("identity") != identity:
                raise ValueError(
                    f"{self.path} holds a tuning run of another model or tuning data ({loaded.get('identity')}); "
                    f"delete it or pass another --state path to tune {identity}"
                )
            from vlm_guard.tuning.state_schema import validate_state

            self.data = validate_state(self.path, loaded, STATE_VERSION)
            logger.info(
                "resuming the tuning state %s (%d settings, %.0f s spent)",
                self.path,
                len(self.data["trials"]),
                self.data["elapsed_s"],
            )

    @property
    def resumed(self) -> bool:
        return bool(self.data["trials"])

    def trial(self, candidate: Candidate) -> dict:
        return self.data["trials"].setdefault(
            candidate.key, {"label": candidate.label, "methods": candidate.methods, "band": candidate.band, "items": {}}
        )

    def results(self, candidate: Candidate, task: str) -> dict:
        return self.trial(candidate)["items"].setdefault(task, {})

    def save(self, force: bool = False) -> None:
        if self.path is None or not self.writer:
            return
        now = time.monotonic()
        if not force and now - self._last_save < SAVE_EVERY_S:
            return
        from vlm_guard.fileio import atomic_write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.path, self.data, allow_nan=True
        )  # as json.dumps wrote it before; a save never fails on a value
        self._last_save = now


# ---------------------------------------------------------------------------------------------- the search
@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        head_map: the head map with ``tuned`` filled in (also saved when ``out_dir`` was given).
        tuned: ``head_map.tuned``.
        table: one row per (setting, rung) measured.
        complete: False when the budget ran out before the plan finished.
    """

    head_map: Any
    tuned: dict
    table: list
    complete: bool


class _Search:
    def __init__(
        self,
        guarded,
        processor,
        data: TuningData,
        state: TuningState,
        budget_s: float,
        batch_size: int,
        progress: bool,
        parallel=None,
    ):
        from vlm_guard.parallel import DataParallel

        self.guarded, self.processor, self.data, self.state = guarded, processor, data, state
        self.budget_s, self.batch_size, self.progress = budget_s, batch_size, progress
        self.parallel = parallel or DataParallel()
        self.tasks = {task.name: task for task in data.tasks}
        self.started = time.monotonic()
        self.spent_before = float(state.data.get("elapsed_s", 0.0))
        self.bar = None

    # ------------------------------------------------------------------ time
    def elapsed(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def check_budget(self) -> None:
        if self.elapsed() > self.budget_s:
            self.flush()
            raise BudgetExhausted()

    def flush(self) -> None:
        self.state.data["elapsed_s"] = round(self.elapsed(), 1)
        self.state.save(force=True)

    # ------------------------------------------------------------------ plan
    def rung_sizes(self) -> list[dict[str, int]]:
        """Item counts per task of each rung: the :data:`RUNGS` halving rungs, then the confirmation rung if any."""
        return self.state.data["plan"]["rungs"]

    def add_confirmation(self, confirm_items: int) -> int | None:
        """Append the confirmation rung to the plan (once; kept in the state, so a resumed run finds it) and return
        its index, or None when ``confirm_items`` is 0. It holds ``confirm_items`` items per task (all the task's items
        when it has fewer), never fewer than the last halving rung."""
        if not confirm_items:
            return None
        plan = self.state.data["plan"]
        if len(plan["rungs"]) == RUNGS:
            last = plan["rungs"][RUNGS - 1]
            plan["rungs"].append(
                {name: max(last.get(name, 0), min(len(task.items), confirm_items)) for name, task in self.tasks.items()}
            )
            plan["confirm_items"] = confirm_items
            self.state.save(force=True)
        return len(plan["rungs"]) - 1

    def make_plan(self, seconds_per_item: dict[str, float], n_candidates: int, n_combos: int) -> dict:
        """Item counts per task and rung, shrunk to fit the budget (see the module docstring)."""
        full = {name: len(task.items) for name, task in self.tasks.items()}
        fractions = [ETA ** -(RUNGS - 1 - r) for r in range(RUNGS)]

        def cost(scale: float) -> float:
            sizes = [
                {name: max(min(MIN_ITEMS, n), math.ceil(n * scale * f)) for name, n in full.items()} for f in fractions
            ]
            alive = [n_candidates]
            for _ in range(RUNGS - 1):
                alive.append(max(1, math.ceil(alive[-1] / ETA)))
            combos = [0] + [n_combos] + [max(1, math.ceil(n_combos / ETA))] * (RUNGS - 2) if n_combos else [0] * RUNGS
            total = 0.0
            for rung, rung_sizes in enumerate(sizes):
                per_setting = sum(seconds_per_item.get(name, 0.0) * n for name, n in rung_sizes.items())
                total += per_setting * (1 + COST_OVERHEAD * (alive[rung] + combos[rung]))
            return total

        remaining = max(0.0, self.budget_s - self.elapsed())
        scale = 1.0
        while scale > 0.02 and cost(scale) > remaining:
            scale *= 0.85
        sizes = [
            {name: max(min(MIN_ITEMS, n), math.ceil(n * scale * f)) for name, n in full.items()} for f in fractions
        ]
        plan = {
            "rungs": sizes,
            "scale": round(scale, 3),
            "estimated_s": round(cost(scale), 1),
            "eta": ETA,
            "seconds_per_item_greedy": {k: round(v, 4) for k, v in seconds_per_item.items()},
        }
        logger.info("tuning plan: %s", plan)
        return plan

    # ------------------------------------------------------------------ running settings
    def evaluate(self, candidate: Candidate, rung: int) -> None:
        """Run ``candidate`` on the items of ``rung`` it has not seen yet."""
        from vlm_guard.config import GuardConfig

        sizes = self.rung_sizes()[rung]
        config = candidate.guard_config() if candidate.methods else GuardConfig()
        self.guarded.set_config(config)
        if self.bar is not None:
            self.bar.set_description(f"rung {rung} {candidate.label}"[:60])
        if self.parallel.distributed:
            self._evaluate_shared(candidate, sizes)
            return
        for name, task in self.tasks.items():
            done = self.state.results(candidate, name)
            pending = [item for item in task.items[: sizes[name]] if item.item_id not in done]
            for start in range(0, len(pending), self.batch_size):
                self.check_budget()
                batch = pending[start : start + self.batch_size]
                self._run_batch(task, batch, done)
                if self.bar is not None:
                    self.bar.update(len(batch))
                self.state.data["elapsed_s"] = round(self.elapsed(), 1)
                self.state.save()
        self.flush()

    def _run_batch(self, task, batch: list, done: dict) -> None:
        """Generate and score one batch into ``done`` (item id -> compact result; unreadable images ``{"skip": 1}``)."""
        from vlm_guard.eval.runner import chat_prompt, generate_answers

        images, prompts, ready = [], [], []
        for item in batch:
            image = self.data.loader.load(item.image, name=item.image_name)
            if image is None:
                done[item.item_id] = {"skip": 1}
                continue
            images.append(image)
            prompts.append(chat_prompt(self.processor, item.prompt))
            ready.append(item)
        if ready:
            answers = generate_answers(self.guarded, self.processor, images, prompts, task.max_new_tokens)
            for item, answer in zip(ready, answers):
                record = {**item.fields, "answer": answer, **task.scorer(item, answer)}
                done[item.item_id] = objective.compact_result(task.kind, record)

    def _evaluate_shared(self, candidate: Candidate, sizes: dict[str, int]) -> None:
        """:meth:`evaluate` on several processes: the pending batches dealt out over the ranks
        (:func:`~vlm_guard.parallel.shard_batches`), then every rank's results added to every rank's state, so that all
        ranks take the same decisions. A rank past the budget stops its share; then every rank stops
        (:class:`BudgetExhausted`) with what all ranks measured saved by rank 0."""
        from vlm_guard.parallel import shard_batches

        parallel = self.parallel
        mine: dict[str, dict] = {}
        over_budget = False
        for name, task in self.tasks.items():
            done = self.state.results(candidate, name)
            pending = [item for item in task.items[: sizes[name]] if item.item_id not in done]
            share = shard_batches(pending, self.batch_size, parallel.rank, parallel.world_size)
            results = mine.setdefault(name, {})
            for start in range(0, len(share), self.batch_size):
                if self.elapsed() > self.budget_s:
                    over_budget = True
                    break
                self._run_batch(task, share[start : start + self.batch_size], results)
            if over_budget:
                break
        everyone = parallel.gather((mine, over_budget))
        for results, _ in everyone:
            for name, items in results.items():
                self.state.results(candidate, name).update(items)
                if self.bar is not None:
                    self.bar.update(len(items))
        self.flush()
        if any(stopped for _, stopped in everyone):
            raise BudgetExhausted()

    def complete_at(self, candidate: Candidate, rung: int) -> bool:
        sizes = self.rung_sizes()[rung]
        trial = self.state.data["trials"].get(candidate.key)
        if trial is None:
            return False
        return all(
            all(item.item_id in trial["items"].get(name, {}) for item in task.items[: sizes[name]])
            for name, task in self.tasks.items()
        )

    def measure(self, candidate: Candidate, rung: int, greedy: Candidate) -> dict:
        """Metrics, score and constraint violations of ``candidate`` on rung ``rung`` (items skipped by either
        side left out)."""
        sizes = self.rung_sizes()[rung]
        own, base = {}, {}
        for name, task in self.tasks.items():
            mine = self.state.results(candidate, name)
            reference = self.state.results(greedy, name)
            ids = [item.item_id for item in task.items[: sizes[name]]]
            ids = [
                i for i in ids if i in mine and i in reference and "skip" not in mine[i] and "skip" not in reference[i]
            ]
            own[name] = [mine[i] for i in ids]
            base[name] = [reference[i] for i in ids]
        own_metrics, base_metrics = objective.metrics(own), objective.metrics(base)
        problems = objective.violations(own_metrics, base_metrics)
        return {
            "label": candidate.label,
            "methods": candidate.methods,
            "band": candidate.band,
            "rung": rung,
            "n": {name: m["n"] for name, m in own_metrics.items()},
            "metrics": _rounded(own_metrics),
            "score": round(objective.score(own_metrics), 3),
            "greedy_score": round(objective.score(base_metrics), 3),
            "violations": problems,
            "feasible": not problems,
        }

    def halve(
        self, candidates: list[Candidate], first_rung: int, greedy: Candidate, stage: str, table: list
    ) -> list[Candidate]:
        """Successive halving from ``first_rung``; returns the survivors ranked at the last rung reached."""
        alive = list(candidates)
        for rung in range(first_rung, RUNGS):
            self.evaluate(greedy, rung)
            for candidate in alive:
                self.evaluate(candidate, rung)
            rows = [self.measure(candidate, rung, greedy) for candidate in alive]
            for row in rows:
                table.append({"stage": stage, **row})
            order = sorted(range(len(alive)), key=lambda i: objective.rank_key(rows[i]["score"], rows[i]["violations"]))
            alive = [alive[i] for i in order]
            if rung < RUNGS - 1:
                alive = alive[: max(1, math.ceil(len(alive) / ETA))]
        return alive

    def ranked_at_best_rung(
        self, candidates: list[Candidate], greedy: Candidate, max_rung: int | None = None
    ) -> tuple[list[dict], int]:
        """Rows of the candidates finished at the largest rung (at most ``max_rung``) where any (and greedy)
        finished, best first."""
        last = len(self.rung_sizes()) - 1 if max_rung is None else min(max_rung, len(self.rung_sizes()) - 1)
        for rung in reversed(range(last + 1)):
            if not self.complete_at(greedy, rung):
                continue
            finished = [c for c in candidates if self.complete_at(c, rung)]
            if finished:
                rows = [self.measure(c, rung, greedy) for c in finished]
                rows.sort(key=lambda row: objective.rank_key(row["score"], row["violations"]))
                return rows, rung
        return [], -1


def _rounded(metrics: dict) -> dict:
    return {
        task: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()} for task, m in metrics.items()
    }


def tune(
    model,
    processor,
    head_map,
    *,
    methods: Sequence[str] = TUNABLE_METHODS,
    data: TuningData | None = None,
    out_dir: str | os.PathLike | None = None,
    state_path: str | os.PathLike | None = None,
    budget_minutes: float = 60.0,
    batch_size: int = 32,
    progress: bool = True,
    combine_methods: bool = True,
    weights_sha256_16: str | None = None,
    parallel=None,
    confirm_items: int = CONFIRM_ITEMS,
) -> TuneResult:
    """Choose each method's strength and layer band for ``model`` on a tuning split (see the module docstring).

    Args:
        model: the plain model (wrapped here, unwrapped at the end).
        processor: its processor.
        head_map: the model's calibrated :class:`~vlm_guard.calibration.head_map.HeadMap` (GIFT's l*, VAR's sink
            dimensions); its ``tuned`` section is replaced.
        methods: methods to tune (each with its grid, see :mod:`vlm_guard.tuning.space`).
        data: the tuning split (default: :func:`synthetic_tuning_data`, for the shipped default model).
        out_dir: folder to save the tuned head map, the tuning table and one PNG curve per method (None: not saved).
        state_path: JSON state for resuming (default ``<out_dir>/tune_state.json``; None without ``out_dir``).
        budget_minutes: time budget of the whole tuning, earlier runs of the same state included.
        batch_size: rows per ``generate`` call.
        progress: show a progress bar.
        combine_methods: also tune the combination of the methods that help.
        weights_sha256_16: digest of the weights (recorded; a shipped map is only used for the same weights).
        parallel: the :class:`~vlm_guard.parallel.DataParallel` context when several processes tune together (every
            rank calls this): each setting's pending items are dealt out by batches, every rank's results go into
            every rank's state (so all take the same decisions; the plan is rank 0's), and rank 0 writes the state
            and ``out_dir``. With a budget that does not run out, the result equals a one-process run's.
        confirm_items: items per task of the confirmation rung (see the module docstring); 0: no confirmation.

    Returns:
        a :class:`TuneResult`.
    """
    import copy

    from tqdm.auto import tqdm

    from vlm_guard.eval.runner import prepare_processor
    from vlm_guard.version import __version__
    from vlm_guard.wrapper import wrap

    methods = [m.strip().lower() for m in methods if m.strip()]
    unknown = [m for m in methods if m not in TUNABLE_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods {methods!r}: choose from {list(TUNABLE_METHODS)}")
    if head_map is None:
        raise ValueError(
            "tuning needs the model's head map (GIFT saliency layer, VAR sink dimensions): run "
            "`vlm-guard calibrate` first and pass it"
        )
    if budget_minutes <= 0:
        raise ValueError(f"budget_minutes={budget_minutes} must be > 0")
    if not isinstance(confirm_items, int) or isinstance(confirm_items, bool) or confirm_items < 0:
        raise ValueError(f"confirm_items={confirm_items!r} must be an int >= 0 (0: no confirmation rung)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if data is None:
        from vlm_guard.synthetic.worlds import world_for_model

        data = synthetic_tuning_data(world=world_for_model(model).name)
    head_map = copy.copy(head_map)
    head_map.tuned = {}
    if out_dir is not None and state_path is None:
        state_path = Path(out_dir) / "tune_state.json"
    identity = {
        "fingerprint_hash": head_map.fingerprint_hash,
        "weights_sha256_16": weights_sha256_16,
        "tuning_data": data.description,
        "methods": methods,
    }
    from vlm_guard.parallel import DataParallel

    parallel = parallel or DataParallel()
    state = TuningState(state_path if parallel.is_main else None, identity)
    if parallel.distributed:  # rank 0 read the state (and checked it): every rank starts from it
        state.data = parallel.broadcast(state.data)
        state.path, state.writer = (Path(state_path) if state_path else None), parallel.is_main
    prepare_processor(processor)
    guarded = wrap(model, processor, None, head_map)
    search = _Search(
        guarded, processor, data, state, budget_minutes * 60.0, batch_size, progress and parallel.is_main, parallel
    )
    greedy = Candidate({})
    num_layers = head_map.num_layers

    grids: dict[str, list[Candidate]] = {}
    skipped: dict[str, str] = {}
    for name in methods:
        grid = method_candidates(name, num_layers, head_map)
        guarded.set_config(grid[0].guard_config())
        if not guarded.interventions:
            skipped[name] = (
                "builds no intervention on this model (e.g. VAR without sink dimensions in the head map): "
                "not tuned, released defaults kept"
            )
            logger.warning("%s %s", name, skipped[name])
            continue
        grids[name] = grid
    table: list[dict] = []
    complete = True
    try:
        if state.data["plan"] is None:
            # measure greedy's cost on the smallest possible rung to size the plan
            probe = {name: min(max(MIN_ITEMS, batch_size), len(task.items)) for name, task in search.tasks.items()}
            state.data["plan"] = {"rungs": [probe]}
            seconds: dict[str, float] = {}
            for name in search.tasks:
                started = time.perf_counter()
                only = {task: (probe[task] if task == name else 0) for task in search.tasks}
                state.data["plan"] = {"rungs": [only]}
                search.evaluate(greedy, 0)
                seconds[name] = (time.perf_counter() - started) / max(1, probe[name])
            n_candidates = sum(len(grid) for grid in grids.values())
            n_combos = (2 ** len(grids) - len(grids) - 1) if combine_methods and len(grids) > 1 else 0
            state.data["plan"] = parallel.broadcast(search.make_plan(seconds, n_candidates, n_combos))  # one plan
            state.save(force=True)
        confirm_rung = search.add_confirmation(confirm_items)
        planned = _planned_items(search, grids, combine_methods)
        search.bar = tqdm(total=planned, desc="tune", unit="item", disable=not progress or not parallel.is_main)

        # stage 1: every method's grid, rung by rung across methods
        alive = {name: list(grid) for name, grid in grids.items()}
        for rung in range(RUNGS):
            search.evaluate(greedy, rung)
            for name in alive:
                for candidate in alive[name]:
                    search.evaluate(candidate, rung)
                rows = [search.measure(c, rung, greedy) for c in alive[name]]
                table.extend({"stage": name, **row} for row in rows)
                order = sorted(
                    range(len(rows)), key=lambda i: objective.rank_key(rows[i]["score"], rows[i]["violations"])
                )
                alive[name] = [alive[name][i] for i in order]
                if rung < RUNGS - 1:
                    alive[name] = alive[name][: max(1, math.ceil(len(alive[name]) / ETA))]
        # stage 2: combinations of the methods that help (on the halving rungs, also in a resumed run)
        best_single = _best_per_method(search, grids, greedy, max_rung=RUNGS - 1)
        winners = [name for name, (row, _) in best_single.items() if _helps(row)]
        combos = _combinations(winners, best_single, grids) if combine_methods else []
        if combos:
            search.halve(combos, 1, greedy, "combination", table)
        # stage 3: the winners measured again on the confirmation rung
        to_confirm = _to_confirm(search, grids, combos, greedy) if confirm_rung is not None else []
        if to_confirm:
            search.evaluate(greedy, confirm_rung)
            for candidate in to_confirm:
                search.evaluate(candidate, confirm_rung)
                table.append({"stage": "confirm", **search.measure(candidate, confirm_rung, greedy)})
    except BudgetExhausted:
        complete = False
        logger.warning("the tuning budget (%.0f min) ran out; choosing from the largest finished rung", budget_minutes)
    finally:
        if search.bar is not None:
            search.bar.close()
        search.flush()
        guarded.unwrap()

    tuned = _finish(
        search,
        grids,
        skipped,
        greedy,
        table,
        complete,
        combine_methods,
        data,
        budget_minutes,
        weights_sha256_16,
        __version__,
    )
    head_map.tuned = tuned
    if out_dir is not None and parallel.is_main:
        save_tuned(head_map, out_dir, search, grids, greedy)
    return TuneResult(head_map=head_map, tuned=tuned, table=tuned["table"], complete=complete)


def _to_confirm(search: _Search, grids: dict, combos: list[Candidate], greedy: Candidate) -> list[Candidate]:
    """Each method's best feasible setting on the halving rungs, then the best feasible combination (the same choice
    in a resumed run: only the halving rungs are read)."""
    chosen = []
    for candidates in [*grids.values(), combos]:
        if not candidates:
            continue
        rows, _ = search.ranked_at_best_rung(candidates, greedy, max_rung=RUNGS - 1)
        if rows and rows[0]["feasible"]:
            chosen.append(_candidate_of(rows[0], candidates))
    return chosen


def _helps(row: dict) -> bool:
    """A feasible setting whose score beats greedy's by at least :data:`objective.MIN_GAIN` points."""
    return bool(row["feasible"]) and row["score"] <= row["greedy_score"] - objective.MIN_GAIN


def _planned_items(search: _Search, grids: dict, combine_methods: bool) -> int:
    """Items the plan will generate (an estimate for the progress bar: the combinations are not known yet)."""
    sizes = search.rung_sizes()
    total, previous = 0, 0
    per_method = [len(g) for g in grids.values()]
    for rung_sizes in sizes[:RUNGS]:
        n = sum(rung_sizes.values())
        total += (n - previous) * (1 + sum(per_method))  # promoted settings only run the new items
        per_method = [max(1, math.ceil(k / ETA)) for k in per_method]
        previous = n
    if combine_methods and len(grids) > 1:
        total += sum(sizes[RUNGS - 1].values()) * 2
    if len(sizes) > RUNGS:  # confirmation: greedy, one setting per method and one combination on the new items
        total += (sum(sizes[RUNGS].values()) - sum(sizes[RUNGS - 1].values())) * (len(grids) + 2)
    return total


def _best_per_method(
    search: _Search, grids: dict, greedy: Candidate, max_rung: int | None = None
) -> dict[str, tuple[dict, int]]:
    best = {}
    for name, grid in grids.items():
        rows, rung = search.ranked_at_best_rung(grid, greedy, max_rung)
        if rows:
            best[name] = (rows[0], rung)
    return best


def _candidate_of(row: dict, grid: list[Candidate]) -> Candidate:
    key = json.dumps({name: row["methods"][name] for name in sorted(row["methods"])}, sort_keys=True)
    return next(c for c in grid if c.key == key)


def _combinations(winners: list[str], best_single: dict, grids: dict) -> list[Candidate]:
    chosen = {
        name: _candidate_of(best_single[name][0], grids[name])
        for name in best_single
        if best_single[name][0]["feasible"]
    }
    subsets = [list(s) for size in range(2, len(winners) + 1) for s in itertools.combinations(winners, size)]
    trio = [name for name in PAPER_TRIO if name in chosen]
    if len(trio) >= 2 and trio not in subsets:
        subsets.append(trio)
    return [combine([chosen[name] for name in subset]) for subset in subsets]


def _finish(
    search: _Search,
    grids: dict,
    skipped: dict,
    greedy: Candidate,
    table: list,
    complete: bool,
    combine_methods: bool,
    data: TuningData,
    budget_minutes: float,
    weights: str | None,
    version: str,
) -> dict:
    """The ``tuned`` section of the head map, from what was measured (also after a budget stop)."""
    settings, gain, chosen_rows = {}, {}, {}
    best_single = _best_per_method(search, grids, greedy)
    for name, (row, rung) in best_single.items():
        confirmed = rung >= RUNGS
        where = "the confirmation rung" if confirmed else f"rung {rung}"
        if row["feasible"]:  # the best setting that meets every constraint; else the released defaults stay
            settings[name] = dict(row["methods"][name])
        else:
            skipped[name] = (
                f"no setting met the constraints on the tuning data{' on ' + where if confirmed else ''} "
                f"(best: {row['label']}, {', '.join(row['violations'])}; n={row['n']}): released defaults kept"
            )
        helps = _helps(row)
        gain[name] = (
            f"{'yes' if helps else 'no'}: score {row['score']:.2f} vs greedy {row['greedy_score']:.2f}"
            f"{'' if row['feasible'] else ' (infeasible: ' + ', '.join(row['violations']) + ')'}"
            f" on {where} (n={row['n']})"
        )
        chosen_rows[name] = row
    for name in grids:
        if name not in best_single:
            skipped.setdefault(name, "the budget ran out before any setting finished its first rung: not tuned")
    # the default set: the best single method or combination that beats greedy at the largest rung it reached
    options: list[dict] = []
    for row, rung in best_single.values():
        options.append({**row, "rung": rung})
    combo_candidates = []
    winners = [n for n, (row, _) in best_single.items() if _helps(row)]
    if combine_methods:
        combo_candidates = _combinations(winners, best_single, grids)
        if combo_candidates:
            rows, rung = search.ranked_at_best_rung(combo_candidates, greedy)
            options.extend(rows)
    top_rung = max((row["rung"] for row in options), default=-1)
    good = [row for row in options if row["rung"] == top_rung and _helps(row)]
    good.sort(key=lambda row: (row["score"], len(row["methods"])))
    if good:  # the smallest set within MIN_GAIN of the best: a larger one must earn its extra methods
        best = good[0]["score"]
        good.sort(
            key=lambda row: (
                (len(row["methods"]), row["score"])
                if row["score"] <= best + objective.MIN_GAIN
                else (len(TUNABLE_METHODS) + 1, row["score"])
            )
        )
    default = sorted(good[0]["methods"], key=TUNABLE_METHODS.index) if good else []
    # the paper trio at tuned settings, for reports
    trio_row = None
    trio = [n for n in PAPER_TRIO if n in settings]
    for row in options:
        if sorted(row["methods"]) == sorted(trio) and len(trio) >= 2:
            trio_row = row
    return {
        "settings": settings,
        "gain": gain,
        "default_methods": default,
        "default_row": good[0] if good else None,
        "combination_rows": [row for row in options if len(row["methods"]) > 1],
        "paper_trio_row": trio_row,
        "skipped": skipped,
        "objective": {
            "text": objective.OBJECTIVE_TEXT,
            "max_recall_drop": objective.MAX_RECALL_DROP,
            "max_pope_drop": objective.MAX_POPE_DROP,
        },
        "search": {
            "kind": "successive halving",
            "eta": ETA,
            "rungs": search.rung_sizes() if search.state.data.get("plan") else [],
            "complete": complete,
            "budget_minutes": budget_minutes,
            "elapsed_s": round(search.elapsed(), 1),
            "plan": search.state.data.get("plan"),
        },
        "tuning_data": {"name": data.name, **data.description},
        "weights_sha256_16": weights,
        "library_version": version,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "table": table if table else _table_from_state(search, grids, greedy),
        "plots": {name: f"tune_{name}.png" for name in grids if any(row.get("stage") == name for row in table)},
    }


def _table_from_state(search: _Search, grids: dict, greedy: Candidate) -> list[dict]:
    """Rows of every finished (setting, rung) in the state (used when a resumed run measured nothing new)."""
    rows = []
    for name, grid in grids.items():
        for rung in range(len(search.rung_sizes())):
            if not search.complete_at(greedy, rung):
                continue
            rows.extend({"stage": name, **search.measure(c, rung, greedy)} for c in grid if search.complete_at(c, rung))
    return rows


def save_tuned(
    head_map,
    out_dir: str | os.PathLike,
    search: _Search | None = None,
    grids: dict | None = None,
    greedy: Candidate | None = None,
) -> Path:
    """Write the tuned head map, ``tuning.md`` (the table) and one PNG curve per method into ``out_dir``."""
    from vlm_guard.tuning.plots import plot_method_curves
    from vlm_guard.tuning.report import tuning_markdown

    out = Path(out_dir)
    head_map.save_pretrained(out)
    from vlm_guard.fileio import atomic_write_text

    atomic_write_text(out / "tuning.md", tuning_markdown(head_map.tuned))
    try:
        plot_method_curves(head_map.tuned, out)
    except Exception as error:  # a plot is a nicety; the settings are saved already
        logger.warning("could not draw the tuning curves: %s", error)
    return out


__all__ = [
    "ETA",
    "RUNGS",
    "TuningData",
    "TuningState",
    "TuneResult",
    "BudgetExhausted",
    "synthetic_tuning_data",
    "file_tuning_data",
    "tune",
    "save_tuned",
]
