"""The ``vlm_guard`` chat model for lmms-eval: any supported VLM, with vlm-guard's methods on, in lmms-eval runs.

::

    lmms-eval --model vlm_guard \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,methods=vhr+gift,dtype=float16,device=cuda \\
        --tasks pope_full --batch_size 8 --output_path out/

Model arguments (``--model_args``, comma-separated ``key=value``):

- ``pretrained``: a hub id, a local folder (``save_pretrained``'s), or ``default`` (the shipped default model;
  ``$VLM_GUARD_DEFAULT_MODEL=fixture`` picks the 3.6M test fixture);
- ``methods``: ``none`` (default), ``vhr+gift`` (released settings), ``vhr+gift@tuned`` (the head map's tuned
  settings), ``all``, or ``auto`` (the set tuned for this model); see :mod:`.settings`;
- ``head_map``: a calibrated head-map folder (default: the cached or shipped map, as ``vlm_guard.wrap`` finds it);
- ``<method>.<field>=<value>``: one method setting (``gift.alpha=3``, ``vhr.target_layers=15-29``);
- ``dtype`` (``float32`` default, ``bfloat16``, ``float16``, ``auto``), ``device`` (``cpu`` default, ``cuda``...),
  ``attn_implementation`` (``sdpa``, ``eager``...), ``batch_size`` (rows per ``generate`` call, left-padded),
  ``trust_remote_code``, ``allow_pickle``, ``system_prompt``.

Generation is :func:`vlm_guard.eval.runner.generate_answers`, the function ``vlm-guard eval`` calls, on the same
batches (requests of one task in document order, ``batch_size`` at a time), so the answers are the same. The task's
``generation_kwargs`` are honoured: ``max_new_tokens``, greedy unless ``do_sample`` or ``temperature > 0`` (then
``temperature``, ``top_p``, ``top_k``), ``num_beams``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``,
``length_penalty``, and ``until`` (the answer is cut at the first stop string). Other keys are refused.

Any error (a bad document, a missing image, a failing ``generate``) is raised: no answer is ever replaced by an
empty string. ``loglikelihood`` is refused (lmms-eval 0.7.3 builds chat-model requests for generation only).
The resolved settings (``describe_settings()``), the active interventions and the head map's identity are
logged when the model loads and kept in :attr:`VLMGuardModel.model_info`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from loguru import logger as eval_logger

from vlm_guard.integrations.lmms_eval.settings import split_model_args

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
"""Budget of a task that sets no ``max_new_tokens``."""

PASSED_GENERATION_KWARGS = (
    "num_beams",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_new_tokens",
    "length_penalty",
)
"""Task generation kwargs handed to ``generate`` as they are."""

SAMPLING_KWARGS = ("temperature", "top_p", "top_k")
"""Task generation kwargs used only when sampling."""

IGNORED_GENERATION_KWARGS = ("do_sample", "max_new_tokens", "until", "image_aspect_ratio")
"""Read here (or meaningless for this model: ``image_aspect_ratio`` is the processor's business)."""


class GenerationFailed(RuntimeError):
    """``generate`` raised for a batch; the message names the task and documents (never scored as empty answers)."""


class VLMGuardModel(lmms):
    """lmms-eval chat model running a Hugging Face VLM through :func:`vlm_guard.wrap` (see the module docstring)."""

    is_simple = False

    def __init__(
        self,
        pretrained: str = "default",
        methods: str = "none",
        head_map: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        system_prompt: str | None = None,
        **method_fields: Any,
    ) -> None:
        super().__init__()
        from vlm_guard.checks import check_device
        from vlm_guard.eval.runner import head_map_digest, prepare_processor
        from vlm_guard.integrations.lmms_eval.settings import guard_config
        from vlm_guard.wrapper import wrap

        methods_text, fields = split_model_args({"methods": methods, **method_fields})
        self._batch_size = _positive_int("batch_size", batch_size)
        device = check_device(str(device or "cpu"), flag="device")
        model, processor, name, weights = _load(
            str(pretrained),
            dtype=str(dtype),
            device=device,
            attn_implementation=attn_implementation,
            trust_remote_code=bool(trust_remote_code),
            allow_pickle=bool(allow_pickle),
        )
        prepare_processor(processor)
        loaded_map = None
        if head_map:
            from vlm_guard.calibration.head_map import HeadMap

            loaded_map = HeadMap.from_pretrained(str(head_map))
        self.guarded = wrap(model, processor, None, loaded_map)  # None: the cached or shipped map, as wrap finds it
        self.guarded.set_config(guard_config(methods_text, fields, self.guarded.head_map))
        self.processor = processor
        self._device = device
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        found_map = self.guarded.head_map
        self.model_info = {
            "model": name,
            "weights_sha256_16": weights,
            "dtype": str(dtype),
            "device": device,
            "methods": methods_text,
            "active_methods": [intervention.name for intervention in self.guarded.interventions],
            "guard_config": self.guarded.guard_config.to_dict(),
            "settings": self.guarded.describe_settings(tuned_only=False),
            "head_map": None
            if found_map is None
            else {
                "path": str(head_map) if head_map else "found by vlm_guard.wrap (cache or shipped)",
                "digest": head_map_digest(found_map),
                "fingerprint_hash": getattr(found_map, "fingerprint_hash", None),
                "tuned_default_methods": (getattr(found_map, "tuned", None) or {}).get("default_methods"),
            },
            "batch_size": self._batch_size,
        }
        text = json.dumps(self.model_info, sort_keys=True, default=str)
        eval_logger.info(f"vlm_guard model info: {text}")
        logger.info("vlm_guard model info: %s", text)

    # ------------------------------------------------------------------ lmms-eval properties
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def model(self):
        return self.guarded.model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "--model vlm_guard does not score log-likelihoods: lmms-eval 0.7.3 builds chat-model requests for "
            "generation only (generate_until). Run a generate_until task (e.g. pope, coco_cap_chair, or "
            "`vlm-guard export-lmms`'s vlm_guard_pope / vlm_guard_chair), or ask the task for a one-letter answer."
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "--model vlm_guard answers one turn per document; multi-round tasks are not "
            "supported. Run a generate_until task."
        )

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """One answer per request, in request order; batches hold requests of one task with one set of
        generation kwargs, in document order (as ``vlm-guard eval`` batches a task's items)."""
        from tqdm import tqdm

        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            _, _, gen_kwargs, _, task, split = request.args
            key = (task, split, json.dumps(gen_kwargs, sort_keys=True, default=str))
            groups.setdefault(key, []).append(index)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlm_guard responding")
        total_tokens, total_seconds = 0, 0.0
        try:
            for indices in groups.values():
                for start in range(0, len(indices), self._batch_size):
                    batch = indices[start : start + self._batch_size]
                    answers, counts, seconds = self._answer_batch([requests[index] for index in batch])
                    total_tokens += sum(counts)
                    total_seconds += seconds
                    for index, answer, count in zip(batch, answers, counts):
                        results[index] = GenerationResult(text=answer, token_counts=TokenCounts(output_tokens=count))
                        context = requests[index].args[0]
                        self.cache_hook.add_partial("generate_until", (context, requests[index].args[2]), answer)
                    bar.update(len(batch))
        finally:
            bar.close()
        missing = [index for index, result in enumerate(results) if result is None]
        if missing:  # every request went into a batch above; this guards the invariant
            raise GenerationFailed(f"{len(missing)} request(s) got no answer (first: {missing[0]}).")
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        log_metrics(
            total_gen_tokens=total_tokens,
            total_elapsed_time=total_seconds,
            avg_speed=total_tokens / total_seconds if total_seconds > 0 else 0.0,
        )
        return results

    def _answer_batch(self, batch: Sequence[Instance]) -> tuple[list[str], list[int], float]:
        from vlm_guard.eval.runner import generate_answers

        images, prompts, names = [], [], []
        for request in batch:
            _, doc_to_messages, _, doc_id, task, split = request.args
            image, prompt = self._prompt(doc_to_messages(self.task_dict[task][split][doc_id]), task, doc_id)
            images.append(image)
            prompts.append(prompt)
            names.append(f"{task}/{split}#{doc_id}")
        generation, max_new_tokens, until = generation_settings(batch[0].args[2], names[0])
        started = time.perf_counter()
        try:
            answers = generate_answers(self.guarded, self.processor, images, prompts, max_new_tokens, **generation)
        except Exception as error:
            raise GenerationFailed(
                f"generate failed for {len(batch)} document(s) ({names[0]} ... {names[-1]}): "
                f"{type(error).__name__}: {error}"
            ) from error
        seconds = time.perf_counter() - started
        answers = [cut_at_stop(answer, until) for answer in answers]
        counts = [len(self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers]
        return answers, counts, seconds

    def _prompt(self, messages: list[dict], task: str, doc_id: int) -> tuple[Any, str]:
        """``(image, prompt text)`` of one document's chat messages: the processor's chat template over the turns,
        with an image placeholder where the image is (as :func:`vlm_guard.eval.runner.chat_prompt`)."""
        if self.system_prompt:
            messages = self._apply_system_prompt(list(messages), self.system_prompt)
        chat = ChatMessages(messages=messages)
        images, videos, audios = chat.extract_media()
        if videos or audios:
            raise ValueError(f"{task} document {doc_id} holds video or audio; --model vlm_guard takes images only.")
        if len(images) != 1:
            raise ValueError(
                f"{task} document {doc_id} holds {len(images)} images; --model vlm_guard answers about "
                f"one image per question (vlm_guard's methods locate one image span)."
            )
        turns = []
        for message in chat.messages:
            content = []
            for part in message.content:
                if part.type == "image":
                    content.append({"type": "image"})
                elif part.type == "text":
                    content.append({"type": "text", "text": part.text})
            turns.append({"role": message.role, "content": content})
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(
                f"the processor of {self.model_info['model']} has no chat template; use an "
                f"instruction-tuned checkpoint (with chat_template.json)."
            )
        prompt = self.processor.apply_chat_template(turns, add_generation_prompt=True)
        from vlm_guard.images import load_image

        return load_image(images[0]), prompt  # a path or a decoded image, as RGB (as `vlm-guard eval` reads them)


# ---------------------------------------------------------------------------------------------- helpers
def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name}={value!r}: --model vlm_guard needs a whole number >= 1 (e.g. --batch_size 8).")
    return number


def generation_settings(gen_kwargs: dict, where: str = "") -> tuple[dict, int, list[str]]:
    """``(generate kwargs, max_new_tokens, stop strings)`` from a task's ``generation_kwargs``.

    Greedy (``do_sample=False, num_beams=1``, as ``vlm-guard eval``) unless the task asks for sampling with
    ``do_sample: true`` or ``temperature > 0``.

    Raises:
        ValueError: a key this model does not know (named, with the keys it takes).

    Example:
        >>> generation_settings({"max_new_tokens": 8, "temperature": 0, "until": ["\\n"]})
        ({'do_sample': False, 'num_beams': 1}, 8, ['\\n'])
    """
    gen_kwargs = dict(gen_kwargs or {})
    known = set(PASSED_GENERATION_KWARGS) | set(SAMPLING_KWARGS) | set(IGNORED_GENERATION_KWARGS)
    unknown = sorted(set(gen_kwargs) - known)
    if unknown:
        raise ValueError(
            f"{where}: generation kwargs {unknown} are not supported by --model vlm_guard; it takes {sorted(known)}."
        )
    max_new_tokens = gen_kwargs.get("max_new_tokens")
    max_new_tokens = (
        DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else _positive_int("max_new_tokens", max_new_tokens)
    )
    temperature = gen_kwargs.get("temperature")
    sample = bool(gen_kwargs.get("do_sample")) or (temperature is not None and float(temperature) > 0)
    settings: dict[str, Any] = {"do_sample": sample, "num_beams": 1}
    for key in PASSED_GENERATION_KWARGS:
        if gen_kwargs.get(key) is not None:
            settings[key] = gen_kwargs[key]
    if sample:
        for key in SAMPLING_KWARGS:
            if gen_kwargs.get(key) is not None:
                settings[key] = gen_kwargs[key]
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [str(stop) for stop in until]
    return settings, max_new_tokens, [stop for stop in until if stop]


def cut_at_stop(answer: str, until: Sequence[str]) -> str:
    """``answer`` up to its first stop string, stripped.

    Example:
        >>> cut_at_stop("A cat.\\n\\nA dog.", ["\\n\\n"])
        'A cat.'
    """
    for stop in until:
        answer = answer.split(stop, 1)[0]
    return answer.strip()


def _load(
    pretrained: str,
    *,
    dtype: str,
    device: str,
    attn_implementation: str | None,
    trust_remote_code: bool,
    allow_pickle: bool,
):
    """``(model, processor, name, weights digest)``; ``default`` is the shipped default model."""
    from vlm_guard.checks import check_model_argument, model_load_error
    from vlm_guard.defaults import default_model_dir
    from vlm_guard.eval.runner import weights_digest
    from vlm_guard.models.loading import load_model, model_label

    model_id = None if pretrained.strip().lower() == "default" else pretrained
    check_model_argument(model_id, flag="pretrained")
    try:
        model, processor = load_model(
            model_id,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            attn_implementation=attn_implementation,
        )
    except OSError as error:
        raise model_load_error(model_id, error, flag="pretrained") from None
    return model, processor, model_label(model_id), weights_digest(model_id or default_model_dir())
