"""The schema of a head map's files, checked when a map is read: every field of ``head_map.json`` but ``tuned`` (whose
schema is :func:`vlm_guard.settings.validate_tuned`), and the tensors' shapes against the fingerprint.

A field of the wrong type or out of range would otherwise load silently (``"distance": 3``), crash later far from the
file (``calibration: []`` in ``summary()``) or be bent into another value (``"saliency_layer": 1.5`` read as 1).
:func:`check_head_map_fields` refuses it with one line naming the file and the field::

    maps/x/head_map.json: field gift.saliency_layer is 1.5, not null or a layer index 0..31; the head map is corrupt
    or was edited: re-run `vlm-guard calibrate`.

Identity fields of the fingerprint that are missing (or null) are not refused here: a map without them still reads
(``vlm-guard heads show``), and :meth:`vlm_guard.calibration.HeadMap.check_compatible` refuses to use it on a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_head_map_fields"]

# fingerprint fields: text ones, and counts (positive integers); num_layers and num_heads are required
FINGERPRINT_TEXT = (
    "family",
    "model_class",
    "name_or_path",
    "config_digest",
    "weights_digest",
    "weights_dtype",
    "transformers_version",
)
FINGERPRINT_COUNTS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")
LAYER_HEAD_TENSORS = (
    "vhd_mean",
    "vhd_std",
    "vhd_selection_frequency",
    "text_activation_mean",
    "image_centric_head_fraction",
)
SINK_SOURCES = ("auto", "override")


class _FieldError(Exception):
    """``field`` is ``value``, ``expected`` (e.g. "not a string"); or, with ``text``, ``field <text>``."""

    def __init__(self, field: str, value: Any, expected: str = "", text: str | None = None):
        super().__init__(field)
        self.field, self.value, self.expected, self.text = field, value, expected, text


def _short(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(container: dict, key: str, prefix: str) -> Any:
    if not isinstance(container, dict) or key not in container:
        raise _FieldError(f"{prefix}{key}", None, text="is missing")
    return container[key]


def _index_list(value: Any, field: str, size: int) -> None:
    if not isinstance(value, list) or not all(_is_int(v) and 0 <= v < size for v in value):
        raise _FieldError(field, value, f"not a list of layer indices 0..{size - 1}")


def _number_list(value: Any, field: str, length: int | None, allow_empty: bool = False) -> None:
    """A list of finite numbers or nulls (NaN is stored as null), of ``length`` entries when given."""
    if not isinstance(value, list) or not all(v is None or _is_number(v) for v in value):
        raise _FieldError(field, value, "not a list of numbers (or null)")
    if length is not None and len(value) != length and not (allow_empty and not value):
        raise _FieldError(field, None, text=f"has {len(value)} entries, not one per layer ({length})")


def _positive(value: Any, field: str) -> None:
    if not _is_number(value) or value <= 0:
        raise _FieldError(field, value, "not a positive number")


def _check(data: dict, tensors: dict[str, torch.Tensor]) -> None:
    from vlm_guard.methods.vhr.vhd import DISTANCES, OUTLIER_FILTERS

    for key in ("library_version", "fingerprint_hash"):
        if key in data and not isinstance(data[key], str):
            raise _FieldError(key, data[key], "not a string")
    fingerprint = _require(data, "fingerprint", "")
    if not isinstance(fingerprint, dict):
        raise _FieldError("fingerprint", fingerprint, "not an object")
    for key in FINGERPRINT_TEXT:
        if fingerprint.get(key) is not None and not isinstance(fingerprint[key], str):
            raise _FieldError(f"fingerprint.{key}", fingerprint[key], "not a string")
    for key in FINGERPRINT_COUNTS:
        value = fingerprint.get(key)
        if (value is not None or key in ("num_layers", "num_heads")) and not (_is_int(value) and value > 0):
            raise _FieldError(f"fingerprint.{key}", value, "not a positive integer")
    layers = fingerprint["num_layers"]
    hidden = fingerprint.get("hidden_size")
    if "calibration" in data and not isinstance(data["calibration"], dict):
        raise _FieldError("calibration", data["calibration"], "not an object")

    vhd = _require(data, "vhd", "")
    if not isinstance(vhd, dict):
        raise _FieldError("vhd", vhd, "not an object")
    if _require(vhd, "distance", "vhd.") not in DISTANCES:
        raise _FieldError("vhd.distance", vhd["distance"], f"not one of {list(DISTANCES)}")
    if _require(vhd, "outlier_filter", "vhd.") not in OUTLIER_FILTERS:
        raise _FieldError("vhd.outlier_filter", vhd["outlier_filter"], f"not one of {list(OUTLIER_FILTERS)}")
    vhr_heads = _require(vhd, "vhr_heads", "vhd.")
    if not isinstance(vhr_heads, dict):
        raise _FieldError("vhd.vhr_heads", vhr_heads, "not an object {layer: [head, ...]}")
    absent = [layer for layer in range(layers) if str(layer) not in vhr_heads]
    if absent:
        raise _FieldError(
            "vhd.vhr_heads", None, text=f"has no entry for layers {absent[:8]} (one per layer 0..{layers - 1})"
        )

    sinks = _require(data, "sinks", "")
    if not isinstance(sinks, dict):
        raise _FieldError("sinks", sinks, "not an object")
    dims = _require(sinks, "sink_dims", "sinks.")
    limit = hidden if _is_int(hidden) else None
    if not isinstance(dims, list) or not all(_is_int(d) and d >= 0 and (limit is None or d < limit) for d in dims):
        raise _FieldError(
            "sinks.sink_dims", dims, "not a list of hidden dimensions" + (f" 0..{limit - 1}" if limit else "")
        )
    _number_list(_require(sinks, "sink_dim_ratios", "sinks."), "sinks.sink_dim_ratios", None)
    if len(sinks["sink_dim_ratios"]) != len(dims):
        raise _FieldError(
            "sinks.sink_dim_ratios",
            None,
            text=f"has {len(sinks['sink_dim_ratios'])} entries, not one per sink dimension ({len(dims)})",
        )
    if _require(sinks, "source", "sinks.") not in SINK_SOURCES:
        raise _FieldError("sinks.source", sinks["source"], f"not one of {list(SINK_SOURCES)}")
    _positive(_require(sinks, "threshold", "sinks."), "sinks.threshold")
    _positive(_require(sinks, "min_ratio", "sinks."), "sinks.min_ratio")

    centric = data.get("image_centric")
    if centric is not None:
        if not isinstance(centric, dict):
            raise _FieldError("image_centric", centric, "not null or an object")
        for key in ("rho", "mass_threshold", "sink_threshold"):
            value = _require(centric, key, "image_centric.")
            if not _is_number(value) or value < 0:
                raise _FieldError(f"image_centric.{key}", value, "not a non-negative number")
        _index_list(_require(centric, "layers", "image_centric."), "image_centric.layers", layers)
        from vlm_guard.calibration.head_map import PER_LAYER_STATS

        for key in PER_LAYER_STATS:
            _number_list(_require(centric, key, "image_centric."), f"image_centric.{key}", layers)
        if "image_centric_head_fraction" not in tensors:
            raise _FieldError(
                "image_centric", None, text="is present, but the tensors file has no image_centric_head_fraction"
            )

    gift = _require(data, "gift", "")
    if not isinstance(gift, dict):
        raise _FieldError("gift", gift, "not an object")
    saliency = _require(gift, "saliency_layer", "gift.")
    if saliency is not None and not (_is_int(saliency) and 0 <= saliency < layers):
        raise _FieldError("gift.saliency_layer", saliency, f"not null or a layer index 0..{layers - 1}")
    _index_list(_require(gift, "enhance_layers", "gift."), "gift.enhance_layers", layers)
    _number_list(_require(gift, "layer_shift", "gift."), "gift.layer_shift", layers, allow_empty=True)


def _check_tensors(fingerprint: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    """The first tensor whose presence or shape disagrees with the fingerprint, as a message; None when all agree."""
    layers, heads = fingerprint["num_layers"], fingerprint["num_heads"]
    for name in ("vhd_mean", "vhd_std"):
        if name not in tensors:
            return f"has no tensor {name!r}"
    for name in LAYER_HEAD_TENSORS:
        if name in tensors and tuple(tensors[name].shape) != (layers, heads):
            return (
                f"tensor {name!r} has shape {list(tensors[name].shape)}, but the JSON's fingerprint.num_layers and "
                f"num_heads say [{layers}, {heads}]"
            )
    hidden = fingerprint.get("hidden_size")
    profile = tensors.get("sink_dim_profile")
    if profile is not None and (profile.ndim != 1 or (hidden is not None and profile.shape[0] != hidden)):
        return (
            f"tensor 'sink_dim_profile' has shape {list(profile.shape)}, but the JSON's fingerprint.hidden_size "
            f"says [{hidden}]"
        )
    sample = tensors.get("weights_sample")
    if sample is not None and sample.ndim != 1:
        return f"tensor 'weights_sample' has shape {list(sample.shape)}; expected one dimension"
    return None


def check_head_map_fields(json_path: Path, tensor_path: Path, data: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a head map whose JSON fields (``tuned`` aside) or tensor shapes break the schema.

    Raises:
        vlm_guard.calibration.HeadMapFileError: one line naming the file and the field.
    """
    from vlm_guard.calibration.head_map import HeadMapFileError

    fix = "the head map is corrupt or was edited: re-run `vlm-guard calibrate`."
    try:
        _check(data, tensors)
    except _FieldError as error:
        if error.text is not None:
            raise HeadMapFileError(f"{json_path}: field {error.field} {error.text}; {fix}") from None
        raise HeadMapFileError(
            f"{json_path}: field {error.field} is {_short(error.value)}, {error.expected}; {fix}"
        ) from None
    problem = _check_tensors(data["fingerprint"], tensors)
    if problem:
        raise HeadMapFileError(f"{tensor_path} {problem}; {fix}")
