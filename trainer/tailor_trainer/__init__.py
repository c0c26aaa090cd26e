"""Tailor's training pipeline: prep -> adapt -> train -> evaluate.

Started as ``python -m tailor_trainer run --config FILE``; the only contract with the operator
is :class:`tailor_trainer.config.TrainerConfig`.
"""

__version__ = "0.1.0"
