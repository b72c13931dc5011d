"""Head maps shared on the Hugging Face Hub, like peft adapters.

``HeadMap.from_pretrained("org/name")`` reads a map from the hub: a local folder of that name wins; otherwise
the repository's ``head_map.json`` + ``head_map.safetensors`` come from the huggingface_hub cache
(``models--org--name/snapshots/<revision>/``), downloaded first unless offline (``HF_HUB_OFFLINE=1``: the cache
only). ``HeadMap.push_to_hub("org/name")`` uploads the two files with a model card (``README.md``) saying which
checkpoint the map belongs to, how it was calibrated, what was tuned and the measured effect.

Example (not run: calibrates a real model and uploads to the hub)::

    head_map = vlm_guard.calibrate(model, processor, "coco/val2014", limit=200)
    head_map.push_to_hub("me/llava-1.5-7b-head-map")            # needs `huggingface-cli login`
    head_map = HeadMap.from_pretrained("me/llava-1.5-7b-head-map")
    guarded = vlm_guard.wrap(model, processor, "auto", head_map=head_map)
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from vlm_guard.calibration.head_map import JSON_FILE, TENSOR_FILE, model_name

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
HUB_FILES = (JSON_FILE, TENSOR_FILE, CARD_FILE)
"""What a head-map repository holds (the card is optional when reading)."""

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_hub_id(name: str | os.PathLike) -> bool:
    """True for ``"org/name"`` (one slash, hub characters, no ``..``, not a path starting with ``.``, ``/`` or ``~``)."""
    text = os.fspath(name)
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not text.endswith((".", "-"))


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    """``cache_dir``, else ``$HF_HUB_CACHE`` read now (huggingface_hub reads it once, at import)."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    return os.environ.get("HF_HUB_CACHE") or None


def download(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Path:
    """The snapshot folder of hub repository ``repo_id`` holding its head map (downloaded unless offline).

    Raises:
        FileNotFoundError: the repository (or revision) is neither in the cache nor reachable; or it holds no head map.
    """
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=_cache_dir(cache_dir),
                allow_patterns=list(HUB_FILES),
                local_files_only=offline,
                token=token,
            )
        )
    except Exception as error:  # huggingface_hub's not-found / offline / HTTP errors: one line with the fix
        where = "the local hub cache (HF_HUB_OFFLINE is set)" if offline else "the hub or the local hub cache"
        raise FileNotFoundError(
            f"no head map at {repo_id}: it is not a local folder, and {where} has no repository {repo_id!r}"
            f"{'' if revision is None else f' at revision {revision!r}'} ({type(error).__name__}). Give a folder written "
            "by `vlm-guard calibrate --out`, or a hub id pushed with HeadMap.push_to_hub."
        ) from None
    missing = [name for name in (JSON_FILE, TENSOR_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the hub repository {repo_id} ({folder}) holds no head map: {', '.join(missing)} missing; "
            "push one with HeadMap.push_to_hub."
        )
    logger.info("head map %s from the hub cache at %s", repo_id, folder)
    return folder


def resolve(name: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where to read the head map ``name`` from: the local folder when it exists, else the hub snapshot of ``name``
    when it is a hub id; else the path as given (the caller reports it missing)."""
    path = Path(name).expanduser()
    if path.exists() or not is_hub_id(name):
        return path
    return download(os.fspath(name), revision=revision, cache_dir=cache_dir)


# ---------------------------------------------------------------------------- the card
def _identity(fingerprint: dict) -> str:
    """The model's name for the card: a hub id as it is, a local path as its last component (never a machine's path)."""
    name = str(fingerprint.get("name_or_path") or "")
    return name if is_hub_id(name) else (model_name(fingerprint) or "(unnamed model)")


def _measured_effect(tuned: dict) -> list[str]:
    lines = []
    row = tuned.get("default_row")
    if isinstance(row, dict) and row.get("metrics"):
        lines.append(
            f"- default set `{row.get('label', '?')}`: score {row.get('score')} vs greedy {row.get('greedy_score')} "
            f"(n={row.get('n')})"
        )
        for task, metrics in row["metrics"].items():
            values = ", ".join(f"{k} {v}" for k, v in metrics.items() if k != "n")
            lines.append(f"  - {task}: {values}")
    for method, text in (tuned.get("gain") or {}).items():
        lines.append(f"- {method}: {text}")
    return lines


def model_card(head_map: Any, repo_id: str | None = None) -> str:
    """The ``README.md`` of a head-map repository: checkpoint, calibration, tuning and measured effect."""
    from vlm_guard.version import __version__

    fp = head_map.fingerprint
    calibration = head_map.calibration or {}
    tuned = head_map.tuned or {}
    model = _identity(fp)
    base = f"base_model: {model}" if is_hub_id(model) else None
    lines = [
        "---",
        "library_name: vlm-guard",
        "tags:",
        "- vlm-guard",
        "- head-map",
        "- hallucination",
        base,
        "---",
        "",
        f"# vlm-guard head map for {model}",
        "",
        "What `vlm-guard calibrate` learned about this model's attention heads (VHR heads, VAR sink dimensions and "
        "image-centric heads, the GIFT saliency layer), for `vlm_guard.wrap`.",
        "",
        "```python",
        "import vlm_guard",
        "from vlm_guard.calibration import HeadMap",
        "",
        f"head_map = HeadMap.from_pretrained({(repo_id or 'ORG/NAME')!r})",
        'guarded = vlm_guard.wrap(model, processor, "auto", head_map=head_map)  # refused for other weights',
        "```",
        "",
        "## Checkpoint",
        "",
        f"- model: {model} ({fp.get('family')}, {fp.get('model_class')})",
        f"- geometry: {fp.get('num_layers')} layers x {fp.get('num_heads')} heads ({fp.get('num_kv_heads')} kv heads), "
        f"head_dim {fp.get('head_dim')}, hidden {fp.get('hidden_size')}",
        f"- weights digest {fp.get('weights_digest')} ({fp.get('weights_dtype', '?')}), config digest "
        f"{fp.get('config_digest')}, transformers {fp.get('transformers_version', '?')}; fingerprint hash "
        f"{head_map.fingerprint_hash}",
        "- `wrap` checks these digests: the map is refused for any other checkpoint.",
        "",
        "## Calibration",
        "",
        f"- images: {calibration.get('n_images', '?')} profiled, {calibration.get('n_skipped', 0)} skipped"
        + (f"; source: {calibration['source']}" if calibration.get("source") else ""),
        f"- prompts: {calibration.get('prompts', [])}",
        f"- device {calibration.get('device', '?')}, dtype {calibration.get('dtype', '?')}, "
        f"{calibration.get('seconds', '?')} s; vlm-guard {head_map.library_version}",
    ]
    from vlm_guard.calibration.calibrate import MIN_CALIBRATION_IMAGES

    n_images = calibration.get("n_images")
    if isinstance(n_images, int) and n_images < MIN_CALIBRATION_IMAGES:
        lines.append(
            f"- **fewer than {MIN_CALIBRATION_IMAGES} images**: the selected heads and layers are not stable at "
            "this size (docs/calibration.md); recalibrate on more before relying on it."
        )
    sinks = (
        ", ".join(f"{d} (x{r:.1f})" for d, r in zip(head_map.sink_dims, head_map.sink_dim_ratios))
        or "none (VAR stays off)"
    )
    lines += [
        f"- VHR heads: {int(head_map.vhr_heads.sum())} of {head_map.num_layers * head_map.num_heads}; "
        f"VAR sink dimensions: {sinks}; GIFT saliency layer: {head_map.gift_saliency_layer}",
        "",
        "## Tuning",
        "",
    ]
    if tuned:
        data = (tuned.get("tuning_data") or {}).get("name", "?")
        objective = (tuned.get("objective") or {}).get("text", "?")
        lines += [
            f"- tuned by `vlm-guard tune` on {data}",
            f"- objective: {objective}",
            f"- default methods: {', '.join(tuned.get('default_methods') or []) or 'none (no method helped)'}",
        ]
        for method, settings in (tuned.get("settings") or {}).items():
            lines.append(f"- {method}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        effect = _measured_effect(tuned)
        lines += ["", "## Measured effect", "", *(effect or ["- not recorded"])]
    else:
        lines.append("- not tuned: `wrap` uses the methods' released settings (run `vlm-guard tune` to choose them).")
    lines += ["", f"_Card written by vlm-guard {__version__}._", ""]
    return "\n".join(line for line in lines if line is not None)


def push_to_hub(
    head_map: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload ``head_map`` (its two files and a model card) to the hub repository ``repo_id`` (created if needed).

    Returns:
        huggingface_hub's commit information.
    Raises:
        ValueError: ``repo_id`` is not ``"org/name"``.
    """
    from huggingface_hub import HfApi

    if not is_hub_id(repo_id):
        raise ValueError(
            f"repo_id={repo_id!r} is not a hub id; give it as 'org/name' (e.g. 'me/llava-1.5-7b-head-map')"
        )
    from vlm_guard.fileio import atomic_write_text

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vlm_guard_head_map_") as folder:
        head_map.save_pretrained(folder)
        atomic_write_text(Path(folder) / CARD_FILE, model_card(head_map, repo_id))
        message = commit_message or f"head map for {_identity(head_map.fingerprint)} ({head_map.fingerprint_hash})"
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=message,
            create_pr=create_pr,
            allow_patterns=list(HUB_FILES),
        )
    logger.info("pushed the head map to %s", repo_id)
    return info


__all__ = ["CARD_FILE", "HUB_FILES", "is_hub_id", "download", "resolve", "model_card", "push_to_hub"]
