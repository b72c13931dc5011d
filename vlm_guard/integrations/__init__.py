"""Bridges to other tools' evaluation harnesses (each in its own subpackage, importing its tool only there).

- :mod:`vlm_guard.integrations.lmms_eval`: a ``vlm_guard`` model for lmms-eval (``pip install
  "vlm-attention-guard[lmms-eval]"``), its task configs for local POPE and CHAIR files, and the export of the
  synthetic benchmark into those files.
"""
