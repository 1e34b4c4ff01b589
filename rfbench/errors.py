"""Errors raised by rfbench.

Every error a user can cause is an ``RFBenchError`` whose message says what was wrong and how to
fix it. The CLI prints the message on one line and exits with status 2.
"""

from __future__ import annotations


class RFBenchError(Exception):
    """Base class of every error rfbench raises on purpose."""


class SpecError(RFBenchError):
    """A suite file or option is malformed (unknown key, wrong type, impossible value)."""


class DataError(RFBenchError):
    """Input tensors or files are unusable (wrong shape or dtype, NaN/Inf, broken file)."""


class EstimatorError(RFBenchError):
    """An estimator cannot be built or applied (unknown name, unsupported pair, bad parameter)."""


class ClippingWarning(RuntimeWarning):
    """A fitted parameter was clipped or floored (e.g. DARK's proposal eigenvalues): the estimate
    stays valid (unbiased where it was) but is no longer the optimum its paper derives. The runner
    writes these warnings into the cell's ``message``."""


class UnsupportedError(EstimatorError):
    """A valid estimator cannot serve this case; ``reasons`` lists why, in plain words."""

    def __init__(self, reasons: list[str] | str):
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        super().__init__("; ".join(self.reasons))
