"""Calibration: profile a model's heads over a set of images once and build a :class:`HeadMap`.

Each batch costs exactly two forward passes (no generation, no cache, only the last position's
logits):

1. the image-free prompt (image span deleted, ``adapter.remove_image``): per-head outputs at the last
   position for every layer, and on the first batch the first token's layer inputs, which decide the
   sink dimensions (:func:`vlm_guard.methods.var.sinks.find_sink_dims`; that token's states do not depend on
   the image under causal attention);
2. the prompt with the image: per-head outputs at the last position (VHD against pass 1), VAR
   image-centric statistics on the text rows after the image in layers ``2 .. L-2``, and the GIFT
   gaze shift of the query rows in layers ``1 .. L-2``.

Only the rows the observers ask for are recomputed explicitly; no full attention matrix is stored.

Example (not run: profiles 200 photos)::

    import vlm_guard
    model, processor = vlm_guard.load_default()
    head_map = vlm_guard.calibrate(model, processor, "photos/*.jpg", limit=200, out_dir="maps/toy")
    print(head_map.summary())
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from vlm_guard.calibration.head_map import HeadMap, ImageCentricStats, cache_report, save_to_cache
from vlm_guard.calibration.session import ProfilingSession, profiling_session
from vlm_guard.images import IMAGE_EXTENSIONS
from vlm_guard.methods.gift.layer import GazeShiftObserver, candidate_layers, choose_saliency_layer, enhancement_layers
from vlm_guard.methods.var.sinks import (
    DEFAULT_RHO,
    FIRST_SINK_LAYER,
    SINK_THRESHOLD,
    VISUAL_MASS_THRESHOLD,
    FirstTokenRecorder,
    ImageCentricObserver,
    find_sink_dims,
)
from vlm_guard.methods.vhr.vhd import DISTANCES, OUTLIER_FILTERS, HeadOutputRecorder, VHDAccumulator, stack_divergence
from vlm_guard.models.fingerprint import weights_sample
from vlm_guard.parallel import DataParallel, shard_batches
from vlm_guard.version import __version__

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Please describe this image in detail."
MAX_SKIPPED_LISTED = 50
MIN_CALIBRATION_IMAGES = 16
"""Fewer calibration images than this draw a warning. Measured on the default model (``docs/calibration.md``,
``scripts/calibration_stability.py`` -> ``docs/results/calibration_stability.json``): the VHR heads chosen from two
disjoint image sets agree more as the sets grow and stop improving at 16 (Jaccard 0.91 at 2 images, 0.95 at 8, 0.96
at 16 and at 32; worst pair 0.89 / 0.90 / 0.94 / 0.95); image-centric heads agree from 4; the sink dimensions do not
depend on the images."""
GIFT_TIE = 0.05
"""The GIFT saliency layer is reported as a near tie when another candidate layer's gaze shift is within this
fraction of l*'s: then another image set may choose the other layer (on the default model, layers 1 and 23 are 3 %
apart and l* flips between them at every set size measured, up to 32 images)."""


def var_layers(num_layers: int) -> list[int]:
    """Layers where VAR acts and image-centric statistics are measured: ``2 .. L-2`` (paper: from
    layer 2, last layer excluded)."""
    return list(range(FIRST_SINK_LAYER, num_layers - 1))


class HeadProfiler:
    """Accumulates VHD, sink and gaze statistics over prompt batches; :meth:`head_map` builds the map.

    Use inside a :func:`~vlm_guard.calibration.session.profiling_session` (``calibrate`` does this), or
    through :meth:`open` for already-processed model inputs (e.g. :func:`vlm_guard.testing.build_batch`).

    Args:
        session: the profiling session of the model.
        distance: VHD distance (``"sq_l2"`` released default, ``"l2"``, ``"cosine"``).
        outlier_filter: VHR outlier filter (``"released"``, ``"always"``, ``"off"``).
        sink_dims: override the sink dimensions (None: find them from the first token).
        sink_threshold: tau (20).
        sink_dim_min_ratio: "near tau" rule for automatic sink dims (default tau / 2).
        rho / visual_mass_threshold: the image-centric test (paper 0.8 / 0.2).
    """

    def __init__(
        self,
        session: ProfilingSession,
        distance: str = "sq_l2",
        outlier_filter: str = "released",
        sink_dims: Sequence[int] | None = None,
        sink_threshold: float = SINK_THRESHOLD,
        sink_dim_min_ratio: float | None = None,
        rho: float = DEFAULT_RHO,
        visual_mass_threshold: float = VISUAL_MASS_THRESHOLD,
    ):
        if distance not in DISTANCES:
            raise ValueError(f"distance={distance!r} is not known; choose one of {list(DISTANCES)}")
        if outlier_filter not in OUTLIER_FILTERS:
            raise ValueError(f"outlier_filter={outlier_filter!r} is not known; choose one of {list(OUTLIER_FILTERS)}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho={rho} must be in [0, 1] (paper: 0.8 general, 0.5 hallucination, 0.9 vision-centric)")
        if not 0.0 <= visual_mass_threshold <= 1.0:
            raise ValueError(f"visual_mass_threshold={visual_mass_threshold} must be in [0, 1] (paper: 0.2)")
        if sink_threshold <= 0:
            raise ValueError(f"sink_threshold={sink_threshold} must be > 0 (paper tau: 20)")
        self.session = session
        geometry = session.adapter.geometry
        self.num_layers, self.num_heads, self.hidden_size = (
            geometry.num_layers,
            geometry.num_heads,
            geometry.hidden_size,
        )
        self.distance = distance
        self.outlier_filter = outlier_filter
        self.sink_threshold = float(sink_threshold)
        self.sink_dim_min_ratio = float(sink_dim_min_ratio if sink_dim_min_ratio is not None else sink_threshold / 2)
        self.rho = rho
        self.visual_mass_threshold = visual_mass_threshold
        self.all_layers = list(range(self.num_layers))
        self.vhd = VHDAccumulator(self.num_layers, self.num_heads, outlier_filter)
        self.image_centric = ImageCentricObserver(
            var_layers(self.num_layers), [], sink_threshold, visual_mass_threshold, rho
        )
        self.gaze = GazeShiftObserver(candidate_layers(self.num_layers))
        self.sink_profile: torch.Tensor | None = None
        self.sink_dim_ratios: list[float] = []
        self.sink_dims: list[int] | None = None
        self.sink_dims_source = "auto"
        if sink_dims is not None:
            dims = [int(d) for d in sink_dims]
            bad = [d for d in dims if not 0 <= d < self.hidden_size]
            if bad:
                raise ValueError(
                    f"sink_dims {bad} are outside 0..{self.hidden_size - 1}; pass hidden dimensions of this model"
                )
            self.sink_dims = dims
            self.sink_dims_source = "override"
            self.image_centric.sink_dims = dims
        self.prompts_profiled = 0

    @classmethod
    def open(cls, model, processor=None, **options):
        """Context manager: ``with HeadProfiler.open(model) as profiler: profiler.profile(inputs)``."""
        import contextlib

        @contextlib.contextmanager
        def manager():
            with profiling_session(model, processor) as session:
                yield cls(session, **options)

        return manager()

    # ------------------------------------------------------------------ passes
    def profile(self, inputs: dict) -> int:
        """Profile one left-padded prompt batch (two forwards). Rows without an image are ignored.

        Args:
            inputs: model inputs from the processor (``input_ids``, ``attention_mask``, image tensors).
        Returns:
            the number of prompts (rows with an image) added.
        """
        session = self.session
        adapter = session.adapter
        inputs = session.to_model(inputs)
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
            inputs["attention_mask"] = attention_mask
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                "the prompt batch is right-padded; profiling reads the last position, so pad on the left "
                "(tokenizer.padding_side = 'left')"
            )
        has_image = adapter.prompt_spans(input_ids, attention_mask).has_image  # [B]
        if not bool(has_image.any()):
            logger.warning("a profiled batch has no image token (id %d); it is ignored", adapter.image_token_id)
            return 0

        # pass 1: image-free prompt
        text_ids, text_mask = adapter.remove_image(input_ids, attention_mask)
        without_image = HeadOutputRecorder(self.all_layers)
        observers = [without_image]
        first_token = None
        if self.sink_profile is None:
            first_token = FirstTokenRecorder(self.all_layers)
            observers.append(first_token)
        session.forward({"input_ids": text_ids, "attention_mask": text_mask}, observers)
        if first_token is not None:
            self._decide_sink_dims(first_token.states)

        # pass 2: with the image
        with_image = HeadOutputRecorder(self.all_layers)
        session.forward(inputs, [with_image, self.image_centric, self.gaze])
        vhd, text_activation = stack_divergence(
            with_image.outputs, without_image.outputs, self.all_layers, self.distance
        )
        self.vhd.update(vhd[has_image], text_activation[has_image])
        added = int(has_image.sum())
        self.prompts_profiled += added
        return added

    def decide_sink_dims(self, inputs: dict) -> None:
        """Decide the sink dimensions from one prompt batch's image-free pass alone (what :meth:`profile` does on its
        first batch), so that data-parallel ranks all use the dimensions a one-process run finds on its first batch.
        Nothing is accumulated."""
        session = self.session
        inputs = session.to_model(inputs)
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_ids, text_mask = session.adapter.remove_image(input_ids, attention_mask)
        first_token = FirstTokenRecorder(self.all_layers)
        session.forward({"input_ids": text_ids, "attention_mask": text_mask}, [first_token])
        self._decide_sink_dims(first_token.states)

    def accumulated(self) -> dict[str, torch.Tensor]:
        """Every running sum and count of the profiled statistics, as float64 tensors: summing these over profilers
        that saw disjoint prompts (data-parallel ranks) and :meth:`load_accumulated` gives the statistics of all the
        prompts, up to float summation order."""
        state = {
            "prompts_profiled": torch.tensor(float(self.prompts_profiled), dtype=torch.float64),
            "vhd.count": torch.tensor(float(self.vhd.count), dtype=torch.float64),
            "vhd.sum": self.vhd._sum.clone(),
            "vhd.sum_sq": self.vhd._sum_sq.clone(),
            "vhd.text_sum": self.vhd._text_sum.clone(),
            "vhd.selected": self.vhd._selected.clone(),
        }
        for layer, totals in self.image_centric.totals.items():
            values = [getattr(totals, name.name) for name in dataclasses.fields(totals)]
            state[f"image_centric.totals.{layer}"] = torch.tensor(values, dtype=torch.float64)
        for layer in self.image_centric.totals:
            pairs = self.image_centric.head_pairs.get(layer)
            centric = self.image_centric.head_centric.get(layer)
            zeros = torch.zeros(self.num_heads, dtype=torch.float64)
            state[f"image_centric.head_pairs.{layer}"] = zeros if pairs is None else pairs.double()
            state[f"image_centric.head_centric.{layer}"] = zeros if centric is None else centric.double()
            state[f"image_centric.seen.{layer}"] = torch.tensor(float(pairs is not None), dtype=torch.float64)
        for layer in self.gaze._sums:
            state[f"gaze.{layer}"] = torch.tensor(
                [self.gaze._sums[layer], float(self.gaze._prompts[layer])], dtype=torch.float64
            )
        return state

    def load_accumulated(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the running sums and counts by ``state`` (from :meth:`accumulated`, e.g. summed over ranks)."""
        self.prompts_profiled = int(round(float(state["prompts_profiled"])))
        self.vhd.count = int(round(float(state["vhd.count"])))
        self.vhd._sum, self.vhd._sum_sq = state["vhd.sum"].clone(), state["vhd.sum_sq"].clone()
        self.vhd._text_sum, self.vhd._selected = state["vhd.text_sum"].clone(), state["vhd.selected"].clone()
        for layer, totals in self.image_centric.totals.items():
            values = state[f"image_centric.totals.{layer}"].tolist()
            for name, value in zip(dataclasses.fields(totals), values):
                setattr(totals, name.name, float(value))
            if float(state[f"image_centric.seen.{layer}"]) > 0:
                self.image_centric.head_pairs[layer] = state[f"image_centric.head_pairs.{layer}"].float()
                self.image_centric.head_centric[layer] = state[f"image_centric.head_centric.{layer}"].float()
            else:
                self.image_centric.head_pairs.pop(layer, None)
                self.image_centric.head_centric.pop(layer, None)
        for layer in self.gaze._sums:
            total, prompts = state[f"gaze.{layer}"].tolist()
            self.gaze._sums[layer], self.gaze._prompts[layer] = float(total), int(round(prompts))

    def _decide_sink_dims(self, first_token_states: torch.Tensor) -> None:
        found = find_sink_dims(first_token_states, min_ratio=self.sink_dim_min_ratio)
        self.sink_profile = found.profile.cpu()
        if self.sink_dims is None:
            self.sink_dims = found.dims
            self.image_centric.sink_dims = found.dims
            if found.dims:
                logger.info("sink dimensions %s (ratio %s)", found.dims, [round(r, 1) for r in found.ratios])
            else:
                logger.warning(
                    "no massive activations: the largest first-token ratio |x_d|/rms is %.1f (dim %d), below %.1f "
                    "(tau/2). The head map gets no sink dimensions and VAR stays off for this model; pass sink_dims=[...] "
                    "to override.",
                    float(found.profile.max()),
                    int(found.profile.argmax()),
                    self.sink_dim_min_ratio,
                )
        self.sink_dim_ratios = [float(self.sink_profile[d]) for d in self.sink_dims]

    # ------------------------------------------------------------------ result
    def head_map(self, calibration: dict | None = None) -> HeadMap:
        """The :class:`HeadMap` of everything profiled so far.

        Raises:
            ValueError: nothing was profiled.
        """
        if self.prompts_profiled == 0:
            raise ValueError("no prompt with an image was profiled; give at least one readable image")
        stats = self.image_centric.statistics(self.num_layers, self.num_heads)
        image_centric = ImageCentricStats(
            rho=self.rho,
            mass_threshold=self.visual_mass_threshold,
            sink_threshold=self.sink_threshold,
            layers=stats["layers"],
            head_fraction=stats["head_fraction"],
            **{
                k: stats[k]
                for k in (
                    "centric_fraction",
                    "massive_fraction",
                    "visual_mass_mean",
                    "non_sink_ratio_mean",
                    "visual_sinks_mean",
                    "text_sinks_mean",
                )
            },
        )
        layer_shift = self.gaze.layer_means(self.num_layers)
        saliency = choose_saliency_layer(layer_shift, self.num_layers)
        calibration = dict(calibration or {})
        calibration.setdefault("n_images", self.prompts_profiled)
        return HeadMap(
            fingerprint=self.session.adapter.describe(),
            vhd_mean=self.vhd.mean,
            vhd_std=self.vhd.std,
            vhr_heads=self.vhd.map_heads(),
            vhd_selection_frequency=self.vhd.selection_frequency,
            text_activation_mean=self.vhd.text_activation_mean,
            distance=self.distance,
            outlier_filter=self.outlier_filter,
            sink_dims=list(self.sink_dims or []),
            sink_dim_ratios=list(self.sink_dim_ratios),
            sink_dim_profile=self.sink_profile,
            sink_dims_source=self.sink_dims_source,
            sink_threshold=self.sink_threshold,
            sink_dim_min_ratio=self.sink_dim_min_ratio,
            image_centric=image_centric,
            gift_saliency_layer=saliency,
            gift_enhance_layers=enhancement_layers(saliency, self.num_layers),
            gift_layer_shift=[float(v) for v in layer_shift],
            calibration=calibration,
            library_version=__version__,
            weights_sample=weights_sample(self.session.adapter.model)[0],
        )


# ---------------------------------------------------------------------- images and prompts
def find_calibration_images(images) -> tuple[list, dict[str, str]]:
    """``(items, skipped)``: calibration items from a folder, a glob pattern (``**`` included), one file, or a list
    of paths / PIL images, and the links skipped on the way (``name -> reason``: dangling, looping, or a second path
    to a file already listed).

    A folder contributes its files with an image extension (:data:`IMAGE_EXTENSIONS`), sorted; a glob its matching
    files, sorted (see :func:`vlm_guard.images.find_images`: symbolic links are never followed into a loop).
    Unreadable files are not filtered here: they are skipped (and counted) when loaded.

    Raises:
        ValueError: nothing matches (the message says whether links were skipped).
    """
    from vlm_guard.images import display_name, find_images

    if isinstance(images, (str, Path)):
        search = find_images(images, IMAGE_EXTENSIONS)
        if not search.files:
            path = Path(images).expanduser()
            what = (
                f"the folder holds no file ending in {list(IMAGE_EXTENSIONS)}"
                if path.is_dir()
                else "is neither a folder, a file, nor a glob that matches files"
            )
            links = f" ({len(search.skipped)} skipped: {next(iter(search.skipped.items()))})" if search.skipped else ""
            raise ValueError(f"images={display_name(images)!r}: {what}{links}; pass a folder or a glob of image files")
        return list(search.files), dict(search.skipped)
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images], {}
    return list(images), {}


def resolve_images(images) -> list:
    """The items of :func:`find_calibration_images` (skipped links are logged)."""
    items, skipped = find_calibration_images(images)
    for name, reason in skipped.items():
        logger.warning("skipping %s: %s", name, reason)
    return items


def _item_name(item, index: int) -> str:
    from vlm_guard.images import display_name

    return display_name(item) if isinstance(item, (str, Path)) else f"image #{index}"


def load_image(item):
    """An RGB PIL image from a path or a PIL image (:func:`vlm_guard.images.load_image`); raises
    :class:`~vlm_guard.images.ImageLoadError` on unreadable input."""
    from PIL import Image

    from vlm_guard.images import load_image as load_rgb

    if isinstance(item, (str, Path, Image.Image)):
        return load_rgb(item)
    raise ValueError(f"calibration images must be paths or PIL images, got {type(item).__name__}")


def build_prompt(processor, text: str) -> str:
    """The processor's chat template around an image and ``text`` (with the generation prompt), or
    ``"<image>\\n{text}"`` when the processor has no chat template (:func:`vlm_guard.models.loading.chat_prompt`)."""
    from vlm_guard.models.loading import chat_prompt

    return chat_prompt(processor, text, fallback=True)


def _normalise_prompts(prompts) -> list[str]:
    if prompts is None:
        return [DEFAULT_PROMPT]
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [str(p) for p in prompts]
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError(f"prompts={prompts!r} must be None, a non-empty string, or a list of non-empty strings")
    return prompts


class _LeftPadding:
    def __init__(self, processor):
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.previous = getattr(self.tokenizer, "padding_side", None)

    def __enter__(self):
        if self.previous is not None:
            self.tokenizer.padding_side = "left"

    def __exit__(self, *exc):
        if self.previous is not None:
            self.tokenizer.padding_side = self.previous


def _process(processor, family: str, images: list, texts: list[str]) -> dict:
    from vlm_guard.models.loading import encode_prompts

    with _LeftPadding(processor):
        encoded = encode_prompts(processor, images, texts)
    return dict(encoded)


def _decide_sinks_from_first_batch(
    profiler: HeadProfiler, processor, family: str, items: list, prompt_texts: list[str], batch_size: int
) -> None:
    """Sink dimensions from the batch a one-process calibration profiles first: the first ``batch_size`` readable
    images (one at a time if the processor rejects the batch, as :func:`calibrate` does)."""
    batch: list[tuple[object, str]] = []
    for index, item in enumerate(items):
        try:
            image = load_image(item)
        except Exception:
            continue
        batch.append((image, build_prompt(processor, prompt_texts[index % len(prompt_texts)])))
        if len(batch) == batch_size:
            break
    candidates = [batch] + [[single] for single in batch]
    for candidate in candidates if batch else []:
        try:
            inputs = _process(processor, family, [entry[0] for entry in candidate], [entry[1] for entry in candidate])
        except Exception:
            continue
        profiler.decide_sink_dims(inputs)
        return


# ---------------------------------------------------------------------- calibrate
def calibrate(
    model,
    processor,
    images,
    prompts=None,
    *,
    batch_size: int = 4,
    limit: int | None = None,
    distance: str = "sq_l2",
    outlier_filter: str = "released",
    sink_dims: Sequence[int] | None = None,
    sink_threshold: float = SINK_THRESHOLD,
    sink_dim_min_ratio: float | None = None,
    rho: float = DEFAULT_RHO,
    visual_mass_threshold: float = VISUAL_MASS_THRESHOLD,
    progress: bool = True,
    out_dir: str | Path | None = None,
    plots: bool = True,
    save_cache: bool = True,
    cache_dir: str | Path | None = None,
    parallel: DataParallel | None = None,
) -> HeadMap:
    """Profile ``model``'s heads over ``images`` and return a :class:`HeadMap`.

    Two forward passes per batch (image-free and with the image), no generation. Unreadable images
    (and images the processor rejects) are skipped, counted in ``calibration["n_skipped"]`` and listed
    (up to 50) in ``calibration["skipped"]``.

    Args:
        model: a supported VLM or a :class:`vlm_guard.GuardedModel` (profiled with its methods off).
        processor: its processor (chat template, image processing).
        images: a folder, a glob, a file, or a list of paths / PIL images.
        prompts: None (``"Please describe this image in detail."``), one string, or a list used
            in turn (image i gets ``prompts[i % len(prompts)]``).
        batch_size: prompts per forward pass.
        limit: profile at most this many images (the first ones, in sorted order).
        distance / outlier_filter: VHD options (released defaults ``"sq_l2"`` / ``"released"``).
        sink_dims: override the automatic sink dimensions.
        sink_threshold: tau (20). sink_dim_min_ratio: automatic sink dims need a ratio >= this (tau/2).
        rho / visual_mass_threshold: the image-centric test (0.8 / 0.2).
        progress: show a tqdm bar.
        out_dir: also save the map (and, with ``plots``, the PNG plots) there.
        save_cache: also save the map into the head-map cache (:func:`default_cache_dir`), where
            ``vlm_guard.wrap`` finds it; unnamed models are never cached.
        cache_dir: cache folder (default :func:`default_cache_dir`).
        parallel: the data-parallel context when several processes calibrate together (every rank calls this):
            the images are shared out by batches, every rank takes the sink dimensions from the first batch (as one
            process does), the per-rank sums and counts are added up, and rank 0 writes ``out_dir`` and the cache.
            The map equals a one-process run's up to float summation order.
    Returns:
        the :class:`HeadMap` (on every rank).
    Raises:
        ValueError: bad options, or no image could be profiled.

    Example (not run: profiles 500 COCO images on a 7B model)::

        head_map = calibrate(model, processor, "coco/val2014", limit=500, out_dir="maps/llava-7b")
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None")
    if processor is None:
        raise ValueError(
            "calibrate needs the model's processor (to build prompts and image tensors); pass processor=..."
        )
    prompt_texts = _normalise_prompts(prompts)
    items, skipped_links = find_calibration_images(images)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ValueError("images is empty: give a folder, a glob or a list of images")

    parallel = parallel or DataParallel()
    if len(items) < MIN_CALIBRATION_IMAGES and parallel.is_main:
        _warn_few_images(len(items))
    started = time.perf_counter()
    skipped: list[tuple[int, str]] = [
        (-1, f"{name}: {reason}") for name, reason in skipped_links.items()
    ]  # (item, why)
    if parallel.is_main:
        for _, line in skipped:
            logger.warning("skipping %s", line)
    with HeadProfiler.open(
        model,
        processor,
        distance=distance,
        outlier_filter=outlier_filter,
        sink_dims=sink_dims,
        sink_threshold=sink_threshold,
        sink_dim_min_ratio=sink_dim_min_ratio,
        rho=rho,
        visual_mass_threshold=visual_mass_threshold,
    ) as profiler:
        family = profiler.session.adapter.family
        if not getattr(processor, "chat_template", None):
            logger.warning("the processor has no chat template; calibration prompts are '<image token>\\n<prompt>'")
        indices = list(range(len(items)))
        if parallel.distributed:
            # every rank takes the sink dimensions from the batch a one-process run profiles first, then its share
            _decide_sinks_from_first_batch(profiler, processor, family, items, prompt_texts, batch_size)
            indices = shard_batches(indices, batch_size, parallel.rank, parallel.world_size)
        bar = tqdm(total=len(indices), desc="calibrate", unit="image", disable=not progress or not parallel.is_main)

        def run(batch: list[tuple[object, str, str, int]]) -> None:
            images_, texts = [b[0] for b in batch], [b[1] for b in batch]
            try:
                inputs = _process(processor, family, images_, texts)
            except Exception as error:  # one bad image must not sink the batch: retry one by one
                if len(batch) == 1:
                    logger.warning("skipping %s: the processor rejected it (%s)", batch[0][2], error)
                    skipped.append((batch[0][3], f"{batch[0][2]}: {error}"))
                    return
                for single in batch:
                    run([single])
                return
            profiler.profile(inputs)

        batch: list[tuple[object, str, str, int]] = []
        try:
            for index in indices:
                item = items[index]
                name = _item_name(item, index)
                try:
                    image = load_image(item)
                except Exception as error:
                    logger.warning("skipping %s", error)
                    skipped.append((index, str(error) if name in str(error) else f"{name}: {error}"))
                    bar.update(1)
                    continue
                text = build_prompt(processor, prompt_texts[index % len(prompt_texts)])
                batch.append((image, text, name, index))
                if len(batch) == batch_size:
                    run(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                run(batch)
                bar.update(len(batch))
        finally:
            bar.close()
        if parallel.distributed:  # sums and counts of every rank, added up (rank order); skipped items in item order
            shares = parallel.gather((profiler.accumulated(), [entry for entry in skipped if entry[0] >= 0]))
            total = {key: sum(state[key] for state, _ in shares) for key in shares[0][0]}
            profiler.load_accumulated(total)
            skipped = [entry for entry in skipped if entry[0] < 0] + sorted(
                (entry for _, rank_skipped in shares for entry in rank_skipped), key=lambda entry: entry[0]
            )
        skipped_lines = [line for _, line in skipped]
        if profiler.prompts_profiled == 0:
            first = f" (first: {skipped_lines[0]})" if skipped_lines else ""
            raise ValueError(
                f"no image could be profiled: {len(skipped_lines)} of {len(items)} were skipped{first}; check the images argument"
            )
        seconds = time.perf_counter() - started
        calibration = {
            "n_images": profiler.prompts_profiled,
            "n_skipped": len(skipped_lines),
            "skipped": skipped_lines[:MAX_SKIPPED_LISTED],
            "prompts": prompt_texts,
            "batch_size": batch_size,
            "limit": limit,
            "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / profiler.prompts_profiled, 4),
            "device": str(profiler.session.device),
            "dtype": str(profiler.session.dtype).replace("torch.", ""),
        }
        head_map = profiler.head_map(calibration)
    if not parallel.is_main:
        return head_map  # every rank holds the reduced map; rank 0 writes it
    if skipped:
        logger.warning("calibration skipped %d of %d images (unreadable or rejected)", len(skipped), len(items))
        if len(items) >= MIN_CALIBRATION_IMAGES > head_map.calibration["n_images"]:
            _warn_few_images(head_map.calibration["n_images"])
    if out_dir is not None:
        head_map.save_pretrained(out_dir)
        if plots:
            from vlm_guard.calibration.plots import save_plots

            save_plots(head_map, out_dir)
    tie = gift_layer_tie(head_map)
    if tie is not None:
        logger.warning(
            "the GIFT saliency layer l*=%d is a near tie with layer %d (gaze shift %.3g vs %.3g): another image "
            "set may choose layer %d; more images do not settle a tie. Check GIFT's effect with `vlm-guard tune`, "
            "or set GIFTConfig(saliency_layer=...) yourself",
            tie[0],
            tie[2],
            tie[1],
            tie[3],
            tie[2],
        )
    if save_cache:
        folder = save_to_cache(head_map, cache_dir)  # an untuned map: beside a tuned one, never over it
        if folder is not None:
            for line in cache_report(head_map, cache_dir):
                logger.info("%s", line)
    return head_map


def gift_layer_tie(head_map: HeadMap, margin: float = GIFT_TIE) -> tuple[int, float, int, float] | None:
    """``(l*, its gaze shift, runner-up layer, its gaze shift)`` when another candidate layer comes within ``margin``
    (a fraction) of l*'s gaze shift, else None."""
    from vlm_guard.methods.gift.layer import candidate_layers

    best = head_map.gift_saliency_layer
    shifts = head_map.gift_layer_shift
    if best is None or best >= len(shifts):
        return None
    top = shifts[best]
    others = [
        (shifts[layer], layer)
        for layer in candidate_layers(head_map.num_layers)
        if layer != best and layer < len(shifts) and shifts[layer] == shifts[layer]
    ]  # NaN: not measured
    if not others or not top > 0:
        return None
    value, layer = max(others)
    return (best, float(top), layer, float(value)) if value >= (1 - margin) * top else None


def _warn_few_images(count: int) -> None:
    logger.warning(
        "calibrating on %d image%s: below %d the selected heads and layers change from one image set to the "
        "next (docs/calibration.md); use at least %d images of the kind the model will see",
        count,
        "" if count == 1 else "s",
        MIN_CALIBRATION_IMAGES,
        MIN_CALIBRATION_IMAGES,
    )
