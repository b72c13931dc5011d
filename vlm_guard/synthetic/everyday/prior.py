"""The language model's own co-occurrence prior: does it prefer each object's partner?

For every paired type ``a`` and every other type ``b``, score ``log P(" b" | context ending in "a {a} and a")``
with the text-only LM (sum over ``b``'s tokens, averaged over a few neutral contexts), then report for ``a``
the partner's rank among the other types and ``P(partner) / mean P(other)``.

Example (not run: loads and scores the SmolLM2-135M language model)::

    lm, tokenizer = load_language_model()
    table = partner_preference(lm, tokenizer)
    table["pairs"]["fork"]["partner_rank"]       # 1 = the partner is the LM's favourite continuation
"""

from __future__ import annotations

import math

import torch

from vlm_guard.synthetic.everyday.world import OBJECT_TYPES, PARTNER_PAIRS, partner_of

CONTEXTS: tuple[str, ...] = (
    "In the picture there is a {a} and a",
    "I can see a {a} and a",
    "The image shows a {a} and a",
)
"""Neutral sentence openings ending in "a {a} and a" (the phrase a caption model writes)."""


@torch.no_grad()
def continuation_logprobs(lm, tokenizer, context: str, words: list[str]) -> list[float]:
    """``log P(" " + word | context)`` under ``lm`` for each word (sum over its tokens), one batched forward
    (right padding, so every row's positions are those of an unpadded forward)."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    word_ids = [tokenizer(" " + word, add_special_tokens=False).input_ids for word in words]
    length = len(context_ids) + max(len(w) for w in word_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(words), length), pad, dtype=torch.long)  # [words, seq]
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(word_ids):
        sequence = context_ids + tokens
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    logprobs = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)  # [words, seq-1, vocab]
    start = len(context_ids) - 1
    return [
        float(sum(logprobs[row, start + k, token] for k, token in enumerate(tokens)))
        for row, tokens in enumerate(word_ids)
    ]


def continuation_logprob(lm, tokenizer, context: str, word: str) -> float:
    """``log P(" " + word | context)`` under ``lm``: the sum over ``word``'s tokens."""
    return continuation_logprobs(lm, tokenizer, context, [word])[0]


@torch.no_grad()
def partner_preference(lm, tokenizer, contexts: tuple[str, ...] = CONTEXTS) -> dict:
    """Per paired type: the partner's mean log-probability, its rank among all other types, and the ratio
    ``P(partner) / mean P(other types)`` (probabilities averaged over ``contexts``).

    Returns:
        ``{"pairs": {type: {...}}, "all_partners_rank_1": bool, "min_ratio": float, "contexts": [...]}``
    """
    table = {}
    for a in OBJECT_TYPES:
        partner = partner_of(a)
        if partner is None:
            continue
        candidates = [b for b in OBJECT_TYPES if b != a]
        per_context = [continuation_logprobs(lm, tokenizer, c.format(a=a), candidates) for c in contexts]
        probs = {
            b: sum(math.exp(values[i]) for values in per_context) / len(contexts) for i, b in enumerate(candidates)
        }
        others = [p for b, p in probs.items() if b != partner]
        ranking = sorted(probs, key=lambda b: -probs[b])
        table[a] = {
            "partner": partner,
            "partner_prob": round(probs[partner], 6),
            "mean_other_prob": round(sum(others) / len(others), 6),
            "ratio": round(probs[partner] / max(1e-12, sum(others) / len(others)), 2),
            "partner_rank": ranking.index(partner) + 1,
            "top3": ranking[:3],
        }
    return {
        "pairs": table,
        "all_partners_rank_1": all(v["partner_rank"] == 1 for v in table.values()),
        "min_ratio": min(v["ratio"] for v in table.values()),
        "contexts": list(contexts),
        "pair_list": [list(p) for p in PARTNER_PAIRS],
    }
