"""Run a model (plain or guarded) over benchmark items: batched greedy generation, one record per finished
item, resumable, with a summary that records what produced the numbers.

The pieces, each usable alone:

- :func:`load_model`: the shipped default model, or any checkpoint through ``AutoModelForImageTextToText``;
- :func:`chat_prompt`: one image + one text turn through the processor's chat template;
- :func:`generate_answers`: one left-padded batch through ``model.generate`` (greedy unless told otherwise);
- :func:`run_items`: all items of a task into a :class:`~vlm_guard.eval.records.ResultsWriter`, skipping the
  ones already done and the images that cannot be read (counted, not fatal);
- :func:`run_benchmark`: several method sets on the same items, one results file and summary per method set,
  and a comparison (bootstrap intervals, paired differences against greedy) written as JSON and markdown.

Records are plain JSON: ``id``, ``task`` (e.g. ``"pope/random"``, ``"chair"``), the item's fields (label,
object, image...), ``prompt``, ``answer`` and the task's score fields (``prediction`` for POPE; the CHAIR
counts for captions).

Example (not run: loads a model and generates for minutes)::

    from vlm_guard.eval.runner import load_model, run_benchmark
    from vlm_guard.eval.tasks import synthetic_tasks
    model, processor, name = load_model()
    tasks = synthetic_tasks(n_questions=500, n_captions=500)
    run_benchmark(model, processor, tasks, ["none", "vhr"], "runs/syn.jsonl")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_guard.eval.following import MAX_UNCLEAR_SHARE
from vlm_guard.eval.images import ImageLoader, ImageSource
from vlm_guard.eval.pope import parse_pope_answer
from vlm_guard.eval.records import ResultsWriter, part_path, part_paths, read_records, write_summary
from vlm_guard.parallel import DataParallel

logger = logging.getLogger(__name__)

TASK_KINDS = ("pope", "chair")
RECORD_KEYS = ("id", "task", "prompt", "answer")
"""Keys every record holds (a records file whose lines lack one is refused on resume with a one-line error)."""
SCORE_KEYS = {"pope": ("label",), "chair": ("n_hallucinated", "n_mentions", "n_recalled", "n_gt_objects", "n_words")}
"""Keys the metrics of each task kind read from a record."""

Scorer = Callable[["EvalItem", str], dict]
"""``scorer(item, answer) -> dict`` of score fields merged into the item's record."""


@dataclass
class EvalItem:
    """One question or caption request.

    Attributes:
        item_id: Unique id within its results file (e.g. ``"pope/random/42"``).
        prompt: The user text of the chat turn (the image comes first).
        image: Path (relative to the loader's root), PIL image, or callable returning one.
        image_name: Name used when the image cannot be read (reported in the summary).
        fields: JSON-ready fields copied into the record (label, object, image id, ground truth...).
    """

    item_id: str
    prompt: str
    image: ImageSource
    image_name: str
    fields: dict = field(default_factory=dict)


@dataclass
class EvalTask:
    """A group of items scored the same way.

    Attributes:
        name: ``"pope/<split>"`` or ``"chair"`` (the record's ``task`` and the metric group name).
        kind: ``"pope"`` or ``"chair"``.
        items: The items, in run order.
        scorer: ``scorer(item, answer) -> dict`` merged into the record.
        max_new_tokens: Generation budget of this task.
    """

    name: str
    kind: str
    items: list[EvalItem]
    scorer: Scorer
    max_new_tokens: int

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"EvalTask.kind must be one of {TASK_KINDS}, got {self.kind!r}.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"EvalTask.max_new_tokens must be a positive int, got {self.max_new_tokens!r}.")
        ids = [item.item_id for item in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task {self.name!r} has duplicate item ids; every item needs its own id.")


def pope_scorer(item: EvalItem, answer: str) -> dict:
    """POPE score fields: the parsed ``prediction`` (``"yes"``/``"no"``) and ``correct``."""
    prediction = parse_pope_answer(answer)
    return {"prediction": prediction, "correct": prediction == item.fields.get("label")}


# ---------------------------------------------------------------------------------------------- model loading
def load_model(
    model_id: str | os.PathLike | None = None,
    *,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    allow_pickle: bool = False,
) -> tuple[Any, Any, str]:
    """The model to evaluate, its processor and its name for reports (:func:`vlm_guard.models.loading.load_model`,
    the loader of every command, and :func:`~vlm_guard.models.loading.model_label`).

    Args:
        model_id: A Hugging Face hub id or a local folder; None loads the shipped default model
            (:func:`vlm_guard.load_default`). Nothing is downloaded unless the id is a hub id that is not in the
            local cache and the network allows it.
        trust_remote_code: Allow the checkpoint's own code (off unless asked for).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``.
        device: Torch device.
        allow_pickle: Read a checkpoint that has only pickle weights (off: safetensors only, see
            :mod:`vlm_guard.models.loading`).

    Returns:
        ``(model, processor, name)``: the model in eval mode, its processor with left padding, and a name for
        reports (the id or a description of the default model).
    """
    from vlm_guard.models.loading import load_model as load
    from vlm_guard.models.loading import model_label

    model, processor = load(
        model_id, device=device, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    return model, processor, model_label(model_id)


def prepare_processor(processor: Any) -> Any:
    """Left padding and a pad token for batched generation (:func:`vlm_guard.models.loading.prepare_processor`)."""
    from vlm_guard.models.loading import prepare_processor as prepare

    return prepare(processor)


def chat_prompt(processor: Any, text: str) -> str:
    """The generation prompt for one image followed by ``text``, through the processor's chat template; a
    ``ValueError`` when the processor has none (:func:`vlm_guard.models.loading.chat_prompt`).

    Example:
        >>> from vlm_guard.synthetic.model import build_processor
        >>> processor = build_processor()                              # the 3.6M test fixture's processor
        >>> chat_prompt(processor, "describe the image")
        'USER: <image> describe the image ASSISTANT:'
    """
    from vlm_guard.models.loading import chat_prompt as build

    return build(processor, text)


def generate_answers(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    max_new_tokens: int,
    **generation_kwargs: Any,
) -> list[str]:
    """Answers for one batch (``images[i]`` with ``prompts[i]``), greedy unless ``generation_kwargs`` say otherwise.

    Args:
        model: A model or :class:`~vlm_guard.wrapper.GuardedModel`.
        processor: Its processor (left padding; see :func:`prepare_processor`).
        images: PIL images, one per prompt.
        prompts: Full prompts from :func:`chat_prompt`.
        max_new_tokens: Generation budget.
        generation_kwargs: Passed to ``generate`` (default ``do_sample=False, num_beams=1``).

    Returns:
        The decoded new text of each row, stripped.
    """
    import torch

    from vlm_guard.models.loading import encode_prompts

    inputs = encode_prompts(processor, list(images), list(prompts))  # one image list per row (SmolVLM needs it)
    if "token_type_ids" in inputs and not _accepts(model, "token_type_ids"):
        inputs.pop("token_type_ids")  # some tokenizers return it; generate rejects unused model kwargs
    device = getattr(model, "device", None)
    if device is not None:
        inputs = inputs.to(device)
    dtype = getattr(model, "dtype", None)
    if "pixel_values" in inputs and dtype is not None and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    kwargs = {"do_sample": False, "num_beams": 1, **generation_kwargs, "max_new_tokens": max_new_tokens}
    if kwargs.get("pad_token_id") is None and processor.tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = processor.tokenizer.pad_token_id
    with torch.no_grad():
        output = model.generate(**inputs, **kwargs)  # [batch, prompt + new]
    new_tokens = output[:, inputs["input_ids"].shape[1] :]  # [batch, new]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _accepts(model: Any, name: str) -> bool:
    """Whether the (unwrapped) model's forward takes the argument ``name`` (Gemma 3 takes token_type_ids)."""
    import inspect

    from vlm_guard.wrapper import GuardedModel

    base = model.model if isinstance(model, GuardedModel) else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return True


# ---------------------------------------------------------------------------------------------- running items
@dataclass
class RunStats:
    """What :func:`run_items` did.

    Attributes:
        n_items: Items in the task.
        n_done_before: Items already in the results file (skipped).
        n_written: Records written by this call.
        n_skipped: Items whose image could not be read (not written; retried by a rerun).
        elapsed_s: Wall time of this call.
        generate_s: Time inside ``generate``.
    """

    n_items: int = 0
    n_done_before: int = 0
    n_written: int = 0
    n_skipped: int = 0
    elapsed_s: float = 0.0
    generate_s: float = 0.0


def run_items(
    model: Any,
    processor: Any,
    task: EvalTask,
    writer: ResultsWriter,
    loader: ImageLoader,
    *,
    batch_size: int = 8,
    progress: bool = True,
    record_extra: Mapping[str, Any] | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
) -> RunStats:
    """Generate and score every item of ``task`` not yet in ``writer``; one record per item, written at once.

    Args:
        model: A model or guarded model.
        processor: Its processor (left padding).
        task: The items, scorer and generation budget.
        writer: The results file (``id_key="id"``); items in ``writer.done_ids()`` are skipped.
        loader: Image loader; unreadable images skip their items (counted in the returned stats).
        batch_size: Rows per ``generate`` call.
        progress: Show a tqdm bar.
        record_extra: Fields added to every record (e.g. ``{"methods": "vhr"}``).
        generation_kwargs: Extra ``generate`` arguments (greedy by default).

    Returns:
        A :class:`RunStats`.
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    started = time.perf_counter()
    done = writer.done_ids()
    pending = [item for item in task.items if item.item_id not in done]
    stats = RunStats(n_items=len(task.items), n_done_before=len(task.items) - len(pending))
    if stats.n_done_before:
        logger.info("%s: %d of %d items already done", task.name, stats.n_done_before, stats.n_items)
    bar = tqdm(total=len(pending), desc=task.name, disable=not progress or not pending, unit="item", leave=False)
    try:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            images, prompts, ready = [], [], []
            for item in batch:
                image = loader.load(item.image, name=item.image_name)
                if image is None:
                    stats.n_skipped += 1
                    continue
                images.append(image)
                prompts.append(chat_prompt(processor, item.prompt))
                ready.append(item)
            if ready:
                generate_started = time.perf_counter()
                answers = generate_answers(
                    model, processor, images, prompts, task.max_new_tokens, **dict(generation_kwargs or {})
                )
                seconds = time.perf_counter() - generate_started
                stats.generate_s += seconds
                for item, answer in zip(ready, answers):
                    record = {
                        "id": item.item_id,
                        "task": task.name,
                        **item.fields,
                        "prompt": item.prompt,
                        "answer": answer,
                    }
                    record.update(task.scorer(item, answer))
                    record["seconds"] = round(seconds / len(ready), 4)
                    if record_extra:
                        record.update(record_extra)
                    writer.write(record)
                    stats.n_written += 1
            bar.update(len(batch))
    finally:
        bar.close()
        stats.elapsed_s = time.perf_counter() - started
    return stats


# ---------------------------------------------------------------------------------------------- method sets
TUNED_SUFFIX = "@tuned"
"""A method set written ``vhr@tuned`` runs with the head map's tuned settings (``vlm-guard tune``); without the
suffix a set runs at the released defaults, whatever the head map holds."""


def method_label(methods: str) -> str:
    """File-safe label of a method set: ``"none"``, ``"vhr"``, ``"vhr+var"``, ``"all"``, ``"vhr+pai@tuned"``.

    Example:
        >>> method_label(" VHR, var "), method_label(""), method_label("vhr,pai@tuned")
        ('vhr+var', 'none', 'vhr+pai@tuned')
    """
    text = methods.strip().lower()
    tuned = text.endswith(TUNED_SUFFIX)
    if tuned:
        text = text[: -len(TUNED_SUFFIX)]
    names = [name.strip() for name in text.replace("+", ",").split(",") if name.strip()]
    if not names or names in (["none"], ["off"], ["greedy"]):
        return "none"
    return "+".join(names) + (TUNED_SUFFIX if tuned else "")


def method_display_name(label: str) -> str:
    """Table name of a method set: ``"greedy"`` for none, ``"VHR+VAR+GIFT"`` for all, else upper-case; a tuned
    set gets `` tuned`` (``"VHR tuned"``)."""
    if label.endswith(TUNED_SUFFIX):
        return method_display_name(label[: -len(TUNED_SUFFIX)]) + " tuned"
    if label == "none":
        return "greedy"
    if label == "all":
        from vlm_guard.config import ALL_METHODS

        return "+".join(name.upper() for name in ALL_METHODS)
    return label.upper()


def parse_compare(text: str) -> list[str]:
    """Method sets from ``--compare "none;vhr;var,gift;all"``, greedy (``"none"``) first.

    Greedy is added when missing: every other set is compared against it.

    Example:
        >>> parse_compare("vhr;none;all")
        ['none', 'vhr', 'all']
    """
    labels: list[str] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        label = method_label(part)
        if label not in labels:
            labels.append(label)
    if not labels:
        raise ValueError(f"--compare names no method set: {text!r}; e.g. 'none;vhr;var;gift;all;pai;vcd'.")
    if "none" in labels:
        labels.remove("none")
    return ["none", *labels]


def guard_config_for(label: str):
    """The :class:`~vlm_guard.config.GuardConfig` of a method-set label: released defaults, set explicitly so that a
    head map's tuned settings do not change them; for ``...@tuned`` the fields are left unset, so the wrapper fills
    them from the head map's tuned settings."""
    from vlm_guard.config import GuardConfig

    if label.endswith(TUNED_SUFFIX):
        return GuardConfig.from_methods(label[: -len(TUNED_SUFFIX)].replace("+", ","))
    config = GuardConfig.from_methods("none" if label == "none" else label.replace("+", ","))
    return GuardConfig(
        **{name: type(getattr(config, name))(**getattr(config, name).to_dict()) for name in config.enabled_methods}
    )  # every field explicit: the released values


def results_paths(out: str | os.PathLike, label: str | None) -> tuple[Path, Path]:
    """``(records, summary)`` paths: ``<out>`` and ``<out stem>.summary.json`` for a single run;
    ``<out stem>.<label>.jsonl`` and ``<out stem>.<label>.summary.json`` for one method set of a comparison.

    Example:
        >>> [p.name for p in results_paths("runs/syn.jsonl", "vhr")]
        ['syn.vhr.jsonl', 'syn.vhr.summary.json']
    """
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    if label is None:
        return out, stem.with_name(stem.name + ".summary.json")
    return stem.with_name(f"{stem.name}.{label}.jsonl"), stem.with_name(f"{stem.name}.{label}.summary.json")


def comparison_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``(summary json, markdown table)`` of a comparison: ``<out stem>.summary.json`` and ``<out stem>.md``."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    return stem.with_name(stem.name + ".summary.json"), stem.with_name(stem.name + ".md")


@dataclass
class MethodRun:
    """One method set's results: its label, config, active interventions, records per task and run stats."""

    label: str
    guard_config: dict
    active_methods: list[str]
    inactive_methods: list[str]
    records: dict[str, list[dict]]
    stats: dict[str, RunStats]
    records_path: Path
    skipped_images: dict[str, str]
    summary_path: Path | None = None
    metrics: dict = field(default_factory=dict)
    record_method_code: dict = field(default_factory=dict)


def run_method_set(
    guarded: Any,
    processor: Any,
    tasks: Sequence[EvalTask],
    label: str,
    records_path: Path,
    loader: ImageLoader,
    *,
    batch_size: int = 8,
    progress: bool = True,
    config: Any = None,
    code: str | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
    parallel: DataParallel | None = None,
) -> MethodRun:
    """Run every task with one method set (``guarded.set_config``) into one results file.

    With ``parallel`` (a :class:`~vlm_guard.parallel.DataParallel` of several processes, every rank calls this) the
    items not yet done are shared out by batches (:func:`~vlm_guard.parallel.shard_batches`); each rank writes its
    own resumable part file (:func:`~vlm_guard.eval.records.part_path`), and rank 0 merges the parts into
    ``records_path`` in the order a one-process run writes (task by task, item by item). Part files left by an
    interrupted run, with any number of processes, are merged before anything runs, so a resume with any number of
    processes (one included) neither repeats nor loses an item. Only rank 0's return value holds the records.

    ``code`` (e.g. :func:`code_digest`'s ``sha256_16``) is stored in every new record, so a file resumed after the
    method code changed shows it (see ``record_method_code`` in the summary).

    With ``fingerprint_extra`` (a dict, possibly empty) the results file carries the run's fingerprint
    (:func:`run_fingerprint` plus these fields) in its first line: resuming a file written with another fingerprint
    raises :class:`~vlm_guard.eval.records.RunMismatchError` naming the fields that differ, and a second process
    writing the same file at once gets :class:`~vlm_guard.eval.records.FileBusyError`.
    """
    explicit = config is not None  # e.g. `eval --settings`: the values are given, the head map's tuning not needed
    config = config if explicit else guard_config_for(label)
    if label.endswith(TUNED_SUFFIX) and not explicit:
        from vlm_guard.settings import tuned_settings

        tuned = tuned_settings(guarded.head_map, getattr(guarded, "task", None))
        if not getattr(guarded.head_map, "tuned", None):
            raise ValueError(
                f"method set {label!r} asks for tuned settings, but the head map has none; run "
                "`vlm-guard tune` and pass the tuned head map (--head-map DIR)"
            )
        untuned = [name for name in config.enabled_methods if name not in tuned]
        if untuned:
            logger.warning(
                "method set %r: the head map has no tuned settings for %s; they run at released defaults",
                label,
                untuned,
            )
    guarded.set_config(config)
    # the values that run (a head map's tuned settings filled in), not the request
    fingerprint = (
        run_fingerprint(guarded, processor, label, guarded.guard_config, tasks, code=code, extra=fingerprint_extra)
        if fingerprint_extra is not None
        else None
    )
    active = [intervention.name for intervention in guarded.interventions]
    inactive = [name for name in config.enabled_methods if name not in active]
    if inactive:
        logger.warning(
            "method set %r: %s built no intervention on this model (switched off; see the warnings above); "
            "its rows measure the plain model for those methods.",
            label,
            inactive,
        )
    parallel = parallel or DataParallel()
    record_extra = {"methods": label, **({"method_code": code} if code else {})}
    stats: dict[str, RunStats] = {}
    records: dict[str, list[dict]] = {}
    writer = None
    try:
        done: frozenset | None = None
        merged = 0
        if parallel.is_main:
            writer = ResultsWriter(records_path, id_key="id", fingerprint=fingerprint, required_keys=RECORD_KEYS)
            # the parts an interrupted data-parallel run left (any number of processes) join the file first
            merged = writer.merge_parts(part_paths(records_path))
            if merged:
                logger.info("%s: %d records merged from the part files of an interrupted run", records_path, merged)
            _check_done_records(writer, tasks)
            done = writer.done_ids()
        if parallel.distributed:
            done = parallel.broadcast(done)
            stats = _run_shard(
                guarded,
                processor,
                tasks,
                records_path,
                loader,
                parallel,
                done,
                fingerprint,
                batch_size=batch_size,
                progress=progress,
                record_extra=record_extra,
            )
            if not parallel.is_main:
                return MethodRun(
                    label=label,
                    guard_config=guarded.guard_config.to_dict(),
                    active_methods=active,
                    inactive_methods=inactive,
                    records={},
                    stats=stats,
                    records_path=records_path,
                    skipped_images=dict(loader.skipped),
                )
            writer.merge_parts(part_paths(records_path))
        else:
            for task in tasks:
                stats[task.name] = run_items(
                    guarded,
                    processor,
                    task,
                    writer,
                    loader,
                    batch_size=batch_size,
                    progress=progress,
                    record_extra=record_extra,
                )
                logger.info("%s %s: %s", label, task.name, stats[task.name])
        if parallel.distributed or merged:
            writer.reorder(_item_order(tasks))  # the order a one-process run writes: task by task, item by item
    finally:
        if writer is not None:
            writer.close()
    wanted = {task.name: {item.item_id for item in task.items} for task in tasks}
    counted: set[tuple[str, Any]] = set()
    duplicates = 0
    for record in read_records(records_path):
        task_name = record.get("task")
        if task_name in wanted and record.get("id") in wanted[task_name]:
            key = (task_name, record["id"])
            if key in counted:  # a merged or doubly written file: every item counts once (the first record)
                duplicates += 1
                continue
            counted.add(key)
            records.setdefault(task_name, []).append(record)
    if duplicates:
        logger.warning("%s: %d duplicate records ignored (each item counts once).", records_path, duplicates)
    return MethodRun(
        label=label,
        guard_config=guarded.guard_config.to_dict(),  # the values that ran (tuned ones filled in)
        active_methods=active,
        inactive_methods=inactive,
        records=records,
        stats=stats,
        records_path=records_path,
        skipped_images=dict(loader.skipped),
    )


def _item_order(tasks: Sequence[EvalTask]) -> Callable[[dict], int]:
    """Sort key of records: position of the item among ``tasks``; records of other items (an earlier, larger
    ``--limit``) go after them, in file order (the sort is stable)."""
    pairs = [(task.name, item.item_id) for task in tasks for item in task.items]
    position = {pair: index for index, pair in enumerate(pairs)}
    return lambda record: position.get((record.get("task"), record.get("id")), len(pairs))


def _run_shard(
    guarded: Any,
    processor: Any,
    tasks: Sequence[EvalTask],
    records_path: Path,
    loader: ImageLoader,
    parallel: DataParallel,
    done: frozenset,
    fingerprint: Mapping[str, Any] | None,
    *,
    batch_size: int,
    progress: bool,
    record_extra: Mapping[str, Any],
) -> dict[str, RunStats]:
    """This rank's share of the pending items into its part file; the stats (and unreadable images) of all ranks.

    Called by every rank; returns after every rank has finished its share (the gather waits for the slowest).
    """
    from vlm_guard.parallel import shard_batches

    stats: dict[str, RunStats] = {}
    with ResultsWriter(
        part_path(records_path, parallel.rank, parallel.world_size),
        id_key="id",
        fingerprint=fingerprint,
        required_keys=RECORD_KEYS,
    ) as part:
        for task in tasks:
            pending = [item for item in task.items if item.item_id not in done]
            share = EvalTask(
                task.name,
                task.kind,
                shard_batches(pending, batch_size, parallel.rank, parallel.world_size),
                task.scorer,
                task.max_new_tokens,
            )
            stats[task.name] = run_items(
                guarded,
                processor,
                share,
                part,
                loader,
                batch_size=batch_size,
                progress=progress and parallel.is_main,
                record_extra=record_extra,
            )
            logger.info("rank %d %s: %s", parallel.rank, task.name, stats[task.name])
    everyone = parallel.gather((stats, dict(loader.skipped)))
    for _, skipped in everyone:
        for name, reason in skipped.items():
            loader.skipped.setdefault(name, reason)
    total: dict[str, RunStats] = {}
    for task in tasks:
        shares = [rank_stats[task.name] for rank_stats, _ in everyone]
        total[task.name] = RunStats(
            n_items=len(task.items),
            n_done_before=sum(1 for item in task.items if item.item_id in done),
            n_written=sum(share.n_written for share in shares),
            n_skipped=sum(share.n_skipped for share in shares),
            elapsed_s=max(share.elapsed_s for share in shares),
            generate_s=sum(share.generate_s for share in shares),
        )
    return total


def run_benchmark(
    model: Any,
    processor: Any,
    tasks: Sequence[EvalTask],
    method_sets: Sequence[str],
    out: str | os.PathLike,
    *,
    loader: ImageLoader | None = None,
    head_map: Any = None,
    batch_size: int = 8,
    seed: int = 0,
    n_resamples: int = 1000,
    progress: bool = True,
    run_config: Mapping[str, Any] | None = None,
    compare: bool | None = None,
    configs: Mapping[str, Any] | None = None,
    fingerprint_extra: Mapping[str, Any] | None = None,
    parallel: DataParallel | None = None,
    max_unclear: float = MAX_UNCLEAR_SHARE,
    prompt_fixes: Mapping[str, str] | None = None,
) -> dict:
    """Run ``tasks`` with each method set, write records and summaries, and compare against greedy.

    Args:
        model: The plain model (wrapped here once; method sets switch with ``set_config``).
        processor: Its processor.
        tasks: The tasks (same items for every method set).
        method_sets: Labels from :func:`method_label` / :func:`parse_compare`; with more than one, ``"none"``
            must come first (the baseline).
        out: Results path (``.jsonl``); see :func:`results_paths` and :func:`comparison_paths`.
        loader: Image loader (default: paths relative to the working directory).
        head_map: A :class:`~vlm_guard.calibration.head_map.HeadMap` (None: the cached one, if any).
        batch_size: Rows per ``generate`` call.
        seed: Bootstrap seed (recorded in every summary).
        n_resamples: Bootstrap resamples.
        progress: Show tqdm bars.
        run_config: Run settings recorded in the summaries (model, prompts, sizes...); ``method_code``
            (:func:`code_digest`, taken once every method module is imported) is added.
        compare: Write the comparison files (default: when there is more than one method set).
        configs: Optional label -> GuardConfig overriding the default hyper-parameters of a method set.
        fingerprint_extra: Fields that identify the data and prompts (benchmark, world seed, prompt templates...)
            added to each records file's run fingerprint (see :func:`run_fingerprint`); every records file gets a
            fingerprint whether or not this is given.
        parallel: The data-parallel context when several processes run this (every rank calls it, see
            :func:`run_method_set`); rank 0 writes the records files, summaries and comparison.
        max_unclear: The prompt-following check (:mod:`vlm_guard.eval.following`): a task where more than this
            share of outputs does not answer the prompt is marked ``followed_prompt: False`` in the summaries, its
            table cells say so instead of showing numbers, and one warning naming the share, examples and the fix
            is logged. 1 turns the check off. Recorded in the summaries' config (not in the records' fingerprint).
        prompt_fixes: Task kind (``"pope"``, ``"chair"``) -> the remedy the warning names (default: a generic one).

    Returns:
        The comparison dict (also written): per method set, its metrics and paired differences against greedy,
        and ``prompt_not_followed``: one ``{"methods", "task", "unclear_share", "message"}`` per task whose prompt
        was not followed (empty when every prompt was followed). On ranks other than 0:
        ``{"method_sets": [], "rank": rank}`` (they write nothing).
    """
    from vlm_guard.eval.following import not_followed_message
    from vlm_guard.eval.report import comparison_markdown, followed_prompt, method_metrics, paired_vs_baseline
    from vlm_guard.wrapper import wrap

    method_sets = list(method_sets)
    if not method_sets:
        raise ValueError("method_sets is empty; pass at least one, e.g. ['none'].")
    compare = len(method_sets) > 1 if compare is None else compare
    if compare and method_sets[0] != "none":
        raise ValueError(f"a comparison needs greedy ('none') first as its baseline, got {method_sets}.")
    loader = loader or ImageLoader()
    prepare_processor(processor)
    # the head map's task profile for "@tuned" rows: yes/no questions only -> "answer", else "caption"
    profile = "answer" if tasks and all(task.kind == "pope" for task in tasks) else "caption"
    guarded = wrap(model, processor, None, head_map, task=profile)
    for label in method_sets:
        guard_config_for(label)  # imports every method module now, so the digest below is of the code that runs
    run_config = {**dict(run_config or {}), "method_code": code_digest(), "max_unclear": max_unclear}
    runs: list[MethodRun] = []
    not_followed: list[dict] = []
    try:
        for label in method_sets:
            records_path, summary_path = results_paths(out, label if compare else None)
            config = (configs or {}).get(label)
            code = run_config["method_code"]["sha256_16"]
            run = run_method_set(
                guarded,
                processor,
                tasks,
                label,
                records_path,
                loader,
                batch_size=batch_size,
                progress=progress,
                config=config,
                code=code,
                fingerprint_extra=dict(fingerprint_extra or {}),
                parallel=parallel,
            )
            if parallel is not None and not parallel.is_main:
                continue
            run.summary_path = summary_path
            metrics = method_metrics(run.records, tasks, seed=seed, n_resamples=n_resamples, max_unclear=max_unclear)
            for task in tasks:
                if not followed_prompt(metrics[task.name]):
                    baseline = runs[0].metrics.get(task.name, {}) if compare and runs else {}
                    message = not_followed_message(
                        task.name,
                        metrics[task.name],
                        methods=label,
                        fix=(prompt_fixes or {}).get(task.kind),
                        baseline_followed=followed_prompt(baseline),
                    )
                    logger.warning("%s", message)
                    not_followed.append(
                        {
                            "methods": label,
                            "task": task.name,
                            "unclear_share": metrics[task.name]["unclear_share"],
                            "message": message,
                        }
                    )
            if compare and runs:
                metrics["vs_greedy"] = paired_vs_baseline(
                    run.records, runs[0].records, tasks, seed=seed, n_resamples=n_resamples
                )
            n_scored = sum(len(records) for records in run.records.values())
            run_extra = _run_extra(run, tasks)
            run.record_method_code = run_extra["record_method_code"]
            write_summary(
                summary_path,
                {
                    "guard_config": run.guard_config,
                    "methods": label,
                    **run_config,
                    "batch_size": batch_size,
                    "n_resamples": n_resamples,
                    "head_map": _head_map_name(guarded.head_map),
                },
                metrics,
                seed=seed,
                n=n_scored,
                extra=run_extra,
            )
            logger.info("wrote %s and %s", records_path, summary_path)
            run.metrics = metrics
            runs.append(run)
    finally:
        guarded.unwrap()
    if parallel is not None and not parallel.is_main:
        return {"method_sets": [], "rank": parallel.rank}
    result = {
        "method_sets": [
            {
                "label": run.label,
                "name": method_display_name(run.label),
                "guard_config": run.guard_config,
                "active_methods": run.active_methods,
                "inactive_methods": run.inactive_methods,
                "records": str(run.records_path),
                "summary": str(run.summary_path),
                "record_method_code": run.record_method_code,
                "metrics": run.metrics,
            }
            for run in runs
        ],
        "tasks": {task.name: len(task.items) for task in tasks},
        "prompt_not_followed": not_followed,
    }
    if compare:
        summary_path, markdown_path = comparison_paths(out)
        n_scored = sum(len(records) for records in runs[0].records.values())
        written = write_summary(
            summary_path,
            {
                **run_config,
                "batch_size": batch_size,
                "n_resamples": n_resamples,
                "method_sets": [run.label for run in runs],
                "head_map": _head_map_name(guarded.head_map),
            },
            {run.label: run.metrics for run in runs},
            seed=seed,
            n=n_scored,
            extra={"comparison": result, "skipped_images": len(loader.skipped)},
        )
        markdown = comparison_markdown(written, title=run_config.get("title"))
        from vlm_guard.fileio import atomic_write_text

        atomic_write_text(markdown_path, markdown)
        result["markdown"] = markdown
        result["markdown_path"] = str(markdown_path)
        result["summary_path"] = str(summary_path)
    else:
        from vlm_guard.eval.report import single_markdown

        result["markdown"] = single_markdown(runs[0].metrics, title=run_config.get("title"))
        result["summary_path"] = str(runs[0].summary_path)
    return result


def _flatten(prefix: str, value: Any, into: dict) -> dict:
    if isinstance(value, Mapping) and value:
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}", inner, into)
    else:
        into[prefix] = value
    return into


def _sha16(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


def head_map_digest(head_map: Any) -> str | None:
    """16 hex digits of a head map's content (JSON and tensors), or None without a map.

    The ``tuned`` section (``vlm-guard tune``) is left out: the values it contributes are in the run's resolved
    ``guard_config``, so rows pinned to released values keep their records when the same map gains tuned settings.
    """
    if head_map is None:
        return None
    import json

    import numpy as np

    content = {key: value for key, value in head_map.to_json().items() if key != "tuned"}
    parts = [json.dumps(content, sort_keys=True, default=str).encode()]
    for name, tensor in sorted(head_map._tensors().items()):
        parts += [name.encode(), np.ascontiguousarray(tensor.numpy()).tobytes()]
    return _sha16(b"\0".join(parts))


def run_fingerprint(
    guarded: Any,
    processor: Any,
    label: str,
    config: Any,
    tasks: Sequence[EvalTask],
    *,
    code: str | None = None,
    extra: Mapping[str, Any] | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
) -> dict:
    """What must not change while one results file is written, as flat ``field -> value``.

    Fields: ``model.*`` (class, config and weights digests of :func:`vlm_guard.models.fingerprint.model_fingerprint`,
    and the weights dtype), ``methods`` and ``guard_config.*`` (every hyper-parameter), ``head_map`` (a digest of
    the map in use), ``generation.*`` (greedy settings and each task's ``max_new_tokens``), ``prompts.chat_template``
    (a digest of the processor's template), ``code.method_code`` (:func:`code_digest`) and ``code.vlm_guard_version``,
    plus ``extra`` under ``data.*`` (benchmark, world seed, prompt templates...). The batch size is left out (it
    does not change greedy answers beyond float noise, and a resume may need a smaller one); the item list is left
    out too (a larger ``--limit`` extends a file), but each finished item's stored prompt must equal its prompt now.

    Example:
        >>> import vlm_guard
        >>> from vlm_guard.defaults import load_fixture
        >>> from vlm_guard.eval.tasks import synthetic_tasks
        >>> model, processor = load_fixture()                          # the 3.6M test fixture
        >>> config = vlm_guard.GuardConfig.from_methods("vhr")
        >>> guarded = vlm_guard.wrap(model, processor, config)
        >>> tasks = synthetic_tasks(n_questions=2, n_captions=0)
        >>> run_fingerprint(guarded, processor, "vhr", config, tasks)["guard_config.vhr.alpha"]
        2.0
    """
    from vlm_guard.models.fingerprint import model_fingerprint
    from vlm_guard.version import __version__

    model = getattr(guarded, "model", guarded)
    identity = model_fingerprint(model)
    fingerprint: dict[str, Any] = {
        "model.class": identity["model_class"],
        "model.config_digest": identity["config_digest"],
        "model.weights_digest": identity["weights_digest"],
        "model.dtype": identity["weights_dtype"],
        "methods": label,
        "head_map": head_map_digest(getattr(guarded, "head_map", None)),
        "generation.do_sample": False,
        "generation.num_beams": 1,
        "prompts.chat_template": _sha16(str(getattr(processor, "chat_template", None) or "").encode()),
        "code.method_code": code,
        "code.vlm_guard_version": __version__,
    }
    guard = {key: value for key, value in config.to_dict().items() if "version" not in key}
    _flatten("guard_config", guard, fingerprint)
    for task in tasks:
        fingerprint[f"generation.max_new_tokens.{task.name}"] = task.max_new_tokens
    for key, value in dict(generation_kwargs or {}).items():
        fingerprint[f"generation.{key}"] = value
    for key, value in dict(extra or {}).items():
        _flatten(f"data.{key}", value, fingerprint)
    return fingerprint


def _check_done_records(writer: ResultsWriter, tasks: Sequence[EvalTask]) -> None:
    """Refuse a resume from a records file whose records were edited or damaged, with a one-line error naming the
    file, the line and the field.

    Every record must hold a string or integer ``id``, name one of this run's tasks in ``task`` (the one its item
    belongs to, when the item is one of this run's), and hold a string ``prompt`` and ``answer`` and valid score
    fields (:data:`SCORE_KEYS`: a yes/no POPE ``label``, non-negative CHAIR counts). A finished item's prompt must
    equal its prompt now. Items are skipped as done by id, so a record that passed as done but dropped out of the
    metrics (an edited ``task``) would silently shrink them: it is refused here instead.
    """
    from vlm_guard.eval.records import RunMismatchError

    if not len(writer):
        return
    items = {(task.name, item.item_id): (task, item) for task in tasks for item in task.items}
    task_of_id = {item.item_id: task.name for task in tasks for item in task.items}
    kinds = {task.name: task.kind for task in tasks}
    fix = "the file was edited or written by another tool: fix or delete that line, or pass another --out."
    for line, record in writer.numbered_records():
        where = f"{writer.path}:{line}"
        item_id = record.get("id")
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
            raise ValueError(f"{where}: field 'id' is {item_id!r}, not a string or an integer; {fix}")
        task_name = record.get("task")
        if not isinstance(task_name, str) or task_name not in kinds:
            raise ValueError(
                f"{where}: record {item_id!r} has field 'task' {task_name!r}, not a task of this run "
                f"({', '.join(kinds)}); {fix}"
            )
        owner = task_of_id.get(item_id)
        if owner is not None and owner != task_name:
            raise ValueError(
                f"{where}: record {item_id!r} has field 'task' {task_name!r}, but item {item_id!r} belongs "
                f"to {owner!r}; {fix}"
            )
        for key in ("prompt", "answer"):
            if not isinstance(record.get(key), str):
                raise ValueError(
                    f"{where}: record {item_id!r} has field {key!r} {record.get(key)!r}, not a string; {fix}"
                )
        _check_score_fields(record, kinds[task_name], where, fix)
        found = items.get((task_name, item_id))
        if found is None:
            continue  # an item of an earlier, larger --limit: kept, not scored
        task, item = found
        if record.get("prompt") != item.prompt:
            raise RunMismatchError(
                f"{where}: item {item.item_id!r} was asked with the prompt {record.get('prompt')!r}, now "
                f"{item.prompt!r}; pass another --out, or rerun with the same prompt settings."
            )


def _check_score_fields(record: Mapping[str, Any], kind: str, where: str, fix: str) -> None:
    """The fields the ``kind`` metrics read: present and of the right type and range."""
    item_id = record.get("id")
    missing = [key for key in SCORE_KEYS.get(kind, ()) if key not in record]
    if missing:
        raise ValueError(
            f"{where}: the record of item {item_id!r} lacks {missing}, which the {kind} metrics read; {fix}"
        )
    if kind == "pope":
        label = record["label"]
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise ValueError(f"{where}: record {item_id!r} has field 'label' {label!r}, not 'yes' or 'no'; {fix}")
    elif kind == "chair":
        for key in SCORE_KEYS["chair"]:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{where}: record {item_id!r} has field {key!r} {value!r}, not a non-negative integer; {fix}"
                )
        for part, whole in (("n_hallucinated", "n_mentions"), ("n_recalled", "n_gt_objects")):
            if record[part] > record[whole]:
                raise ValueError(
                    f"{where}: record {item_id!r} has field {part!r} {record[part]} larger than {whole!r} "
                    f"{record[whole]}; {fix}"
                )


METHOD_CODE = ("core/*.py", "methods/*.py", "methods/*/*.py", "models/*.py", "wrapper.py", "config.py", "settings.py")
"""The sources whose digest every result record carries (:func:`code_digest`), relative to the package."""


def code_digest() -> dict:
    """SHA-256 (first 16 hex digits) over the source of the parts that change generated text (:data:`METHOD_CODE`:
    the engine ``core/``, every method folder ``methods/``, the model adapters ``models/``, ``wrapper.py``,
    ``config.py``, ``settings.py``), with the number of files: two runs with the same digest ran the same method code,
    even between releases.
    """
    import hashlib

    package = Path(__file__).resolve().parent.parent
    files = sorted(path for pattern in METHOD_CODE for path in package.glob(pattern))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return {"sha256_16": digest.hexdigest()[:16], "files": len(files)}


def weights_digest(model_dir: str | os.PathLike, max_bytes: int = 2 << 30) -> str | None:
    """SHA-256 (first 16 hex digits) of a local model folder's ``*.safetensors`` files, or None (not a folder, no
    safetensors, or more than ``max_bytes``): tells which weights produced a result file."""
    import hashlib

    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files or sum(path.stat().st_size for path in files) > max_bytes:
        return None
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _head_map_name(head_map: Any) -> dict | None:
    if head_map is None:
        return None
    return {
        "fingerprint_hash": getattr(head_map, "fingerprint_hash", None),
        "sink_dims": list(getattr(head_map, "sink_dims", []) or []),
        "gift_saliency_layer": getattr(head_map, "gift_saliency_layer", None),
    }


def _run_extra(run: MethodRun, tasks: Sequence[EvalTask]) -> dict:
    from collections import Counter

    codes = Counter(record.get("method_code") for records in run.records.values() for record in records)
    if len(codes) > 1:
        logger.warning(
            "%s: records were generated by %d different versions of the method code: %s; delete the "
            "file and rerun for numbers from one version.",
            run.records_path,
            len(codes),
            dict(codes),
        )
    return {
        "record_method_code": {str(key): value for key, value in codes.items()},
        "active_methods": run.active_methods,
        "inactive_methods": run.inactive_methods,
        "skipped_images": len(run.skipped_images),
        "skipped": dict(list(sorted(run.skipped_images.items()))[:50]),
        "tasks": {
            task.name: {
                "items": len(task.items),
                "scored": len(run.records.get(task.name, [])),
                "done_before": run.stats[task.name].n_done_before,
                "written": run.stats[task.name].n_written,
                "skipped": run.stats[task.name].n_skipped,
                "generate_s": round(run.stats[task.name].generate_s, 2),
            }
            for task in tasks
        },
    }


__all__ = [
    "EvalItem",
    "EvalTask",
    "RunStats",
    "MethodRun",
    "pope_scorer",
    "load_model",
    "prepare_processor",
    "chat_prompt",
    "generate_answers",
    "run_items",
    "run_method_set",
    "run_benchmark",
    "method_label",
    "method_display_name",
    "TUNED_SUFFIX",
    "parse_compare",
    "guard_config_for",
    "results_paths",
    "comparison_paths",
    "code_digest",
    "weights_digest",
    "run_fingerprint",
    "head_map_digest",
    "RECORD_KEYS",
]
