"""Default model v3: training (``train``), its batches (``data``) and its report (``report``).

The run-time parts (world, prompts, model shape, assembly) live in ``vlm_guard.synthetic.everyday_v3``.
"""
