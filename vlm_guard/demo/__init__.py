"""The Gradio demo: plain vs guarded answers side by side, per-token attention heatmaps, VAR's sinks,
GIFT's saliency and risky words highlighted (``vlm-guard demo``).

Modules: :mod:`.inputs` (caps, validation, bundled examples), :mod:`.session` (the runs, no Gradio),
:mod:`.overlay` (pictures), :mod:`.app` (the Blocks layout and handlers), :mod:`.cli` (the command).
Gradio is imported only by :mod:`.app` and when the command runs (the ``demo`` extra).
"""
