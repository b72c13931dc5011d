"""The language model's own co-occurrence prior: does it prefer each object's partner?

For every paired type ``a`` and every other type ``b``, score ``log P(" b" | context ending in "a {a} and a")``
with the text-only LM (sum over ``b``'s tokens, averaged over a few neutral contexts), then report for ``a``
the partner's rank among the other types and ``P(partner) / mean P(other)``.

Example:
    >>> lm, tokenizer = load_language_model()
    >>> table = partner_preference(lm, tokenizer)
    >>> table["pairs"]["fork"]["partner_rank"]       # 1 = the partner is the LM's favourite continuation
    1
"""

from __future__ import annotations

import math

import torch

from .world import OBJECT_TYPES, PARTNER_PAIRS, partner_of

CONTEXTS: tuple[str, ...] = (
    "In the picture there is a {a} and a",
    "I can see a {a} and a",
    "The image shows a {a} and a",
)
"""Neutral sentence openings ending in "a {a} and a" (the phrase a caption model writes)."""


@torch.no_grad()
def continuation_logprob(lm, tokenizer, context: str, word: str) -> float:
    """``log P(" " + word | context)`` under ``lm``: the sum over ``word``'s tokens."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    word_ids = tokenizer(" " + word, add_special_tokens=False).input_ids
    ids = torch.tensor([context_ids + word_ids])
    logprobs = lm(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # [seq-1, vocab]
    positions = range(len(context_ids) - 1, len(context_ids) - 1 + len(word_ids))
    return float(sum(logprobs[p, t] for p, t in zip(positions, word_ids)))


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
        probs = {}
        for b in OBJECT_TYPES:
            if b == a:
                continue
            values = [math.exp(continuation_logprob(lm, tokenizer, c.format(a=a), b)) for c in contexts]
            probs[b] = sum(values) / len(values)
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
