"""How a ``generate`` call through the wrapper is read before the methods run.

transformers accepts the prompt as ``input_ids=``, as ``inputs=`` (the positional name of the first
argument) or positionally, with or without ``inputs_embeds``; the engine needs the token ids to place the
image. This module finds them, refuses what the methods cannot follow, and says when the plain model runs:

- ``input_ids`` in any of the three spellings: the methods run (embeddings, when given as well, are used
  by the model and the ids place the image).
- embeddings only: one warning, the plain model runs the call.
- assisted generation (``assistant_model``, ``prompt_lookup_num_tokens``, ``assistant_early_exit``):
  ``ValueError`` (the methods' contrast streams and per-step state do not follow rejected drafts).
- beam search or ``num_return_sequences > 1`` with a contrastive method (its contrast pass keeps
  one cache per prompt row), given as keywords or in a
  ``generation_config=`` object (or the model's own): ``ValueError`` before any work (their contrast
  pass keeps one cache per prompt row).
- ``compile_config`` with ``fullgraph=True`` (in the call, its ``generation_config`` or the model's):
  ``ValueError`` before any work: the methods run outside compiled graphs (``fullgraph=False``, the
  default, compiles the rest of the model and gives the eager tokens; ``docs/compile.md``).
- ``prefill_chunk_size``: one warning, the prompt is prefilled in one pass (the methods choose heads,
  sinks and saliency from the whole prompt); the tokens are those of the same call without chunking.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

ASSISTED_ARGUMENTS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
ONE_ROW_PER_PROMPT = ("num_beams", "num_return_sequences")


def prompt_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The prompt's token ids ``[B, S]`` of a ``generate`` call, under any of its spellings, or None."""
    for candidate in (kwargs.get("input_ids"), kwargs.get("inputs"), args[0] if args else None):
        if isinstance(candidate, torch.Tensor) and not candidate.is_floating_point() and candidate.ndim == 2:
            return candidate
    return None


def _setting(name: str, kwargs: dict, model):
    if kwargs.get(name) is not None:
        return kwargs[name]
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def check_generate_call(
    model, methods: list[str], args: tuple, kwargs: dict, contrastive: list[str] = ()
) -> tuple[torch.Tensor | None, dict]:
    """Read a guarded ``generate`` call.

    ``methods`` are the enabled methods, ``contrastive`` those among them whose contrast pass keeps one cache per
    prompt row (``MethodSpec.contrastive``).

    Returns:
        ``(input_ids or None, kwargs)``: None means the plain model runs the call (a warning was logged);
        the kwargs may have ``prefill_chunk_size`` switched off.
    Raises:
        ValueError: assisted generation with methods on; beam search or several sequences per prompt with a
            contrastive method.
    """
    compile_config = _setting("compile_config", kwargs, model)
    if compile_config is not None and getattr(compile_config, "fullgraph", False):
        raise ValueError(
            f"compile_config.fullgraph=True cannot compile vlm_guard methods {methods}: they run outside torch.compile "
            "graphs. Use CompileConfig(fullgraph=False) (the default: the rest of the model compiles, the tokens are the "
            "eager ones), or run the call inside `with guarded.disabled():`. See docs/compile.md."
        )
    contrastive = [name for name in methods if name in contrastive]
    for name in ONE_ROW_PER_PROMPT if contrastive else ():
        value = _setting(name, kwargs, model)
        if value is not None and value > 1:
            raise ValueError(
                f"{name}={value} is not supported with {contrastive}: their contrast pass keeps one cache per prompt row. "
                "Use greedy or sampling with num_beams=1 and num_return_sequences=1 (in the call and in its "
                "generation_config), or switch those methods off."
            )
    for name in ASSISTED_ARGUMENTS:
        if _setting(name, kwargs, model) is not None:
            raise ValueError(
                f"{name}={_setting(name, kwargs, model)!r}: assisted generation is not supported with vlm_guard methods "
                f"{methods} (the draft tokens it rejects would leave the methods' per-step state behind). Drop {name}, "
                "or run it on the plain model inside `with guarded.disabled():`."
            )
    input_ids = prompt_ids(args, kwargs)
    if input_ids is None:
        logger.warning(
            "vlm_guard: generate(...) got embeddings without input_ids, so the image positions are unknown; the plain "
            "model runs this call (methods %s off). Pass input_ids as well to run them.",
            methods,
        )
        return None, kwargs
    if _setting("prefill_chunk_size", kwargs, model) is not None:
        logger.warning(
            "vlm_guard: prefill_chunk_size is ignored while methods %s run: they choose heads, sinks and saliency from "
            "the whole prompt, so the prompt is prefilled in one pass (same tokens as without chunking).",
            methods,
        )
        kwargs = dict(kwargs, prefill_chunk_size=None)
    return input_ids, kwargs
