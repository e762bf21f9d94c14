"""The preflight memory planner: exact parameter counts from a checkpoint's ``config.json`` instantiated on
the meta device (no weights read), the bytes each learner rank and each rollout server needs, and whether
that fits the device (``training.device_memory_gib`` or the detected GPU).

Modules: :mod:`~coordexp.planning.inventory` (parameter counts per group, trainable counts under freezing and
LoRA/DoRA), :mod:`~coordexp.planning.activations` (the per-layer activation formula),
:mod:`~coordexp.planning.memory` (the plan, the fit check, the fixes), :mod:`~coordexp.planning.report` (the
table). ``python -m coordexp.preflight`` is the entry point (docs/runbook.md "Memory plan").
"""
