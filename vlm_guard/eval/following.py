"""Prompt-following check: did the model answer the kind of output a task's metrics read?

POPE's parse rule (:func:`vlm_guard.eval.pope.parse_pope_answer`) turns *any* text into "yes" or "no": a caption,
an empty string or "nope" all count as "yes". CHAIR scores any text as a caption: a bare "yes" has no object
mention, hence no hallucination. A model that does not follow a task's prompt therefore gets numbers that look
fine and mean nothing. This module measures, per task, the share of outputs that do not answer the prompt:

- POPE, *unclear* answer: the first sentence (what the parse rule reads) holds no yes/no word: none of
  :data:`YES_WORDS` ("yes", "yeah", "yep", "yup") nor :data:`NO_WORDS` ("no", "not", the parse rule's own
  negations). "There is a dog." and "nope" are unclear (the rule reads both as "yes"); "Yes, there is." and
  "There is no dog." are not.
- CHAIR, *not a caption*: fewer than :data:`MIN_CAPTION_WORDS` words, or a first word that is a yes/no word
  (:data:`YES_WORDS`, "no", "nope"): a caption prompt was answered as a question.

A task whose share exceeds ``max_unclear`` (default :data:`MAX_UNCLEAR_SHARE`) is marked
``followed_prompt: False``: its numbers are kept in the summary JSON but never shown as results (tables print
"prompt not followed"), and ``vlm-guard eval`` exits with code 3. ``max_unclear=1`` turns the check off.

Example:
    >>> check = pope_following(["Yes.", "No, there is not.", "a red ball on a table"])
    >>> check["followed_prompt"], round(check["unclear_share"], 3), check["unclear_examples"]
    (True, 0.333, ['a red ball on a table'])
    >>> chair_following(["yes", "no", "A dog on the grass."])["followed_prompt"]
    False
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vlm_guard.eval.pope import NEGATION_WORDS, answer_words, first_sentence

MAX_UNCLEAR_SHARE = 0.5
"""Default ``max_unclear``: a task is marked not followed when more than this share of its outputs does not answer
the prompt (POPE: no yes/no word; CHAIR: not a caption). ``vlm-guard eval ... --max-unclear``."""

YES_WORDS = frozenset({"yes", "yeah", "yep", "yup"})
"""Words that answer "yes" (the POPE rule reads every answer without a negation as "yes")."""

NO_WORDS = NEGATION_WORDS
"""The POPE parse rule's negation words (an answer holding one is read as "no")."""

NON_CAPTION_FIRST_WORDS = YES_WORDS | {"no", "nope"}
"""A CHAIR output that starts with one of these answers a question instead of describing the image."""

MIN_CAPTION_WORDS = 2
"""A CHAIR output with fewer words (e.g. empty, "A.", "Kitchen") is not a caption."""

N_EXAMPLES = 2
"""Example outputs kept (and quoted in the message) per task."""

EXIT_PROMPT_NOT_FOLLOWED = 3
"""Exit code of ``vlm-guard eval`` when a task's prompt was not followed (its numbers are withheld)."""


def pope_answer_is_clear(answer: str) -> bool:
    """Whether a POPE answer says yes or no: its first sentence holds a word of :data:`YES_WORDS` or :data:`NO_WORDS`.

    Example:
        >>> [pope_answer_is_clear(text) for text in ("Yes, there is.", "There is no cat.", "There is a cat.", "nope")]
        [True, True, False, False]
    """
    if not isinstance(answer, str):
        raise ValueError(f"answer must be a string, got {type(answer).__name__}: {answer!r:.80}.")
    return any(word in YES_WORDS or word in NO_WORDS for word in answer_words(first_sentence(answer)))


def is_caption(text: str) -> bool:
    """Whether a CHAIR output reads as a caption: at least :data:`MIN_CAPTION_WORDS` words, and not starting with a
    yes/no word (:data:`NON_CAPTION_FIRST_WORDS`).

    Example:
        >>> [is_caption(text) for text in ("A dog on the grass.", "Yes.", "no, a cat", "", "Kitchen.")]
        [True, False, False, False, False]
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}: {text!r:.80}.")
    words = answer_words(text)
    return len(words) >= MIN_CAPTION_WORDS and words[0] not in NON_CAPTION_FIRST_WORDS


def _check_threshold(max_unclear: float) -> float:
    if isinstance(max_unclear, bool) or not isinstance(max_unclear, (int, float)) or not 0.0 <= max_unclear <= 1.0:
        raise ValueError(f"max_unclear must be a share between 0 and 1 (1 turns the check off), got {max_unclear!r}.")
    return float(max_unclear)


def _following(outputs: Sequence[str], ok: Any, max_unclear: float) -> dict:
    max_unclear = _check_threshold(max_unclear)
    failed = [text for text in outputs if not ok(text)]
    share = len(failed) / len(outputs) if outputs else 0.0
    examples: list[str] = []
    for text in failed:  # distinct examples, in run order
        if text not in examples:
            examples.append(text)
        if len(examples) == N_EXAMPLES:
            break
    return {
        "followed_prompt": share <= max_unclear,
        "unclear_share": share,
        "n_unclear": len(failed),
        "unclear_examples": examples,
        "n": len(outputs),
        "max_unclear": max_unclear,
    }


def pope_following(answers: Iterable[str], max_unclear: float = MAX_UNCLEAR_SHARE) -> dict:
    """The prompt-following check of one POPE split.

    Args:
        answers: The model's answers (raw text, as in the records' ``answer``).
        max_unclear: Largest share of unclear answers (see :func:`pope_answer_is_clear`) of a followed prompt.

    Returns:
        ``{"followed_prompt", "unclear_share", "n_unclear", "unclear_examples", "n", "max_unclear"}``;
        ``unclear_examples`` holds up to :data:`N_EXAMPLES` distinct unclear answers. With no answers the share is 0
        (followed).

    Example:
        >>> pope_following(["a red ball", "a red ball", "No."])["followed_prompt"]
        False
    """
    return _following(list(answers), pope_answer_is_clear, max_unclear)


def chair_following(captions: Iterable[str], max_unclear: float = MAX_UNCLEAR_SHARE) -> dict:
    """The prompt-following check of a CHAIR task: same keys as :func:`pope_following`, where an unclear output is
    one that is not a caption (see :func:`is_caption`).

    Example:
        >>> chair_following(["A dog on the grass.", "yes"])["unclear_share"]
        0.5
    """
    return _following(list(captions), is_caption, max_unclear)


def task_following(kind: str, records: Sequence[Mapping[str, Any]], max_unclear: float = MAX_UNCLEAR_SHARE) -> dict:
    """:func:`pope_following` or :func:`chair_following` over the ``answer`` of each record of a task."""
    answers = [record["answer"] for record in records]
    if kind == "pope":
        return pope_following(answers, max_unclear)
    if kind == "chair":
        return chair_following(answers, max_unclear)
    raise ValueError(f"kind must be 'pope' or 'chair', got {kind!r}.")


def _quoted(examples: Sequence[str]) -> str:
    shown = [repr(text if len(text) <= 60 else text[:57] + "...") for text in examples]
    return ", ".join(shown) if shown else "none"


def not_followed_message(
    task_name: str,
    check: Mapping[str, Any],
    methods: str = "none",
    fix: str | None = None,
    baseline_followed: bool = True,
) -> str:
    """One line saying that the model did not follow a task's prompt: the share, examples and what to do.

    Args:
        task_name: ``"pope/<split>"`` or ``"chair"``.
        check: From :func:`pope_following` / :func:`chair_following` (or a task's metrics, which hold the same keys).
        methods: The method set that produced the outputs (``"none"``: plain greedy decoding).
        fix: The remedy to name (default: a generic one per task kind).
        baseline_followed: False when plain decoding did not follow this prompt either (then the method set is not
            named as a possible cause).

    Example:
        >>> not_followed_message("pope/random", pope_following(["a red ball"] * 3))  # doctest: +ELLIPSIS
        "pope/random: the model does not answer yes/no to this prompt: 100% of its 3 answers hold no yes/no word..."
    """
    share, n = check["unclear_share"], check["n"]
    examples = _quoted(check.get("unclear_examples") or [])
    who = "the model" if methods == "none" else f"the model with {methods!r}"
    if task_name.split("/", 1)[0] == "pope":
        problem = (
            f"{who} does not answer yes/no to this prompt: {100 * share:.0f}% of its {n} answers hold no "
            f"yes/no word in their first sentence (e.g. {examples}), which the POPE rule would count as 'yes'; "
            f"accuracy and F1 of this split are withheld"
        )
        fix = fix or "ask for a yes/no answer in the prompt, or use a model that follows it"
    else:
        problem = (
            f"{who} does not caption the image for this prompt: {100 * share:.0f}% of its {n} outputs are "
            f"not captions (a yes/no answer or under {MIN_CAPTION_WORDS} words, e.g. {examples}), which CHAIR "
            f"would score as captions without hallucination; the CHAIR numbers are withheld"
        )
        fix = fix or "use a caption prompt the model follows, or a model that captions"
    if methods != "none" and baseline_followed:
        fix += f", or compare with plain decoding (--methods none): {methods!r} may be what breaks the answers"
    limit = check.get("max_unclear", MAX_UNCLEAR_SHARE)
    return (
        f"{task_name}: {problem}. Fix: {fix} (the limit is --max-unclear {limit:g} of the outputs; "
        f"--max-unclear 1 turns the check off)."
    )


__all__ = [
    "MAX_UNCLEAR_SHARE",
    "YES_WORDS",
    "NO_WORDS",
    "NON_CAPTION_FIRST_WORDS",
    "MIN_CAPTION_WORDS",
    "N_EXAMPLES",
    "EXIT_PROMPT_NOT_FOLLOWED",
    "pope_answer_is_clear",
    "is_caption",
    "pope_following",
    "chair_following",
    "task_following",
    "not_followed_message",
]
