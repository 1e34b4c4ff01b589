"""Kernel learning: fit settings (``config``), training losses (``objectives``), the trainer
(``training``). See ``rfbench.learning.training`` for how fitting works.

    from rfbench.learning import FitConfig, fit_estimator
    res = fit_estimator(est, q_train, k_train, v_train, FitConfig(steps=200), scale=capture.scale)

Names are re-exported lazily, so ``import rfbench.learning.config`` (what a suite parser needs)
imports neither the trainer nor pandas.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "config": (
        "FitConfig",
        "FitSpec",
        "HOLDOUT_KEYS",
        "OBJECTIVES",
        "SPLITS",
        "TokenSplit",
        "parse_fit_section",
        "split_ranges",
        "split_tokens",
    ),
    "objectives": ("Objective",),
    "training": (
        "FitResult",
        "VAL_SEED_BASE",
        "check_config",
        "fit_estimator",
        "target_attention",
        "target_inputs",
        "warm_up",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rfbench.learning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"rfbench.learning.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted({*globals(), *__all__})
