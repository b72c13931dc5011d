"""vlm_guard: training-free hallucination mitigation for Hugging Face vision-language models.

Example:
    >>> import vlm_guard
    >>> model, processor = vlm_guard.load_default()
    >>> guarded = vlm_guard.wrap(model, processor, vlm_guard.GuardConfig.from_methods("all"))
"""

from .config import GuardConfig
from .version import __version__
from .wrapper import GuardedModel, wrap


def load_default(*args, **kwargs):
    """The shipped default model and processor (see :func:`vlm_guard.defaults.load_default`)."""
    from .defaults import load_default as _load_default

    return _load_default(*args, **kwargs)


def calibrate(*args, **kwargs):
    """Profile a model's heads once and return a :class:`vlm_guard.heads.HeadMap`
    (see :func:`vlm_guard.heads.calibrate.calibrate`)."""
    from .heads.calibrate import calibrate as _calibrate

    return _calibrate(*args, **kwargs)


__all__ = ["GuardConfig", "GuardedModel", "wrap", "load_default", "calibrate", "__version__"]
