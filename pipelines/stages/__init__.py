"""The pipeline's stages, in order: calibrate -> teacher -> prune -> finetune -> evaluate (one module each).

See :mod:`pipelines.stages.base` for what a stage module defines and how its output is cached.
"""

from pipelines.stages import calibrate, evaluate, finetune, prune, teacher

STAGES = (calibrate, teacher, prune, finetune, evaluate)
"""Stage modules in a topological order of ``NEEDS``."""
NAMES: tuple[str, ...] = tuple(s.NAME for s in STAGES)
BY_NAME = {s.NAME: s for s in STAGES}

__all__ = ["BY_NAME", "NAMES", "STAGES"]
