"""Measure the first bars of default model v3 on any checkpoint or exported weights (run from the repository root):

    python -m toyworld.v3.report --run /root/vlm-guard-runs/v3 --out /root/vlm-guard-runs/v3/report.json
    python -m toyworld.v3.report --weights /root/vlm-guard-runs/v3/final --out report.json

Every measure uses held-out **independent** scenes (seed ``HELD_OUT_SEED``), greedy decoding, fp32:

* ``partner_slot``: does the image support an absent partner? In the reference description, at each slot where
  the object after a present paired type ``a`` is named (the text up to ``"A small faint red"``), with ``a``'s
  partner absent: ``P(partner word | image)`` against ``P(partner word | no image)`` (the same chat without the
  image item), and the same for ``OTHERS_PER_SLOT`` other absent types. Bar: mean P(partner | image) < mean
  P(partner | no image).
* ``attention_decay``: greedy detail descriptions ("Please describe this image in detail."), then one eager
  forward over prompt + description; per generated token the attention share on the image tokens (mean over
  layers and heads). Bar: the mean share over the second half of each description is below the first half's.
  Since a longer context alone dilutes attention, the share is also given relative to what uniform attention
  over the visible keys would give the image (``relative_to_uniform_*``).
* ``probe``: linear probes (one logistic regression per type) on the mean of the image tokens as they enter the
  LM (projector outputs), fitted on held-out scenes, tested on others: present objects are found (AUC of
  present vs absent), and, among scenes where a type is absent, its score does not separate scenes holding its
  partner from the rest (AUC near 0.5). Bar: partner AUC < 0.6 while presence AUC > 0.9.
* ``prior``: the co-occurrence prior still shows: in greedy detail descriptions an absent partner of a present
  object is named at least twice as often as another absent object, and POPE accuracy orders random > popular >
  adversarial (questions in POPE's wording, 2 present + 2 absent objects per scene and split).
* ``sinks``: the sink dimensions found by VAR's rule on the first token, and per layer the image tokens' sink
  score phi (mean, max, fraction >= tau) against tau and the first token's phi.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
from pathlib import Path

import torch

from toyworld.shapes.report import generate
from vlm_guard.methods.var.sinks import (
    FIRST_SINK_LAYER,
    SINK_THRESHOLD,
    find_sink_dims,
    sink_scores,
)
from vlm_guard.synthetic.everyday.world import _groups
from vlm_guard.synthetic.everyday_v3.world import (
    DETAIL_PROMPTS,
    OBJECT_TYPES,
    brightness_word,
    independent_world,
    long_description,
    partner_of,
    render,
    size_word,
)

logger = logging.getLogger("toyworld.v3.report")

HELD_OUT_SEED = 424_242  # training draws seed + k * 1_000_003, k = 1..4
REPORT_PROMPT = DETAIL_PROMPTS[1]
OTHERS_PER_SLOT = 4
"""Other absent types scored at each partner slot (a rotating sample, so every type is compared over a run)."""


def messages(text: str, with_image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _cell(model) -> int:
    return model.config.vision_config.image_size // 4


def partner_slots(scene) -> list[tuple[str, str, list[str]]]:
    """``(prefix, partner, other absent types)`` for each object that follows a present paired type whose partner
    is absent: ``prefix`` is the reference description up to the type word of that next object."""
    ordered = [obj for group in _groups(scene) for obj in group]
    text = long_description(scene)
    slots = []
    for before, after in itertools.pairwise(ordered):
        partner = partner_of(before.type)
        if partner is None or partner in scene.types:
            continue
        opening = f"A {size_word(after)} {brightness_word(after)} {after.colour}"
        sentence = f"{opening} {after.type} is "
        position = text.find(sentence)
        if position < 0:
            raise RuntimeError(f"no sentence {sentence!r} in the description of scene {scene.index}")
        others = [t for t in OBJECT_TYPES if t not in scene.types and t != partner]
        start = (scene.index + len(slots)) % len(others)
        others = (others[start:] + others[:start])[:OTHERS_PER_SLOT]  # a rotating sample keeps the batch small
        slots.append((text[: position + len(opening)], partner, others))
    return slots


@torch.no_grad()
def word_logprobs(model, processor, image, with_image: bool, prefix: str, words: list[str]) -> list[float]:
    """``log P(" " + word | chat(prompt) + prefix)`` for each word (sum over its tokens), one batched forward."""
    tokenizer = processor.tokenizer
    chat = processor.apply_chat_template(messages(REPORT_PROMPT, with_image), add_generation_prompt=True)
    texts = [chat + prefix + " " + word for word in words]
    word_ids = [tokenizer(" " + word, add_special_tokens=False).input_ids for word in words]
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        if with_image:
            inputs = processor(images=[image] * len(words), text=texts, return_tensors="pt", padding=True)
        else:
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = previous_side
    logprobs = model(**inputs).logits.float().log_softmax(-1)  # [words, seq, vocab]
    lengths = inputs["attention_mask"].sum(-1)
    values = []
    for row, tokens in enumerate(word_ids):
        end = int(lengths[row])
        ids = inputs["input_ids"][row, end - len(tokens) : end].tolist()
        if ids != tokens:
            raise RuntimeError(
                f"the word {words[row]!r} does not tokenize the same after the prefix: {ids} vs {tokens}"
            )
        values.append(float(sum(logprobs[row, end - len(tokens) - 1 + k, t] for k, t in enumerate(tokens))))
    return values


def partner_slot_report(model, processor, scenes) -> dict:
    with_image, without, other_with, other_without, cases = [], [], [], [], []
    for scene in scenes:
        image = render(scene, _cell(model))
        for prefix, partner, others in partner_slots(scene):
            words = [partner] + others
            lp_image = word_logprobs(model, processor, image, True, prefix, words)
            lp_text = word_logprobs(model, processor, image, False, prefix, words)
            with_image.append(math.exp(lp_image[0]))
            without.append(math.exp(lp_text[0]))
            other_with.append(sum(math.exp(v) for v in lp_image[1:]) / len(others))
            other_without.append(sum(math.exp(v) for v in lp_text[1:]) / len(others))
            if len(cases) < 5:
                cases.append(
                    {
                        "scene": scene.index,
                        "prefix_end": prefix[-60:],
                        "partner": partner,
                        "p_image": round(with_image[-1], 5),
                        "p_no_image": round(without[-1], 5),
                    }
                )
    n = len(with_image)

    def mean(values):
        return round(sum(values) / max(1, len(values)), 5)

    raised = sum(a > b for a, b in zip(with_image, without))
    return {
        "slots": n,
        "p_partner_image": mean(with_image),
        "p_partner_no_image": mean(without),
        "p_other_absent_image": mean(other_with),
        "p_other_absent_no_image": mean(other_without),
        "image_raises_partner_fraction": round(raised / max(1, n), 4),
        "examples": cases,
        "bar_partner_image_below_no_image": bool(n) and mean(with_image) < mean(without),
    }


@torch.no_grad()
def attention_decay_report(model, processor, scenes, max_new_tokens: int = 200, batch_size: int = 4) -> dict:
    images = [render(scene, _cell(model)) for scene in scenes]
    texts = generate(
        model,
        processor,
        images,
        [messages(REPORT_PROMPT)] * len(scenes),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    image_token_id = model.config.image_token_id
    chat = processor.apply_chat_template(messages(REPORT_PROMPT), add_generation_prompt=True)
    first, second, lengths, per_scene, relative_first, relative_second = [], [], [], [], [], []
    try:
        for image, text in zip(images, texts):
            inputs = processor(images=[image], text=[chat], return_tensors="pt")
            prompt_length = inputs["input_ids"].shape[1]
            answer = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            if answer.shape[1] < 4:
                continue
            ids = torch.cat([inputs["input_ids"], answer], 1)
            out = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=inputs["pixel_values"],
                output_attentions=True,
            )
            image_mask = (ids[0] == image_token_id).float()  # [seq]
            # each answer token's query row (the row that predicts the next token): mean over layers and heads
            attention = torch.stack([a[0].float() for a in out.attentions]).mean((0, 1))  # [seq, seq]
            rows = attention[prompt_length - 1 : ids.shape[1] - 1]  # [answer, seq]
            share = (rows * image_mask).sum(-1)  # [answer]
            # what uniform attention over the visible keys would give the image: a share that falls with length
            visible = torch.arange(prompt_length, ids.shape[1], dtype=torch.float32)  # keys seen by each row
            uniform = image_mask.sum() / visible
            half = share.shape[0] // 2
            first.append(float(share[:half].mean()))
            second.append(float(share[half:].mean()))
            relative_first.append(float((share[:half] / uniform[:half]).mean()))
            relative_second.append(float((share[half:] / uniform[half:]).mean()))
            lengths.append(int(answer.shape[1]))
            per_scene.append([round(first[-1], 4), round(second[-1], 4)])
    finally:
        model.set_attn_implementation(previous)
    n = len(first)
    mean_first, mean_second = sum(first) / max(1, n), sum(second) / max(1, n)
    lower = sum(b < a for a, b in zip(first, second))
    return {
        "captions": n,
        "mean_tokens": round(sum(lengths) / max(1, n), 1),
        "image_share_first_half": round(mean_first, 5),
        "image_share_second_half": round(mean_second, 5),
        "second_half_lower_fraction": round(lower / max(1, n), 4),
        "per_caption": per_scene,
        "relative_to_uniform_first_half": round(sum(relative_first) / max(1, n), 4),
        "relative_to_uniform_second_half": round(sum(relative_second) / max(1, n), 4),
        "sample": texts[:2],
        "bar_second_half_below_first": bool(n) and mean_second < mean_first,
    }


def auc(positive: list[float], negative: list[float]) -> float | None:
    """Probability that a positive case scores above a negative one (ties count half); None without both."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


@torch.no_grad()
def image_token_features(model, processor, scenes) -> torch.Tensor:
    """Mean over each image's tokens as they enter the LM (projector outputs). [scenes, hidden]"""
    from toyworld.shapes.train import vision_features
    from toyworld.v3.data import V3BatchBuilder

    builder = V3BatchBuilder(processor, int(model.config.image_seq_length), _cell(model))
    features = []
    for start in range(0, len(scenes), 16):
        pixels = builder.pixel_values(scenes[start : start + 16]).to(model.dtype)
        features.append(model.model.multi_modal_projector(vision_features(model, pixels)).float().mean(1))
    return torch.cat(features)


def fit_probes(features: torch.Tensor, labels: torch.Tensor, steps: int = 300, weight_decay: float = 1e-3):
    """Logistic regressions (one per column of ``labels``) on standardised ``features``; returns a scorer."""
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mean) / std  # [n, hidden]
    weight = torch.zeros(x.shape[1], labels.shape[1], requires_grad=True)
    bias = torch.zeros(labels.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, labels.float())
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return lambda f: (((f - mean) / std) @ weight + bias).detach()


def probe_report(model, processor, fit_scenes, test_scenes) -> dict:
    def labels(scenes):
        return torch.tensor([[t in s.types for t in OBJECT_TYPES] for s in scenes])

    score = fit_probes(image_token_features(model, processor, fit_scenes), labels(fit_scenes))
    scores = score(image_token_features(model, processor, test_scenes))  # [test, types]
    presence, partner = {}, {}
    for column, object_type in enumerate(OBJECT_TYPES):
        present = [float(scores[i, column]) for i, s in enumerate(test_scenes) if object_type in s.types]
        absent = [(float(scores[i, column]), s) for i, s in enumerate(test_scenes) if object_type not in s.types]
        presence[object_type] = auc(present, [v for v, _ in absent])
        mate = partner_of(object_type)
        if mate is not None:
            partner[object_type] = auc(
                [v for v, s in absent if mate in s.types], [v for v, s in absent if mate not in s.types]
            )

    def mean(values):
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None

    presence_auc, partner_auc = mean(presence.values()), mean(partner.values())
    return {
        "features": "mean of the image tokens entering the LM (projector outputs)",
        "fit_scenes": len(fit_scenes),
        "test_scenes": len(test_scenes),
        "presence_auc_mean": presence_auc,
        "absent_partner_auc_mean": partner_auc,
        "presence_auc": {k: None if v is None else round(v, 3) for k, v in presence.items()},
        "absent_partner_auc": {k: None if v is None else round(v, 3) for k, v in partner.items()},
        "bar_partner_not_found_while_present_found": (
            presence_auc is not None and partner_auc is not None and presence_auc > 0.9 and partner_auc < 0.6
        ),
    }


@torch.no_grad()
def sink_report(model, processor, scenes) -> dict:
    image_token_id = model.config.image_token_id
    chat = processor.apply_chat_template(messages(REPORT_PROMPT), add_generation_prompt=True)
    first_states, per_scene = [], []
    for scene in scenes:
        inputs = processor(images=[render(scene, _cell(model))], text=[chat], return_tensors="pt")
        out = model(**inputs, output_hidden_states=True)
        states = torch.stack(out.hidden_states[:-1])[:, 0].float()  # [layers, seq, hidden]: each layer's input
        first_states.append(states[:, 0])
        per_scene.append((states, inputs["input_ids"][0] == image_token_id))
    found = find_sink_dims(torch.stack(first_states))
    dims = found.dims or [int(torch.stack(first_states).abs().mean((0, 1)).argmax())]
    layers = per_scene[0][0].shape[0]
    table = []
    for layer in range(layers):
        image_phi = torch.cat([sink_scores(states[layer, mask], dims) for states, mask in per_scene])
        first_phi = torch.stack([sink_scores(states[layer, :1], dims)[0] for states, _ in per_scene])
        table.append(
            {
                "layer": layer,
                "image_phi_mean": round(float(image_phi.mean()), 3),
                "image_phi_max": round(float(image_phi.max()), 3),
                "image_fraction_ge_tau": round(float((image_phi >= SINK_THRESHOLD).float().mean()), 4),
                "first_token_phi": round(float(first_phi.mean()), 3),
            }
        )
    return {
        "sink_dims": found.dims,
        "dims_measured": dims,
        "dims_found_by_rule": bool(found.dims),
        "sink_dim_ratios": [round(r, 2) for r in found.ratios],
        "tau": SINK_THRESHOLD,
        "first_sink_layer": FIRST_SINK_LAYER,
        "scenes": len(scenes),
        "per_layer": table,
        "any_image_token_ge_tau": any(row["image_fraction_ge_tau"] > 0 for row in table[FIRST_SINK_LAYER:]),
    }


def prior_report(model, processor, caption_scenes, pope_scenes, max_new_tokens: int = 200, batch_size: int = 8) -> dict:
    from toyworld.everyday.report import partner_rates, says_yes
    from vlm_guard.synthetic.everyday_v3.world import (
        QUESTION_SPLITS,
        mentioned_objects,
        questions,
    )

    cell = _cell(model)
    texts = generate(
        model,
        processor,
        [render(s, cell) for s in caption_scenes],
        [messages(REPORT_PROMPT)] * len(caption_scenes),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    rates = partner_rates([s.types for s in caption_scenes], [mentioned_objects(t) for t in texts])
    pope = {}
    for split in QUESTION_SPLITS:
        items = [(s, q) for s in pope_scenes for q in questions(s, split=split)]
        answers = generate(
            model,
            processor,
            [render(s, cell) for s, _ in items],
            [messages(q.text) for _, q in items],
            max_new_tokens=3,
            batch_size=batch_size,
        )
        correct = sum(bool(says_yes(a)) == (q.answer == "yes") for (_, q), a in zip(items, answers))
        pope[split] = {
            "accuracy": round(correct / max(1, len(items)), 4),
            "questions": len(items),
            "unclear": sum(says_yes(a) is None for a in answers),
        }
    accuracy = [pope[s]["accuracy"] for s in QUESTION_SPLITS]
    return {
        "captions": len(caption_scenes),
        "detail_partner_rates": rates,
        "pope": pope,
        "bar_partner_named_2x": bool(rates["partner_at_least_2x"]),
        "bar_pope_random_gt_popular_gt_adversarial": accuracy[0] > accuracy[1] > accuracy[2],
    }


def build_report(
    model,
    processor,
    partner_scenes: int = 20,
    caption_scenes: int = 8,
    sink_scenes: int = 6,
    max_new_tokens: int = 200,
    probe_scenes: int = 400,
    prior_scenes: int = 100,
) -> dict:
    world = independent_world(HELD_OUT_SEED)
    report = {
        "held_out_seed": HELD_OUT_SEED,
        "prompt": REPORT_PROMPT,
        "image_tokens": int(model.config.image_seq_length),
    }
    logger.info("partner slots on %d scenes", partner_scenes)
    report["partner_slot"] = partner_slot_report(model, processor, world.scenes(0, partner_scenes))
    logger.info("attention decay on %d descriptions", caption_scenes)
    report["attention_decay"] = attention_decay_report(
        model, processor, world.scenes(1000, caption_scenes), max_new_tokens=max_new_tokens
    )
    logger.info("linear probes on %d + %d scenes", probe_scenes, probe_scenes // 2)
    report["probe"] = probe_report(
        model, processor, world.scenes(3000, probe_scenes), world.scenes(3000 + probe_scenes, max(1, probe_scenes // 2))
    )
    if prior_scenes:
        logger.info("prior: %d descriptions, POPE on %d scenes", prior_scenes, prior_scenes)
        report["prior"] = prior_report(
            model, processor, world.scenes(4000, prior_scenes), world.scenes(5000, prior_scenes), max_new_tokens
        )
    logger.info("sinks on %d scenes", sink_scenes)
    report["sinks"] = sink_report(model, processor, world.scenes(2000, sink_scenes))
    report["bars"] = {
        "partner_image_below_no_image": [
            [report["partner_slot"]["p_partner_image"], report["partner_slot"]["p_partner_no_image"]],
            report["partner_slot"]["bar_partner_image_below_no_image"],
        ],
        "image_attention_second_half_below_first": [
            [report["attention_decay"]["image_share_first_half"], report["attention_decay"]["image_share_second_half"]],
            report["attention_decay"]["bar_second_half_below_first"],
        ],
        "probe_partner_auc_below_0.6_presence_above_0.9": [
            [report["probe"]["absent_partner_auc_mean"], report["probe"]["presence_auc_mean"]],
            report["probe"]["bar_partner_not_found_while_present_found"],
        ],
        **(
            {
                "prior_partner_named_2x": [
                    [
                        report["prior"]["detail_partner_rates"]["absent_partner_claimed"],
                        report["prior"]["detail_partner_rates"]["absent_other_claimed"],
                    ],
                    report["prior"]["bar_partner_named_2x"],
                ],
                "prior_pope_random_gt_popular_gt_adversarial": [
                    [report["prior"]["pope"][s]["accuracy"] for s in ("random", "popular", "adversarial")],
                    report["prior"]["bar_pope_random_gt_popular_gt_adversarial"],
                ],
            }
            if "prior" in report
            else {}
        ),
        "image_tokens_reach_tau": [
            max(r["image_phi_max"] for r in report["sinks"]["per_layer"]),
            report["sinks"]["any_image_token_ge_tau"],
        ],
    }
    return report


def load_model(run: str | None, weights: str | None):
    """``(model, processor, where)``: a run's latest checkpoint (adapters unmerged) or exported weights."""
    if (run is None) == (weights is None):
        raise ValueError("pass exactly one of --run (a training folder) or --weights (a final/ or export/ folder)")
    if run is not None:
        from toyworld.v3.train import load_run

        model, processor, _, state = load_run(run)
        return model, processor, {"run": str(run), "stage": state["stage"], "step": state["step"]}
    from vlm_guard.synthetic.everyday_v3.assemble import build_assembled

    model, processor = build_assembled(weights)
    return model, processor, {"weights": str(weights)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.v3.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="training folder: measure its latest checkpoint")
    parser.add_argument("--weights", help="folder with v3_weights.safetensors + v3_config.json")
    parser.add_argument("--out", help="write the report as JSON here (atomically)")
    parser.add_argument("--partner-scenes", type=int, default=20)
    parser.add_argument("--caption-scenes", type=int, default=8)
    parser.add_argument("--sink-scenes", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=200, help="length limit of the detail descriptions")
    parser.add_argument(
        "--probe-scenes", type=int, default=400, help="scenes the probes are fitted on (half as many tested)"
    )
    parser.add_argument(
        "--prior-scenes",
        type=int,
        default=100,
        help="descriptions and POPE scenes for the prior bars (0 leaves them out)",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    if args.prior_scenes < 0:
        parser.error(f"--prior-scenes must be >= 0, got {args.prior_scenes}")
    for name in ("partner_scenes", "caption_scenes", "sink_scenes", "max_new_tokens", "probe_scenes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model, processor, source = load_model(args.run, args.weights)
    report = {
        "source": source,
        **build_report(
            model.eval(),
            processor,
            args.partner_scenes,
            args.caption_scenes,
            args.sink_scenes,
            args.max_new_tokens,
            args.probe_scenes,
            args.prior_scenes,
        ),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        from vlm_guard.fileio import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    print(json.dumps(report["bars"], indent=1) if args.out else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
