"""Empirical privacy auditing: checks a privacy claim from the outside.

``dpft.audit`` is the public entry point (see docs/audit.md). Its modules:

* :mod:`dpft.audit.stats`: the bounds and the attack's simulated scores (numpy
  and scipy only, no torch);
* :mod:`dpft.audit.harness`: the one-run audit, which trains a small canary task
  with a :class:`dpft.PrivacyEngine` (planted bugs, for the tests, are set on
  that engine alone);
* :mod:`dpft.audit.trials`: the many-trial distinguishing audit;
* :mod:`dpft.audit.cli`: ``dpft audit``.
"""

from .cli import add_cli_parser, run_cli
from .harness import MODES, SCORES, AuditResult, one_run_audit
from .stats import (
    Claim,
    clopper_pearson,
    epsilon_lower_bound,
    one_run_p_value,
    perfect_guess_ceiling,
    threshold_lower_bound,
)
from .trials import TRIAL_TASKS, DistinguishingResult, distinguishing_audit

__all__ = [
    "AuditResult",
    "Claim",
    "DistinguishingResult",
    "MODES",
    "SCORES",
    "TRIAL_TASKS",
    "add_cli_parser",
    "clopper_pearson",
    "distinguishing_audit",
    "epsilon_lower_bound",
    "one_run_audit",
    "one_run_p_value",
    "perfect_guess_ceiling",
    "run_cli",
    "threshold_lower_bound",
]
