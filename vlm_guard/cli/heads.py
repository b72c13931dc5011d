"""``vlm-guard calibrate`` and ``vlm-guard heads show``: their parsers, and ``heads show`` itself.

Standard library only: ``vlm_guard.calibration`` imports torch when imported, so the parsers live here and
``vlm-guard calibrate`` runs :func:`vlm_guard.cli.calibrate.run_calibrate` through
:func:`~vlm_guard.cli.arguments.deferred`.

``heads show`` reads ``head_map.json`` and the header and ``vhd_mean`` of ``head_map.safetensors`` directly (the
safetensors layout: an 8-byte little-endian header length, a JSON header, raw little-endian tensors), so it answers
in a fraction of a second without torch. It checks what it prints (format, version, the tensors' SHA-256 recorded in
the JSON, the tensor's shape, the tuned section's methods and fields); a map that fails any of these checks, or that
holds something this reader does not know, is read by :meth:`vlm_guard.calibration.head_map.HeadMap.from_pretrained`
instead, whose one-line errors name the file and the field. The model is shown by name (the last component of the
path it was calibrated from: ``default-v2-913254c020304393``, ``llava-1.5-7b-hf``), never the absolute path of the
machine that built the map.

Examples:
    vlm-guard calibrate --images photos/ --out maps/toy
    vlm-guard heads show maps/llava-7b
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import math
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlm_guard.checks import display_model_name
from vlm_guard.cli.arguments import (
    DTYPE_NAMES,
    add_allow_pickle_argument,
    deferred,
    float_range,
    positive_int,
)
from vlm_guard.methods import registry

# the head-map file format (vlm_guard.calibration.head_map; tests/test_cli_light.py keeps these equal to it)
FORMAT_NAME = "vlm_guard.head_map"
FORMAT_VERSION = 2
JSON_FILE = "head_map.json"
TENSOR_FILE = "head_map.safetensors"
TENSORS_DIGEST_KEY = "tensors_sha256"
MAX_JSON_BYTES = 16 << 20
METHOD_ORDER = registry.MethodNames()

RELEASED_DEFAULTS: Mapping[str, dict[str, Any]] = registry.MethodFacts(
    lambda spec: spec.config_class().to_dict(), "released defaults"
)
"""Each method config's fields and released defaults, in declaration order (read from the registry: no torch)."""
UNTUNED_DEFAULT_METHODS = ("pai",)  # vlm_guard.settings.UNTUNED_DEFAULT_METHODS (kept equal by a test)


def _sink_dims(text: str) -> list[int]:
    """``--sink-dims '2533,1415'`` -> ``[2533, 1415]`` (checked while parsing, before the model loads)."""
    try:
        dims = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers, e.g. '2533,1415'") from None
    if not dims:
        raise argparse.ArgumentTypeError(f"{text!r} names no dimension; omit it to find them automatically")
    negative = [dim for dim in dims if dim < 0]
    if negative:
        raise argparse.ArgumentTypeError(f"{text!r} holds negative dimension(s) {negative}; hidden dimensions are >= 0")
    return dims


def register(subparsers) -> None:
    calibrate_parser = subparsers.add_parser(
        "calibrate",
        help="profile a model's attention heads once and save a head map",
        description=(
            "Profile attention heads over a set of images (two forward passes per batch, no generation) and save a head "
            "map (head_map.json + head_map.safetensors) with a VHD heatmap and a sink-dimension plot into --out. The map is "
            "also saved into the head-map cache ($VLM_GUARD_CACHE or ~/.cache/vlm_guard/head_maps) beside, never over, a tuned "
            "map of the same model; vlm_guard.wrap prefers a tuned map, and the last line says which map it uses "
            "(docs/calibration.md). Use at least 16 images (fewer are warned about). Unreadable images are skipped and "
            "counted."
        ),
    )
    calibrate_parser.add_argument(
        "--model", default=None, help="hub id or local folder (default: the shipped default model)"
    )
    calibrate_parser.add_argument("--images", required=True, help="folder of images or a glob pattern (quote it)")
    calibrate_parser.add_argument("--out", required=True, help="folder to write the head map and plots into")
    calibrate_parser.add_argument(
        "--limit", type=positive_int, default=None, help="profile at most N images (first in sorted order)"
    )
    calibrate_parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="calibration prompt (repeat for several, used in turn); default 'Please describe this image in detail.'",
    )
    calibrate_parser.add_argument(
        "--batch-size", type=positive_int, default=4, help="prompts per forward pass (default %(default)s)"
    )
    calibrate_parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    calibrate_parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default=None, help="model dtype (default: float32 on cpu, float16 on cuda)"
    )
    calibrate_parser.add_argument(
        "--distance",
        choices=("sq_l2", "l2", "cosine"),
        default="sq_l2",
        help="VHD distance (default %(default)s, released)",
    )
    calibrate_parser.add_argument(
        "--sink-dims", type=_sink_dims, default=None, help="override the sink dimensions, e.g. '2533,1415'"
    )
    calibrate_parser.add_argument(
        "--rho",
        type=float_range(0.0, 1.0),
        default=0.8,
        help="image-centric non-sink ratio threshold, in [0, 1] (default %(default)s)",
    )
    calibrate_parser.add_argument("--no-cache", action="store_true", help="do not save the map into the head-map cache")
    calibrate_parser.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    calibrate_parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own code (off by default)"
    )
    add_allow_pickle_argument(calibrate_parser)
    calibrate_parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    calibrate_parser.set_defaults(func=deferred("vlm_guard.cli.calibrate", "run_calibrate"))

    heads_parser = subparsers.add_parser("heads", help="inspect head maps", description="Inspect head maps.")
    heads_subparsers = heads_parser.add_subparsers(dest="heads_command", metavar="SUBCOMMAND")
    show_parser = heads_subparsers.add_parser(
        "show", help="print a head map's summary", description="Print a head map's summary table."
    )
    show_parser.add_argument("directory", help="folder written by `vlm-guard calibrate --out`")
    show_parser.set_defaults(func=run_show)
    heads_parser.set_defaults(func=lambda args: heads_parser.print_help() or 2)


# ---------------------------------------------------------------------------------------------- heads show
class _NotLight(Exception):
    """The map holds something the light reader does not check: read it with HeadMap.from_pretrained."""


def run_show(args: argparse.Namespace) -> int:
    try:
        text = light_summary(args.directory)
    except _NotLight:
        text = _full_summary(args.directory)
    print(text)
    return 0


def _full_summary(directory: str) -> str:
    from vlm_guard.calibration.head_map import HeadMap
    from vlm_guard.settings import tuned_report

    head_map = HeadMap.from_pretrained(directory)
    lines = head_map.summary().splitlines()
    lines = [_model_line(head_map.fingerprint) if line.startswith("model ") else line for line in lines]
    return "\n".join(lines) + "\n\n" + "\n".join(tuned_report(head_map))


def _model_line(fingerprint: dict) -> str:
    return f"model       {fingerprint.get('family')} {fingerprint.get('model_class', '')} {display_model_name(fingerprint)}"


def _read_vhd_mean(path: Path, layers: int, heads: int) -> list[list[float]]:
    """``vhd_mean`` ``[layers][heads]`` from a safetensors file, read with the standard library."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise _NotLight
        (size,) = struct.unpack("<Q", head)
        if size > MAX_JSON_BYTES:
            raise _NotLight
        try:
            header = json.loads(handle.read(size))
            entry = header["vhd_mean"]
            start, end = (int(value) for value in entry["data_offsets"])
        except (ValueError, KeyError, TypeError):
            raise _NotLight from None
        if (
            entry.get("dtype") != "F32"
            or list(entry.get("shape", [])) != [layers, heads]
            or end - start != 4 * layers * heads
        ):
            raise _NotLight
        handle.seek(8 + size + start)
        raw = handle.read(end - start)
    if len(raw) != end - start:
        raise _NotLight
    values = array.array("f")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    if not all(math.isfinite(value) for value in values):
        raise _NotLight
    return [list(values[layer * heads : (layer + 1) * heads]) for layer in range(layers)]


def _float(value: Any) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _NotLight
    return float(value)


def _cell(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _ranges(layers: list[int]) -> str:
    if not layers:
        return ""
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1]}"
    return ",".join(map(str, layers))


def _fingerprint_hash(fingerprint: dict) -> str:
    keys = (
        "family",
        "model_class",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "hidden_size",
        "config_digest",
        "weights_digest",
    )
    key = {k: fingerprint.get(k) for k in keys}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def light_summary(directory: str | Path) -> str:
    """The text of ``vlm-guard heads show`` read without torch; raises :class:`_NotLight` for a map this reader
    does not check fully (the caller then reads it with ``HeadMap.from_pretrained``)."""
    directory = Path(directory)
    json_path, tensor_path = directory / JSON_FILE, directory / TENSOR_FILE
    if not (json_path.is_file() and tensor_path.is_file()) or json_path.stat().st_size > MAX_JSON_BYTES:
        raise _NotLight
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _NotLight from None
    try:
        return _render(data, directory, tensor_path)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError):
        raise _NotLight from None


def _render(data: dict, directory: Path, tensor_path: Path) -> str:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise _NotLight
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise _NotLight
    expected = data.get(TENSORS_DIGEST_KEY)
    if expected is not None:
        digest = hashlib.sha256()
        with tensor_path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected:
            raise _NotLight
    fp = data["fingerprint"]
    layers, heads = fp["num_layers"], fp["num_heads"]
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in (layers, heads)):
        raise _NotLight
    vhd_mean = _read_vhd_mean(tensor_path, layers, heads)
    calibration, vhd, sinks, gift = data.get("calibration", {}), data["vhd"], data["sinks"], data["gift"]
    by_layer: dict[int, list[int]] = {layer: [] for layer in range(layers)}
    for key, chosen in vhd["vhr_heads"].items():
        layer = int(key)
        if not 0 <= layer < layers or not isinstance(chosen, list):
            raise _NotLight
        for head in chosen:
            if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
                raise _NotLight
        by_layer[layer] = sorted(set(chosen))
    sink_dims = [int(d) for d in sinks["sink_dims"]]
    ratios = [_float(v) for v in sinks["sink_dim_ratios"]]
    if len(ratios) != len(sink_dims):
        raise _NotLight
    saliency = gift["saliency_layer"]
    enhance = [int(v) for v in gift["enhance_layers"]]
    shifts = [_float(v) for v in gift["layer_shift"]]
    for layer in [saliency, *enhance]:
        if layer is not None and not 0 <= int(layer) < layers:
            raise _NotLight
    centric = data.get("image_centric")
    lines = [
        f"vlm_guard head map (library {data.get('library_version', 'unknown')})",
        _model_line(fp),
        f"geometry    layers={fp.get('num_layers')} heads={fp.get('num_heads')} kv_heads={fp.get('num_kv_heads')} "
        f"head_dim={fp.get('head_dim')} hidden={fp.get('hidden_size')}  hash={_fingerprint_hash(fp)}",
        f"identity    weights={fp.get('weights_digest') or 'MISSING'} ({fp.get('weights_dtype', '?')}) "
        f"config={fp.get('config_digest') or 'MISSING'} transformers={fp.get('transformers_version', '?')}",
        f"calibration images={calibration.get('n_images', '?')} skipped={calibration.get('n_skipped', 0)} "
        f"prompts={calibration.get('prompts', [])}",
        f"vhd         distance={vhd['distance']} outlier_filter={vhd['outlier_filter']}",
    ]
    if sink_dims:
        dims = ", ".join(f"{d} (x{r:.1f})" for d, r in zip(sink_dims, ratios))
        lines.append(f"sink dims   {dims}  [{sinks['source']}; tau={float(sinks['threshold']):g}]")
    else:
        lines.append(f"sink dims   none (no dimension reaches ratio {float(sinks['min_ratio']):g}): VAR stays off")
    lines.append(f"gift        saliency layer l*={saliency}  enhance layers {_ranges(enhance) or 'none'}")
    lines.append("")
    header = (
        f"{'layer':>5} {'VHD mean':>10} {'VHD max':>10} {'top head':>8} {'VHR heads':<24} {'img-centric':>11} "
        f"{'vis mass':>8} {'gaze shift':>10}"
    )
    lines += [header, "-" * len(header)]
    for layer in range(layers):
        row = vhd_mean[layer]
        row_mean = sum(row) / len(row)
        top_head = max(range(heads), key=lambda head: (row[head], -head))
        listed = ",".join(map(str, by_layer[layer]))
        if len(listed) > 24:
            listed = listed[:21] + "..."
        fraction = mass = float("nan")
        if centric is not None:
            fraction, mass = _float(centric["centric_fraction"][layer]), _float(centric["visual_mass_mean"][layer])
        shift = shifts[layer] if layer < len(shifts) else float("nan")
        mark = " <- l*" if layer == saliency else (" (enhance)" if layer in enhance else "")
        lines.append(
            f"{layer:>5} {row_mean:>10.4g} {row[top_head]:>10.4g} {top_head:>8} {listed:<24} "
            f"{_cell(fraction, '.2f'):>11} {_cell(mass, '.3f'):>8} {_cell(shift, '.4g'):>10}{mark}"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(_tuned_lines(data.get("tuned")))


def _tuned_lines(tuned: Any) -> list[str]:
    """The tuned-settings report of a map in the single-profile format (``vlm_guard.settings.tuned_report``);
    other formats go to the full reader."""
    if not tuned:
        return [
            "tuned settings: none (every method runs at its released defaults unless set; "
            "default method set: " + ",".join(UNTUNED_DEFAULT_METHODS) + "). Run `vlm-guard tune` to choose them."
        ]
    if isinstance(tuned, dict) and "profiles" in tuned:
        return _profile_lines(tuned)
    if not isinstance(tuned, dict) or "default_methods" not in tuned:
        raise _NotLight
    settings, methods = tuned.get("settings") or {}, tuned["default_methods"]
    if not isinstance(settings, dict) or not isinstance(methods, list):
        raise _NotLight
    for method, values in settings.items():
        if (
            method not in RELEASED_DEFAULTS
            or not isinstance(values, dict)
            or set(values) - set(RELEASED_DEFAULTS[method])
        ):
            raise _NotLight
    if not all(isinstance(m, str) and m in METHOD_ORDER for m in methods):
        raise _NotLight
    data = tuned.get("tuning_data") or {}
    lines = [
        f"tuned settings (vlm-guard tune {tuned.get('library_version', '?')}, on {data.get('name', '?')}; "
        f"objective: {tuned.get('objective', {}).get('text', '?')})"
    ]
    name = data.get("name", "tuning data")
    reason = (
        f"chosen by `vlm-guard tune` for this model (on {name})"
        if methods
        else f"`vlm-guard tune` found no method that helps this model (on {name}): none enabled"
    )
    lines.append(f"default method set: {','.join(methods) or 'none'} -- {reason}")
    lines.append(
        f"  {'method':<6} {'field':<16} {'value':<22} {'source':<18} {'released default':<22} gain on tuning data"
    )
    gains = tuned.get("gain") or {}
    for method in METHOD_ORDER:
        values = settings.get(method) or {}
        if not values:
            note = (tuned.get("skipped") or {}).get(method, "not tuned")
            lines.append(
                f"  {method:<6} {'(all)':<16} {'released defaults':<22} {'released default':<18} {'':<22} {note}"
            )
            continue
        first = True
        for field_name, default in RELEASED_DEFAULTS[method].items():
            if field_name not in values:
                continue
            gain, first = (gains.get(method, "") if first else ""), False
            lines.append(
                f"  {method:<6} {field_name:<16} {values[field_name]!r:<22} {'tuned':<18} {default!r:<22} {gain}"
            )
    lines.append("  (all other fields: released defaults; a value set in the user's config wins over both)")
    return lines


def _profile_lines(tuned: dict) -> list[str]:
    """The report of a map with task profiles (``vlm_guard.settings._profiles_report``, without torch); a
    section that does not look as ``vlm-guard tune`` writes it goes to the full reader, which names the field."""
    from vlm_guard.settings import PROFILES

    profiles, default = tuned.get("profiles"), tuned.get("default_profile")
    if not isinstance(profiles, dict) or not profiles or default not in profiles:
        raise _NotLight
    data, confirm = tuned.get("tuning_data") or {}, tuned.get("confirmation_data") or {}
    if not isinstance(data, dict) or not isinstance(confirm, dict):
        raise _NotLight
    name_of_data = data.get("name", "tuning data")
    lines = [
        f"tuned task profiles (vlm-guard tune {tuned.get('library_version', '?')}, on {data.get('name', '?')}; "
        f"winners confirmed on {confirm.get('name', '?')}); default profile: {default}"
    ]
    for name, section in profiles.items():
        if name not in PROFILES or not isinstance(section, dict):
            raise _NotLight
        settings, methods = section.get("settings") or {}, section.get("default_methods")
        if not isinstance(settings, dict) or not isinstance(methods, list):
            raise _NotLight
        if not all(isinstance(m, str) and m in METHOD_ORDER for m in methods):
            raise _NotLight
        for method, values in settings.items():
            if (
                method not in RELEASED_DEFAULTS
                or not isinstance(values, dict)
                or set(values) - set(RELEASED_DEFAULTS[method])
            ):
                raise _NotLight
        reason = (
            f"{name} profile, chosen by `vlm-guard tune` for this model (on {name_of_data})"
            if methods
            else f"{name} profile, `vlm-guard tune` found no method that helps this model (on {name_of_data}): "
            "none enabled"
        )
        lines.append(f"  profile {name} ({PROFILES[name]}): {','.join(methods) or 'none'} -- {reason}")
        if section.get("decision"):
            lines.append(f"    decision: {section['decision']}")
        for method, values in settings.items():
            for field_name, value in values.items():
                lines.append(
                    f"    {method:<6} {field_name:<16} {value!r:<22} (released default "
                    f"{RELEASED_DEFAULTS[method][field_name]!r})"
                )
    lines.append(
        "  (a field not listed runs at its released default; a value set in the user's config wins over both; "
        'choose a profile with wrap(..., "auto:answer") or task=)'
    )
    return lines


__all__ = ["register", "run_show", "light_summary", "display_model_name", "RELEASED_DEFAULTS"]
