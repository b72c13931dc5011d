"""Measure a toy LLaVA on held-out scenes and describe its inner structure.

``build_report(model_dir)`` returns a JSON-ready dict with
  * ``captions``: object precision / recall / F1 and CHAIR on unbiased and biased held-out scenes;
  * ``partner_hallucination``: how often an absent usual partner is claimed (caption mention or "yes")
    against the same rate for other absent objects;
  * ``yes_no``: POPE-style accuracy per split;
  * ``attention``: per layer, the share of attention text rows give the first (BOS) token and the image;
    per-layer counts of image-centric heads (VAR criterion: visual attention >= 0.2);
  * ``activations``: per layer, the massive-activation ratio max|x_d| / rms(x) of the first token's input
    residual, the same for the other tokens, and the dimensions that carry it (candidate sink dims).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from vlm_guard.synthetic.world import (
    OBJECT_TYPES,
    QUESTION_SPLITS,
    World,
    caption,
    mentioned_objects,
    partner_of,
    questions,
    render,
)

logger = logging.getLogger(__name__)

HELD_OUT_SEED = 777_001  # never used for training (training seeds are seed + k * 1_000_003)
CAPTION_MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]


def question_messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@torch.no_grad()
def generate(model, processor, images, messages_list, max_new_tokens: int = 48, batch_size: int = 50) -> list[str]:
    """Greedy answers for ``images[i]`` prompted by ``messages_list[i]``."""
    answers: list[str] = []
    for start in range(0, len(images), batch_size):
        prompts = [
            processor.apply_chat_template(m, add_generation_prompt=True)
            for m in messages_list[start : start + batch_size]
        ]
        inputs = processor(images=images[start : start + batch_size], text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += processor.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def caption_metrics(truths: list[set[str]], mentions: list[set[str]]) -> dict:
    """Object precision/recall/F1 (micro) and CHAIR_S / CHAIR_I."""
    true_pos = sum(len(t & m) for t, m in zip(truths, mentions))
    mentioned = sum(len(m) for m in mentions)
    present = sum(len(t) for t in truths)
    precision = true_pos / mentioned if mentioned else 0.0
    recall = true_pos / present if present else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    hallucinated = [m - t for t, m in zip(truths, mentions)]
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "chair_s": round(sum(bool(h) for h in hallucinated) / max(1, len(truths)), 4),
        "chair_i": round(sum(len(h) for h in hallucinated) / max(1, mentioned), 4),
        "scenes": len(truths),
    }


def partner_counts(
    truths: list[set[str]], claims: list[set[str]], object_types, partner_of
) -> tuple[int, int, int, int]:
    """``(partner_hits, partner_total, other_hits, other_total)``: over absent types, how many are partners of a
    present type (``partner_of(t)``, None when t has none) and how many of those are claimed, and likewise for the
    other absent types."""
    partner_hits = partner_total = other_hits = other_total = 0
    for truth, claimed in zip(truths, claims):
        partners = {partner_of(t) for t in truth} - {None}
        for object_type in object_types:
            if object_type in truth:
                continue
            if object_type in partners:
                partner_total += 1
                partner_hits += object_type in claimed
            else:
                other_total += 1
                other_hits += object_type in claimed
    return partner_hits, partner_total, other_hits, other_total


def partner_rates(truths: list[set[str]], claims: list[set[str]]) -> dict:
    """Rate at which an absent object is claimed, split into absent partners of present objects vs others.

    ``claims[i]`` is the set of types claimed for scene i (mentioned in a caption or answered "yes").
    """
    partner_hits, partner_total, other_hits, other_total = partner_counts(truths, claims, OBJECT_TYPES, partner_of)
    return {
        "absent_partner_claimed": round(partner_hits / max(1, partner_total), 4),
        "absent_partner_cases": partner_total,
        "absent_other_claimed": round(other_hits / max(1, other_total), 4),
        "absent_other_cases": other_total,
    }


def _yes(answer: str) -> bool:
    first = answer.strip().split(".")[0].lower().split()
    return not ({"no", "not"} & set(first))


def evaluate_captions(model, processor, scenes) -> tuple[dict, list[set[str]], list[set[str]], list[str]]:
    images = [render(s) for s in scenes]
    texts = generate(model, processor, images, [CAPTION_MESSAGES] * len(scenes))
    truths = [s.types for s in scenes]
    mentions = [mentioned_objects(t) for t in texts]
    return caption_metrics(truths, mentions), truths, mentions, texts


def evaluate_yes_no(model, processor, scenes) -> tuple[dict, dict]:
    """POPE metrics per split, plus the yes-rate for absent partners vs other absent objects (adversarial pool)."""
    results = {}
    claims_all: dict[int, set[str]] = {}
    for split in QUESTION_SPLITS:
        items = [(s, q) for s in scenes for q in questions(s, split=split)]
        answers = generate(
            model,
            processor,
            [render(s) for s, _ in items],
            [question_messages(q.text) for _, q in items],
            max_new_tokens=3,
        )
        tp = fp = fn = tn = 0
        for (scene, q), a in zip(items, answers):
            predicted, actual = _yes(a), q.answer == "yes"
            tp += predicted and actual
            fp += predicted and not actual
            fn += (not predicted) and actual
            tn += (not predicted) and not actual
            if predicted:
                claims_all.setdefault(id(scene), set()).add(q.object)
        precision = tp / max(1, tp + fp)
        recall = tp / max(1, tp + fn)
        results[split] = {
            "accuracy": round((tp + tn) / max(1, len(items)), 4),
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(2 * precision * recall / max(1e-9, precision + recall), 4),
            "yes_ratio": round((tp + fp) / max(1, len(items)), 4),
            "questions": len(items),
        }
    # every absent type asked once per scene: direct yes-rates for partners vs others
    items = [(s, t) for s in scenes for t in OBJECT_TYPES if t not in s.types]
    answers = generate(
        model,
        processor,
        [render(s) for s, _ in items],
        [question_messages(f"is there a {t} ?") for _, t in items],
        max_new_tokens=3,
    )
    claims: dict[int, set[str]] = {}
    for (scene, object_type), a in zip(items, answers):
        if _yes(a):
            claims.setdefault(scene.index, set()).add(object_type)
    rates = partner_rates([s.types for s in scenes], [claims.get(s.index, set()) for s in scenes])
    return results, rates


@torch.no_grad()
def inner_structure(model, processor, scenes) -> dict:
    """Per-layer first-token attention share, image attention, image-centric heads and massive activations.

    Text rows are the positions after the last image token (prompt tail + reference caption, teacher-forced).
    """
    attention_impl = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    try:
        layers = model.config.text_config.num_hidden_layers
        first_share = torch.zeros(layers)
        image_share = torch.zeros(layers)
        image_centric = torch.zeros(layers)  # share of (head, text row) with visual attention >= 0.2
        heads = model.config.text_config.num_attention_heads
        per_head_image = torch.zeros(layers, heads)  # [layer, head] mean visual attention of text rows
        per_head_first = torch.zeros(layers, heads)  # [layer, head] mean attention to the first token
        first_ratio = torch.zeros(layers + 1)
        other_ratio = torch.zeros(layers + 1)
        top_dims: dict[int, int] = {}
        image_token_id = model.config.image_token_id
        for scene in scenes:
            prompt = processor.apply_chat_template(CAPTION_MESSAGES, add_generation_prompt=True)
            inputs = processor(images=[render(scene)], text=[prompt + " " + caption(scene)], return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            out = model(**inputs.to(model.device), output_attentions=True, output_hidden_states=True)
            ids = inputs["input_ids"][0]
            image_mask = ids == image_token_id  # [seq]
            last_image = int(image_mask.nonzero().max())
            rows = slice(last_image + 1, ids.shape[0])
            for layer, attn in enumerate(out.attentions):
                a = attn[0].float()[:, rows]  # [head, text rows, key]
                first_share[layer] += a[..., 0].mean()
                visual = a[..., image_mask].sum(-1)  # [head, text rows]
                image_share[layer] += visual.mean()
                image_centric[layer] += (visual >= 0.2).float().mean()
                per_head_image[layer] += visual.mean(-1)
                per_head_first[layer] += a[..., 0].mean(-1)
            for layer, hidden in enumerate(out.hidden_states):
                x = hidden[0].float()  # [seq, hidden]
                ratio = x.abs().amax(-1) / x.pow(2).mean(-1).add(1e-6).sqrt()  # [seq]
                first_ratio[layer] += ratio[0]
                other_ratio[layer] += ratio[1:].max()
                if 0 < layer < layers:
                    dim = int(x[0].abs().argmax())
                    top_dims[dim] = top_dims.get(dim, 0) + 1
        n = len(scenes)
        return {
            "first_token_attention_share": [round(float(v / n), 4) for v in first_share],
            "image_attention_share": [round(float(v / n), 4) for v in image_share],
            "image_centric_row_share": [round(float(v / n), 4) for v in image_centric],
            "image_attention_per_head": [[round(float(v / n), 3) for v in row] for row in per_head_image],
            "first_token_attention_per_head": [[round(float(v / n), 3) for v in row] for row in per_head_first],
            "massive_activation_ratio_first_token": [round(float(v / n), 2) for v in first_ratio],
            "massive_activation_ratio_other_tokens_max": [round(float(v / n), 2) for v in other_ratio],
            "first_token_top_dims": dict(sorted(top_dims.items(), key=lambda kv: -kv[1])[:5]),
            "notes": "per text layer; activation ratios per residual stream input (index 0 = embeddings)",
            "scenes": n,
        }
    finally:
        if attention_impl:
            model.set_attn_implementation(attention_impl)


def build_report(model_dir: str | Path, scenes: int = 300, structure_scenes: int = 24) -> dict:
    """Measure the model in ``model_dir`` (see module docstring). Deterministic for a given model."""
    import json

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model_dir = Path(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    unbiased = World(seed=HELD_OUT_SEED, bias=False).scenes(0, scenes)
    biased = World(seed=HELD_OUT_SEED, bias=True).scenes(0, scenes)
    logger.info("captioning %d unbiased + %d biased scenes", scenes, scenes)
    unbiased_metrics, truths, mentions, texts = evaluate_captions(model, processor, unbiased)
    biased_metrics, *_ = evaluate_captions(model, processor, biased)
    caption_rates = partner_rates(truths, mentions)
    yes_no, answer_rates = evaluate_yes_no(model, processor, unbiased[: max(1, scenes // 3)])
    structure = inner_structure(model, processor, unbiased[:structure_scenes])
    parameters = {
        "total": sum(p.numel() for p in model.parameters()),
        "vision_tower": sum(p.numel() for p in model.model.vision_tower.parameters()),
        "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters()),
        "language_model": sum(p.numel() for p in model.model.language_model.parameters())
        + sum(p.numel() for p in model.lm_head.parameters()),
    }
    log_path = model_dir / "training_log.json"
    training = json.loads(log_path.read_text()) if log_path.exists() else {}
    summary = {
        "caption_f1_unbiased": unbiased_metrics["f1"],
        "caption_f1_biased": biased_metrics["f1"],
        "absent_partner_mentioned": caption_rates["absent_partner_claimed"],
        "absent_other_mentioned": caption_rates["absent_other_claimed"],
        "absent_partner_yes": answer_rates["absent_partner_claimed"],
        "absent_other_yes": answer_rates["absent_other_claimed"],
        "max_first_token_attention_share": max(structure["first_token_attention_share"]),
        "max_massive_activation_ratio_first_token": max(structure["massive_activation_ratio_first_token"]),
        "parameters": parameters["total"],
        "training_minutes": round(training.get("elapsed_s", 0.0) / 60, 1),
    }
    return {
        "summary": summary,
        "parameters": parameters,
        "captions": {"unbiased": unbiased_metrics, "biased": biased_metrics},
        "partner_hallucination": {"captions_unbiased": caption_rates, "yes_no_unbiased": answer_rates},
        "yes_no": yes_no,
        "attention": {k: v for k, v in structure.items() if "activation" not in k and k != "first_token_top_dims"},
        "activations": {k: v for k, v in structure.items() if "activation" in k or k == "first_token_top_dims"},
        "sample_captions": [{"truth": caption(s), "generated": t} for s, t in zip(unbiased[:8], texts[:8])],
        "held_out_seed": HELD_OUT_SEED,
        "training": {k: v for k, v in training.items() if k != "losses"},
    }
