"""``vlm-guard bench``: latency and memory of every decoding method against plain ``generate``.

For each model (the shipped default model when present, and a LLaVA-1.5-shaped random model) the
configurations below run interleaved over ``--repeats`` repetitions (the order rotates each time), after
one untimed warm-up of each; medians and their ratios to plain are reported side by side:

======================  =====================================================================
configuration           what runs
======================  =====================================================================
``plain``               the unwrapped model's ``generate`` (its own attention, SDPA)
``off``                 wrapped, every method off
``vhr`` ``var`` ``gift``  one method with its defaults
``vhr+var+gift``        the three paper methods together
``pai`` ``vcd``         the baselines (their contrast passes double the work by design)
======================  =====================================================================

Measured, per run (greedy, batch ``--batch``, ``--new-tokens`` tokens, no early stop):

- prefill latency: from the ``generate`` call to the end of the first step (the prompt forward, its
  side passes and the first token's logits processors);
- decode latency per token: the median time between consecutive steps (one forward of one new row
  plus the logits processors), timed by a ``StoppingCriteria`` that runs after each step; the table
  gives the median over repetitions and its ratio to plain, ``x(min)`` the ratio of the fastest
  repetitions, and ``x(cpu)`` the ratio of the median CPU time per step of the generating thread
  (``time.thread_time``: time spent descheduled by other jobs is not counted; both are less sensitive
  to other load on a shared machine than the wall-clock median). Python's garbage collector runs before
  each timed run and is paused during it (as ``timeit`` does), so no run pays for an earlier one's garbage;
- torch operations dispatched, in a separate untimed pass (one run per configuration): every aten
  operation that reaches the dispatcher under a ``TorchDispatchMode`` (:class:`OpCounter`), views and
  factory calls included, so the count is independent of the device and of other load. Reported per
  decoding step (the median of the counts between consecutive steps) and for the prefill (up to the end
  of the first step), with their ratios to plain: a device-independent figure of the launch and
  dispatch overhead a GPU pays per step, where layers are fast;
- whether each configuration acts (``acts``): the largest change of the prefill's last logits against
  plain, and the layers each method still edits while decoding (a layer whose edit is the identity for
  the sample, e.g. VAR without a sink there, runs the plain attention and is not listed);
- peak memory at the benchmark prompt, in a separate untimed pass (one run per configuration, after the
  timed ones; a short prompt, so the figure is small and its ratio says little): the rise
  of the process's peak resident set size (``VmHWM`` in ``/proc/self/status``, reset through
  ``/proc/self/clear_refs`` before each run) over the resident size just before the run. For that pass
  glibc is told (``mallopt``) to serve every allocation above 64 KiB with its own mapping and to give
  it back on free, so the resident size follows the live tensors instead of the allocator's reuse of
  freed memory (without it the rise varies from 0 to the full value between identical runs). It counts
  activations, caches and temporaries (the weights are already resident); ``tracemalloc`` cannot see
  torch's allocations. On CUDA ``torch.cuda.max_memory_allocated`` is used;
- peak memory at a long prompt (``--long-prompt``, 8192 tokens by default, CPU): every configuration on
  a small random LLaVA-shaped model (:data:`LONG_PROMPT_MODEL`) in a fresh process each, the same
  resident-set measure (:func:`long_prompt_memory`); target <= 1.2x plain for the paper methods (the
  explicit rows of a long prefill are computed in chunks, see ``vlm_guard.core.engine``).

Targets (issue 16): decode latency all off <= 1.03x plain, VHR / VAR / GIFT each <= 1.15x, the three
together <= 1.3x; operations per decoding step all off <= 1.02x; long-prompt peak memory <= 1.2x.

The random model: CLIP-shaped vision tower at 336 px / patch 14 (576 image tokens, width scaled down),
a Llama text backbone with 32 heads (width 1024 and 6 layers by default, scaled down from 4096 x 32 so a
run takes a few minutes on a CPU). Random weights have no attention sinks, so a massive activation is
planted in hidden dimension ``PLANTED_SINK_DIM`` of the BOS embedding and VAR gets that dimension
through its config (``sink_dims``, :func:`planted_var_settings`); GIFT uses its depth-mapped default
layers. The shipped default model is too narrow for massive activations (VAR's calibration finds no sink
dimension, so VAR is off there by default): the benchmark gives VAR the dimension BOS peaks in and a
threshold under BOS's score (:func:`bench_var_settings`), so the VAR row measures VAR at work.

On a CPU shared with other jobs use ``--threads 1``: with several OpenMP threads, a descheduled thread
stalls every parallel op, which penalises the methods' many small ops far beyond their cost (on a loaded
2-core machine plain decoding measured 198 ms/token with 2 threads and 35 ms with 1).

Example:
    $ nice vlm-guard bench --threads 1 --repeats 7 --new-tokens 24 --long-prompt 8192 --out bench.json
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import StoppingCriteria, StoppingCriteriaList

from vlm_guard.config import GuardConfig
from vlm_guard.fileio import atomic_write_json, atomic_write_text
from vlm_guard.methods import registry
from vlm_guard.settings import SOURCE_TUNED
from vlm_guard.version import __version__

logger = logging.getLogger(__name__)

OFF_DECODE_TARGET = 1.03  # decode-latency ratio to plain with every method off
COMBINED_DECODE_TARGET = (
    1.3  # the paper methods together; each method's own target is its MethodSpec.bench_decode_target
)
OPS_TARGETS = {"off": 1.02}  # operations per decoding step, ratio to plain
MEMORY_TARGET = 1.2  # peak memory at the long prompt, ratio to plain, for the methods without a contrast stream


def _bench_specs() -> list:
    return [spec for spec in registry.method_specs() if spec.bench_fields is not None]


def _combined_name() -> str | None:
    paper = [spec.name for spec in _bench_specs() if spec.in_all]
    return "+".join(paper) if len(paper) > 1 else None


def configurations() -> tuple[str, ...]:
    """The rows of the table: plain, every method off, each paper method alone, the paper methods together, then the
    other registered methods (the baselines); every method with ``MethodSpec.bench_fields``."""
    specs = _bench_specs()
    combined = _combined_name()
    return (
        "plain",
        "off",
        *(spec.name for spec in specs if spec.in_all),
        *((combined,) if combined else ()),
        *(spec.name for spec in specs if not spec.in_all),
    )


def decode_targets() -> dict[str, float]:
    """Targets on the decode-latency ratio to plain; a configuration without one is reported only (contrastive
    baselines)."""
    targets = {"off": OFF_DECODE_TARGET}
    targets.update(
        {spec.name: spec.bench_decode_target for spec in _bench_specs() if spec.bench_decode_target is not None}
    )
    if _combined_name():
        targets[_combined_name()] = COMBINED_DECODE_TARGET
    return targets


def memory_target_configs() -> tuple[str, ...]:
    """The configurations held to :data:`MEMORY_TARGET` at the long prompt: those without a contrast stream."""
    contrastive = {spec.name for spec in _bench_specs() if spec.contrastive}
    return tuple(name for name in configurations()[1:] if not contrastive & set(name.split("+")))


def __getattr__(name: str):
    # the table's rows and targets follow the method registry: read at every use
    computed = {
        "CONFIGURATIONS": configurations,
        "DECODE_TARGETS": decode_targets,
        "MEMORY_TARGET_CONFIGS": memory_target_configs,
    }
    if name in computed:
        return computed[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PLANTED_SINK_DIM = 7
PLANTED_SINK_VALUE = 400.0
BOS_TOKEN, PAD_TOKEN = 1, 0
LONG_PROMPT_MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "vocab_size": 4096}


def planted_var_settings(hidden_size: int) -> dict:
    """VAR settings for a random model with the planted BOS sink: its dimension, the paper's tau = 20 when the width
    allows a larger phi (``phi <= sqrt(M)``; above 625 dimensions), else half the ceiling ``sqrt(M) / 2``; the
    text sink recycled as in the paper (the released ``require_visual_sink`` would leave every layer as is).

    Example:
        >>> planted_var_settings(1024)["tau"], planted_var_settings(256)["tau"]
        (20.0, 8.0)
    """
    from vlm_guard.methods.var.sinks import SINK_THRESHOLD

    tau = SINK_THRESHOLD if hidden_size > 625 else round(hidden_size**0.5 / 2, 3)
    return {"sink_dims": [PLANTED_SINK_DIM], "tau": float(tau), "require_visual_sink": False}


# ---------------------------------------------------------------------- models
def llava15_shaped_model(
    hidden_size: int = 1024,
    num_layers: int = 6,
    num_heads: int = 32,
    vocab_size: int = 4096,
    seed: int = 0,
    max_positions: int = 4096,
):
    """A random LLaVA-1.5-shaped model (576 image tokens, ``num_heads`` heads) scaled down for the CPU.

    The vocabulary is scaled down with the width (4096 by default) so the LM head keeps about the share
    of the per-token cost it has in LLaVA-1.5-7B (a few percent) instead of dominating it. The image
    token is the last id of the vocabulary.
    """
    import transformers

    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
        projection_dim=64,
    )
    text = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=int(hidden_size * 2.6875),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=BOS_TOKEN,
        pad_token_id=PAD_TOKEN,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab_size - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "sdpa"
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[BOS_TOKEN, PLANTED_SINK_DIM] = PLANTED_SINK_VALUE
    model.generation_config.pad_token_id = PAD_TOKEN
    model.generation_config.eos_token_id = None
    return model


def llava15_inputs(model, batch: int = 1, text_tokens: int = 40, seed: int = 0) -> dict:
    """``text_tokens`` may be large: a long prompt is a long question after the image (``--long-prompt``)."""
    # BOS, a few system tokens, 576 image tokens, then the question (``text_tokens`` text tokens in all)
    generator = torch.Generator().manual_seed(seed)
    image_token = model.config.image_token_index
    rows = []
    for _ in range(batch):
        text = torch.randint(3, image_token, (text_tokens,), generator=generator)
        rows.append(torch.cat([torch.tensor([BOS_TOKEN]), text[:5], torch.full((576,), image_token), text[5:]]))
    input_ids = torch.stack(rows)
    vision = model.config.vision_config
    pixel_values = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}


def default_model_inputs(processor, batch: int = 1) -> dict:
    from PIL import Image

    from vlm_guard.defaults import EXAMPLES_DIR

    images = (
        sorted(p for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if EXAMPLES_DIR.exists()
        else []
    )
    from vlm_guard.images import load_image

    image = load_image(images[0]) if images else Image.new("RGB", (64, 64), (120, 80, 40))
    from vlm_guard.models.loading import chat_prompt

    prompt = chat_prompt(processor, "Describe the image in detail.")
    return dict(processor(images=[image] * batch, text=[prompt] * batch, return_tensors="pt"))


def bench_var_settings(model, inputs: dict) -> dict:
    """VAR settings that make VAR act on a model without massive activations (the shipped default model is
    192 wide: ``phi <= sqrt(192) < 20``, so its calibration finds no sink dimension and VAR is off there).

    The sink dimension is the one with the largest ``|x_d| / rms(x)`` on the first prompt token (BOS), median
    over the middle layers (as calibration ranks them); ``tau`` is half of BOS's smallest ``phi`` over the VAR
    layers, so BOS is a sink in every one of them; text sinks are recycled (``require_visual_sink=False``, the
    paper's form), since BOS is a text sink. This measures what VAR costs, not what it gains.
    """
    from vlm_guard.methods.var.intervention import default_var_layers
    from vlm_guard.methods.var.sinks import massive_activation_ratios, middle_layers

    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # L+1 x [B, S, M]; [l] enters layer l
    num_layers = len(hidden) - 1
    ratios = torch.stack([massive_activation_ratios(hidden[layer][0, 0]) for layer in range(num_layers)])  # [L, M]
    dim = int(ratios[middle_layers(num_layers)].median(dim=0).values.argmax())
    bos_phi = [float(ratios[layer, dim]) for layer in default_var_layers(num_layers)]
    return {
        "sink_dims": [dim],
        "tau": round(0.5 * min(bos_phi), 3),
        "require_visual_sink": False,
        "bos_phi": [round(value, 3) for value in bos_phi],
    }


def method_configs(random_model: bool, var_override: dict | None = None) -> dict[str, GuardConfig | None]:
    """The configurations of the table. ``var_override``: VAR settings for the model (the random model's planted
    sink dimension; :func:`bench_var_settings` for a model without massive activations)."""
    if var_override is None:
        var_override = planted_var_settings(1024) if random_model else {}
    var_override = {
        key: value for key, value in var_override.items() if key in ("sink_dims", "tau", "require_visual_sink")
    }

    def with_var(config: GuardConfig) -> GuardConfig:
        if config.var is not None and var_override:
            return config.replace(var={**config.var.to_dict(), **var_override})
        return config

    configs: dict[str, GuardConfig | None] = {"plain": None, "off": GuardConfig()}
    for name in configurations()[2:]:
        methods = name.split("+")
        config = GuardConfig.from_methods(methods)
        for method in methods:  # the fields the method's spec sets for the benchmark (VCD contrasting greedy decoding)
            fields = registry.get_method(method).bench_fields
            if fields:
                config = config.replace(**{method: registry.get_method(method).config_class(**fields)})
        configs[name] = with_var(config)
    return configs


# ---------------------------------------------------------------------- measuring
class StepTimer(StoppingCriteria):
    """Records a timestamp after every generation step; never stops generation."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # CPU time of the calling thread (not counting time it was descheduled)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.thread_time())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory rise of one run, in MiB (CUDA allocator on GPU, peak RSS on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM-VmRSS"
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.method = "unavailable"
            self._start = _status_kb("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        pass

    def rise_mib(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        if self.method == "unavailable":
            return None
        peak = _status_kb("VmHWM")
        return None if peak is None else max(0, peak - self._start) / 1024


class OpCounter(TorchDispatchMode):
    """Counts the torch (aten) operations dispatched while it is active.

    Every operation that reaches the dispatcher below autograd counts once, views and in-place ops
    included; composite operations count as the operations they decompose into (``x @ w`` on a vector
    is ``unsqueeze``, ``mm``, ``squeeze_``).

    Example:
        >>> with OpCounter() as counter:
        ...     _ = (torch.ones(2) + 1).sum()
        >>> counter.total, dict(counter.by_op)
        (3, {'aten.ones.default': 1, 'aten.add.Tensor': 1, 'aten.sum.default': 1})
    """

    def __init__(self):
        super().__init__()
        self.total = 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.by_op[str(func)] += 1
        return func(*args, **(kwargs or {}))


class StepOpCounts(StoppingCriteria):
    """Records an :class:`OpCounter`'s running total after every generation step; never stops generation."""

    def __init__(self, counter: OpCounter):
        self.counter = counter
        self.totals: list[int] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        self.totals.append(self.counter.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class Run:
    prefill_ms: float
    decode_ms: float
    peak_mib: float | None
    prefill_ops: int | None = None
    decode_ops: float | None = None
    decode_cpu_ms: float | None = None


def follow_live_memory(enabled: bool = True) -> bool:
    """Make glibc map every allocation above 64 KiB separately and unmap it on free (see the module
    docstring), or (``enabled=False``) go back to glibc's default thresholds (128 KiB). Returns False
    where that is not possible (non-glibc systems)."""
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_threshold = -1, -3
    mmap_threshold, trim_threshold = (64 * 1024, 0) if enabled else (128 * 1024, 128 * 1024)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(
            libc.mallopt(m_trim_threshold, trim_threshold)
        )
    except (OSError, AttributeError):
        return False


def run_once(model, processor, config: GuardConfig | None, inputs: dict, new_tokens: int) -> Run:
    """One timed ``generate``; wraps the model for this run only (plain: unwrapped)."""
    from vlm_guard.wrapper import GuardedModel

    device = next(model.parameters()).device
    guarded = (
        None if config is None else GuardedModel(model, processor, config, head_map=_head_map_for(model, processor))
    )
    runner = model if guarded is None else guarded
    timer = StepTimer()
    gc.collect()  # as timeit does: no collection of an earlier run's garbage inside this run's timing
    gc.disable()
    try:
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            runner.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([timer]),
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        peak = memory.rise_mib()
    finally:
        gc.enable()
        if guarded is not None:
            guarded.unwrap()
    steps = [b - a for a, b in zip(timer.times, timer.times[1:])]
    cpu_steps = [b - a for a, b in zip(timer.cpu_times, timer.cpu_times[1:])]
    return Run(
        prefill_ms=(timer.times[0] - start) * 1e3,
        decode_ms=statistics.median(steps) * 1e3 if steps else float("nan"),
        peak_mib=peak,
        decode_cpu_ms=statistics.median(cpu_steps) * 1e3 if cpu_steps else float("nan"),
    )


def count_ops_once(model, processor, config: GuardConfig | None, inputs: dict, new_tokens: int) -> tuple[int, float]:
    """One untimed ``generate`` under an :class:`OpCounter`.

    Returns:
        ``(prefill_ops, decode_ops)``: the operations dispatched up to the end of the first step, and
        the median count between consecutive steps (one decoding step). The wrapping itself is not counted.
    """
    from vlm_guard.wrapper import GuardedModel

    guarded = (
        None if config is None else GuardedModel(model, processor, config, head_map=_head_map_for(model, processor))
    )
    runner = model if guarded is None else guarded
    try:
        with OpCounter() as counter:
            steps = StepOpCounts(counter)
            runner.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([steps]),
            )
    finally:
        if guarded is not None:
            guarded.unwrap()
    per_step = [b - a for a, b in zip(steps.totals, steps.totals[1:])]
    return steps.totals[0], (statistics.median(per_step) if per_step else float("nan"))


def method_action(model, processor, config: GuardConfig | None, inputs: dict) -> dict | None:
    """Whether a configuration really edits the model on these inputs: the largest change of the prefill's
    last-position logits against plain, and the layers each method still acts on while decoding."""
    from vlm_guard.wrapper import GuardedModel

    if config is None:
        return None
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1].float()
    guarded = GuardedModel(model, processor, config, head_map=_head_map_for(model, processor))
    try:
        with torch.no_grad():
            logits = guarded(**inputs).logits[:, -1].float()
        generation = guarded.last_generation  # what each method computed at this prefill (None: no method on)
        states = generation.states if generation is not None else {}
        layers = {
            intervention.name: sorted(intervention.decode_layers(states.get(intervention.name)))
            for intervention in guarded.interventions
        }
        # the settings line of each method with a field from the head map's tuned section (lines[i]: i-th method's)
        tuned = [
            line
            for name, line in zip(guarded.guard_config.enabled_methods, guarded.describe_settings())
            if SOURCE_TUNED in guarded.settings_sources.get(name, {}).values()
        ]
    finally:
        guarded.unwrap()
    return {
        "max_prefill_logit_change": float((logits - plain).abs().max()),
        "decode_layers": layers,
        "tuned_settings": tuned,
    }


def tuned_lines(results: dict) -> list[str]:
    """``config (values)`` for each configuration that ran with values from the head map's tuned section (``wrap``
    fills the fields a configuration leaves unset from there, and so does the benchmark)."""
    return [
        f"{config_name} ({'; '.join(result['acts']['tuned_settings'])})"
        for config_name, result in results.items()
        if (result.get("acts") or {}).get("tuned_settings")
    ]


_HEAD_MAPS: dict[int, object] = {}


def _head_map_for(model, processor):
    if id(model) not in _HEAD_MAPS:
        from vlm_guard.wrapper import _find_cached_head_map

        try:
            _HEAD_MAPS[id(model)] = _find_cached_head_map(model, processor)
        except Exception as error:  # a broken cache must not stop the benchmark
            logger.warning("no head map for the benchmark (%s)", error)
            _HEAD_MAPS[id(model)] = None
    return _HEAD_MAPS[id(model)]


def bench_model(name: str, model, processor, inputs: dict, configs: dict, repeats: int, new_tokens: int) -> dict:
    """Runs every configuration ``repeats`` times, interleaved, after one warm-up each."""
    names = list(configs)
    for config_name in names:  # warm-up (untimed): first-call costs, allocator growth
        run_once(model, processor, configs[config_name], inputs, min(new_tokens, 3))
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for config_name in order:
            runs[config_name].append(run_once(model, processor, configs[config_name], inputs, new_tokens))
            logger.info("%s %s repeat %d: %s", name, config_name, repeat, runs[config_name][-1])
    memory_runs = {}
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not follow_live_memory():
        logger.warning("could not tune glibc malloc: CPU peak memory will be noisy")
    try:
        # the first run after changing the thresholds is an outlier (the heap is re-laid out): discard it
        run_once(model, processor, configs[names[0]], inputs, min(new_tokens, 3))
        for config_name in names:  # memory pass (untimed)
            memory_runs[config_name] = run_once(model, processor, configs[config_name], inputs, new_tokens).peak_mib
    finally:
        if on_cpu:
            follow_live_memory(False)
    op_counts = {
        config_name: count_ops_once(model, processor, configs[config_name], inputs, new_tokens) for config_name in names
    }
    actions = {config_name: method_action(model, processor, configs[config_name], inputs) for config_name in names}
    for config_name in names:
        for run in runs[config_name]:
            run.peak_mib = memory_runs[config_name]
            run.prefill_ops, run.decode_ops = op_counts[config_name]
    results = {}
    plain = _medians(runs["plain"])
    for config_name in names:
        medians = _medians(runs[config_name])
        ratios = {
            key: (medians[key] / plain[key] if medians[key] is not None and plain[key] else None) for key in medians
        }
        target = decode_targets().get(config_name)
        ops_target = OPS_TARGETS.get(config_name)
        results[config_name] = {
            "config": None if configs[config_name] is None else configs[config_name].to_dict(),
            "runs": [run.__dict__ for run in runs[config_name]],
            "median": medians,
            "ratio_to_plain": ratios,
            "decode_target": target,
            "decode_target_met": None
            if target is None or ratios["decode_ms"] is None
            else ratios["decode_ms"] <= target,
            "ops_target": ops_target,
            "ops_target_met": None
            if ops_target is None or ratios["decode_ops"] is None
            else ratios["decode_ops"] <= ops_target,
            "acts": actions[config_name],
        }
    return results


def _medians(runs: list[Run]) -> dict:
    peaks = [r.peak_mib for r in runs if r.peak_mib is not None]
    return {
        "prefill_ms": statistics.median(r.prefill_ms for r in runs),
        "decode_ms": statistics.median(r.decode_ms for r in runs),
        "decode_ms_min": min(r.decode_ms for r in runs),
        "decode_cpu_ms": statistics.median(r.decode_cpu_ms for r in runs)
        if all(r.decode_cpu_ms is not None for r in runs)
        else None,
        "peak_mib": statistics.median(peaks) if peaks else None,
        "prefill_ops": runs[0].prefill_ops,
        "decode_ops": runs[0].decode_ops,
    }


def format_table(model_name: str, results: dict) -> str:
    lines = [
        f"== {model_name}",
        f"{'config':<14}{'prefill ms':>11}{'x':>7}{'decode ms/tok':>15}{'x':>7}{'x(min)':>8}{'x(cpu)':>8}{'peak MiB':>10}{'x':>7}"
        f"{'ops/step':>10}{'x':>7}{'prefill ops':>13}{'x':>7}  target (decode x; ops x)",
    ]
    for config_name, result in results.items():
        median, ratio = result["median"], result["ratio_to_plain"]
        target = result["decode_target"]
        verdict = ""
        if target is not None:
            verdict = f"<= {target:.2f}: {'met' if result['decode_target_met'] else 'MISSED'}"
        if result.get("ops_target") is not None:
            verdict += f"; ops <= {result['ops_target']:.2f}: {'met' if result['ops_target_met'] else 'MISSED'}"
        peak = "n/a" if median["peak_mib"] is None else f"{median['peak_mib']:.1f}"
        peak_ratio = "n/a" if ratio["peak_mib"] is None else f"{ratio['peak_mib']:.2f}"
        ops = "n/a" if median["decode_ops"] is None else f"{median['decode_ops']:.0f}"
        ops_ratio = "n/a" if ratio["decode_ops"] is None else f"{ratio['decode_ops']:.2f}"
        prefill_ops = "n/a" if median["prefill_ops"] is None else f"{median['prefill_ops']}"
        prefill_ops_ratio = "n/a" if ratio["prefill_ops"] is None else f"{ratio['prefill_ops']:.2f}"
        cpu_ratio = "n/a" if ratio.get("decode_cpu_ms") is None else f"{ratio['decode_cpu_ms']:.2f}"
        lines.append(
            f"{config_name:<14}{median['prefill_ms']:>11.1f}{ratio['prefill_ms']:>7.2f}{median['decode_ms']:>15.2f}"
            f"{ratio['decode_ms']:>7.2f}{ratio['decode_ms_min']:>8.2f}{cpu_ratio:>8}{peak:>10}{peak_ratio:>7}"
            f"{ops:>10}{ops_ratio:>7}{prefill_ops:>13}{prefill_ops_ratio:>7}  {verdict}"
        )
    acting = []
    for config_name, result in results.items():
        if result.get("acts"):
            layers = "; ".join(f"{name} {value or 'none'}" for name, value in result["acts"]["decode_layers"].items())
            acting.append(
                f"{config_name}: logits change {result['acts']['max_prefill_logit_change']:.3g}"
                f"{', decode layers ' + layers if layers else ''}"
            )
    if acting:
        lines.append("acts: " + " | ".join(acting))
    tuned = tuned_lines(results)
    if tuned:
        lines.append("head map's tuned values: " + " | ".join(tuned))
    return "\n".join(lines)


# ---------------------------------------------------------------------- long-prompt memory
def _long_prompt_child(config_name: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """One configuration in a fresh process: build the long-prompt model, warm up on a short prompt, then the
    peak resident-set rise of one ``generate`` at the long prompt (see :func:`long_prompt_memory`)."""
    from vlm_guard.wrapper import GuardedModel

    tuned = follow_live_memory()  # before anything is allocated: the heap is laid out this way from the start
    torch.set_num_threads(threads)
    shape = LONG_PROMPT_MODEL
    model = llava15_shaped_model(
        shape["hidden_size"],
        shape["num_layers"],
        shape["num_heads"],
        shape["vocab_size"],
        max_positions=prompt_tokens + new_tokens + 8,
    )
    config = long_prompt_configs()[config_name]
    text_tokens = prompt_tokens - 1 - 576
    guarded = None if config is None else GuardedModel(model, None, config)
    runner = model if guarded is None else guarded
    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    runner.generate(**llava15_inputs(model, 1, 40), **generate)  # first-call costs (thread pools, lazy imports)
    inputs = llava15_inputs(model, 1, text_tokens)
    with PeakMemory(torch.device("cpu")) as memory:
        runner.generate(**inputs, **generate)
    return {"peak_mib": memory.rise_mib(), "malloc_tuned": tuned, "prompt_length": int(inputs["input_ids"].shape[1])}


def long_prompt_configs() -> dict[str, GuardConfig | None]:
    """The table's configurations for the long-prompt model (VAR at the planted sink, tau for its width)."""
    return method_configs(True, planted_var_settings(LONG_PROMPT_MODEL["hidden_size"]))


def long_prompt_memory(prompt_tokens: int, new_tokens: int = 2, threads: int = 1, configs=None) -> dict:
    """Peak memory of every configuration at a ``prompt_tokens`` prompt on a small random LLaVA-shaped model
    (:data:`LONG_PROMPT_MODEL`; BOS, 576 image tokens, a long question), each in a fresh process.

    Measure: the rise of the process's peak resident set (``VmHWM`` after a ``clear_refs`` reset, minus
    ``VmRSS`` before) over one ``generate``, with glibc told to map large allocations separately and give them
    back on free (:func:`follow_live_memory`), so the figure follows the live tensors. A fresh process per
    configuration keeps one run's freed heap from hiding the next one's peak; the model's weights and a short
    warm-up run are resident before the measurement starts.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = {}
    for config_name in configs or long_prompt_configs():
        with context.Pool(1) as pool:
            results[config_name] = pool.apply(_long_prompt_child, (config_name, prompt_tokens, new_tokens, threads))
        logger.info("long prompt %s: %s", config_name, results[config_name])
    plain = results["plain"]["peak_mib"]
    for config_name, result in results.items():
        ratio = None if plain is None or result["peak_mib"] is None else result["peak_mib"] / plain
        result["ratio_to_plain"] = ratio
        result["memory_target"] = MEMORY_TARGET if config_name in memory_target_configs() else None
        result["memory_target_met"] = (
            None if result["memory_target"] is None or ratio is None else ratio <= MEMORY_TARGET
        )
    shape = LONG_PROMPT_MODEL
    return {
        "prompt_length": results["plain"]["prompt_length"],
        "new_tokens": new_tokens,
        "description": (
            f"random LLaVA-1.5-shaped: hidden {shape['hidden_size']}, {shape['num_layers']} layers, "
            f"{shape['num_heads']} heads, vocab {shape['vocab_size']}; BOS, 576 image tokens, a long question; "
            f"VAR at the planted sink dim {PLANTED_SINK_DIM}, tau {planted_var_settings(shape['hidden_size'])['tau']}"
        ),
        "measure": "peak RSS rise (VmHWM after clear_refs reset - VmRSS before) of one generate, fresh process per "
        "configuration, glibc mmap threshold 64 KiB and trim threshold 0",
        "configs": results,
    }


def format_long_prompt(report: dict) -> str:
    lines = [
        f"== peak memory at a {report['prompt_length']}-token prompt ({report['description']})",
        f"{'config':<14}{'peak MiB':>10}{'x':>7}  target",
    ]
    for config_name, result in report["configs"].items():
        peak = "n/a" if result["peak_mib"] is None else f"{result['peak_mib']:.1f}"
        ratio = "n/a" if result["ratio_to_plain"] is None else f"{result['ratio_to_plain']:.2f}"
        verdict = ""
        if result["memory_target"] is not None:
            verdict = f"<= {result['memory_target']:.2f}: {'met' if result['memory_target_met'] else 'MISSED'}"
        lines.append(f"{config_name:<14}{peak:>10}{ratio:>7}  {verdict}")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The report as markdown tables (what ``--markdown`` writes): per model the ratios to plain and the targets,
    then the long-prompt memory."""

    def ratio(value):
        return "n/a" if value is None else f"{value:.2f}"

    def verdict(met):
        return "" if met is None else (" ✓" if met else " ✗")

    lines = [
        f"Generated by `vlm-guard bench` (vlm_guard {report['vlm_guard_version']}, torch {report['torch']}, transformers "
        f"{report['transformers']}, {report['device']} {report.get('dtype', 'float32')}, {report['threads']} thread(s), {report['settings']['repeats']} "
        f"interleaved repetitions, {report['settings']['new_tokens']} new tokens). Ratios to plain `generate`; "
        "decode x: median wall-clock time per step, x(cpu): median CPU time per step of the generating thread; "
        "✓/✗: the row's target (in brackets) met or missed.",
        "",
    ]
    for model in report["models"].values():
        lines += [
            f"### {model['description']} (prompt {model['prompt_length']} tokens)",
            "",
            "| config | decode ms/tok | decode x | x(cpu) | prefill x | peak memory x | ops/step | ops x | prefill ops x |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, result in model["configs"].items():
            median, ratios = result["median"], result["ratio_to_plain"]
            target = (
                ""
                if result["decode_target"] is None
                else f" (<= {result['decode_target']:.2f}{verdict(result['decode_target_met'])})"
            )
            ops_target = (
                ""
                if result.get("ops_target") is None
                else f" (<= {result['ops_target']:.2f}{verdict(result['ops_target_met'])})"
            )
            lines.append(
                f"| {name} | {median['decode_ms']:.2f} | {ratio(ratios['decode_ms'])}{target} | "
                f"{ratio(ratios.get('decode_cpu_ms'))} | {ratio(ratios['prefill_ms'])} | {ratio(ratios.get('peak_mib'))} | "
                f"{median['decode_ops']:.0f} | "
                f"{ratio(ratios['decode_ops'])}{ops_target} | {ratio(ratios['prefill_ops'])} |"
            )
        tuned = tuned_lines(model["configs"])
        if tuned:
            lines += [
                "",
                "Rows that ran with values from the head map's tuned section (`wrap` fills a field the row's "
                "configuration leaves unset from there): " + "; ".join(f"`{line}`" for line in tuned),
            ]
        if model.get("var_settings"):
            lines += ["", f"VAR settings for this model (see `bench_var_settings`): {model['var_settings']}"]
        lines.append("")
    if "long_prompt" in report:
        long_prompt = report["long_prompt"]
        lines += [
            f"### Peak memory at a {long_prompt['prompt_length']}-token prompt",
            "",
            long_prompt["description"] + "; " + long_prompt["measure"] + ".",
            "",
            "| config | peak MiB | x plain |",
            "|---|---|---|",
        ]
        for name, result in long_prompt["configs"].items():
            target = (
                ""
                if result["memory_target"] is None
                else f" (<= {result['memory_target']:.2f}{verdict(result['memory_target_met'])})"
            )
            peak = "n/a" if result["peak_mib"] is None else f"{result['peak_mib']:.1f}"
            lines.append(f"| {name} | {peak} | {ratio(result['ratio_to_plain'])}{target} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- command
def _on_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The model inputs on ``device``, floating ones (pixel values) in ``dtype``."""
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


def run_bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {
        "vlm_guard_version": __version__,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "settings": {
            "repeats": args.repeats,
            "new_tokens": args.new_tokens,
            "batch": args.batch,
            "memory_measure": "cuda.max_memory_allocated"
            if device.type == "cuda"
            else "peak RSS rise (VmHWM after reset - VmRSS before)",
            "op_count": "aten ops dispatched under a TorchDispatchMode, one untimed run per configuration: "
            "prefill_ops up to the end of the first step, decode_ops the median per decoding step",
        },
        "targets": {
            "decode_ratio": decode_targets(),
            "ops_per_step_ratio": OPS_TARGETS,
            "long_prompt_peak_memory_ratio": {name: MEMORY_TARGET for name in memory_target_configs()},
        },
        "models": {},
        "notes": [],
    }
    tables = []
    if args.model in ("default", "both", "all", "fixture"):
        try:
            from vlm_guard.defaults import describe_default, load_default, load_fixture

            if args.model in ("all", "fixture"):
                model, processor = load_fixture(device=str(device), dtype=dtype)
                description = "the 3.6M test fixture (vlm_guard.defaults.load_fixture())"
            else:
                model, processor = load_default(device=str(device), dtype=dtype)
                description = f"vlm_guard.load_default(): {describe_default()}"
        except (FileNotFoundError, OSError) as error:
            which = "the test fixture" if args.model in ("all", "fixture") else "default model"
            report["notes"].append(f"{which} skipped: {error}")
            tables.append(f"== {which}: skipped ({error})")
        else:
            inputs = _on_device(default_model_inputs(processor, args.batch), device, dtype)
            var_settings = bench_var_settings(model, inputs)
            results = bench_model(
                "default", model, processor, inputs, method_configs(False, var_settings), args.repeats, args.new_tokens
            )
            key = "fixture" if args.model in ("all", "fixture") else "default"
            report["models"][key] = {
                "description": description,
                "prompt_length": int(inputs["input_ids"].shape[1]),
                "var_settings": var_settings,
                "configs": results,
            }
            tables.append(format_table(f"{description} (prompt {inputs['input_ids'].shape[1]} tokens)", results))
    if args.model in ("default-v2", "all"):
        try:
            from vlm_guard.defaults import load_default_v2

            model, processor = load_default_v2(args.v2_weights, device=str(device), dtype=dtype)
        except (FileNotFoundError, OSError, ModuleNotFoundError) as error:
            report["notes"].append(f"default model v2 skipped: {error}")
            tables.append(f"== default model v2: skipped ({error})")
        else:
            inputs = _on_device(default_model_inputs(processor, args.batch), device, dtype)
            var_settings = bench_var_settings(model, inputs)
            results = bench_model(
                "default-v2",
                model,
                processor,
                inputs,
                method_configs(False, var_settings),
                args.repeats,
                args.new_tokens,
            )
            geometry = model.config.text_config
            description = (
                f"default model v2 ({args.v2_weights or 'shipped'}): {geometry.num_hidden_layers} layers, hidden "
                f"{geometry.hidden_size}, {geometry.num_attention_heads} heads ({geometry.num_key_value_heads} kv)"
            )
            report["models"]["default_v2"] = {
                "description": description,
                "prompt_length": int(inputs["input_ids"].shape[1]),
                "var_settings": var_settings,
                "configs": results,
            }
            tables.append(format_table(f"{description} (prompt {inputs['input_ids'].shape[1]} tokens)", results))
    if args.model in ("random", "both", "all"):
        model = llava15_shaped_model(args.hidden_size, args.layers, args.heads, args.vocab_size).to(device, dtype)
        inputs = _on_device(llava15_inputs(model, args.batch), device, dtype)
        results = bench_model(
            "llava15-shaped",
            model,
            None,
            inputs,
            method_configs(True, planted_var_settings(args.hidden_size)),
            args.repeats,
            args.new_tokens,
        )
        description = (
            f"random LLaVA-1.5-shaped: 576 image tokens (336 px, patch 14), {args.heads} heads, hidden {args.hidden_size}, "
            f"{args.layers} layers, vocab {args.vocab_size}; planted sink dim {PLANTED_SINK_DIM} on BOS, VAR tau "
            f"{planted_var_settings(args.hidden_size)['tau']}"
        )
        report["models"]["llava15_shaped"] = {
            "description": description,
            "prompt_length": int(inputs["input_ids"].shape[1]),
            "configs": results,
        }
        tables.append(format_table(description, results))
    if args.long_prompt:
        if device.type != "cpu":
            report["notes"].append("the long-prompt memory pass runs on the CPU only; skipped")
        else:
            report["long_prompt"] = long_prompt_memory(args.long_prompt, threads=torch.get_num_threads())
            tables.append(format_long_prompt(report["long_prompt"]))
    report["table"] = "\n\n".join(tables)
    return report


def _command(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats} must be at least 1")
    if args.long_prompt and args.long_prompt < 1024:
        raise ValueError(
            f"--long-prompt={args.long_prompt} must be 0 (skip) or at least 1024 tokens (576 are image tokens)"
        )
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens={args.new_tokens} must be at least 2 (decode latency needs two steps)")
    report = run_bench(args)
    print(report["table"])
    for note in report["notes"]:
        print(f"note: {note}")
    if args.out:
        atomic_write_json(args.out, report, indent=2, allow_nan=True)
        print(f"wrote {args.out}")
    if args.markdown:
        atomic_write_text(args.markdown, format_markdown(report))
        print(f"wrote {args.markdown}")
    return 0


# the parser of `vlm-guard bench` lives in vlm_guard.cli.bench (this module imports torch and transformers)
