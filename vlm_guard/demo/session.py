"""The demo's engine room: run the plain and the guarded generation, collect per-token attention to
the image, read VAR's sinks and GIFT's saliency, score mentions with the grounding checker, and
compose the pictures. No Gradio here: everything is testable without a browser.

Attention per generated token: token ``t`` is shown with the attention of the query row that
produced it (the last prompt row for ``t = 0``, the row of token ``t - 1`` afterwards), averaged
over heads, restricted to the image keys.

- Plain run: the exact plain model (``guarded.disabled()``), timed; then one teacher-forced forward of
  prompt + answer records the rows (not timed). For the plain model this equals the rows seen while
  decoding.
- Guarded run: the recorder rides along with the methods (last in the post-softmax order, so it sees
  VAR's and GIFT's edits). Its time therefore includes the recording: one fp32 row per layer and step.

Example (not run: loads the default model and generates two answers)::

    session = DemoSession.load()                     # the shipped default model
    run = session.run("house.png", "Describe the image.", {"vhr": 2.0, "var": None}, max_new_tokens=32)
    run.plain.text, run.guarded.text, run.guarded.seconds
    picture, info = session.token_view(run, "guarded", token_index=0, layer=None)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm_guard.config import METHOD_ORDER, GuardConfig
from vlm_guard.core.contract import Intervention, LayerContext, PromptContext, RowSelection
from vlm_guard.demo.inputs import (
    DemoLimits,
    Example,
    image_fingerprint,
    load_examples,
    validate_image,
    validate_max_new_tokens,
    validate_prompt,
)
from vlm_guard.demo.overlay import ImageGrid, display_image, head_map_figure, heatmap_overlay, placeholder, square_grid
from vlm_guard.grounding import TRUTH
from vlm_guard.methods import registry
from vlm_guard.models.inputs import append_tokens
from vlm_guard.wrapper import GuardedModel, wrap

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Please describe this image in detail."
"""The prompt box's first text for a model of no synthetic world: ``vlm-guard caption``'s (CHAIR's wording). A model
trained on a synthetic world gets its world's caption prompt (the same words for the everyday world, the default
model's; ``describe the image`` for the shapes test fixture), as ``vlm-guard caption`` does."""

DEMO_TASK = "caption"
"""The task profile whose tuned settings the demo starts from: it asks for descriptions."""

BREAKING_DROP = 20.0
"""A row of a tuning table made before task profiles (no ``broken`` verdict) breaks the answers when it lost at least
this many points of CHAIR recall or of a POPE split's accuracy, or added as many points of POPE error, against greedy."""

LABEL_FLAGGED = "not in image"
LABEL_LOW_TVHD = "low T-VHD"
LABEL_GROUNDED = "grounded object"
LABEL_WORD = "word"
HIGHLIGHT_COLOURS = {
    LABEL_FLAGGED: "#ff5050",
    LABEL_LOW_TVHD: "#ffb020",
    LABEL_GROUNDED: "#3cc060",
    LABEL_WORD: "transparent",
}
"""Labels of the risk highlighting and their colours (``gr.HighlightedText`` color_map). Every other token
is a plain ``word`` (no colour): ``gr.HighlightedText`` only sends clicks on labelled tokens, and every
generated token must open its heatmap."""


# ---------------------------------------------------------------------------- method controls
@dataclass(frozen=True)
class MethodControl:
    """One method's switch and main strength in the UI.

    Attributes:
        name: registry name (``"vhr"``).
        label: shown name.
        strength_field: the config field the slider sets.
        minimum / maximum / step: slider range.
        fallback: slider value when the config class is not available to read its default from.
        help: one line shown under the slider.
    """

    name: str
    label: str
    strength_field: str
    minimum: float
    maximum: float
    step: float
    fallback: float
    help: str


def method_controls() -> tuple[MethodControl, ...]:
    """The controls of the registered methods that have one (``MethodSpec.ui``), in run order."""
    return tuple(
        MethodControl(
            spec.name,
            spec.ui.label,
            spec.strength_field,
            spec.ui.minimum,
            spec.ui.maximum,
            spec.ui.step,
            spec.ui.fallback,
            spec.ui.help,
        )
        for spec in registry.method_specs()
        if spec.ui is not None
    )


METHOD_CONTROLS: Sequence[MethodControl] = registry.LiveTuple(method_controls, "the demo's method controls")
"""Every method's switch and slider (a live view of the registry: a method registered later appears too)."""


@dataclass
class MethodAvailability:
    """Whether a method can run in this installation, its config class and slider default."""

    control: MethodControl
    config_class: type | None
    default: float
    note: str = ""

    @property
    def available(self) -> bool:
        return self.config_class is not None


def method_availability() -> dict[str, MethodAvailability]:
    """Every method of :data:`METHOD_CONTROLS` with its status (a missing module is a note, not an error)."""
    result = {}
    for control in METHOD_CONTROLS:
        try:
            config_class = registry.get_method(control.name).config_class
        except Exception as error:  # a module not written yet, or broken: the demo runs without it
            logger.info("method %s unavailable: %s", control.name, error)
            result[control.name] = MethodAvailability(
                control, None, control.fallback, f"{control.label} is not available in this installation ({error})."
            )
            continue
        fields = {f.name: f for f in dataclasses.fields(config_class)}
        default, note = control.fallback, ""
        if control.strength_field in fields:
            value = fields[control.strength_field].default
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                default = float(value)
        else:
            note = f"{config_class.__name__} has no field {control.strength_field!r}: the slider is ignored (defaults used)."
        result[control.name] = MethodAvailability(control, config_class, default, note)
    return result


def build_guard_config(
    settings: dict[str, float | None],
    availability: dict[str, MethodAvailability] | None = None,
    fields: dict[str, dict[str, Any]] | None = None,
) -> tuple[GuardConfig, list[str]]:
    """A :class:`GuardConfig` from the UI: ``{method: strength or None (off)}``.

    Args:
        fields: other fields to set with a method's strength (``{method: {field: value}}``, e.g. the layers of the
            setting a slider started from).
    Returns:
        ``(config, notes)``; notes say which requested methods were skipped and why.
    Raises:
        ValueError: a strength the method's config refuses (the message names the field and range).
    """
    availability = availability or method_availability()
    chosen: dict[str, Any] = {}
    notes: list[str] = []
    for name in METHOD_ORDER:
        strength = settings.get(name)
        if strength is None:
            continue
        status = availability.get(name)
        if status is None or not status.available:
            notes.append(status.note if status else f"unknown method {name!r} skipped.")
            continue
        field_names = {f.name for f in dataclasses.fields(status.config_class)}
        kwargs = {k: v for k, v in ((fields or {}).get(name) or {}).items() if k in field_names}
        if status.control.strength_field in field_names:
            kwargs[status.control.strength_field] = float(strength)
        if status.note:
            notes.append(status.note)
        chosen[name] = status.config_class(**kwargs)
    return GuardConfig(**chosen), notes


# ---------------------------------------------------------------------------- the tuning table
@dataclass(frozen=True)
class StartSetting:
    """Where a method's slider starts.

    Attributes:
        strength: the slider's value.
        fields: the other fields of that setting (run with the slider's strength), e.g. VHR's layers.
        source: where it comes from, for the page.
    """

    strength: float
    fields: dict
    source: str


def tuning_rows(head_map: Any, task: str = DEMO_TASK) -> list[dict]:
    """The rows of the tuning table that ``vlm-guard tune`` stored in ``head_map`` for ``task``'s profile (a map
    tuned before profiles: its one table), or ``[]``."""
    from vlm_guard.settings import profile_section

    if head_map is None or not getattr(head_map, "tuned", None):
        return []
    try:
        section, _ = profile_section(head_map, task)
    except ValueError as error:  # a malformed tuned section: no table (wrap reports it)
        logger.info("no tuning table: %s", error)
        return []
    rows = (section or {}).get("table") or []
    return [row for row in rows if isinstance(row, dict) and isinstance(row.get("methods"), dict)]


def _single_method(row: dict) -> tuple[str, dict] | None:
    methods = row["methods"]
    if len(methods) != 1:
        return None
    ((name, fields),) = methods.items()
    return (name, dict(fields or {})) if isinstance(fields, dict) or fields is None else None


def row_items(row: dict) -> int:
    """Items a table row was measured on (the most of any task)."""
    n = row.get("n")
    if isinstance(n, dict):
        return max((int(v) for v in n.values() if isinstance(v, (int, float))), default=0)
    return int(n) if isinstance(n, (int, float)) else 0


_DROP = re.compile(r"(recall|acc|POPE error)\s*([+-][0-9.]+)")


def row_breaks(row: dict) -> str:
    """Why a tuning-table row broke the answers (``""`` when it did not): the constraints a profile's judgement
    found broken, or in a table made before profiles, a loss of :data:`BREAKING_DROP` points or more."""
    judgement = row.get("judgement")
    if isinstance(judgement, dict):
        broken = judgement.get("broken") or []
        details = []
        for name in broken:
            interval = (judgement.get("constraints") or {}).get(name) or {}
            diff = interval.get("diff") if isinstance(interval, dict) else None
            details.append(f"{name} {diff:+.1f}" if isinstance(diff, (int, float)) else str(name))
        return ", ".join(details)
    heavy = []
    for violation in row.get("violations") or []:
        match = _DROP.search(str(violation))
        if match is None:
            continue
        value = float(match.group(2))
        if (match.group(1) == "POPE error" and value >= BREAKING_DROP) or (
            match.group(1) != "POPE error" and value <= -BREAKING_DROP
        ):
            heavy.append(str(violation))
    return ", ".join(heavy)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def _fields_match(row_fields: dict, running: dict, skip: str | None = None) -> bool:
    return all(key in running and _same(value, running[key]) for key, value in row_fields.items() if key != skip)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _showing(view: str) -> list:
    """The registered methods whose demo control shows ``view`` (``"sink_mask"``, ``"saliency"``)."""
    return [spec for spec in registry.method_specs() if spec.ui is not None and view in spec.ui.shows]


SWITCHED_OFF_HINTS = registry.MethodFacts(
    lambda spec: (spec.ui.switched_off_hint or None) if spec.ui else None,
    "what to do when the method switched itself off",
)
"""``{method: hint}`` shown when a method builds no intervention on the model (``MethodUI.switched_off_hint``)."""


# ---------------------------------------------------------------------------- attention recorder
class ImageAttentionRecorder(Intervention):
    """Observer: records the post-softmax attention of generated-token rows to the image keys.

    Batch of one. Per layer, the head-mean over image keys ``[I]`` and the total image attention.

    Args:
        num_layers: decoder layers (all are recorded).
        forced_start: None while decoding (rows: the last prompt row at prefill, then each new row);
            an int for a teacher-forced forward, where rows ``forced_start..`` of the prefill are the
            rows that produced generated tokens ``0..``.
    """

    name = "demo_attention"
    needs_image = True
    uses_weights = True

    def __init__(self, num_layers: int, forced_start: int | None = None):
        self._layers = set(range(num_layers))
        self.forced_start = forced_start
        self.image_positions: torch.Tensor | None = None  # [I] prompt positions of the image tokens
        self.maps: dict[int, dict[int, torch.Tensor]] = {}  # token -> layer -> [I] head-mean attention

    def layers(self) -> set[int]:
        return self._layers

    def begin(self, prompt: PromptContext, engine) -> None:
        if prompt.batch_size != 1:
            raise ValueError(f"ImageAttentionRecorder records one sequence, got a batch of {prompt.batch_size}")
        self.maps = {}
        self.image_positions = prompt.spans.image[0].nonzero().flatten()  # [I]

    def rows(self, ctx: LayerContext) -> torch.Tensor | None:
        if self.forced_start is None:
            return ctx.generated_rows() | ctx.last_prompt_row()
        if ctx.phase != "prefill":
            return None
        rows = torch.zeros(
            ctx.prompt.batch_size, ctx.query_length, dtype=torch.bool, device=ctx.prompt.input_ids.device
        )
        rows[:, self.forced_start :] = True
        return rows

    def on_weights(self, ctx: LayerContext, weights: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        mine = rows.mask[0].nonzero().flatten()  # [r] indices into R
        if mine.numel() == 0 or self.image_positions is None or self.image_positions.numel() == 0:
            return weights
        image_weights = weights[0][:, mine][:, :, self.image_positions.to(weights.device)]  # [H, r, I]
        per_row = image_weights.mean(dim=0).detach().cpu()  # [r, I]
        for k, r in enumerate(mine.tolist()):
            token = ctx.step if self.forced_start is None else int(rows.index[r]) - self.forced_start
            self.maps.setdefault(token, {})[ctx.layer] = per_row[k].clone()
        return weights

    def stacked(self, num_tokens: int, num_layers: int) -> np.ndarray | None:
        """``[T, L, I]`` attention to the image per token and layer (zeros where nothing was recorded)."""
        if self.image_positions is None or self.image_positions.numel() == 0 or num_tokens == 0:
            return None
        array = np.zeros((num_tokens, num_layers, self.image_positions.numel()), dtype=np.float32)
        for token, by_layer in self.maps.items():
            if 0 <= token < num_tokens:
                for layer, values in by_layer.items():
                    array[token, layer] = values.float().numpy()
        return array


# ---------------------------------------------------------------------------- results
@dataclass
class GenerationResult:
    """One answer and what the demo shows about it.

    Attributes:
        kind: ``"plain"`` or ``"guarded"``.
        text: the decoded answer.
        token_ids: generated ids (up to, not including, the end-of-sequence token).
        pieces: per-token text pieces; ``"".join(pieces) == text``.
        seconds: wall time of the generation.
        methods: methods that ran (empty for plain).
        attention: ``[T, L, I]`` head-mean attention to the image tokens, or None.
        tvhd: ``[T]`` T-VHD per token, or None when unavailable.
        mentions: grounding-checker results (``word, object, score, flagged``).
        sink_mask: VAR's visual sinks, layer -> ``[I]`` bool (guarded run with VAR only).
        saliency: GIFT's saliency ``[I]`` (guarded run with GIFT only).
        notes: things the user should know about this answer.
    """

    kind: str
    text: str
    token_ids: list[int]
    pieces: list[str]
    seconds: float
    methods: list[str] = field(default_factory=list)
    attention: np.ndarray | None = None
    tvhd: np.ndarray | None = None
    mentions: list = field(default_factory=list)
    sink_mask: dict[int, np.ndarray] | None = None
    saliency: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class DemoRun:
    """Both answers for one image and prompt.

    Attributes:
        image: the picture as the model saw it (display size).
        grid: layout of the image tokens on it, or None when unknown for this model.
        num_layers: decoder layers.
        plain / guarded: the two answers.
        ground_truth: objects of a bundled example, or None for uploads.
        notes: run-level notes (missing pieces, skipped methods).
    """

    image: Image.Image
    grid: ImageGrid | None
    num_layers: int
    plain: GenerationResult
    guarded: GenerationResult
    prompt: str = ""
    ground_truth: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def result(self, which: str) -> GenerationResult:
        if which not in ("plain", "guarded"):
            raise ValueError(f"which must be 'plain' or 'guarded', got {which!r}")
        return self.plain if which == "plain" else self.guarded


# ---------------------------------------------------------------------------- loading
def load_model(model: str | None = None, device: str = "cpu", allow_pickle: bool = False):
    """``(model, processor, name)``: the shipped default model when ``model`` is None, else a hub id or a
    local folder in its own dtype (safetensors weights only unless ``allow_pickle``), through
    :func:`vlm_guard.models.loading.load_model`, the loader of every command."""
    from vlm_guard.models.loading import load_model as load
    from vlm_guard.models.loading import model_label

    loaded, processor = load(model, device=device, allow_pickle=allow_pickle)
    return loaded, processor, model_label(model)


def model_world(model) -> str | None:
    """The synthetic world ``model`` was trained on (``config.vlm_guard_world`` or its folder's record), or None for
    any other model (real images)."""
    from vlm_guard.synthetic.worlds import CONFIG_KEY, world_of_folder

    config = getattr(model, "config", None)
    name = getattr(config, CONFIG_KEY, None)
    if name is None:
        try:
            name = world_of_folder(getattr(config, "_name_or_path", None))
        except ValueError as error:
            logger.warning("%s", error)
            name = None
    return name


def load_head_map(folder: str | Path):
    """A head map from ``vlm-guard calibrate``'s folder (raises ``FileNotFoundError`` / ``ValueError``)."""
    try:
        from vlm_guard.calibration.head_map import HeadMap
    except ImportError as error:
        raise ValueError(f"head maps are not available in this installation ({error})") from error
    return HeadMap.from_pretrained(str(folder))


def load_checker():
    """The default grounding checker, or ``(None, note)`` when it is not installed."""
    try:
        from vlm_guard.grounding import GroundingChecker

        return GroundingChecker.default(), ""
    except Exception as error:  # missing assets or module: the demo runs without flags
        logger.info("grounding checker unavailable: %s", error)
        return None, f"Grounding checker unavailable ({error}); words are not checked against the image."


# ---------------------------------------------------------------------------- session
class DemoSession:
    """One loaded model behind the demo; runs are serialised by a lock (the engine is not re-entrant).

    Args:
        model / processor: the VLM (a processor is required: the demo renders its chat template).
        head_map: a :class:`vlm_guard.calibration.head_map.HeadMap` or None (a cached one is looked up).
        checker: a grounding checker with ``check(image, caption)``, or None.
        limits: input caps.
        examples: bundled examples (default: the package's).
        model_name: shown in the UI.
        notes: startup notes shown in the UI (missing pieces).
        default_prompt: the prompt box's initial text (default: the model's world's caption prompt, as
            ``vlm-guard caption`` uses, else :data:`DEFAULT_PROMPT`).

    Grounding colours: on a bundled example, from its ground truth; otherwise from ``checker`` when it knows the
    model's world (:meth:`vlm_guard.grounding.GroundingChecker.knows_world`; a checker without that method is
    trusted); otherwise none, with a note saying why.
    """

    def __init__(
        self,
        model,
        processor,
        head_map=None,
        checker=None,
        limits: DemoLimits | None = None,
        examples: list[Example] | None = None,
        model_name: str = "",
        notes: list[str] | None = None,
        default_prompt: str | None = None,
    ):
        if processor is None:
            raise ValueError("DemoSession needs the model's processor (for images and the chat template); got None")
        self.model = model
        self.processor = processor
        self.guarded: GuardedModel = wrap(model, processor, GuardConfig(), head_map, task=DEMO_TASK)
        self.world = model_world(model)
        self.checker = checker
        self.checker_note = ""
        knows_world = getattr(checker, "knows_world", None)
        if checker is not None and callable(knows_world) and not knows_world(self.world):
            checked = getattr(checker, "world", None)
            self.checker_note = (
                f"The grounding checker knows the {checked or 'real-image'} world, not this model's "
                f"({self.world or 'real images'}): it colours no word. Bundled examples are coloured "
                "from their ground truth."
            )
            self.checker = None
        self.limits = limits or DemoLimits()
        self.examples = load_examples() if examples is None else examples
        self._example_by_fingerprint: dict[str, Example] = {}
        for example in self.examples:
            try:
                with Image.open(example.path) as image:
                    self._example_by_fingerprint[image_fingerprint(image)] = example
            except OSError as error:
                logger.warning("bundled example %s is unreadable: %s", example.path, error)
        if default_prompt is None:
            from vlm_guard.synthetic.worlds import world_kind

            default_prompt = world_kind(self.world).caption_prompt if self.world else DEFAULT_PROMPT
        self.default_prompt = default_prompt
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.notes = list(notes or [])
        self.availability = method_availability()
        self._check_methods_build()
        self.start = {name: self._start_setting(name) for name in self.availability}
        self.lock = threading.Lock()
        self.tvhd_function, tvhd_note = _find_tvhd()
        if tvhd_note:
            self.notes.append(tvhd_note)
        if self.checker_note:
            self.notes.append(self.checker_note)
        elif self.checker is None and not any(note.startswith("Grounding checker") for note in self.notes):
            self.notes.append(
                "Grounding checker unavailable; only bundled examples are coloured (from their ground truth)."
            )
        if not self.examples:
            self.notes.append("No bundled examples found (vlm_guard/assets/examples); upload an image.")

    @classmethod
    def load(
        cls,
        model: str | None = None,
        head_map: str | Path | None = None,
        limits: DemoLimits | None = None,
        use_checker: bool = True,
        device: str = "cpu",
        allow_pickle: bool = False,
    ) -> DemoSession:
        """Load a model (default: the shipped one), an optional head map and the grounding checker."""
        loaded, processor, name = load_model(model, device=device, allow_pickle=allow_pickle)
        notes = []
        head_map_object = None
        if head_map is not None:
            head_map_object = load_head_map(head_map)
        checker = None
        if use_checker:
            checker, note = load_checker()
            if note:
                notes.append(note)
        else:
            notes.append("Grounding checker switched off (--no-checker).")
        return cls(
            loaded, processor, head_map=head_map_object, checker=checker, limits=limits, model_name=name, notes=notes
        )

    def _check_methods_build(self) -> None:
        """Mark methods whose default config cannot be built for this model (e.g. no head map) as unavailable."""
        for name, status in self.availability.items():
            if not status.available:
                continue
            try:
                built = registry.get_method(name).build(
                    status.config_class(), self.guarded.adapter, self.guarded.head_map
                )
            except Exception as error:
                logger.info("method %s cannot run on this model: %s", name, error)
                status.config_class = None
                status.note = f"{status.control.label} cannot run on this model: {error}"
                continue
            if built is None:  # the method switched itself off (e.g. VAR without sink dimensions)
                status.config_class = None
                status.note = (
                    f"{status.control.label} is off for this model. {SWITCHED_OFF_HINTS.get(name, '')}".strip()
                )

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.guarded.adapter.geometry.num_layers

    @property
    def head_map(self):
        return self.guarded.head_map

    def default_methods(self) -> tuple[list[str], str]:
        """Methods switched on when the demo opens, and why: the set ``vlm-guard tune`` chose for this model's
        :data:`DEMO_TASK` profile, else PAI (:func:`vlm_guard.settings.default_methods`)."""
        from vlm_guard.settings import default_methods

        methods, reason = default_methods(self.head_map, DEMO_TASK)
        return [m for m in methods if self.availability.get(m) is not None and self.availability[m].available], reason

    def strength_default(self, name: str) -> tuple[float, str]:
        """The slider's starting value for ``name`` and its source (see :meth:`_start_setting`)."""
        start = self.start[name]
        return start.strength, start.source

    def start_fields(self) -> dict[str, dict]:
        """``{method: other fields}`` run with each slider's strength (those of the setting it started from)."""
        return {name: dict(start.fields) for name, start in self.start.items() if start.fields}

    def _start_setting(self, name: str) -> StartSetting:
        """Where the slider of ``name`` starts: the head map's tuned value for the :data:`DEMO_TASK` profile; else the
        best setting of that method the tuning table measured that did not break the answers (not adopted by tuning:
        it did not beat greedy decoding), run with that row's other fields; else the released default. The released
        strengths were chosen for 7B models and can break a small one (VHR alpha 2 on the default model)."""
        from vlm_guard.settings import tuned_settings

        status = self.availability[name]
        strength_field = status.control.strength_field
        try:
            tuned = tuned_settings(self.head_map, DEMO_TASK).get(name, {})
        except ValueError as error:
            logger.info("no tuned settings: %s", error)
            tuned = {}
        value = _number(tuned.get(strength_field))
        if value is not None:
            return StartSetting(value, {}, f"tuned, {DEMO_TASK} profile")
        candidates = []
        for row in tuning_rows(self.head_map):
            single = _single_method(row)
            if single is None or single[0] != name or "preset" in single[1] or row_breaks(row):
                continue
            strength = _number(single[1].get(strength_field))
            if strength is None or not status.control.minimum <= strength <= status.control.maximum:
                continue
            score = _number(row.get("score"))
            gain = _number((row.get("judgement") or {}).get("gain")) if isinstance(row.get("judgement"), dict) else None
            rank = -gain if gain is not None else (score if score is not None else math.inf)
            candidates.append((-row_items(row), len(row.get("violations") or []), rank, row, strength, single[1]))
        if candidates:
            _, _, _, row, strength, fields = min(candidates, key=lambda c: c[:3])
            others = {k: v for k, v in fields.items() if k != strength_field}
            return StartSetting(
                strength, others, f"best measured by tuning, not adopted: {row.get('label', name)}, n={row_items(row)}"
            )
        return StartSetting(status.default, {}, "released default")

    def setting_warnings(self, settings: dict[str, float | None]) -> list[str]:
        """One line per chosen method setting that the tuning table of the head map measured as breaking the answers
        (that exact setting, or a weaker one of the same method with the same other fields), or that is stronger than
        every setting of that method the table measured (not measured on this model: it may break the answers)."""
        rows = tuning_rows(self.head_map)
        if not rows:
            return []
        try:
            config, _ = build_guard_config(settings, self.availability, self.start_fields())
            from vlm_guard.settings import resolve_config

            resolved, _ = resolve_config(config, self.head_map, DEMO_TASK)
        except ValueError:
            return []  # the run itself reports a bad setting
        warnings = []
        for name in resolved.enabled_methods:
            status = self.availability.get(name)
            if status is None or not status.available:
                continue
            running = getattr(resolved, name).to_dict()
            strength_field = status.control.strength_field
            chosen = _number(running.get(strength_field))
            exact, weaker, strengths = [], [], []
            for row in rows:
                single = _single_method(row)
                if single is None or single[0] != name:
                    continue
                measured_strength = _number(single[1].get(strength_field))
                if measured_strength is not None:
                    strengths.append(measured_strength)
                if _fields_match(single[1], running):
                    exact.append(row)
                elif chosen is not None and _fields_match(single[1], running, skip=strength_field):
                    measured = _number(single[1].get(strength_field))
                    if measured is not None and measured < chosen and row_breaks(row):
                        weaker.append((measured, row))
            label = (
                f"{status.control.label} {strength_field}={chosen:g}" if chosen is not None else status.control.label
            )
            start = self.start.get(name)
            advice = f" Its slider started at {start.strength:g} ({start.source})." if start is not None else ""
            if exact:
                row = max(exact, key=row_items)
                why = row_breaks(row)
                if why:
                    warnings.append(
                        f"{label}: the tuning table of this model's head map measured this setting as "
                        f"breaking the answers ({why}; n={row_items(row)}).{advice}"
                    )
            elif weaker:
                measured, row = max(weaker, key=lambda item: item[0])
                warnings.append(
                    f"{label}: the tuning table of this model's head map measured a weaker setting, "
                    f"{strength_field}={measured:g}, as breaking the answers ({row_breaks(row)}; "
                    f"n={row_items(row)}).{advice}"
                )
            elif chosen is not None and strengths and chosen > max(strengths):
                warnings.append(
                    f"{label}: stronger than every {status.control.label} setting the tuning table of this "
                    f"model's head map measured (at most {strength_field}={max(strengths):g}); not measured "
                    f"on this model, it may break the answers.{advice}"
                )
        return warnings

    def example_for(self, image: Image.Image) -> Example | None:
        """The bundled example with exactly these pixels, if any."""
        return self._example_by_fingerprint.get(image_fingerprint(image))

    def prepare(self, image: Image.Image, prompt: str) -> dict:
        """Model inputs for one image and prompt, through the processor's chat template."""
        from vlm_guard.models.loading import chat_prompt

        processor = self.processor
        inputs = processor(images=image, text=chat_prompt(processor, prompt, fallback=True), return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        prepared = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(dtype)
            prepared[key] = value
        return prepared

    def image_grid(self, inputs: dict, num_image_tokens: int) -> ImageGrid | None:
        """How the image tokens lie on the picture, per family; None when unknown."""
        family = self.guarded.adapter.family
        config = self.model.config
        vision = getattr(config, "vision_config", None)
        if family in ("qwen2_vl", "qwen2_5_vl") and "image_grid_thw" in inputs:
            _, height, width = (int(v) for v in inputs["image_grid_thw"][0].tolist())
            merge = int(getattr(vision, "spatial_merge_size", 2))
            grid = ImageGrid(height // merge, width // merge)
            return grid if grid.size == num_image_tokens else None
        if family == "llava_next" and vision is not None:
            side = int(vision.image_size) // int(vision.patch_size)
            return ImageGrid(side, side) if side * side <= num_image_tokens else None
        return square_grid(num_image_tokens)

    def _center_crop(self) -> bool:
        image_processor = getattr(self.processor, "image_processor", None)
        return bool(getattr(image_processor, "do_center_crop", False)) and self.guarded.adapter.family == "llava"

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.model, "generation_config", None), getattr(self.processor, "tokenizer", None)):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def _split_answer(self, new_ids: torch.Tensor) -> tuple[list[int], list[str], str]:
        ids = []
        eos = self._eos_ids()
        for token in new_ids.tolist():
            if token in eos:
                break
            ids.append(int(token))
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        pieces, previous = [], ""
        for end in range(1, len(ids) + 1):
            text = tokenizer.decode(ids[:end], skip_special_tokens=True)
            pieces.append(text[len(previous) :] if text.startswith(previous) else text)
            previous = text
        return ids, pieces, "".join(pieces)

    # ------------------------------------------------------------------ runs
    def run(self, image, prompt: str, settings: dict[str, float | None], max_new_tokens: int | None = None) -> DemoRun:
        """Validate the inputs, generate the plain and the guarded answer, and collect what the UI shows.

        Args:
            image: a file path or PIL image (validated against the limits).
            prompt: the user's text.
            settings: ``{method: strength or None}`` (None = off).
            max_new_tokens: default ``limits.default_new_tokens``.
        Raises:
            DemoInputError: bad image, prompt or token count (message for the user).
            ValueError: a strength outside a method's range.
        """
        picture = validate_image(image, self.limits)
        prompt = validate_prompt(prompt, self.limits)
        max_new_tokens = validate_max_new_tokens(max_new_tokens or self.limits.default_new_tokens, self.limits)
        config, notes = build_guard_config(settings, self.availability, self.start_fields())
        inputs = self.prepare(picture, prompt)
        spans = self.guarded.adapter.prompt_spans(inputs["input_ids"], inputs.get("attention_mask"))
        image_positions = spans.image[0].nonzero().flatten()
        grid = self.image_grid(inputs, int(image_positions.numel()))
        if grid is None:
            notes.append(
                f"No spatial layout known for {image_positions.numel()} image tokens of this model: heatmaps are not drawn."
            )
        notes += [f"Warning: {line}" for line in self.setting_warnings(settings)]
        example = self.example_for(picture)
        with self.lock, torch.no_grad():
            plain = self._run_plain(inputs, max_new_tokens)
            guarded = self._run_guarded(inputs, max_new_tokens, config, image_positions)
            for result in (plain, guarded):
                result.tvhd = self._token_vhd(inputs, result)
                result.mentions = self._ground(picture, example, result.text)
        notes.append(self.grounding_note(example))
        if not config.enabled_methods:
            notes.append("No method is switched on: the guarded answer is the plain model's.")
        return DemoRun(
            image=display_image(picture, center_crop=self._center_crop()),
            grid=grid,
            num_layers=self.num_layers,
            plain=plain,
            guarded=guarded,
            prompt=prompt,
            ground_truth=list(example.objects) if example is not None else None,
            notes=notes,
        )

    def _generation_kwargs(self, max_new_tokens: int) -> dict:
        return {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}

    def _run_plain(self, inputs: dict, max_new_tokens: int) -> GenerationResult:
        prompt_length = inputs["input_ids"].shape[1]
        start = time.perf_counter()
        with self.guarded.disabled():
            output = self.guarded.generate(**inputs, **self._generation_kwargs(max_new_tokens))
        seconds = time.perf_counter() - start
        ids, pieces, text = self._split_answer(output[0, prompt_length:])
        result = GenerationResult("plain", text, ids, pieces, seconds)
        if ids:
            # teacher-forced: the rows that produced tokens 0..T-1 are positions prompt_length-1 .. end
            recorder = ImageAttentionRecorder(self.num_layers, forced_start=prompt_length - 1)
            answer = torch.tensor([ids[:-1]], dtype=inputs["input_ids"].dtype, device=self.device)  # [1, T-1]
            forward_inputs = append_tokens(inputs, answer)  # every per-token input grows (Qwen2-VL's mm_token_type_ids)
            with self.guarded.interventions_active([recorder]):
                self.model(**forward_inputs, use_cache=False)
            result.attention = recorder.stacked(len(ids), self.num_layers)
        return result

    def _run_guarded(
        self, inputs: dict, max_new_tokens: int, config: GuardConfig, image_positions: torch.Tensor
    ) -> GenerationResult:
        prompt_length = inputs["input_ids"].shape[1]
        self.guarded.set_config(config)
        methods = list(self.guarded.interventions)
        recorder = ImageAttentionRecorder(self.num_layers)
        # an observer runs after the methods (it sees their edited weights), under the wrapper's lock; with no
        # method on, the recorder runs as the only intervention
        watching = self.guarded.observing(recorder) if methods else self.guarded.interventions_active([recorder])
        with watching:
            start = time.perf_counter()
            output = self.guarded.generate(**inputs, **self._generation_kwargs(max_new_tokens))
            seconds = time.perf_counter() - start
        ids, pieces, text = self._split_answer(output[0, prompt_length:])
        result = GenerationResult("guarded", text, ids, pieces, seconds, methods=[i.name for i in methods])
        result.attention = recorder.stacked(len(ids), self.num_layers)
        positions = image_positions.cpu()
        generation = self.guarded.last_generation
        states = generation.states if generation is not None else {}  # what each method computed for this answer
        for intervention in methods:
            ui = registry.get_method(intervention.name).ui if registry.is_method(intervention.name) else None
            shows = ui.shows if ui is not None else ()
            label = ui.label if ui is not None else intervention.name
            state = states.get(intervention.name)
            if "sink_mask" in shows:
                sink_mask = getattr(state, "sink_mask", None)
                if isinstance(sink_mask, dict) and sink_mask:
                    result.sink_mask = {
                        int(layer): mask[0].detach().cpu()[positions].numpy().astype(bool)
                        for layer, mask in sink_mask.items()
                    }
                else:
                    result.notes.append(f"{label} ran but exposed no sinks for this prompt.")
            if "saliency" in shows:
                saliency = getattr(state, "saliency", None)
                if isinstance(saliency, torch.Tensor):
                    result.saliency = saliency[0].detach().float().cpu()[positions].numpy()
                else:
                    result.notes.append(f"{label} ran but exposed no saliency map for this prompt.")
        return result

    def grounding_note(self, example: Example | None) -> str:
        """What the answers' colours are based on, for the page."""
        if example is not None and example.objects:
            return (
                f"Colours: the example's ground truth ({', '.join(example.objects)}): green objects are in the image, "
                "red ones are not."
            )
        if self.checker is not None:
            return "Colours: the grounding checker's verdicts (a model's estimate, not ground truth)."
        why = self.checker_note or "no grounding checker is loaded."
        return f"Colours hidden: this image has no ground truth and {why[0].lower() + why[1:]}"

    def _ground(self, image: Image.Image, example: Example | None, text: str) -> list:
        """The answer's object mentions judged against the example's ground truth, else by the checker, else none."""
        if not text.strip():
            return []
        if example is not None and example.objects:
            from vlm_guard.grounding import truth_mentions
            from vlm_guard.synthetic.worlds import world_kind

            world = self._examples_world()
            parser = world_kind(world).mentions_with_words if world is not None else None
            vocabulary = sorted({o for e in self.examples for o in (*e.objects, *e.absent)})
            return truth_mentions(text, example.objects, parser, vocabulary)
        return self._check(image, text)

    def _examples_world(self) -> str | None:
        """The synthetic world the bundled examples come from: the model's, else the one whose object types hold
        every example's objects (its mention parser knows its synonyms and plurals), else None."""
        if self.world is not None:
            return self.world
        from vlm_guard.synthetic.worlds import WORLD_NAMES, world_kind

        objects = {o for e in self.examples for o in (*e.objects, *e.absent)}
        for name in WORLD_NAMES:
            if objects and objects <= set(world_kind(name).object_types):
                return name
        return None

    def _check(self, image: Image.Image, text: str) -> list:
        if self.checker is None or not text.strip():
            return []
        try:
            return list(self.checker.check(image, text))
        except Exception as error:  # the answer is still worth showing
            logger.warning("grounding checker failed on %r: %s", text, error)
            return []

    def _token_vhd(self, inputs: dict, result: GenerationResult) -> np.ndarray | None:
        if self.tvhd_function is None or not result.token_ids:
            return None
        try:
            scores = self.tvhd_function(self, inputs, result)
        except Exception as error:
            logger.warning("T-VHD failed: %s", error)
            result.notes.append(f"T-VHD could not be computed ({type(error).__name__}: {error}).")
            return None
        return None if scores is None else np.asarray(scores, dtype=np.float32)

    # ------------------------------------------------------------------ views
    def token_view(self, run: DemoRun, which: str, token_index: int, layer: int | None) -> tuple[Image.Image, str]:
        """The heatmap of one generated token (with VAR's sinks outlined) and a Markdown description.

        Args:
            run: a finished run.
            which: ``"plain"`` or ``"guarded"``.
            token_index: 0-based generated token.
            layer: a decoder layer, or None for the mean over layers.
        """
        result = run.result(which)
        if result.num_tokens == 0:
            return placeholder("The answer is empty: nothing to show."), "The answer is empty."
        token_index = int(min(max(token_index, 0), result.num_tokens - 1))
        piece = result.pieces[token_index]
        lines = [f"**{which}** token {token_index + 1}/{result.num_tokens}: `{piece.strip() or repr(piece)}`"]
        if result.attention is None or run.grid is None:
            return placeholder("No attention map for this model or answer."), "\n\n".join(lines)
        per_layer = result.attention[token_index]  # [L, I]
        values = per_layer.mean(axis=0) if layer is None else per_layer[layer]
        marks = None
        if result.sink_mask:
            if layer is None:
                stacked = np.stack(list(result.sink_mask.values()))
                marks = run.grid.to_grid(stacked.any(axis=0))
            elif layer in result.sink_mask:
                marks = run.grid.to_grid(result.sink_mask[layer])
        picture = heatmap_overlay(
            run.image, run.grid.to_grid(values), marks=marks, scale_title="attention", scale_format="{:.2%}"
        )  # colour scale: share of this token's attention per cell
        where = "mean over layers" if layer is None else f"layer {layer}"
        lines.append(
            f"Attention to the image ({where}, mean over heads): {100 * float(values.sum()):.1f}% of this token's attention."
        )
        if marks is not None and np.asarray(marks).any():
            lines.append(f"Cyan boxes: VAR's visual sink tokens ({int(np.asarray(marks).sum())} cells).")
        elif result.sink_mask:
            lines.append("VAR marked no image token as a sink here.")
        elif (
            which == "guarded"
            and (sinks := _showing("sink_mask"))
            and not any(spec.name in result.methods for spec in sinks)
        ):
            lines.append(f"Switch {' or '.join(spec.ui.label for spec in sinks)} on to see its sink tokens.")
        if result.tvhd is not None:
            lines.append(
                f"T-VHD of this token: {float(result.tvhd[token_index]):.3g} (answer median {float(np.median(result.tvhd)):.3g})."
            )
        for mention, tokens in mention_tokens(result):
            if token_index in tokens:
                if getattr(mention, "source", "checker") == TRUTH:
                    where = (
                        "not in this example (ground truth)" if mention.flagged else "in this example (ground truth)"
                    )
                    lines.append(f"Ground truth: '{mention.word}' -> {mention.object} is {where}.")
                    continue
                verdict = "flagged: probably not in the image" if mention.flagged else "grounded"
                lines.append(f"Checker: '{mention.word}' -> {mention.object}, score {mention.score:.2f} ({verdict}).")
        return picture, "\n\n".join(lines)

    def saliency_view(self, run: DemoRun) -> Image.Image:
        """The saliency over the image of a method that shows one (GIFT; guarded run), or a placeholder saying why there
        is none."""
        saliency = run.guarded.saliency
        if saliency is None:
            shown = _showing("saliency")
            labels = " or ".join(spec.ui.label for spec in shown) or "a method with a saliency map"
            running = [spec.ui.label for spec in shown if spec.name in run.guarded.methods]
            reason = (
                f"{' and '.join(running)} exposed no saliency map."
                if running
                else f"Switch {labels} on to see its saliency map."
            )
            return placeholder(reason)
        if run.grid is None:
            return placeholder("No spatial layout known for this model's image tokens.")
        return heatmap_overlay(
            run.image, run.grid.to_grid(saliency), colormap="viridis", opacity=0.6, scale_title="saliency"
        )

    def head_map_view(self) -> tuple[Image.Image | None, str]:
        """A layers x heads plot of the loaded head map's VHD, and a Markdown summary."""
        head_map = self.head_map
        if head_map is None:
            return None, "No head map loaded. Run `vlm-guard calibrate` for this model, or pass `--head-map DIR`."
        scores = getattr(head_map, "vhd_mean", None)
        summary = ""
        try:
            summary = head_map.summary() if hasattr(head_map, "summary") else ""
        except Exception as error:
            summary = f"(summary unavailable: {error})"
        summary = _format_summary(summary)
        if scores is None:
            return None, f"The head map has no VHD scores to plot.\n\n{summary}"
        scores = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
        selected = getattr(head_map, "vhr_heads", None)
        if isinstance(selected, torch.Tensor):
            selected = selected.detach().cpu().numpy().astype(bool)
        return head_map_figure(
            scores,
            title="VHD per head (dots: VHR heads)" if selected is not None else "VHD per head",
            selected=selected,
        ), summary


def _format_summary(summary) -> str:
    if isinstance(summary, dict):
        return "\n".join(f"- **{key}**: {value}" for key, value in summary.items())
    text = str(summary)
    return f"```text\n{text}\n```" if "\n" in text else text


def _find_tvhd():
    """The T-VHD scorer adapted to the demo's call, or ``(None, note)``."""
    try:
        import vlm_guard.calibration.tvhd as tvhd  # noqa: F401
    except Exception as error:
        return None, f"T-VHD is not available in this installation ({error}); only checker flags are highlighted."
    return _call_tvhd, ""


def _call_tvhd(session: DemoSession, inputs: dict, result: GenerationResult):
    from vlm_guard.calibration.tvhd import token_vhd

    generated = torch.tensor([result.token_ids], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
    return token_vhd(session.guarded, session.processor, inputs, generated)[0]  # [T], plain model's heads


# ---------------------------------------------------------------------------- highlighting
def mention_tokens(result: GenerationResult) -> list[tuple[Any, list[int]]]:
    """Each checker mention with the indices of the tokens that spell it (by character offsets)."""
    starts, position = [], 0
    for piece in result.pieces:
        starts.append(position)
        position += len(piece)
    lowered = result.text.lower()
    found, search_from = [], 0
    for mention in result.mentions:
        word = str(getattr(mention, "word", "")).lower()
        if not word:
            continue
        begin = lowered.find(word, search_from)
        if begin < 0:
            begin = lowered.find(word)
            if begin < 0:
                continue
        end = begin + len(word)
        search_from = end
        tokens = [
            i
            for i, (s, piece) in enumerate(zip(starts, result.pieces))
            if s < end and s + len(piece) > begin and piece.strip()
        ]
        found.append((mention, tokens))
    return found


def low_tvhd_tokens(result: GenerationResult, fraction: float = 0.5) -> set[int]:
    """Word tokens whose T-VHD is below ``fraction`` x the answer's median (a relative, per-answer rule)."""
    if result.tvhd is None or len(result.tvhd) == 0:
        return set()
    words = [i for i, piece in enumerate(result.pieces) if any(c.isalpha() for c in piece)]
    if not words:
        return set()
    median = float(np.median(result.tvhd[words]))
    return {i for i in words if float(result.tvhd[i]) < fraction * median}


def highlighted(result: GenerationResult) -> list[tuple[str, str]]:
    """The answer as ``(piece, label)`` pairs for ``gr.HighlightedText``, one per generated token, every one
    labelled (risk labels, else :data:`LABEL_WORD`) so that every token is clickable."""
    labels: dict[int, str] = {}
    for index in low_tvhd_tokens(result):
        labels[index] = LABEL_LOW_TVHD
    for mention, tokens in mention_tokens(result):
        truth = getattr(mention, "source", "checker") == TRUTH  # certain: wins over a low T-VHD mark
        for index in tokens:
            labels[index] = (
                LABEL_FLAGGED if mention.flagged else (LABEL_GROUNDED if truth else labels.get(index, LABEL_GROUNDED))
            )
    return [(piece, labels.get(index, LABEL_WORD)) for index, piece in enumerate(result.pieces)]
