"""The head map: what calibration learned about one model's attention heads, saved once and reused.

A :class:`HeadMap` holds, for one model (identified by its fingerprint, ``adapter.describe()``):

- VHD: mean and spread over the calibration images (``[L, H]``), the text activation TA, the
  per-sample selection frequency and the selected VHR heads per layer;
- VAR: the sink dimensions with their magnitude ratios (or none, which switches VAR off), and
  image-centric head statistics per layer (:class:`ImageCentricStats`);
- GIFT: the saliency layer l* and the suggested enhancement layers;
- the library version and a summary of the calibration set.

On disk a head map is a folder with ``head_map.json`` (readable; everything but the large tensors)
and ``head_map.safetensors`` (the ``[L, H]`` tensors and the ``[M]`` sink-dimension profile); never
pickle. ``calibrate`` also writes the PNG plots there (:mod:`vlm_guard.calibration.plots`). The two files are a bound
pair: :meth:`HeadMap.save_pretrained` writes both under temporary names and then renames them, and the JSON records
the tensors file's SHA-256 (``tensors_sha256``), which :meth:`HeadMap.from_pretrained` checks; every JSON field is
checked against its schema on reading (:mod:`vlm_guard.calibration.head_map_schema`), with one line naming the file and
the field.

Identity: the fingerprint holds the family, class and geometry of the model plus the digests of its
config and weights (:mod:`vlm_guard.models.fingerprint`). :meth:`HeadMap.check_compatible` refuses a
map whose geometry or weights digest differs from the model's, and a map that lacks any of these
identity fields (an edited file, or one written before format version 2): the model's name is not
evidence (``runA/checkpoint-final`` and ``runB/checkpoint-final`` share it). A map made in another
dtype is accepted when the weight sample stored with it agrees up to float16/bfloat16 rounding. The
config digest is compared when the map was made with the same transformers major.minor version (the
serialised config gains and loses default keys between versions).

Cache: :func:`default_cache_dir` is ``$VLM_GUARD_CACHE`` when set, else
``~/.cache/vlm_guard/head_maps``. Calibration saves each map there too, in a folder named
``<model name>-<fingerprint hash>``, where the hash covers the geometry and the config and weights
digests, and :func:`find_cached_head_map` (called by ``vlm_guard.wrap`` when no map is passed) looks
it up by that hash. Models without a name (``config._name_or_path`` empty, e.g. built from a config in
a test) are not cached.

Example (not run: calibrates a real model)::

    head_map = vlm_guard.calibrate(model, processor, images)
    head_map.save_pretrained("maps/llava-7b")
    head_map = HeadMap.from_pretrained("maps/llava-7b")
    print(head_map.summary())
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_guard.version import __version__

logger = logging.getLogger(__name__)

FORMAT_NAME = "vlm_guard.head_map"
FORMAT_VERSION = 2  # 2: the fingerprint carries config and weights digests, the tensors a weight sample
JSON_FILE = "head_map.json"
TENSOR_FILE = "head_map.safetensors"
CACHE_ENV = "VLM_GUARD_CACHE"
# fingerprint fields that must match exactly
GEOMETRY_KEYS = ("family", "model_class", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")
# the digests that tie a map to one checkpoint (see vlm_guard.models.fingerprint)
DIGEST_KEYS = ("config_digest", "weights_digest")
IDENTITY_KEYS = GEOMETRY_KEYS + DIGEST_KEYS
MAX_JSON_BYTES = 16 << 20
TENSORS_DIGEST_KEY = "tensors_sha256"  # in head_map.json: the SHA-256 of the head_map.safetensors written with it


class HeadMapMismatchError(ValueError):
    """A head map was made for another model (its fingerprint differs from the model's)."""


class HeadMapFileError(ValueError):
    """A head-map file is unreadable, corrupt or incomplete (the message names the file)."""


# ---------------------------------------------------------------------- fingerprints
def model_name(fingerprint: dict) -> str:
    """The last path component of ``name_or_path`` ("llava-hf/llava-1.5-7b-hf" -> "llava-1.5-7b-hf");
    used only to name cache folders (identity is checked by digests)."""
    name = str(fingerprint.get("name_or_path") or "").replace("\\", "/").rstrip("/")
    return name.rsplit("/", 1)[-1]


def fingerprint_hash(fingerprint: dict) -> str:
    """16 hex digits identifying the geometry and the config and weights digests (names cache folders)."""
    key = {k: fingerprint.get(k) for k in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def missing_identity(fingerprint: Any) -> list[str]:
    """Identity fields absent (or empty) from ``fingerprint``."""
    if not isinstance(fingerprint, dict):
        return list(IDENTITY_KEYS)
    return [k for k in IDENTITY_KEYS if fingerprint.get(k) in (None, "")]


def _minor_version(version: Any) -> str:
    return ".".join(str(version or "").split(".")[:2])


def fingerprint_mismatches(
    expected: dict, actual: dict, expected_sample: torch.Tensor | None = None, actual_sample: torch.Tensor | None = None
) -> list[str]:
    """Identity fields that differ between a map's fingerprint and a model's.

    Geometry must be equal. The weights digest must be equal, unless the two were made in different dtypes
    and both weight samples are given and agree up to float16/bfloat16 rounding. The config digest is compared
    only when both were made with the same transformers major.minor version.
    """
    from vlm_guard.models.fingerprint import samples_match

    differing = [k for k in GEOMETRY_KEYS if expected.get(k) != actual.get(k)]
    if expected.get("weights_digest") != actual.get("weights_digest"):
        other_dtype = expected.get("weights_dtype") != actual.get("weights_dtype")
        if not (
            other_dtype
            and expected_sample is not None
            and actual_sample is not None
            and samples_match(expected_sample, actual_sample)
        ):
            differing.append("weights_digest")
    if expected.get("config_digest") != actual.get("config_digest"):
        same_version = _minor_version(expected.get("transformers_version")) == _minor_version(
            actual.get("transformers_version")
        )
        if same_version:
            differing.append("config_digest")
        else:
            logger.info(
                "head map made with transformers %s, model loaded with %s: config digests differ (%s vs %s); "
                "relying on the weights digest",
                expected.get("transformers_version"),
                actual.get("transformers_version"),
                expected.get("config_digest"),
                actual.get("config_digest"),
            )
    return differing


def _format_fingerprint(fingerprint: dict) -> str:
    keys = ("family", "name_or_path", *GEOMETRY_KEYS[1:], *DIGEST_KEYS, "weights_dtype")
    return ", ".join(f"{k}={fingerprint.get(k)!r}" for k in keys if k in fingerprint)


# ---------------------------------------------------------------------- image-centric stats
PER_LAYER_STATS = (
    "centric_fraction",
    "massive_fraction",
    "visual_mass_mean",
    "non_sink_ratio_mean",
    "visual_sinks_mean",
    "text_sinks_mean",
)


@dataclass(eq=False)
class ImageCentricStats:
    """VAR image-centric head statistics per layer over the calibration set.

    A (head, text row) pair is image-centric when the row's attention to the image is at least
    ``mass_threshold`` and its visual non-sink ratio at least ``rho``. Lists have one entry per
    layer (NaN where the layer was not measured: layers 0-1 and the last one).

    Attributes:
        rho / mass_threshold / sink_threshold: the test's parameters (tau for the sinks).
        layers: measured layers.
        centric_fraction: fraction of (head, text row) pairs that are image-centric.
        massive_fraction: fraction of pairs with visual mass >= ``mass_threshold``.
        visual_mass_mean: mean visual mass of a pair.
        non_sink_ratio_mean: mean visual non-sink ratio (pairs with any visual mass).
        visual_sinks_mean / text_sinks_mean: sinks per prompt among image / text tokens.
        head_fraction: ``[L, H]`` per-head fraction of text rows that are image-centric.
    """

    rho: float
    mass_threshold: float
    sink_threshold: float
    layers: list[int]
    centric_fraction: list[float]
    massive_fraction: list[float]
    visual_mass_mean: list[float]
    non_sink_ratio_mean: list[float]
    visual_sinks_mean: list[float]
    text_sinks_mean: list[float]
    head_fraction: torch.Tensor

    def per_layer(self) -> dict[int, dict[str, float]]:
        """``{layer: {stat: value}}`` over the measured layers."""
        return {layer: {name: getattr(self, name)[layer] for name in PER_LAYER_STATS} for layer in self.layers}

    def to_json(self) -> dict:
        data = {
            "rho": self.rho,
            "mass_threshold": self.mass_threshold,
            "sink_threshold": self.sink_threshold,
            "layers": list(self.layers),
        }
        for name in PER_LAYER_STATS:
            data[name] = [_json_float(v) for v in getattr(self, name)]
        return data

    @classmethod
    def from_json(cls, data: dict, head_fraction: torch.Tensor) -> ImageCentricStats:
        values = {name: [_read_float(v) for v in data[name]] for name in PER_LAYER_STATS}
        return cls(
            rho=float(data["rho"]),
            mass_threshold=float(data["mass_threshold"]),
            sink_threshold=float(data["sink_threshold"]),
            layers=[int(v) for v in data["layers"]],
            head_fraction=head_fraction,
            **values,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageCentricStats):
            return NotImplemented
        return self.to_json() == other.to_json() and _tensors_equal(self.head_fraction, other.head_fraction)


def _json_float(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _read_float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _tensors_equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (
        a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.nan_to_num(-12345.0), b.nan_to_num(-12345.0)))
    )


# ---------------------------------------------------------------------- the map
@dataclass(eq=False)
class HeadMap:
    """Calibrated head profile of one model. See the module docstring.

    Attributes:
        fingerprint: ``adapter.describe()`` of the calibrated model (geometry, config and weights digests).
        weights_sample: ``[N]`` the model's :func:`vlm_guard.models.fingerprint.weights_sample` values (lets a
            map made in float32 be checked against a float16 load of the same weights); None in hand-made maps.
        vhd_mean / vhd_std: ``[L, H]`` VHD mean and population std over calibration images.
        vhr_heads: ``[L, H]`` bool, VHR heads per layer (selection on the mean VHD).
        vhd_selection_frequency: ``[L, H]`` fraction of images whose per-sample selection kept the head.
        text_activation_mean: ``[L, H]`` mean ``||o without image||^2`` (TA of the outlier filter).
        distance / outlier_filter: VHD settings used.
        sink_dims: VAR sink dimensions (empty: no massive activations, VAR stays off).
        sink_dim_ratios: ``|x_d| / rms`` of each sink dim on the first token (median over middle layers).
        sink_dim_profile: ``[M]`` that ratio for every dimension (None when not measured).
        sink_dims_source: ``"auto"`` (found by calibration) or ``"override"`` (given by the user).
        sink_threshold: tau. sink_dim_min_ratio: the "near tau" rule used (tau / 2 by default).
        image_centric: :class:`ImageCentricStats` or None.
        gift_saliency_layer: l* (None when it could not be measured).
        gift_enhance_layers: suggested GIFT enhancement layers.
        gift_layer_shift: ``[L]`` mean total positive gaze shift per layer (NaN where not measured).
        calibration: summary of the calibration set (``n_images``, ``n_skipped``, ``prompts``, ...).
        library_version: vlm_guard version that made the map.
        tuned: per-model method settings chosen by ``vlm-guard tune`` (``settings``, ``default_methods``, the
            objective, the tuning data and table; see :mod:`vlm_guard.tuning`); empty when never tuned.
    """

    fingerprint: dict
    vhd_mean: torch.Tensor
    vhd_std: torch.Tensor
    vhr_heads: torch.Tensor
    vhd_selection_frequency: torch.Tensor | None = None
    text_activation_mean: torch.Tensor | None = None
    distance: str = "sq_l2"
    outlier_filter: str = "released"
    sink_dims: list[int] = field(default_factory=list)
    sink_dim_ratios: list[float] = field(default_factory=list)
    sink_dim_profile: torch.Tensor | None = None
    sink_dims_source: str = "auto"
    sink_threshold: float = 20.0
    sink_dim_min_ratio: float = 10.0
    image_centric: ImageCentricStats | None = None
    gift_saliency_layer: int | None = None
    gift_enhance_layers: list[int] = field(default_factory=list)
    gift_layer_shift: list[float] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    library_version: str = __version__
    weights_sample: torch.Tensor | None = None
    tuned: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.fingerprint, dict):
            raise ValueError(
                f"HeadMap.fingerprint must be a dict (adapter.describe()), got {type(self.fingerprint).__name__}"
            )
        for key in ("num_layers", "num_heads"):
            value = self.fingerprint.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"HeadMap.fingerprint[{key!r}]={value!r} must be a positive integer")
        shape = (self.num_layers, self.num_heads)
        for name in ("vhd_mean", "vhd_std", "vhr_heads", "vhd_selection_frequency", "text_activation_mean"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"HeadMap.{name} has shape {tuple(value.shape)}; the fingerprint says [layers, heads] = {list(shape)}"
                )
        self.vhr_heads = self.vhr_heads.bool()
        if self.image_centric is not None and tuple(self.image_centric.head_fraction.shape) != shape:
            raise ValueError(
                f"HeadMap.image_centric.head_fraction has shape {tuple(self.image_centric.head_fraction.shape)}, expected {list(shape)}"
            )
        if self.sink_dim_profile is not None and self.sink_dim_profile.ndim != 1:
            raise ValueError(
                f"HeadMap.sink_dim_profile has shape {tuple(self.sink_dim_profile.shape)}; expected [hidden_size]"
            )
        self.sink_dims = [int(d) for d in self.sink_dims]
        hidden = int(self.fingerprint.get("hidden_size", 0) or 0)
        bad = [d for d in self.sink_dims if d < 0 or (hidden and d >= hidden)]
        if bad:
            raise ValueError(f"HeadMap.sink_dims {bad} are outside 0..{hidden - 1} (hidden_size {hidden})")
        if len(self.sink_dim_ratios) != len(self.sink_dims):
            raise ValueError(
                f"HeadMap.sink_dim_ratios has {len(self.sink_dim_ratios)} entries for {len(self.sink_dims)} sink_dims"
            )
        for layer in [self.gift_saliency_layer, *self.gift_enhance_layers]:
            if layer is not None and not 0 <= int(layer) < self.num_layers:
                raise ValueError(f"HeadMap GIFT layer {layer} is outside 0..{self.num_layers - 1}")

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return int(self.fingerprint["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.fingerprint["num_heads"])

    @property
    def fingerprint_hash(self) -> str:
        return fingerprint_hash(self.fingerprint)

    # ------------------------------------------------------------------ what the methods read
    def vhr_head_masks(self) -> dict[int, torch.Tensor]:
        """``{layer: [H] bool}`` the VHR heads of every layer (VHR applies those of its target layers)."""
        return {layer: self.vhr_heads[layer].clone() for layer in range(self.num_layers)}

    def vhr_heads_by_layer(self) -> dict[int, list[int]]:
        """``{layer: [head, ...]}`` (readable form of :meth:`vhr_head_masks`)."""
        return {layer: self.vhr_heads[layer].nonzero().flatten().tolist() for layer in range(self.num_layers)}

    def override_sink_dims(self, sink_dims: list[int]) -> None:
        """Replace the sink dimensions by hand (e.g. the released code's {2533, 1415} for LLaVA-1.5-7B).

        Ratios come from the stored profile when there is one (NaN otherwise).
        """
        dims = [int(d) for d in sink_dims]
        hidden = int(self.fingerprint.get("hidden_size", 0) or 0)
        bad = [d for d in dims if d < 0 or (hidden and d >= hidden)]
        if bad:
            raise ValueError(
                f"sink_dims {bad} are outside 0..{hidden - 1} (hidden_size {hidden}); pass hidden dimensions of this model"
            )
        self.sink_dims = dims
        profile = self.sink_dim_profile
        self.sink_dim_ratios = [float(profile[d]) if profile is not None else float("nan") for d in dims]
        self.sink_dims_source = "override"

    def check_compatible(self, adapter) -> None:
        """Raise :class:`HeadMapMismatchError` unless this map was made for ``adapter``'s model.

        Family, class and geometry must match exactly, and so must the weights digest (up to the dtype
        rule in the module docstring) and the config digest (same transformers major.minor only). A map
        whose fingerprint lacks any identity field is refused. Names are not compared.
        """
        actual = adapter.describe() if hasattr(adapter, "describe") else dict(adapter)
        missing = missing_identity(self.fingerprint)
        if missing:
            raise HeadMapMismatchError(
                f"this head map's fingerprint lacks the identity fields {missing}, so it cannot be matched to a model "
                "(an edited file, or one written by an older vlm_guard). Calibrate this model again with "
                "`vlm-guard calibrate --model ...` (or vlm_guard.calibrate) and use that map."
            )
        actual_sample = None
        model = getattr(adapter, "model", None)
        if (
            self.weights_sample is not None
            and model is not None
            and self.fingerprint.get("weights_digest") != actual.get("weights_digest")
            and self.fingerprint.get("weights_dtype") != actual.get("weights_dtype")
        ):
            from vlm_guard.models.fingerprint import weights_sample

            actual_sample = weights_sample(model)[0]
        differing = fingerprint_mismatches(self.fingerprint, actual, self.weights_sample, actual_sample)
        if differing:
            raise HeadMapMismatchError(
                f"this head map was calibrated for another model (differs in {differing}).\n"
                f"  head map: {_format_fingerprint(self.fingerprint)}\n"
                f"  model:    {_format_fingerprint(actual)}\n"
                "Calibrate this model with `vlm-guard calibrate --model ...` (or vlm_guard.calibrate) and use that map."
            )

    # ------------------------------------------------------------------ comparison
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadMap):
            return NotImplemented
        for item in dataclasses.fields(self):
            a, b = getattr(self, item.name), getattr(other, item.name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if not _tensors_equal(a, b):
                    return False
            elif item.name == "gift_layer_shift" or item.name == "sink_dim_ratios":
                if [_json_float(v) for v in a] != [_json_float(v) for v in b]:
                    return False
            elif a != b:
                return False
        return True

    # ------------------------------------------------------------------ saving
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"vhd_mean": self.vhd_mean, "vhd_std": self.vhd_std}
        optional = {
            "vhd_selection_frequency": self.vhd_selection_frequency,
            "text_activation_mean": self.text_activation_mean,
            "sink_dim_profile": self.sink_dim_profile,
            "weights_sample": self.weights_sample,
            "image_centric_head_fraction": None if self.image_centric is None else self.image_centric.head_fraction,
        }
        tensors.update({k: v for k, v in optional.items() if v is not None})
        return {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "fingerprint": self.fingerprint,
            "fingerprint_hash": self.fingerprint_hash,
            "calibration": self.calibration,
            "vhd": {
                "distance": self.distance,
                "outlier_filter": self.outlier_filter,
                "vhr_heads": {str(layer): heads for layer, heads in self.vhr_heads_by_layer().items()},
            },
            "sinks": {
                "sink_dims": self.sink_dims,
                "sink_dim_ratios": [_json_float(v) for v in self.sink_dim_ratios],
                "source": self.sink_dims_source,
                "threshold": self.sink_threshold,
                "min_ratio": self.sink_dim_min_ratio,
            },
            "image_centric": None if self.image_centric is None else self.image_centric.to_json(),
            "gift": {
                "saliency_layer": self.gift_saliency_layer,
                "enhance_layers": self.gift_enhance_layers,
                "layer_shift": [_json_float(v) for v in self.gift_layer_shift],
            },
            **({"tuned": self.tuned} if self.tuned else {}),
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``head_map.json`` and ``head_map.safetensors`` into ``directory`` (created if needed), atomically.

        Both files are written under temporary names first; the JSON records the tensors file's SHA-256
        (``tensors_sha256``). Only then are they renamed, the tensors first. A failure while writing (a full disk,
        an error, a kill) leaves the previous map in ``directory`` whole and loadable; a kill in the instant between
        the two renames leaves a pair whose digests disagree, which :meth:`from_pretrained` refuses.

        Returns:
            the directory.
        """
        from safetensors.torch import save_file

        from vlm_guard.fileio import atomic_paths, sha256_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_json()  # before any file is touched: a value JSON cannot hold fails here
        with atomic_paths(directory / TENSOR_FILE, directory / JSON_FILE) as (tensor_temporary, json_temporary):
            save_file(
                self._tensors(),
                str(tensor_temporary),
                metadata={"format": FORMAT_NAME, "library_version": self.library_version},
            )
            data[TENSORS_DIGEST_KEY] = sha256_file(tensor_temporary)
            json_temporary.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        logger.info("saved head map to %s", directory)
        return directory

    def push_to_hub(self, repo_id: str, **kwargs) -> Any:
        """Share this map on the hub with a model card (see :func:`vlm_guard.calibration.hub.push_to_hub`)."""
        from vlm_guard.calibration.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, revision: str | None = None) -> HeadMap:
        """Read a map written by :meth:`save_pretrained`, from a folder or a hub id ``"org/name"`` (a map shared with
        :meth:`push_to_hub`, read through the huggingface_hub cache; see :mod:`vlm_guard.calibration.hub`).

        Raises:
            FileNotFoundError: the folder or one of its two files is missing.
            HeadMapFileError: a file is corrupt or incomplete (the message names it).
        """
        from vlm_guard.calibration.hub import resolve

        directory = resolve(directory, revision=revision)  # a local folder wins over a hub id of the same name
        json_path, tensor_path = directory / JSON_FILE, directory / TENSOR_FILE
        for path in (json_path, tensor_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"no head map at {directory}: {path} does not exist. Create one with `vlm-guard calibrate --out {directory}`."
                )
        size = json_path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise HeadMapFileError(
                f"{json_path} is {size} bytes, more than a head map's JSON can be ({MAX_JSON_BYTES}); "
                "it is not a head map written by `vlm-guard calibrate`."
            )
        try:
            data = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            detail = "nested too deeply" if isinstance(error, RecursionError) else str(error)
            raise HeadMapFileError(
                f"{json_path} is not valid JSON ({detail}); the head map is corrupt: re-run `vlm-guard calibrate`."
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise HeadMapFileError(f'{json_path} is not a vlm_guard head map (no "format": "{FORMAT_NAME}" field).')
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise HeadMapFileError(
                f"{json_path} has format_version {version!r}, not a positive integer; the head map is corrupt: re-run "
                "`vlm-guard calibrate`."
            )
        if version > FORMAT_VERSION:
            raise HeadMapFileError(
                f"{json_path} has format_version {version}, newer than this vlm_guard ({__version__}) reads "
                f"({FORMAT_VERSION}); upgrade vlm_guard."
            )
        _check_tensors_digest(directory, data, tensor_path)
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise HeadMapFileError(
                f"{tensor_path} is not a readable safetensors file ({error}); the head map is corrupt: re-run `vlm-guard calibrate`."
            ) from None
        from vlm_guard.calibration.head_map_schema import check_head_map_fields
        from vlm_guard.settings import TunedSectionError

        check_head_map_fields(json_path, tensor_path, data, tensors)  # every field but `tuned`, and the tensor shapes
        try:
            return cls._from_parts(data, tensors)
        except TunedSectionError as error:  # names the field and the fix (re-tune), not "re-run calibrate"
            raise HeadMapFileError(f"{json_path}: {error}") from None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as error:
            detail = f"missing field {error}" if isinstance(error, KeyError) else (str(error) or type(error).__name__)
            raise HeadMapFileError(
                f"{directory} holds an incomplete or inconsistent head map ({detail}); re-run `vlm-guard calibrate`."
            ) from None

    @classmethod
    def _from_parts(cls, data: dict, tensors: dict[str, torch.Tensor]) -> HeadMap:
        fingerprint = data["fingerprint"]
        if not isinstance(fingerprint, dict):
            raise ValueError(f"fingerprint must be an object, got {type(fingerprint).__name__}")
        num_layers, num_heads = (
            _index(fingerprint["num_layers"], "num_layers"),
            _index(fingerprint["num_heads"], "num_heads"),
        )
        if num_layers <= 0 or num_heads <= 0:
            raise ValueError(f"fingerprint has num_layers={num_layers}, num_heads={num_heads}; both must be positive")
        tensors = {name: _float_tensor(name, tensor) for name, tensor in tensors.items()}
        vhr_heads = torch.zeros(num_layers, num_heads, dtype=torch.bool)
        for layer_key, heads in data["vhd"]["vhr_heads"].items():
            layer = _index(layer_key, "vhr_heads layer")
            if not 0 <= layer < num_layers:
                raise ValueError(f"vhr_heads layer {layer_key!r} is outside 0..{num_layers - 1}")
            if not isinstance(heads, list):
                raise ValueError(f"vhr_heads[{layer_key!r}] must be a list of head indices, got {heads!r}")
            for head_value in heads:
                head = _index(head_value, f"vhr_heads[{layer_key!r}] head")
                if not 0 <= head < num_heads:
                    raise ValueError(f"vhr_heads[{layer_key!r}] head {head_value!r} is outside 0..{num_heads - 1}")
                vhr_heads[layer, head] = True
        image_centric = None
        if data.get("image_centric") is not None:
            image_centric = ImageCentricStats.from_json(data["image_centric"], tensors["image_centric_head_fraction"])
        sinks, gift = data["sinks"], data["gift"]
        return cls(
            fingerprint=fingerprint,
            vhd_mean=tensors["vhd_mean"],
            vhd_std=tensors["vhd_std"],
            vhr_heads=vhr_heads,
            vhd_selection_frequency=tensors.get("vhd_selection_frequency"),
            text_activation_mean=tensors.get("text_activation_mean"),
            distance=data["vhd"]["distance"],
            outlier_filter=data["vhd"]["outlier_filter"],
            sink_dims=[int(d) for d in sinks["sink_dims"]],
            sink_dim_ratios=[_read_float(v) for v in sinks["sink_dim_ratios"]],
            sink_dim_profile=tensors.get("sink_dim_profile"),
            sink_dims_source=sinks["source"],
            sink_threshold=float(sinks["threshold"]),
            sink_dim_min_ratio=float(sinks["min_ratio"]),
            image_centric=image_centric,
            gift_saliency_layer=None if gift["saliency_layer"] is None else int(gift["saliency_layer"]),
            gift_enhance_layers=[int(v) for v in gift["enhance_layers"]],
            gift_layer_shift=[_read_float(v) for v in gift["layer_shift"]],
            calibration=data.get("calibration", {}),
            library_version=data.get("library_version", "unknown"),
            weights_sample=_vector(tensors.get("weights_sample"), "weights_sample"),
            tuned=_validated_tuned(data.get("tuned")),
        )

    # ------------------------------------------------------------------ reading
    def summary(self) -> str:
        """A readable report: fingerprint, calibration set, sinks, GIFT layers and a per-layer table."""
        fp = self.fingerprint
        calibration = self.calibration
        lines = [
            f"vlm_guard head map (library {self.library_version})",
            f"model       {fp.get('family')} {fp.get('model_class', '')} {fp.get('name_or_path') or '(unnamed)'}",
            f"geometry    layers={fp.get('num_layers')} heads={fp.get('num_heads')} kv_heads={fp.get('num_kv_heads')} "
            f"head_dim={fp.get('head_dim')} hidden={fp.get('hidden_size')}  hash={self.fingerprint_hash}",
            f"identity    weights={fp.get('weights_digest') or 'MISSING'} ({fp.get('weights_dtype', '?')}) "
            f"config={fp.get('config_digest') or 'MISSING'} transformers={fp.get('transformers_version', '?')}",
            f"calibration images={calibration.get('n_images', '?')} skipped={calibration.get('n_skipped', 0)} "
            f"prompts={calibration.get('prompts', [])}",
            f"vhd         distance={self.distance} outlier_filter={self.outlier_filter}",
        ]
        if self.sink_dims:
            dims = ", ".join(f"{d} (x{r:.1f})" for d, r in zip(self.sink_dims, self.sink_dim_ratios))
            lines.append(f"sink dims   {dims}  [{self.sink_dims_source}; tau={self.sink_threshold:g}]")
        else:
            lines.append(f"sink dims   none (no dimension reaches ratio {self.sink_dim_min_ratio:g}): VAR stays off")
        enhance = _ranges(self.gift_enhance_layers) or "none"
        lines.append(f"gift        saliency layer l*={self.gift_saliency_layer}  enhance layers {enhance}")
        lines.append("")
        header = (
            f"{'layer':>5} {'VHD mean':>10} {'VHD max':>10} {'top head':>8} {'VHR heads':<24} {'img-centric':>11} "
            f"{'vis mass':>8} {'gaze shift':>10}"
        )
        lines.append(header)
        lines.append("-" * len(header))
        by_layer = self.vhr_heads_by_layer()
        for layer in range(self.num_layers):
            row_mean = float(self.vhd_mean[layer].mean())
            top_head = int(self.vhd_mean[layer].argmax())
            row_max = float(self.vhd_mean[layer, top_head])
            heads = ",".join(map(str, by_layer[layer]))
            if len(heads) > 24:
                heads = heads[:21] + "..."
            centric = mass = float("nan")
            if self.image_centric is not None:
                centric, mass = self.image_centric.centric_fraction[layer], self.image_centric.visual_mass_mean[layer]
            shift = self.gift_layer_shift[layer] if layer < len(self.gift_layer_shift) else float("nan")
            mark = (
                " <- l*"
                if layer == self.gift_saliency_layer
                else (" (enhance)" if layer in self.gift_enhance_layers else "")
            )
            lines.append(
                f"{layer:>5} {row_mean:>10.4g} {row_max:>10.4g} {top_head:>8} {heads:<24} {_cell(centric, '.2f'):>11} "
                f"{_cell(mass, '.3f'):>8} {_cell(shift, '.4g'):>10}{mark}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"HeadMap({self.fingerprint.get('family')}, layers={self.num_layers}, heads={self.num_heads}, "
            f"sink_dims={self.sink_dims}, gift_saliency_layer={self.gift_saliency_layer}, "
            f"images={self.calibration.get('n_images', '?')})"
        )


def _check_tensors_digest(directory: Path, data: dict, tensor_path: Path) -> None:
    """Refuse a tensors file that is not the one the JSON was written with (``tensors_sha256``).

    Maps written before the digest was recorded have no such field and are read as they are.
    """
    from vlm_guard.fileio import sha256_file

    expected = data.get(TENSORS_DIGEST_KEY)
    if expected is None:
        return
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise HeadMapFileError(
            f"{directory / JSON_FILE}: field {TENSORS_DIGEST_KEY} is {json.dumps(expected)[:80]}, not "
            "a SHA-256 hex digest; the head map is corrupt or was edited: re-run `vlm-guard calibrate`."
        )
    actual = sha256_file(tensor_path)
    if actual != expected:
        raise HeadMapFileError(
            f"{directory}: {TENSOR_FILE} (sha256 {actual[:12]}...) is not the tensors file {JSON_FILE} was written with "
            f"(sha256 {expected[:12]}...; an interrupted or mixed save); re-run `vlm-guard calibrate --out {directory}`."
        )


def _validated_tuned(tuned: Any) -> dict:
    """The ``tuned`` section checked against its schema (:func:`vlm_guard.settings.validate_tuned`)."""
    from vlm_guard.settings import validate_tuned

    return validate_tuned(tuned)


def _index(value: Any, what: str) -> int:
    """An index from JSON: an int or a decimal string of one ("3"); anything else (3.5, true, null) is refused."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} {value!r} is not an integer")
    return value


def _float_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A stored tensor as float32; a head map holds only floating tensors (integer, bool or complex ones are corrupt)."""
    if not tensor.is_floating_point():
        raise ValueError(
            f"tensor {name!r} has dtype {str(tensor.dtype).replace('torch.', '')}; head-map tensors are floating point"
        )
    return tensor.float()


def _vector(tensor: torch.Tensor | None, name: str) -> torch.Tensor | None:
    if tensor is not None and tensor.ndim != 1:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}; expected one dimension")
    return tensor


def _cell(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _ranges(layers: list[int]) -> str:
    if not layers:
        return ""
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1]}"
    return ",".join(map(str, layers))


# ---------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """The head-map cache folder: ``$VLM_GUARD_CACHE`` when set, else ``~/.cache/vlm_guard/head_maps``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "vlm_guard" / "head_maps"


CACHE_KEYS = GEOMETRY_KEYS + ("weights_digest",)
"""What a cache folder is keyed by: the geometry and the weights digest, both the same under every transformers
version. The config digest is not part of the key because transformers versions serialise configs differently
(a map made under 5.x must be found under 4.57); :meth:`HeadMap.check_compatible` still compares it where it can."""


def cache_key(fingerprint: dict) -> str:
    """16 hex digits naming the cache folder of the model with ``fingerprint`` (see ``CACHE_KEYS``)."""
    key = {k: fingerprint.get(k) for k in CACHE_KEYS}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_folder(fingerprint: dict, cache_dir: str | Path | None = None) -> Path:
    """Where the map of the model with ``fingerprint`` lives in the cache: ``<name>-<cache key>``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name(fingerprint) or str(fingerprint.get("family", "model")))[:64]
    return Path(cache_dir or default_cache_dir()) / f"{slug}-{cache_key(fingerprint)}"


CALIBRATED_SUFFIX = "-calibrated"
"""``vlm-guard calibrate`` saves a map that holds no tuned settings into ``<name>-<cache key>-calibrated``, beside the
folder ``vlm-guard tune`` writes (``<name>-<cache key>``): a new calibration never replaces a tuned map."""


def calibrated_cache_folder(fingerprint: dict, cache_dir: str | Path | None = None) -> Path:
    """Where calibration saves the (untuned) map of the model with ``fingerprint``: ``<name>-<cache key>-calibrated``."""
    folder = cache_folder(fingerprint, cache_dir)
    return folder.with_name(folder.name + CALIBRATED_SUFFIX)


def save_to_cache(head_map: HeadMap, cache_dir: str | Path | None = None) -> Path | None:
    """Save ``head_map`` into the cache; returns the folder, or None for an unnamed model (not cacheable).

    A tuned map goes to :func:`cache_folder`, an untuned one (fresh from calibration) to
    :func:`calibrated_cache_folder`, so a calibration never replaces a tuned map of the same model.
    """
    if not model_name(head_map.fingerprint):
        logger.info(
            "the model has no name_or_path, so its head map is not cached (it could not be told apart from others)"
        )
        return None
    tuned = bool(head_map.tuned)
    folder = (
        cache_folder(head_map.fingerprint, cache_dir)
        if tuned
        else calibrated_cache_folder(head_map.fingerprint, cache_dir)
    )
    head_map.save_pretrained(folder)
    return folder


def _read_cached(folder: Path, adapter, label: str) -> HeadMap | None:
    if not (folder / JSON_FILE).is_file():
        logger.debug("no %s head map at %s", label, folder)
        return None
    try:
        head_map = HeadMap.from_pretrained(folder)
        head_map.check_compatible(adapter)
    except (OSError, ValueError) as error:
        logger.warning("ignoring the %s head map at %s: %s", label, folder, error)
        return None
    return head_map


def find_cached_head_map(adapter, cache_dir: str | Path | None = None, label: str = "cached") -> HeadMap | None:
    """The cached head map whose fingerprint matches ``adapter``'s model, or None: the tuned one
    (:func:`cache_folder`) when there is one, else the calibrated one (:func:`calibrated_cache_folder`).

    Never raises: an unreadable cached map is reported as a warning and ignored. Unnamed models are
    never looked up.
    """
    head_map, folder = _find_cached(adapter, cache_dir, label)
    if head_map is not None:
        logger.info("using the %s head map from %s", label, folder)
    return head_map


def _find_cached(adapter, cache_dir: str | Path | None, label: str) -> tuple[HeadMap | None, Path | None]:
    try:
        fingerprint = adapter.describe()
    except Exception as error:  # an adapter that cannot describe its model: no cache
        logger.debug("no head-map cache lookup: %s", error)
        return None, None
    if not model_name(fingerprint):
        return None, None
    folder = cache_folder(fingerprint, cache_dir)
    head_map = _read_cached(folder, adapter, label)
    if head_map is None or not head_map.tuned:
        calibrated_folder = calibrated_cache_folder(fingerprint, cache_dir)
        calibrated = _read_cached(calibrated_folder, adapter, f"{label} calibrated")
        if calibrated is not None:
            head_map, folder = calibrated, calibrated_folder
    return head_map, (folder if head_map is not None else None)


_REPORTED: set[str] = set()


def find_head_map(adapter, cache_dir: str | Path | None = None) -> HeadMap | None:
    """The head map ``vlm_guard.wrap`` uses when none is passed, or None.

    Order: a tuned map in the cache (written by ``vlm-guard tune``), then the map shipped with the package for
    this model (tuned), then an untuned map in the cache (written by ``vlm-guard calibrate``). A tuned map is
    preferred because its settings were measured on the model; when it hides a calibrated map, a warning (once
    per process) says so and how to use the calibrated one instead (``head_map=FOLDER``, ``--head-map FOLDER``).
    """
    cached, folder = _find_cached(adapter, cache_dir, "cached")
    if cached is not None and cached.tuned:
        logger.info("using the tuned head map from %s", folder)
        return cached
    from vlm_guard.calibration.shipped import find_shipped_head_map

    shipped = find_shipped_head_map(adapter)
    if shipped is not None and shipped.tuned and cached is not None:
        if str(folder) not in _REPORTED:
            _REPORTED.add(str(folder))
            logger.warning(
                "using the tuned head map shipped for this model; your calibrated map at %s is kept but not "
                "used: pass head_map=%r to vlm_guard.wrap (--head-map on the command line) to use it, or tune it "
                "with `vlm-guard tune --head-map %s`",
                folder,
                str(folder),
                folder,
            )
        return shipped
    if cached is not None:
        logger.info("using the calibrated (untuned) head map from %s", folder)
        return cached
    return shipped


def cache_report(head_map: HeadMap, cache_dir: str | Path | None = None) -> list[str]:
    """Lines for ``vlm-guard calibrate``: where the new map was cached and which map ``vlm_guard.wrap`` will use."""
    fingerprint = head_map.fingerprint
    if not model_name(fingerprint):
        return ["not cached: the model has no name (pass head_map=FOLDER to vlm_guard.wrap)"]
    from vlm_guard.calibration.shipped import SHIPPED_HEAD_MAPS

    saved = calibrated_cache_folder(fingerprint, cache_dir)
    lines = [f"cached at {saved}"]
    for label, folder in (
        ("tuned", cache_folder(fingerprint, cache_dir)),
        ("shipped tuned", cache_folder(fingerprint, SHIPPED_HEAD_MAPS)),
    ):
        other = _peek(folder)
        if (
            other is not None
            and other.get("tuned")
            and (other.get("fingerprint") or {}).get("weights_digest") == fingerprint.get("weights_digest")
        ):
            lines.append(
                f"vlm_guard.wrap keeps using the {label} head map of this model ({folder}); to use the new one pass "
                f"head_map={str(saved)!r} to vlm_guard.wrap or --head-map {saved} to the commands, or tune it with "
                f"`vlm-guard tune --head-map {saved}`"
            )
            return lines
    lines.append(
        "vlm_guard.wrap will use it for this model (no tuned map exists: `vlm-guard tune` chooses method settings)"
    )
    return lines


def _peek(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / JSON_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
