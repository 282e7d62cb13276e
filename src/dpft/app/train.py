"""The `dpft train` job as a library function: ``dpft.app.train.train(TrainConfig(...))``.

One private fine-tuning run, start to finish: load the model and the data
(offline by default, see :mod:`dpft.app.offline`), pick the trainable parameters for
the method, wrap the optimizer in a :class:`dpft.PrivacyEngine` calibrated to the
target ε, train with Poisson-sampled logical batches split into physical
batches, evaluate, and write everything a user needs into ``out``:

``config.json``   the resolved configuration (every default filled in)
``metrics.jsonl`` one JSON line per optimizer step (loss, ε so far, ...) and per evaluation
``summary.json``  the final numbers (accuracy, majority baseline, ε, δ, σ, steps, time, memory)
``report.png``    training loss, test accuracy and ε against step (needs matplotlib)
``checkpoint.pt`` trainable parameters, optimizer, engine ledger, sampler position and
                  RNG states, so that ``--resume`` continues the run exactly

Every field of :class:`TrainConfig` defaults to ``None`` = "choose for me"; the
choices depend on the data kind and on the device (on a CPU the default text
job subsamples the training set and shortens sequences so that it finishes in
a few minutes, and says so).

The job in stages, one module each: :mod:`~dpft.app.config` (the options and
their defaults), :mod:`~dpft.app.prepare` (data on tensors, the output folder,
the process group), :mod:`~dpft.app.build` (model, method, optimizer, engine),
:mod:`~dpft.app.loop` (SPARTA's private phases, then the training loop),
:mod:`~dpft.app.summarize` and :mod:`~dpft.app.report` (summary, privacy
record, release, report figure). This module runs them in order.
"""

from __future__ import annotations

from typing import Callable

from .build import _build_model, _build_privacy, _log_plan, _prepare_data, _resolve_job, select_trainable
from .choices import METHODS, PRIVATE_METHODS
from .config import NotAvailableYet, TrainConfig, resolve
from .errors import ConfigError, DataUnavailable, RunFailed
from .loop import _Run, _run_sparta_phases, evaluate
from .prepare import BatchPlan, _Job, _Spent, physical_chunks
from .report import write_report
from .summarize import learning_check

__all__ = [
    "ConfigError",
    "NotAvailableYet",
    "TrainConfig",
    "METHODS",
    "PRIVATE_METHODS",
    "resolve",
    "train",
    "evaluate",
    "BatchPlan",
    "physical_chunks",
    "select_trainable",
    "write_report",
    "DataUnavailable",
    "RunFailed",
    "learning_check",
]


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run one job; returns the summary dict (also written to ``out/summary.json``).

    A run stopped early (``--stop-after-steps``, Ctrl-C) returns
    ``{"stopped": True, "status": ..., "step": ..., "epsilon": ...}`` after
    writing a checkpoint that ``--resume`` continues. A fault (non-finite loss,
    a full disk) raises :class:`RunFailed`, whose message names the last
    checkpoint and the ε spent; every other way out logs the ε spent too.
    """
    log = log or _print
    spent = _Spent()
    try:
        job = _prepare(cfg, log, spent)
        return _Run(job, spent).run()
    except (ConfigError, DataUnavailable, RunFailed):
        raise
    except KeyboardInterrupt:
        if spent.source is not None:  # e.g. during SPARTA's scoring pass: nothing to resume from
            log(f"  interrupted before the first training checkpoint; {spent.text()}")
        raise
    except Exception:
        if spent.source is not None:
            log(f"  the run failed; {spent.text()}")
        raise


def _print(s: str) -> None:
    print(s, flush=True)


def _prepare(cfg: TrainConfig, log: Callable[[str], None], spent: _Spent) -> _Job:
    """Options, output folder, data, model, optimizer and privacy engine; runs SPARTA's
    warm-up and scoring phases (which spend privacy) when the method is sparta."""
    job = _resolve_job(cfg, log)
    _prepare_data(job)
    _build_model(job)
    _build_privacy(job)
    spent.source = job.sp if job.sp is not None else job.engine
    _log_plan(job)
    if job.sp is not None:
        _run_sparta_phases(job)
    return job
