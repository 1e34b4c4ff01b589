"""rfbench: measure random-feature approximations of the softmax kernel exp(q . k)."""

from rfbench import exact
from rfbench._version import __version__  # noqa: F401  (re-exported)
from rfbench.errors import DataError, EstimatorError, RFBenchError, SpecError, UnsupportedError
from rfbench.estimator import Estimator
from rfbench.registry import estimators, feature_maps, make_estimator, weight_matrices

__all__ = [
    "DataError",
    "Estimator",
    "EstimatorError",
    "FitConfig",
    "RFBenchError",
    "SpecError",
    "UnsupportedError",
    "estimators",
    "exact",
    "feature_maps",
    "fit_estimator",
    "load_results",
    "make_estimator",
    "run_suite",
    "theory",
    "weight_matrices",
]


def __getattr__(name):
    # Heavier parts load on first use, so `import rfbench` stays quick.
    if name == "theory":
        # import_module, not `from rfbench import theory`: the latter looks the name up on this
        # package first, which calls this __getattr__ again (infinite recursion).
        import importlib

        return importlib.import_module("rfbench.theory")
    if name == "run_suite":
        from rfbench.suite.runner import run_suite

        return run_suite
    if name in ("fit_estimator", "FitConfig"):
        from rfbench import learning

        return getattr(learning, name)
    if name == "load_results":
        from rfbench.results import load_results

        return load_results
    raise AttributeError(f"module 'rfbench' has no attribute {name!r}")
