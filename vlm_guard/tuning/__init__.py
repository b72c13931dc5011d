"""Per-model tuning of every method's strength and layer band (``vlm-guard tune``, :func:`vlm_guard.tune`), and the rule
that decides which value runs (:func:`resolve_config`: the user's config, then the head map's tuned value, then the
released default).

- :mod:`vlm_guard.settings`: precedence, default method set, reports;
- :mod:`vlm_guard.tuning.space`: the grids (strength x layer band per method);
- :mod:`vlm_guard.tuning.objective`: what is minimised and the recall / POPE constraints;
- :mod:`vlm_guard.tuning.search`: budgeted successive halving, resumable JSON state;
- :mod:`vlm_guard.tuning.profiles`: one setting per task profile (``caption``, ``answer``), judged by paired
  intervals, rung sizes from the effect to resolve, winners confirmed on a separate split (``tune --profiles``);
- :mod:`vlm_guard.tuning.plots`, :mod:`vlm_guard.tuning.report`: PNG curves and the markdown table;
- :mod:`vlm_guard.cli.tune`: the command.
"""

from __future__ import annotations

from vlm_guard.settings import (
    PROFILES,
    UNTUNED_DEFAULT_METHODS,
    default_config,
    default_methods,
    describe_settings,
    resolve_config,
    tuned_report,
    tuned_settings,
)


def tune(*args, **kwargs):
    """See :func:`vlm_guard.tuning.search.tune`."""
    from vlm_guard.tuning.search import tune as run

    return run(*args, **kwargs)


__all__ = [
    "PROFILES",
    "resolve_config",
    "default_methods",
    "default_config",
    "describe_settings",
    "tuned_report",
    "tuned_settings",
    "UNTUNED_DEFAULT_METHODS",
]
