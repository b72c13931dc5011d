"""Measure default model v2 on held-out scenes of the everyday world (``python -m toyworld toy v2-report``).

``build_v2_report(model, processor)`` returns a JSON-ready dict with
  * ``captions``: object precision / recall / F1 and CHAIR on plain prompts ("Describe the image.") and on
    detail prompts (CHAIR's official "Please describe this image in detail."), unbiased held-out scenes;
  * ``partner_hallucination``: how often an absent usual partner of a present object is claimed (caption
    mention, or "yes" to POPE's question) against the same rate for the other absent objects;
  * ``pope``: accuracy / precision / recall / F1 / yes-ratio per split (random, popular, adversarial);
  * ``sinks``: sink dimensions found from the first token's residual stream (the VAR calibration rule),
    and per layer the fraction of image tokens that are visual sinks (phi >= tau on those dimensions);
  * ``must_show``: each bar of issue 12 with the measured value and whether it is met.
"""

from __future__ import annotations

import logging

import torch

from toyworld.shapes.report import caption_metrics, generate, partner_counts
from vlm_guard.methods.var.sinks import FIRST_SINK_LAYER, SINK_THRESHOLD, find_sink_dims, sink_scores
from vlm_guard.synthetic.everyday.world import (
    CAPTION_PROMPTS,
    DETAIL_PROMPTS,
    OBJECT_TYPES,
    QUESTION_SPLITS,
    World,
    caption,
    mentioned_objects,
    partner_of,
    question_text,
    questions,
    render,
)

logger = logging.getLogger(__name__)

HELD_OUT_SEED = 424_242  # training uses seed + k * 1_000_003 (k = 1..4)


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def partner_rates(truths: list[set[str]], claims: list[set[str]]) -> dict:
    """Rate at which absent objects are claimed: absent partners of present objects vs other absent objects."""
    partner_hits, partner_total, other_hits, other_total = partner_counts(truths, claims, OBJECT_TYPES, partner_of)
    partner_rate = partner_hits / max(1, partner_total)
    other_rate = other_hits / max(1, other_total)
    return {
        "absent_partner_claimed": round(partner_rate, 4),
        "absent_partner_cases": partner_total,
        "absent_other_claimed": round(other_rate, 4),
        "absent_other_cases": other_total,
        "ratio": round(partner_rate / other_rate, 2) if other_rate else None,  # None: no other absent claimed
        "partner_at_least_2x": partner_rate > 0 and partner_rate >= 2 * other_rate,
    }


def says_yes(answer: str) -> bool | None:
    """``True`` / ``False`` for an answer starting with yes / no, ``None`` when it is neither."""
    words = answer.strip().lower().replace(",", " ").replace(".", " ").split()
    if not words:
        return None
    if words[0] == "yes":
        return True
    if words[0] in ("no", "not"):
        return False
    return None


def evaluate_pope(model, processor, scenes, batch_size: int) -> dict:
    results = {}
    for split in QUESTION_SPLITS:
        items = [(s, q) for s in scenes for q in questions(s, split=split)]
        answers = generate(
            model,
            processor,
            [render(s) for s, _ in items],
            [_messages(q.text) for _, q in items],
            max_new_tokens=3,
            batch_size=batch_size,
        )
        tp = fp = fn = tn = unclear = 0
        for (_, q), a in zip(items, answers):
            verdict = says_yes(a)
            unclear += verdict is None
            predicted, actual = bool(verdict), q.answer == "yes"
            tp += predicted and actual
            fp += predicted and not actual
            fn += (not predicted) and actual
            tn += (not predicted) and not actual
        precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
        results[split] = {
            "accuracy": round((tp + tn) / max(1, len(items)), 4),
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(2 * precision * recall / max(1e-9, precision + recall), 4),
            "yes_ratio": round((tp + fp) / max(1, len(items)), 4),
            "unclear": unclear,
            "questions": len(items),
            "sample_answers": answers[:4],
        }
    return results


def evaluate_absent_yes(model, processor, scenes, batch_size: int) -> dict:
    """Ask about every absent type of every scene; partner vs other yes-rates."""
    items = [(s, t) for s in scenes for t in OBJECT_TYPES if t not in s.types]
    answers = generate(
        model,
        processor,
        [render(s) for s, _ in items],
        [_messages(question_text(t)) for _, t in items],
        max_new_tokens=3,
        batch_size=batch_size,
    )
    claims: dict[int, set[str]] = {}
    for (scene, object_type), a in zip(items, answers):
        if says_yes(a):
            claims.setdefault(scene.index, set()).add(object_type)
    return partner_rates([s.types for s in scenes], [claims.get(s.index, set()) for s in scenes])


@torch.no_grad()
def visual_sinks(model, processor, scenes) -> dict:
    """Sink dimensions (VAR's rule on the first token's layer inputs) and per-layer visual-sink fractions."""
    image_token_id = model.config.image_token_id
    first_states, fractions, counts = [], None, 0
    prompt = processor.apply_chat_template(_messages(CAPTION_PROMPTS[0]), add_generation_prompt=True)
    per_scene = []
    for scene in scenes:
        inputs = processor(images=[render(scene)], text=[prompt], return_tensors="pt").to(model.device)
        out = model(**inputs, output_hidden_states=True)
        states = torch.stack(out.hidden_states[:-1])[:, 0].float()  # [layers, seq, hidden]: input of each layer
        first_states.append(states[:, 0])
        per_scene.append((states, inputs["input_ids"][0] == image_token_id))
    found = find_sink_dims(torch.stack(first_states))  # [N, L, M]
    layers = len(per_scene[0][0])
    fractions = [0.0] * layers
    if found.dims:
        for states, image_mask in per_scene:
            phi = sink_scores(states[:, image_mask], found.dims)  # [layers, image tokens]
            for layer in range(layers):
                fractions[layer] += float((phi[layer] >= SINK_THRESHOLD).float().mean())
        counts = len(per_scene)
    return {
        "sink_dims": found.dims,
        "sink_dim_ratios": [round(r, 2) for r in found.ratios],
        "tau": SINK_THRESHOLD,
        "visual_sink_fraction_per_layer": [round(f / max(1, counts), 4) for f in fractions],
        "first_sink_layer": FIRST_SINK_LAYER,
        "scenes": len(scenes),
    }


def build_v2_report(
    model, processor, scenes: int = 100, batch_size: int = 25, sink_scenes: int = 12, prior: dict | None = None
) -> dict:
    """Measure ``model`` (see module docstring). Deterministic for a given model (greedy decoding)."""
    held_out = World(seed=HELD_OUT_SEED, bias=False).scenes(0, scenes)
    truths = [s.types for s in held_out]
    images = [render(s) for s in held_out]
    report: dict = {"held_out_seed": HELD_OUT_SEED, "scenes": scenes}
    captions, rates, samples = {}, {}, {}
    for kind, prompt, tokens in (("plain", CAPTION_PROMPTS[0], 40), ("detail", DETAIL_PROMPTS[1], 72)):
        logger.info("%s captions on %d held-out scenes", kind, scenes)
        texts = generate(
            model, processor, images, [_messages(prompt)] * scenes, max_new_tokens=tokens, batch_size=batch_size
        )
        mentions = [mentioned_objects(t) for t in texts]
        captions[kind] = {**caption_metrics(truths, mentions), "prompt": prompt}
        rates[f"captions_{kind}"] = partner_rates(truths, mentions)
        samples[kind] = [{"truth": caption(s), "generated": t} for s, t in zip(held_out[:6], texts[:6])]
    report["captions"] = captions
    yes_no_scenes = held_out[: max(1, scenes // 2)]
    report["pope"] = evaluate_pope(model, processor, yes_no_scenes, batch_size)
    rates["yes_no"] = evaluate_absent_yes(model, processor, yes_no_scenes[: max(1, scenes // 4)], batch_size)
    report["partner_hallucination"] = rates
    report["sinks"] = visual_sinks(model, processor, held_out[:sink_scenes])
    report["sample_captions"] = samples
    if prior is not None:
        report["lm_partner_preference"] = prior
    pope = report["pope"]
    report["must_show"] = {
        "recall_plain_ge_0.7": [captions["plain"]["recall"], captions["plain"]["recall"] >= 0.7],
        "chair_s_detail_ge_0.20": [captions["detail"]["chair_s"], captions["detail"]["chair_s"] >= 0.20],
        "partner_2x_caption": [
            [rates["captions_detail"]["absent_partner_claimed"], rates["captions_detail"]["absent_other_claimed"]],
            rates["captions_detail"]["partner_at_least_2x"],
        ],
        "partner_2x_yes_no": [
            [rates["yes_no"]["absent_partner_claimed"], rates["yes_no"]["absent_other_claimed"]],
            rates["yes_no"]["partner_at_least_2x"],
        ],
        "pope_random_gt_popular_gt_adversarial": [
            [pope[s]["accuracy"] for s in QUESTION_SPLITS],
            pope["random"]["accuracy"] > pope["popular"]["accuracy"] > pope["adversarial"]["accuracy"],
        ],
        "sink_dims_found": [report["sinks"]["sink_dims"], bool(report["sinks"]["sink_dims"])],
    }
    return report
