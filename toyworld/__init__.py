"""Training, reports and weight shipping for the project's default models (outside the ``vlm_guard`` wheel).

Run from the repository root, e.g. ``python -m toyworld.v3.train --out /root/vlm-guard-runs/v3``.
"""
