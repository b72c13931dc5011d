"""Train the toy LLaVA from scratch on CPU, in four stages (LLaVA recipe plus vision pretraining).

1. ``vision``: the CLIP vision tower learns to read the grid (per-cell type/colour/size heads,
   a stand-in for a pretrained CLIP encoder; the heads are discarded).
2. ``lm``: the Llama decoder learns the world's text (chat-formatted captions, no image), so the
   co-occurrence prior of the biased world lives in the language model.
3. ``align``: only the projector trains, on image captions (LLaVA stage 1).
4. ``finetune``: projector + decoder train on captions and yes/no questions (LLaVA stage 2);
   the vision tower stays frozen unless ``finetune_vision_lr`` > 0.
5. ``qa``: a short question-heavy finetune with a per-row loss (a one-word answer weighs as much as a
   caption), without which yes/no answers stay near chance at this budget.

The defaults reproduce the shipped model (about 45 CPU-minutes on one busy core).

Training scenes come from the *biased* world (partners together with ``pair_prob``). Every batch is
a pure function of (seed, stage, step), so a run is deterministic and resumes exactly: checkpoints
hold the weights and optimizer moments as safetensors and the counters as JSON (no pickle).

Example:
    >>> config = TrainConfig(out_dir="runs/toy")
    >>> train(config)          # or: python -m toyworld toy train --out runs/toy
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from toyworld.shapes.data import IGNORE_INDEX, BatchBuilder, cell_labels
from vlm_guard.fileio import atomic_save_safetensors, atomic_write_json
from vlm_guard.synthetic.model import ToyModelSpec, build_model, build_processor
from vlm_guard.synthetic.world import COLOURS, GRID, OBJECT_TYPES, SIZES, World

logger = logging.getLogger(__name__)

STAGES = ("vision", "lm", "align", "finetune", "qa")
CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as ``train_config.json`` in the run folder)."""

    out_dir: str = field(default="runs/toy", metadata={"help": "run folder (checkpoints, final model)"})
    seed: int = field(default=0, metadata={"help": "seed for init and data"})
    spec: ToyModelSpec = field(default_factory=ToyModelSpec, metadata={"help": "model sizes"})
    pair_prob: float = field(default=0.97, metadata={"help": "co-occurrence of partners in training scenes"})
    vision_steps: int = field(default=200, metadata={"help": "stage 1 steps"})
    lm_steps: int = field(default=500, metadata={"help": "stage 2 steps"})
    align_steps: int = field(default=100, metadata={"help": "stage 3 steps"})
    finetune_steps: int = field(default=1200, metadata={"help": "stage 4 steps"})
    qa_steps: int = field(default=300, metadata={"help": "stage 5 steps: question-heavy finetune, per-row loss"})
    qa_question_fraction: float = field(default=0.75, metadata={"help": "share of yes/no rows in stage 5"})
    vision_batch: int = 64
    lm_batch: int = 64
    lm_turns: int = field(default=1, metadata={"help": "captions packed per LM-pretraining sequence"})
    multimodal_batch: int = 32
    vision_lr: float = 2e-3
    lm_lr: float = 1e-3
    align_lr: float = 1e-3
    finetune_lr: float = 5e-4
    finetune_vision_lr: float = field(default=0.0, metadata={"help": "0 keeps the vision tower frozen"})
    question_fraction: float = field(default=0.5, metadata={"help": "share of yes/no rows in multimodal stages"})
    warmup_steps: int = 50
    weight_decay: float = 0.01
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})

    def __post_init__(self):
        if isinstance(self.spec, dict):
            self.spec = ToyModelSpec(**self.spec)
        for name in ("vision_steps", "lm_steps", "align_steps", "finetune_steps", "qa_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.question_fraction <= 1:
            raise ValueError(f"question_fraction must lie in [0, 1], got {self.question_fraction}")

    def steps(self, stage: str) -> int:
        return getattr(self, f"{stage}_steps")

    def to_dict(self) -> dict:
        return asdict(self)


TINY_SPEC = ToyModelSpec(
    vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64
)


class CellHeads(nn.Module):
    """Per-cell classifiers on pooled patch features (vision pretraining only; not shipped)."""

    def __init__(self, hidden: int, patches_per_side: int):
        super().__init__()
        if patches_per_side % GRID:
            raise ValueError(f"patches per side ({patches_per_side}) must be a multiple of the grid ({GRID})")
        self.patches_per_side = patches_per_side
        self.type_head = nn.Linear(hidden, len(OBJECT_TYPES) + 1)
        self.colour_head = nn.Linear(hidden, len(COLOURS))
        self.size_head = nn.Linear(hidden, len(SIZES))

    def forward(self, patch_features: torch.Tensor) -> dict[str, torch.Tensor]:
        # patch_features: [batch, patches, hidden]
        batch, _, hidden = patch_features.shape
        per = self.patches_per_side // GRID
        grid = patch_features.view(batch, GRID, per, GRID, per, hidden).mean(dim=(2, 4))  # [batch, GRID, GRID, hidden]
        cells = grid.reshape(batch, GRID * GRID, hidden)
        return {"type": self.type_head(cells), "colour": self.colour_head(cells), "size": self.size_head(cells)}


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch features exactly as LLaVA feeds them to the projector (CLS dropped). [batch, patches, hidden]"""
    layer = model.config.vision_feature_layer
    outputs = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return outputs.hidden_states[layer][:, 1:]


def _trainable(model, heads: CellHeads, stage: str, config: TrainConfig) -> list[dict]:
    for p in list(model.parameters()) + list(heads.parameters()):
        p.requires_grad_(False)
    vision = list(model.model.vision_tower.parameters())
    projector = list(model.model.multi_modal_projector.parameters())
    text = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    if stage == "vision":
        groups = [{"params": vision + list(heads.parameters()), "lr": config.vision_lr}]
    elif stage == "lm":
        groups = [{"params": text, "lr": config.lm_lr}]
    elif stage == "align":
        groups = [{"params": projector, "lr": config.align_lr}]
    elif stage == "qa":
        groups = [{"params": projector + text, "lr": config.finetune_lr * 0.5}]
    else:
        groups = [{"params": projector + text, "lr": config.finetune_lr}]
        if config.finetune_vision_lr > 0:
            groups.append({"params": vision, "lr": config.finetune_vision_lr})
    for group in groups:
        group["base_lr"] = group["lr"]
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- checkpoints: safetensors for tensors, JSON for the rest -------------------------------------------------


def _save_checkpoint(path: Path, model, heads, optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    from vlm_guard.fileio import atomic_folder

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(path) as tmp:  # a kill or error while saving keeps the previous checkpoint
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(tmp / "cell_heads.safetensors"))
        _finish_checkpoint(tmp, optimizer, state)


def _finish_checkpoint(tmp: Path, optimizer, state: dict) -> None:
    """Write the optimizer (safetensors) and ``state`` (JSON) into the checkpoint's temporary folder ``tmp``
    (:func:`vlm_guard.fileio.atomic_folder` swaps it in)."""
    from safetensors.torch import save_file

    opt_state = optimizer.state_dict()
    tensors = {}
    for index, slots in opt_state["state"].items():
        for key, value in slots.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).contiguous()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1))


RESUME_REMEDY = (
    "the run folder is damaged or was edited: restore it from a copy, or start a new --out (or delete the folder)"
)


def read_train_config(path: Path) -> TrainConfig:
    """The run's ``train_config.json``, checked (one-line :class:`vlm_guard.schema.FileSchemaError` naming the field)."""
    from vlm_guard.schema import load_dataclass

    return load_dataclass(path, TrainConfig, RESUME_REMEDY)


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json`` (``path`` is the checkpoint folder), checked against its schema."""
    from vlm_guard.schema import check_train_state, read_json

    file = path / "state.json"
    return check_train_state(file, read_json(file, RESUME_REMEDY), STAGES, RESUME_REMEDY, optimizer=True)


def _load_checkpoint(path: Path, model, heads) -> dict:
    from safetensors.torch import load_file

    state = read_state(path)  # before the tensors: a damaged state refuses without loading anything
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    heads.load_state_dict(load_file(str(path / "cell_heads.safetensors")))
    return state


def _load_optimizer(path: Path, optimizer, state: dict) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "optimizer.safetensors"))
    slots: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})


# ---- the loop -----------------------------------------------------------------------------------------------


def _stage_loss(stage: str, step: int, model, heads, builder: BatchBuilder, config: TrainConfig) -> torch.Tensor:
    spec = config.spec
    offset = 1_000_003 * (STAGES.index(stage) + 1)
    world = World(seed=config.seed + offset, pair_prob=config.pair_prob, bias=True)
    if stage == "vision":
        # vision pretraining sees unbiased scenes: the encoder should not learn the prior
        world = World(seed=config.seed + offset, bias=False)
        scenes = world.scenes(step * config.vision_batch, config.vision_batch)
        pixel_values = builder.pixel_values(scenes, spec.image_size)
        logits = heads(vision_features(model, pixel_values))
        targets = cell_labels(scenes)
        return sum(
            nn.functional.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten(), ignore_index=IGNORE_INDEX)
            for k in ("type", "colour", "size")
        )
    if stage == "lm":
        per_step = config.lm_batch * config.lm_turns
        scenes = world.scenes(step * per_step, per_step)
        batch = builder.text_batch(scenes, turns=config.lm_turns)
        return model(**batch.as_kwargs()).loss
    scenes = world.scenes(step * config.multimodal_batch, config.multimodal_batch)
    fraction = config.qa_question_fraction if stage == "qa" else config.question_fraction
    batch = builder.multimodal_batch(scenes, spec.image_size, spec.num_image_tokens, fraction, seed=offset + step)
    if stage != "qa":
        return model(**batch.as_kwargs()).loss
    # per-row mean loss: a one-word answer weighs as much as a 25-word caption
    kwargs = batch.as_kwargs()
    labels = kwargs.pop("labels")
    logits = model(**kwargs).logits[:, :-1].float()  # [batch, seq-1, vocab]
    targets = labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [batch, seq-1]
    counts = (targets != IGNORE_INDEX).sum(-1).clamp(min=1)
    return (token_loss.sum(-1) / counts).mean()


def train(
    config: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> Path | None:
    """Run (or resume) training; returns the folder of the final model (``<out_dir>/final``).

    Args:
        config: the run's settings.
        resume: continue the checkpoint in ``config.out_dir``.
        progress: show tqdm bars.
        stop_after: stop (with a checkpoint) after this many steps of this call; returns None then.

    Raises:
        FileExistsError: ``out_dir`` already holds a checkpoint and ``resume`` is False.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, resume, progress, stop_after)
    finally:
        torch.set_num_threads(previous_threads)


def _train(config: TrainConfig, resume: bool, progress: bool, stop_after: int | None) -> Path | None:
    from tqdm.auto import tqdm

    out = Path(config.out_dir)
    checkpoint = out / CHECKPOINT_DIR
    if checkpoint.exists() and not resume:
        raise FileExistsError(f"{checkpoint} already exists; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(config.spec)
    builder = BatchBuilder(processor)
    model = build_model(config.spec, processor.tokenizer, seed=config.seed)
    torch.manual_seed(config.seed + 1)
    heads = CellHeads(config.spec.vision_hidden, config.spec.image_size // config.spec.patch_size)
    state = {"stage": STAGES[0], "step": 0, "elapsed_s": 0.0, "losses": {}}
    if checkpoint.exists():
        saved_config = json.loads(json.dumps(read_train_config(out / "train_config.json").to_dict()))
        new_config = json.loads(json.dumps(config.to_dict()))
        saved_stage = read_state(checkpoint)["stage"]
        # stages not reached yet may be lengthened or added: the run so far is identical either way
        later = [f"{name}_steps" for name in STAGES[STAGES.index(saved_stage) + 1 :]]
        later += ["qa_question_fraction"] if "qa_steps" in later else []
        changed = sorted(k for k in new_config if saved_config.get(k) != new_config[k])
        if any(k not in later for k in changed):
            raise ValueError(
                f"{out / 'train_config.json'} differs from this run's settings in {changed}; resume with "
                "the same settings (only stages not yet reached may change) or choose another --out"
            )
        if changed:
            logger.info("extending the run: %s", {k: new_config[k] for k in changed})
            atomic_write_json(out / "train_config.json", new_config, indent=1, allow_nan=True)
        state = _load_checkpoint(checkpoint, model, heads)
        logger.info("resuming at stage %s step %d", state["stage"], state["step"])
    else:
        atomic_write_json(out / "train_config.json", config.to_dict(), indent=1, allow_nan=True)

    start_stage = STAGES.index(state["stage"])
    steps_this_call = 0
    for stage in STAGES[start_stage:]:
        total = config.steps(stage)
        groups = _trainable(model, heads, stage, config)
        optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.98))
        first = state["step"] if stage == state["stage"] else 0
        if first > 0:
            _load_optimizer(checkpoint, optimizer, state)
        model.train()
        bar = tqdm(
            range(first, total), desc=f"{stage:>8}", initial=first, total=total, disable=not progress, mininterval=5
        )
        losses = state["losses"].setdefault(stage, [])
        clock = time.monotonic()
        running = None
        for step in bar:
            if stop_after is not None and steps_this_call >= stop_after:
                state.update(stage=stage, step=step, elapsed_s=state["elapsed_s"] + time.monotonic() - clock)
                _save_checkpoint(checkpoint, model, heads, optimizer, state)
                bar.close()
                return None
            steps_this_call += 1
            factor = _lr_factor(step, total, config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            loss = _stage_loss(stage, step, model, heads, builder, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            value = float(loss.detach())
            running = value if running is None else 0.95 * running + 0.05 * value
            if step % 10 == 0:
                bar.set_postfix(loss=f"{running:.4f}")
            if step % 50 == 0:
                losses.append([step, round(running, 5)])
            done = step + 1
            if done % config.checkpoint_every == 0 or done == total:
                state.update(stage=stage, step=done, elapsed_s=state["elapsed_s"] + time.monotonic() - clock)
                clock = time.monotonic()
                _save_checkpoint(checkpoint, model, heads, optimizer, state)
                logger.info("checkpoint %s step %d loss %.4f", stage, done, running)
        bar.close()
        state["elapsed_s"] += time.monotonic() - clock
        next_index = STAGES.index(stage) + 1
        if next_index < len(STAGES):
            state.update(stage=STAGES[next_index], step=0)
            _save_checkpoint(checkpoint, model, heads, optimizer, state)
    final = out / FINAL_DIR
    export(
        model,
        processor,
        final,
        extra={"train_config": config.to_dict(), "elapsed_s": state["elapsed_s"], "losses": state["losses"]},
    )
    logger.info("training done in %.0f s; model in %s", state["elapsed_s"], final)
    return final


def export(model, processor, path: Path, extra: dict | None = None) -> None:
    """Save ``model`` + ``processor`` loadable by ``from_pretrained`` (fp32 safetensors)."""
    from vlm_guard.fileio import atomic_folder

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with atomic_folder(path) as folder:  # written beside ``path``, then renamed: a failure keeps the previous export
        model.save_pretrained(str(folder), safe_serialization=True)
        processor.save_pretrained(str(folder))
        make_portable(folder)
        if extra is not None:
            atomic_write_json(folder / "training_log.json", extra, indent=1, allow_nan=True)  # a diverged loss is NaN


def export_checkpoint(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Export the latest checkpoint of a (possibly unfinished) run as a ``from_pretrained`` folder.

    Args:
        run_dir: the run folder (holding ``train_config.json`` and ``checkpoint/``).
        out: destination (default ``<run_dir>/export``).
    Returns:
        the destination folder.
    """
    run_dir = Path(run_dir)
    config_path, checkpoint = run_dir / "train_config.json", run_dir / CHECKPOINT_DIR
    if not config_path.exists() or not checkpoint.exists():
        raise FileNotFoundError(f"{run_dir} is not a training run (needs train_config.json and {CHECKPOINT_DIR}/)")
    config = read_train_config(config_path)
    processor = build_processor(config.spec)
    model = build_model(config.spec, processor.tokenizer, seed=config.seed)
    heads = CellHeads(config.spec.vision_hidden, config.spec.image_size // config.spec.patch_size)
    state = _load_checkpoint(checkpoint, model, heads)
    out = Path(out) if out else run_dir / "export"
    extra = {
        "train_config": config.to_dict(),
        "elapsed_s": state["elapsed_s"],
        "losses": state["losses"],
        "checkpoint": {"stage": state["stage"], "step": state["step"]},
    }
    export(model, processor, out, extra=extra)
    return out


def make_portable(path: str | Path) -> None:
    """Rewrite a transformers-5 save so transformers 4.57 loads it identically (5.x still does).

    * vision weights under ``vision_tower.vision_model.*`` (the 4.x layout; 5.x maps it back);
    * ``preprocessor_config.json`` beside the 5.x ``processor_config.json``;
    * tokenizer class ``PreTrainedTokenizerFast``, ``extra_special_tokens`` as a dict, no token_type_ids.
    """
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    renamed = {}
    for key, value in state.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        renamed[key] = value
    atomic_save_safetensors(renamed, weights, metadata={"format": "pt"})  # rewritten in place: never half of it
    weights.chmod(0o644)
    processor_config = json.loads((path / "processor_config.json").read_text())
    if "image_processor" in processor_config:
        atomic_write_json(path / "preprocessor_config.json", processor_config["image_processor"], indent=2)
    tokenizer_path = path / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["extra_special_tokens"] = {"image_token": tokenizer_config.get("image_token", "<image>")}
    tokenizer_config["model_input_names"] = ["input_ids", "attention_mask"]
    atomic_write_json(tokenizer_path, tokenizer_config, indent=2)
