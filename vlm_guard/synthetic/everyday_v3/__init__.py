"""Default model v3 (run-time parts): the everyday world with 64+ image tokens per image and long descriptions
(``world``), the model shape (``model``) and the assembly of shipped weights onto SmolLM2 (``assemble``).

Training, checkpoints and the v3 report live outside the wheel, in the repository's ``toyworld/v3`` folder.
"""
