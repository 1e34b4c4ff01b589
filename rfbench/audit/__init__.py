"""Conformance checks of random-feature attention implementations (``rfbench audit TARGET``).

Adapters (``rfbench.audit.adapters``) reach an implementation's projection, kernel estimate and
attention; checks (``rfbench.audit.checks``) test them against rfbench's oracles; the report
(``rfbench.audit.report``) prints one table per implementation and is the CLI command.
"""

from rfbench.audit.adapters import Adapter, EstimatorAdapter, adapters_for
from rfbench.audit.checks import Check, Settings, run_checks

__all__ = ["Adapter", "Check", "EstimatorAdapter", "Settings", "adapters_for", "run_checks"]
