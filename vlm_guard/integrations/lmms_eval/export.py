"""Data folders for lmms-eval: POPE and CHAIR items in local files, with the task configs that read them.

A folder written here holds::

    images/                              the images (the synthetic scenes as PNG; absent for COCO: --images is used)
    pope/coco_pope_{random,popular,adversarial}.json   official POPE layout (question_id, image, text, label)
    chair/chair.jsonl                    image_id, image, gt_objects, vocabulary (one caption request per line)
    vlm_guard_pope_{random,popular,adversarial}.yaml, vlm_guard_pope.yaml (the group), vlm_guard_chair.yaml
    export.json                          what was exported, and the `vlm-guard eval` command of the same items

Run it with ``lmms-eval --model vlm_guard --include_path FOLDER --tasks vlm_guard_pope,vlm_guard_chair``. The task
configs are the shipped templates (``templates/*.yaml``, whose functions live in
:mod:`vlm_guard.integrations.lmms_eval.tasks`) plus each folder's data file, image folder (an absolute path:
export again after moving the images), prompts and generation budget. Every file is written atomically.

- :func:`export_synthetic`: the synthetic benchmark's held-out items (``vlm-guard eval synthetic``'s, same world,
  seed, questions, scenes, prompts and token budgets), so the default model runs offline through lmms-eval;
- :func:`export_pope`: official POPE question files (e.g. COCO's) and their image folder;
- :func:`export_coco_chair`: ``vlm-guard eval chair``'s image draw from COCO annotation files.

Example (not run: renders and writes 400 images)::

    export_synthetic("runs/lmms_synthetic", n_questions=300, n_captions=100)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_GROUP = "vlm_guard_pope"
CHAIR_TASK = "vlm_guard_chair"
MANIFEST = "export.json"
GREEDY = {"temperature": 0, "do_sample": False, "num_beams": 1, "until": []}
"""Generation settings of every exported task besides ``max_new_tokens``: greedy, as ``vlm-guard eval``; no stop
strings (lmms-eval would otherwise stop at a blank line)."""

_TEMPLATE_KEYS = ("task", "dataset_kwargs", "generation_kwargs", "lmms_eval_specific_kwargs")
"""Keys each folder adds to a template (the templates leave them out)."""


def pope_task_name(split: str) -> str:
    """``vlm_guard_pope_<split>``."""
    return f"{POPE_GROUP}_{split}"


def template_text(kind: str) -> str:
    """The shipped task template ``templates/<kind>.yaml`` (``pope`` or ``chair``)."""
    if kind not in ("pope", "chair"):
        raise ValueError(f"no task template {kind!r}; templates are 'pope' and 'chair'.")
    text = resources.files("vlm_guard.integrations.lmms_eval").joinpath("templates", f"{kind}.yaml").read_text("utf-8")
    for key in _TEMPLATE_KEYS:
        if any(line.startswith(f"{key}:") for line in text.splitlines()):
            raise ValueError(
                f"template {kind}.yaml sets {key!r}, which each export writes; remove it from the template."
            )
    return text


def _task_yaml(
    kind: str, task: str, data_file: str, image_root: Path, max_new_tokens: int, specific: Mapping[str, Any]
) -> str:
    import yaml

    added = {
        "task": task,
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "generation_kwargs": {"max_new_tokens": int(max_new_tokens), **GREEDY},
        "lmms_eval_specific_kwargs": {"default": {"image_root": str(image_root), **specific}},
    }
    return (
        template_text(kind)
        + "\n# written by `vlm-guard export-lmms` for this folder\n"
        + yaml.safe_dump(added, sort_keys=False, allow_unicode=True)
    )


def _write_text(path: Path, text: str) -> None:
    from vlm_guard.fileio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_pope_tasks(
    out: str | Path,
    splits: Sequence[str],
    image_root: str | Path,
    max_new_tokens: int = 16,
    prompt_suffix: str = "",
    pre_prompt: str = "",
) -> list[str]:
    """The POPE task configs of ``out`` (one per split, reading ``pope/coco_pope_<split>.json``) and their group.

    Returns:
        The task names, the group first.
    """
    out = Path(out)
    names = []
    for split in splits:
        name = pope_task_name(split)
        _write_text(
            out / f"{name}.yaml",
            _task_yaml(
                "pope",
                name,
                f"pope/coco_pope_{split}.json",
                Path(image_root).resolve(),
                max_new_tokens,
                {"pre_prompt": pre_prompt, "post_prompt": prompt_suffix},
            ),
        )
        names.append(name)
    group = "".join(f"  - {name}\n" for name in names)
    _write_text(
        out / f"{POPE_GROUP}.yaml",
        f"# the POPE splits of this folder (`vlm-guard export-lmms`)\ngroup: {POPE_GROUP}\ntask:\n{group}",
    )
    return [POPE_GROUP, *names]


def write_chair_task(out: str | Path, image_root: str | Path, prompt: str, max_new_tokens: int) -> str:
    """The CHAIR task config of ``out`` (reading ``chair/chair.jsonl``); returns its name."""
    out = Path(out)
    _write_text(
        out / f"{CHAIR_TASK}.yaml",
        _task_yaml(
            "chair", CHAIR_TASK, "chair/chair.jsonl", Path(image_root).resolve(), max_new_tokens, {"prompt": prompt}
        ),
    )
    return CHAIR_TASK


def _write_manifest(out: Path, manifest: Mapping[str, Any], name: str = MANIFEST) -> None:
    from vlm_guard.fileio import atomic_write_json

    atomic_write_json(out / name, dict(manifest), indent=2)


def _remove_stale(out: Path, kept_tasks: Sequence[str]) -> None:
    """Delete the task configs and data files an earlier synthetic export wrote that this one does not."""
    candidates = {pope_task_name(split): out / "pope" / f"coco_pope_{split}.json" for split in POPE_SPLITS}
    candidates[CHAIR_TASK] = out / "chair" / "chair.jsonl"
    candidates[POPE_GROUP] = None
    for task, data in candidates.items():
        if task in kept_tasks:
            continue
        for path in (out / f"{task}.yaml", data):
            if path is not None and path.is_file():
                path.unlink()
                logger.info("removed %s (not part of this export)", path)


def _check_counts(n_questions: int, n_captions: int) -> None:
    for flag, value in (("n_questions", n_questions), ("n_captions", n_captions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{flag} must be a whole number >= 0, got {value!r}.")
    if n_questions == 0 and n_captions == 0:
        raise ValueError("nothing to export: n_questions and n_captions are both 0.")


def export_synthetic(
    out: str | Path,
    n_questions: int = 300,
    n_captions: int = 100,
    *,
    world: Any = None,
    world_seed: int | None = None,
    biased: bool = False,
    splits: Sequence[str] = POPE_SPLITS,
    pope_max_new_tokens: int | None = None,
    chair_max_new_tokens: int | None = None,
) -> dict:
    """Write the synthetic benchmark's items (``vlm-guard eval synthetic``'s) as a POPE/CHAIR folder for lmms-eval.

    Args:
        out: The folder (created; files of an earlier export are replaced).
        n_questions: Questions per POPE split (0: no POPE tasks).
        n_captions: Scenes to caption (0: no CHAIR task).
        world: ``"everyday"``, ``"shapes"`` or None (the default model's world, as ``vlm-guard eval synthetic``).
        world_seed: Default :data:`vlm_guard.eval.synthetic.EVAL_SEED` (the held-out, reported seed).
        biased: Training-like biased scenes instead of unbiased ones.
        splits: POPE splits to write.
        pope_max_new_tokens, chair_max_new_tokens: Generation budgets (default: ``vlm-guard eval synthetic``'s, 4 and
            the world's caption budget).

    Returns:
        The manifest written to ``export.json`` (tasks, counts, prompts, and ``vlm_guard_eval_command``: the
        ``vlm-guard eval synthetic`` command that runs the same items).
    """
    from vlm_guard.eval.synthetic import EVAL_SEED, SPLITS
    from vlm_guard.eval.tasks import DEFAULT_MAX_NEW_TOKENS, synthetic_tasks
    from vlm_guard.fileio import atomic_path
    from vlm_guard.synthetic.worlds import world_for_model_argument, world_kind

    _check_counts(n_questions, n_captions)
    bad = [split for split in splits if split not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be among {list(SPLITS)}, got {list(splits)}.")
    kind = world_for_model_argument(None) if world is None else world_kind(world)
    seed = EVAL_SEED if world_seed is None else int(world_seed)
    pope_tokens = pope_max_new_tokens or DEFAULT_MAX_NEW_TOKENS["synthetic_pope"]
    chair_tokens = chair_max_new_tokens or kind.caption_tokens
    kinds = [name for name, count in (("pope", n_questions), ("chair", n_captions)) if count]
    tasks = synthetic_tasks(
        n_questions,
        n_captions,
        world_seed=seed,
        bias=biased,
        pope_max_new_tokens=pope_tokens,
        chair_max_new_tokens=chair_tokens,
        kinds=kinds,
        splits=list(splits),
        world=kind,
    )
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    written: set[int] = set()

    def image_file(scene_index: int, render) -> str:
        name = f"scene_{scene_index:06d}.png"
        if scene_index not in written:
            with atomic_path(images / name) as temporary:
                render().save(temporary, format="PNG")  # lossless: the pixels `vlm-guard eval synthetic` feeds
            written.add(scene_index)
        return name

    task_names: list[str] = []
    pope_splits = []
    for task in tasks:
        if task.kind == "pope":
            split = task.name.split("/", 1)[1]
            rows = [
                {
                    "question_id": position + 1,
                    "image": image_file(item.fields["scene"], item.image),
                    "text": item.prompt,
                    "label": item.fields["label"],
                }
                for position, item in enumerate(task.items)
            ]
            _write_text(out / "pope" / f"coco_pope_{split}.json", _jsonl(rows))
            pope_splits.append(split)
        else:
            rows = [
                {
                    "image_id": item.item_id,
                    "image": image_file(item.fields["scene"], item.image),
                    "gt_objects": list(item.fields["gt_objects"]),
                    "vocabulary": kind.name,
                }
                for item in task.items
            ]
            _write_text(out / "chair" / "chair.jsonl", _jsonl(rows))
    if pope_splits:
        task_names += write_pope_tasks(out, pope_splits, images, pope_tokens)
    if n_captions:
        task_names.append(write_chair_task(out, images, kind.caption_prompt, chair_tokens))
    command = (
        f"vlm-guard eval synthetic --world {kind.name} --world-seed {seed} --n-questions {n_questions} "
        f"--n-captions {n_captions} --tasks {','.join(kinds)}"
        f"{' --biased' if biased else ''} --out RESULTS.jsonl"
    )
    manifest = {
        "format": "vlm_guard.lmms_eval_export/1",
        "source": "synthetic",
        "world": kind.name,
        "world_seed": seed,
        "biased": biased,
        "n_questions_per_split": n_questions if pope_splits else 0,
        "splits": pope_splits,
        "n_captions": n_captions,
        "n_images": len(written),
        "prompts": {"pope": kind.pope_template, "chair": kind.caption_prompt},
        "max_new_tokens": {"pope": pope_tokens, "chair": chair_tokens},
        "tasks": task_names,
        "vlm_guard_eval_command": command,
    }
    _remove_stale(out, task_names)
    _write_manifest(out, manifest)
    logger.info("exported %s to %s", ", ".join(task_names), out)
    return manifest


def export_pope(
    out: str | Path,
    question_files: Sequence[str | Path],
    images: str | Path,
    *,
    prompt_suffix: str = "",
    max_new_tokens: int | None = None,
    limit: int | None = None,
) -> dict:
    """Official POPE question files (e.g. ``coco_pope_random.json``) and their image folder as lmms-eval tasks.

    The files are copied (checked by :func:`vlm_guard.eval.pope.load_pope_questions`; with ``limit`` only the
    first ``limit`` questions); the images stay where they are.
    """
    from vlm_guard.eval.pope import load_pope_questions, pope_split_from_path
    from vlm_guard.eval.tasks import DEFAULT_MAX_NEW_TOKENS

    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images} is not a folder; pass the folder holding the questions' images.")
    out = Path(out)
    by_split: dict[str, Path] = {}
    for path in question_files:
        split = pope_split_from_path(path)
        if split is None:
            raise ValueError(f"{path}: the split is read from the file name (e.g. coco_pope_random.json); rename it.")
        if split in by_split:
            raise ValueError(f"{by_split[split]} and {path} are both the {split} split; pass one file per split.")
        by_split[split] = Path(path)
    counts = {}
    for split, path in by_split.items():
        questions = load_pope_questions(path)[: limit if limit is not None else None]
        rows = [{"question_id": q.question_id, "image": q.image, "text": q.text, "label": q.label} for q in questions]
        _write_text(out / "pope" / f"coco_pope_{split}.json", _jsonl(rows))
        counts[split] = len(rows)
    tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS["pope"]
    splits = [split for split in POPE_SPLITS if split in by_split]
    tasks = write_pope_tasks(out, splits, images, tokens, prompt_suffix=prompt_suffix)
    manifest = {
        "format": "vlm_guard.lmms_eval_export/1",
        "source": "pope",
        "question_files": {split: str(path) for split, path in by_split.items()},
        "images": str(images.resolve()),
        "questions": counts,
        "prompt_suffix": prompt_suffix,
        "max_new_tokens": {"pope": tokens},
        "tasks": tasks,
    }
    _write_manifest(out, manifest, "export_pope.json")
    return manifest


def export_coco_chair(
    out: str | Path,
    images: str | Path,
    instances: str | Path,
    captions: str | Path,
    *,
    n_images: int = 500,
    seed: int = 0,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
) -> dict:
    """``vlm-guard eval chair``'s items (``n_images`` val2014 images drawn with ``seed``) with their ground-truth
    COCO objects, as the CHAIR task of ``out``."""
    from vlm_guard.eval.chair import ChairGroundTruth
    from vlm_guard.eval.tasks import DEFAULT_CHAIR_PROMPT, DEFAULT_MAX_NEW_TOKENS, chair_task

    prompt = prompt or DEFAULT_CHAIR_PROMPT
    tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS["chair"]
    task = chair_task(str(images), str(instances), str(captions), n_images, seed, prompt, max_new_tokens=tokens)
    ground_truth = ChairGroundTruth.from_coco(
        instances, captions, image_ids=[item.fields["image_id"] for item in task.items]
    )
    rows = [
        {
            "image_id": item.fields["image_id"],
            "image": item.image_name,
            "gt_objects": sorted(ground_truth.objects_for(item.fields["image_id"])),
            "vocabulary": "coco",
        }
        for item in task.items
    ]
    out = Path(out)
    _write_text(out / "chair" / "chair.jsonl", _jsonl(rows))
    name = write_chair_task(out, images, prompt, tokens)
    manifest = {
        "format": "vlm_guard.lmms_eval_export/1",
        "source": "coco_chair",
        "images": str(Path(images).resolve()),
        "instances": str(instances),
        "captions": str(captions),
        "n_images": len(rows),
        "seed": seed,
        "prompt": prompt,
        "max_new_tokens": {"chair": tokens},
        "tasks": [name],
    }
    _write_manifest(out, manifest, "export_chair.json")
    return manifest
