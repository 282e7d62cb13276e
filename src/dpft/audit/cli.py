"""``dpft audit``: the command line of both audits (:mod:`dpft.audit.harness`, :mod:`dpft.audit.trials`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..options import EngineOptions
from .harness import MODES, SCORES, one_run_audit

__all__ = ["add_cli_parser", "run_cli"]


def add_cli_parser(subparsers: Any) -> Any:
    """Add the ``audit`` subcommand to ``dpft``'s argparse subparsers."""
    a = subparsers.add_parser(
        "audit",
        help="empirical ε lower bounds of your engine settings (one-run + many-trial audits)",
        description="Train small canary tasks with a PrivacyEngine configured like yours and "
        "report the ε lower bounds that a one-run audit (Steinke, Nasr & Jagielski 2023) and a "
        "many-trial distinguishing test (gradient canaries, Clopper-Pearson bounds; --trials) "
        "certify, next to the engine's claimed ε. A lower bound above the claim means a "
        "privacy bug; one below it proves nothing about privacy. Exit code 1 on a violation.",
    )
    a.add_argument("--mode", choices=MODES, default="bitfit", help="what trains (default bitfit)")
    what = a.add_mutually_exclusive_group(required=True)
    what.add_argument("--epsilon", type=float, help="target ε (σ calibrated by the engine)")
    what.add_argument("--sigma", "--noise-multiplier", dest="sigma", type=float, help="noise multiplier σ")
    length = a.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (default 20)")
    length.add_argument("--epochs", type=float, help="epochs (steps = epochs · ceil(N/B))")
    a.add_argument("--batch-size", type=int, default=500, help="expected batch size B (default 500)")
    a.add_argument(
        "--sample-size", type=int, default=2000, help="data set size N, canary slots included (default 2000); q = B/N"
    )
    a.add_argument("--delta", type=float, help="δ (default dpft.accounting.default_delta(N))")
    a.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping threshold R (default 1)")
    a.add_argument("--clipping-fn", choices=("abadi", "automatic"), default="abadi")
    a.add_argument("--clipping-style", choices=("all-layer", "layer-wise", "param-wise"), default="all-layer")
    a.add_argument("--clipping-mode", choices=("auto", "bk", "ghost", "mixed", "instantiate"), default="auto")
    a.add_argument("--accountant", choices=("pld", "rdp"), default="pld")
    a.add_argument("--num-canaries", type=int, default=1000, help="m (default 1000)")
    a.add_argument("--confidence", type=float, default=0.95, help="1 - β (default 0.95)")
    a.add_argument(
        "--guesses", default="auto", help="'auto' (default), 'wide', or K_IN,K_OUT: canaries guessed in / out"
    )
    a.add_argument("--score", choices=SCORES, default="llr", help="default llr")
    a.add_argument(
        "--trials",
        type=int,
        default=50_000,
        help="distinguishing test: independent trials per world (canary present / absent; "
        "default 50000; 0 skips the test)",
    )
    a.add_argument(
        "--trials-task",
        choices=("embedding", "bitfit", "full", "sparta"),
        default="embedding",
        help="distinguishing test's canary task (default embedding: cost linear in the trials)",
    )
    a.add_argument("--seed", type=int, help="seed everything (default: OS entropy)")
    a.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return a


def run_cli(ns: Any) -> int:
    """Run ``dpft audit`` from parsed arguments; 0 = consistent, 1 = violation, 2 = bad input."""
    import json
    import sys

    guesses: Any = ns.guesses
    if guesses not in ("auto", "wide"):
        try:
            k_in, k_out = (int(k) for k in str(guesses).split(","))
            guesses = (k_in, k_out)
        except ValueError:
            print(f"dpft audit: error: --guesses must be auto, wide or K_IN,K_OUT, got {ns.guesses!r}", file=sys.stderr)
            return 2
    # the configuration both audits run (the engine's arguments, as given)
    try:
        options = EngineOptions(
            target_delta=ns.delta,
            max_grad_norm=ns.max_grad_norm,
            clipping_fn=ns.clipping_fn,
            clipping_style=ns.clipping_style,
            clipping_mode=ns.clipping_mode,
            accountant=ns.accountant,
        )
        config = dict(
            target_epsilon=ns.epsilon,
            noise_multiplier=ns.sigma,
            steps=ns.steps,
            epochs=ns.epochs,
            batch_size=ns.batch_size,
            sample_size=ns.sample_size,
            options=options,
            confidence=ns.confidence,
            score=ns.score,
        )
        result = one_run_audit(ns.mode, num_canaries=ns.num_canaries, guesses=guesses, seed=ns.seed, **config)
        trials = None
        if ns.trials:
            from .trials import distinguishing_audit

            seed = None if ns.seed is None else int(np.random.SeedSequence([ns.seed, 1]).generate_state(1)[0])
            trials = distinguishing_audit(ns.trials_task, trials=ns.trials, seed=seed, **config)
    except ValueError as e:
        print(f"dpft audit: error: {e}", file=sys.stderr)
        return 2
    if ns.json:
        out = result.as_dict()
        if trials is not None:
            out["distinguishing"] = trials.as_dict()
        print(json.dumps(out))
    else:
        print(result.summary())
        if trials is not None:
            print(trials.summary())
    return 1 if result.violation or (trials is not None and trials.violation) else 0
