"""The checks a command runs on its arguments before any slow work: :mod:`vlm_guard.checks` (shared with the
library's runners), re-exported for the commands."""

from vlm_guard.checks import (
    check_device,
    check_head_map_folder,
    check_model_argument,
    check_output_file,
    check_output_folder,
    check_port,
    model_load_error,
)

__all__ = [
    "model_load_error",
    "check_device",
    "check_head_map_folder",
    "check_model_argument",
    "check_output_file",
    "check_output_folder",
    "check_port",
]
