"""Error metrics of random-feature estimators, streamed over pair tiles (no L x L matrix is held).

``kernel``: the kernel and attention-matrix errors of S seeds (``kernel_errors``), each
estimator also measured against its declared target kernel; ``tiles``: the pair-tile
iteration; ``accumulate``: the streaming sums; ``features``: estimator features relative to the
one stabiliser's constants; ``reference``: the exact row log-sum-exp, relative error, row samples;
``expected``: the closed-form expectation of ``kernel_rel_mse`` where rfbench.theory has one.
"""

from rfbench.metrics.expected import expected_kernel_rel_mse, theory_reasons
from rfbench.metrics.kernel import KernelErrors, kernel_errors, same_params, same_target
from rfbench.metrics.reference import MEMORY_BUDGET, exact_row_lse, relative_error, sample_rows

__all__ = [
    "MEMORY_BUDGET",
    "KernelErrors",
    "exact_row_lse",
    "expected_kernel_rel_mse",
    "kernel_errors",
    "relative_error",
    "same_params",
    "same_target",
    "sample_rows",
    "theory_reasons",
]
