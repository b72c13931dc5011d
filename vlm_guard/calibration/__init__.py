"""Head profiling: VHD vision sensitivity, VAR sink dimensions and image-centric heads, GIFT saliency layer.

One module per measure (``vhd``, ``tvhd``, ``sinks``, ``gift_layer``; GIFT's pure gaze functions in
``gaze``), the :class:`HeadMap` that stores the results (``head_map``), the calibration run that fills
it (``calibrate``; call ``vlm_guard.calibrate`` or ``vlm_guard.calibration.calibrate.calibrate``), its plots
(``plots``) and its command line (``cli``: ``vlm-guard calibrate``, ``vlm-guard heads show``).

Example (not run: calibrates a real model on a folder of photos)::

    import vlm_guard
    from vlm_guard.calibration import HeadMap, token_vhd
    head_map = vlm_guard.calibrate(model, processor, "photos/", out_dir="maps/mine")
    scores = token_vhd(model, processor, inputs, output_ids)  # [B, T] per generated token
    assert HeadMap.from_pretrained("maps/mine") == head_map
"""

from vlm_guard.calibration.head_map import (
    HeadMap,
    HeadMapFileError,
    HeadMapMismatchError,
    ImageCentricStats,
    default_cache_dir,
    find_cached_head_map,
)


def token_vhd(*args, **kwargs):
    """See :func:`vlm_guard.calibration.tvhd.token_vhd`."""
    from vlm_guard.calibration.tvhd import token_vhd as _token_vhd

    return _token_vhd(*args, **kwargs)


__all__ = [
    "HeadMap",
    "HeadMapFileError",
    "HeadMapMismatchError",
    "ImageCentricStats",
    "default_cache_dir",
    "find_cached_head_map",
    "token_vhd",
]
