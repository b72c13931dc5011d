"""The benchmark tasks of ``vlm-guard eval`` (also used by tuning and the lmms-eval export): official POPE question
files, CHAIR on COCO val2014, and the synthetic POPE splits and captions, each as
:class:`~vlm_guard.eval.runner.EvalTask` objects. Importing this module is light (the runner and the worlds are
imported when a task is built).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_CHAIR_PROMPT = "Please describe this image in detail."
DEFAULT_MAX_NEW_TOKENS = {"pope": 16, "chair": 512, "synthetic_pope": 4, "synthetic_chair": None}  # None: the world's


def pope_tasks(
    question_files,
    image_root_name: str = "",
    limit: int | None = None,
    max_new_tokens: int = 16,
    prompt_suffix: str = "",
):
    """One :class:`~vlm_guard.eval.runner.EvalTask` per official question file."""
    from vlm_guard.eval.pope import load_pope_questions, pope_split_from_path
    from vlm_guard.eval.runner import EvalItem, EvalTask, pope_scorer

    tasks = []
    for path in question_files:
        split = pope_split_from_path(path) or Path(path).stem
        questions = load_pope_questions(path)[: limit if limit is not None else None]
        items = [
            EvalItem(
                item_id=f"{split}/{question.question_id}",
                prompt=question.text + prompt_suffix,
                image=question.image,
                image_name=question.image,
                fields={
                    "question_id": question.question_id,
                    "split": split,
                    "image": question.image,
                    "label": question.label,
                    "object": question.object_name,
                },
            )
            for question in questions
        ]
        name = f"pope/{split}"
        if any(task.name == name for task in tasks):
            raise ValueError(f"two question files map to split {split!r}; pass one file per split.")
        tasks.append(EvalTask(name=name, kind="pope", items=items, scorer=pope_scorer, max_new_tokens=max_new_tokens))
    return tasks


def chair_task(
    images_dir: str,
    instances: str,
    captions: str,
    n_images: int,
    seed: int,
    prompt: str,
    max_new_tokens: int = 512,
    limit: int | None = None,
):
    """The CHAIR task: ``n_images`` val2014 images drawn with ``seed`` among those in the instances file that are
    also in ``images_dir`` (the usual 500-image setup)."""
    import json

    from vlm_guard.eval.chair import ChairGroundTruth, coco_image_id
    from vlm_guard.eval.runner import EvalItem, EvalTask

    with open(instances, encoding="utf-8") as handle:
        image_entries = json.load(handle).get("images", [])
    names = {int(entry["id"]): entry["file_name"] for entry in image_entries if "id" in entry and "file_name" in entry}
    if not names:
        raise ValueError(
            f"{instances} lists no images ('images' with 'id' and 'file_name'); is it a COCO instances file?"
        )
    folder = Path(images_dir)
    available = sorted(image_id for image_id, name in names.items() if (folder / name).exists())
    if not available:
        raise ValueError(
            f"none of the {len(names)} images of {instances} is in {images_dir}; is it the val2014 folder?"
        )
    count = min(n_images, len(available))
    if count < n_images:
        logger.warning("only %d of the requested %d images are available; using all of them", count, n_images)
    chosen = sorted(random.Random(seed).sample(available, count))
    if limit is not None:
        chosen = chosen[:limit]
    ground_truth = ChairGroundTruth.from_coco(instances, captions, image_ids=chosen)

    def scorer(item, answer):
        scored = ground_truth.score_caption(item.fields["image_id"], answer)
        scored.pop("caption", None)
        scored.pop("image_id", None)
        return scored

    items = [
        EvalItem(
            item_id=str(image_id),
            prompt=prompt,
            image=names[image_id],
            image_name=names[image_id],
            fields={"image_id": coco_image_id(image_id), "image": names[image_id]},
        )
        for image_id in chosen
    ]
    return EvalTask(name="chair", kind="chair", items=items, scorer=scorer, max_new_tokens=max_new_tokens)


def synthetic_tasks(
    n_questions: int = 500,
    n_captions: int = 500,
    world_seed: int | None = None,
    bias: bool = False,
    pope_max_new_tokens: int = 4,
    chair_max_new_tokens: int | None = None,
    kinds=("pope", "chair"),
    splits=None,
    image_size: int | None = None,
    world=None,
):
    """The synthetic POPE splits and CHAIR-style task (see :mod:`vlm_guard.eval.synthetic`) of ``world``
    (``"everyday"``, ``"shapes"``, a :class:`~vlm_guard.synthetic.worlds.WorldKind`, or ``None`` for the default
    model's); ``chair_max_new_tokens``
    defaults to the world's caption budget."""
    from vlm_guard.eval.runner import EvalItem, EvalTask, pope_scorer
    from vlm_guard.eval.synthetic import (
        EVAL_SEED,
        SPLITS,
        caption_items,
        pope_questions,
        score_synthetic_caption,
        synthetic_world,
    )
    from vlm_guard.synthetic.worlds import world_kind

    kind = world_kind(world)
    seed = EVAL_SEED if world_seed is None else world_seed
    scenes = synthetic_world(seed, bias, kind)
    chair_max_new_tokens = chair_max_new_tokens or kind.caption_tokens

    def image_of(index: int):
        return lambda: kind.render(scenes.scene(index), image_size)

    tasks = []
    if "pope" in kinds:
        for split in splits or SPLITS:
            items = [
                EvalItem(
                    item_id=question.question_id,
                    prompt=question.text,
                    image=image_of(question.scene_index),
                    image_name=f"scene/{question.scene_index:06d}",
                    fields={
                        "split": split,
                        "scene": question.scene_index,
                        "object": question.object,
                        "label": question.label,
                        "kind": question.kind,
                    },
                )
                for question in pope_questions(split, n_questions, seed=seed, bias=bias, world=kind)
            ]
            tasks.append(EvalTask(f"pope/{split}", "pope", items, pope_scorer, pope_max_new_tokens))
    if "chair" in kinds:

        def scorer(item, answer):
            return score_synthetic_caption(answer, item.fields["gt_objects"], kind)

        items = [
            EvalItem(
                item_id=entry.image_id,
                prompt=kind.caption_prompt,
                image=image_of(entry.scene_index),
                image_name=entry.image_id,
                fields={"scene": entry.scene_index, "gt_objects": list(entry.gt_objects)},
            )
            for entry in caption_items(n_captions, seed=seed, bias=bias, world=kind)
        ]
        tasks.append(EvalTask("chair", "chair", items, scorer, chair_max_new_tokens))
    return tasks


__all__ = ["DEFAULT_CHAIR_PROMPT", "DEFAULT_MAX_NEW_TOKENS", "pope_tasks", "chair_task", "synthetic_tasks"]
