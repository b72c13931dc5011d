"""Train the default grounding checker: a small open_clip CLIP on the synthetic world.

Loss: SigLIP-style sigmoid loss over every (image, "a {object}") pair of a batch, labelled 1 when the
object is in the image. Scenes are drawn from the *unbiased* world so the checker does not learn the
co-occurrence prior it is meant to catch. The output folder uses open_clip's ``local-dir:`` layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``) plus the world's word tokenizer, so it
loads with ``open_clip.create_model("local-dir:<folder>")`` and no download.

Example:
    >>> folder = train_checker(CheckerTrainConfig(out_dir="runs/checker", steps=600))
    >>> ship_checker(folder)
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlm_guard.fileio import atomic_folder, atomic_path, atomic_save_safetensors, atomic_write_json
from vlm_guard.grounding import DEFAULT_CHECKER_DIR, ToyPreprocess, WordTokenizer

logger = logging.getLogger(__name__)

PROMPT = "a {}"


@dataclass
class CheckerTrainConfig:
    out_dir: str = field(default="runs/checker", metadata={"help": "output folder"})
    seed: int = 0
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch: int = 64
    lr: float = 2e-3
    embed_dim: int = 64
    vision_width: int = 128
    vision_layers: int = 3
    text_width: int = 64
    text_layers: int = 2
    threads: int = 1

    def __post_init__(self):
        if self.steps < 1 or self.batch < 2:
            raise ValueError(f"steps ({self.steps}) must be >= 1 and batch ({self.batch}) >= 2")


def open_clip_config(config: CheckerTrainConfig, vocab_size: int, eos_id: int, pad_id: int) -> dict:
    from vlm_guard.synthetic.world import IMAGE_SIZE, OBJECT_TYPES

    return {
        "model_cfg": {
            "embed_dim": config.embed_dim,
            "init_logit_scale": math.log(10.0),
            "init_logit_bias": -5.0,
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "patch_size": 8,
                "width": config.vision_width,
                "layers": config.vision_layers,
                "head_width": 32,
            },
            "text_cfg": {
                "context_length": 8,
                "vocab_size": vocab_size,
                "width": config.text_width,
                "heads": 2,
                "layers": config.text_layers,
                "pool_type": "eos",
                "eos_id": eos_id,
                "pad_id": pad_id,
            },
        },
        "preprocess_cfg": {
            "size": IMAGE_SIZE,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
        "vlm_guard": {"vocabulary": list(OBJECT_TYPES), "prompt": PROMPT, "train_config": asdict(config)},
    }


def train_checker(config: CheckerTrainConfig, progress: bool = True) -> Path:
    """Train and write the checker folder; returns it."""
    import open_clip
    from tqdm.auto import tqdm

    from vlm_guard.synthetic.model import build_tokenizer
    from vlm_guard.synthetic.world import OBJECT_TYPES, World, render

    torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    # the checker's token ids carry no BOS: drop the template post-processor
    core = tokenizer.backend_tokenizer
    core.post_processor = None
    with atomic_path(out / "tokenizer.json") as temporary:  # every file of the folder: whole or the previous one
        core.save(str(temporary))
    vocab_size = (len(tokenizer) + 15) // 16 * 16
    cfg = open_clip_config(config, vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)
    atomic_write_json(out / "open_clip_config.json", cfg, indent=1)

    torch.manual_seed(config.seed)
    model = open_clip.create_model(f"local-dir:{out}", device="cpu")  # no weights yet: random init
    tokenize = WordTokenizer(out / "tokenizer.json", cfg["model_cfg"]["text_cfg"]["context_length"])
    preprocess = ToyPreprocess(
        cfg["preprocess_cfg"]["size"], cfg["preprocess_cfg"]["mean"], cfg["preprocess_cfg"]["std"]
    )
    prompts = tokenize([PROMPT.format(t) for t in OBJECT_TYPES])  # [types, context]
    world = World(seed=config.seed + 424_242, bias=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    model.train()
    bar = tqdm(range(config.steps), desc="checker", disable=not progress, mininterval=5)
    for step in bar:
        lr_factor = min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor
        scenes = world.scenes(step * config.batch, config.batch)
        pixels = torch.stack([preprocess(render(s)) for s in scenes])  # [batch, 3, H, W]
        labels = torch.tensor([[float(t in s.types) for t in OBJECT_TYPES] for s in scenes])  # [batch, types]
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(prompts, normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T + model.logit_bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_save_safetensors(state, out / "open_clip_model.safetensors")
    logger.info("checker written to %s", out)
    return out


def ship_checker(folder: str | Path) -> Path:
    """Copy a trained checker folder into the package assets."""
    folder = Path(folder)
    if not (folder / "open_clip_model.safetensors").exists():
        raise FileNotFoundError(
            f"{folder} holds no open_clip_model.safetensors; run `python -m toyworld toy train-checker`"
        )
    from vlm_guard.grounding import GroundingChecker

    DEFAULT_CHECKER_DIR.parent.mkdir(parents=True, exist_ok=True)
    # built and evaluated beside the shipped checker, then renamed in: a failure keeps the shipped one whole
    with atomic_folder(DEFAULT_CHECKER_DIR) as staged:
        for name in ("open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json"):
            shutil.copyfile(folder / name, staged / name)
        report = evaluate_checker(GroundingChecker.from_folder(staged))
        atomic_write_json(staged / "checker_report.json", report, indent=1, allow_nan=True)
    return DEFAULT_CHECKER_DIR


def evaluate_checker(checker, scenes: int = 200, seed: int = 777_002) -> dict:
    """Presence accuracy of ``checker`` on held-out unbiased scenes, for every (scene, object type) pair,
    with the flag rate of present objects, absent partners of present objects and other absent objects."""
    from vlm_guard.synthetic.world import OBJECT_TYPES, World, partner_of, render

    counts = {"present": [0, 0], "absent_partner": [0, 0], "absent_other": [0, 0]}  # [flagged, total]
    for scene in World(seed=seed, bias=False).scenes(0, scenes):
        partners = {partner_of(t) for t in scene.types} - {None}
        for object_type, score in zip(OBJECT_TYPES, checker.scores(render(scene), OBJECT_TYPES)):
            kind = (
                "present"
                if object_type in scene.types
                else "absent_partner"
                if object_type in partners
                else "absent_other"
            )
            counts[kind][0] += score < checker.threshold
            counts[kind][1] += 1
    flag_rates = {k: round(f / max(1, n), 4) for k, (f, n) in counts.items()}
    correct = (counts["present"][1] - counts["present"][0]) + counts["absent_partner"][0] + counts["absent_other"][0]
    total = sum(n for _, n in counts.values())
    return {
        "accuracy": round(correct / total, 4),
        "flag_rate": flag_rates,
        "pairs": total,
        "scenes": scenes,
        "threshold": checker.threshold,
        "seed": seed,
    }
