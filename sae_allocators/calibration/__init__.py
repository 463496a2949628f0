"""Calibration: fit the saved JumpReLU thresholds of the batch-level rules on held-out activations.

- :mod:`.fit` -- the rules and the exact streaming quantiles: :func:`calibrate` fits (and applies)
  the thresholds of one SAE on given activations, returning a :class:`CalibrationResult`;
- :mod:`.runner` -- where it runs in SAELens's runners: the wraps of their final save
  (:func:`~.runner.runner_wraps`, installed by :mod:`sae_allocators.patches`) make every runner
  calibrate an SAE of ours before saving it; :class:`CalibratingRunnerMixin` picks the held-out batches.
"""

from sae_allocators.calibration.fit import CalibrationResult, calibrate
from sae_allocators.calibration.runner import CalibratingRunnerMixin

__all__ = ["CalibratingRunnerMixin", "CalibrationResult", "calibrate"]
