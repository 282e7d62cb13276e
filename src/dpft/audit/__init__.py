"""Empirical privacy auditing: checks a privacy claim from the outside.

``dpft.audit`` is the public entry point; the work is in :mod:`dpft.audit.harness`
(the one-run audit and its command line) and :mod:`dpft.audit.trials` (the
many-trial distinguishing audit). See docs/audit.md.
"""

from .harness import *  # noqa: F401,F403
from .harness import __all__ as _harness_all
from .harness import add_cli_parser, run_cli  # noqa: F401
from .trials import TRIAL_TASKS, clopper_pearson, threshold_lower_bound  # noqa: F401

__all__ = [*_harness_all, "TRIAL_TASKS", "clopper_pearson", "threshold_lower_bound"]
