"""ε of a whole group of k examples under an *example-level* DP-SGD run.

Example-level DP-SGD (Poisson rate q, noise σ, T steps) is (ε, δ)-DP for one
example.  For a group of k examples (one user's, one movie's), at each step
M ~ Binomial(k, q) of them are sampled; if their clipped gradients all point
the same way (what an adversary can arrange, and what the canary audit in
tests/test_user_level.py builds), the step releases N(M R, σ² R²) instead of
N(0, σ² R²): a mixture of Gaussians with sensitivities m = 0..k taken with the
binomial probabilities.  Its privacy loss distribution is computed with
dp-accounting (``from_mixture_gaussian_mechanism``, add and remove) and composed
over T steps; the ε at δ is what such a group actually gets, so the example-level
claim says nothing about it.  For comparison the textbook group-privacy
conversion of (ε, δ)-DP to (kε, k e^{(k-1)ε} δ)-DP is printed too (an upper bound,
vacuous here: its δ exceeds 1 already for small k).

    python -m benchmarks.group_epsilon --sigma 0.6724 --q 0.0128 --steps 79 --delta 1e-5 --k 1 2 5 24 32
"""

from __future__ import annotations

import argparse
import math

from dp_accounting.pld import privacy_loss_distribution as pld
from scipy import stats


def group_epsilon(sigma: float, q: float, steps: int, delta: float, k: int, interval: float = 1e-3) -> float:
    """ε at ``delta`` of a group of ``k`` aligned examples (dp-accounting's mixture-of-Gaussians PLD)."""
    probs = [float(stats.binom.pmf(m, k, q)) for m in range(k + 1)]
    one = pld.from_mixture_gaussian_mechanism(
        standard_deviation=sigma,
        sensitivities=list(range(k + 1)),
        sampling_probs=probs,
        value_discretization_interval=interval,
    )
    return float(one.self_compose(steps).get_epsilon_for_delta(delta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sigma", type=float, required=True)
    ap.add_argument("--q", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--eps", type=float, default=None, help="the example-level claim (for the textbook conversion)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 5, 10, 24, 32])
    a = ap.parse_args()
    print(
        "| group size k | ε of the group (dp-accounting, aligned worst case) | textbook conversion (kε, k e^((k-1)ε) δ) |"
    )
    print("|---:|---:|---|")
    for k in a.k:
        eps = group_epsilon(a.sigma, a.q, a.steps, a.delta, k)
        conv = "-"
        if a.eps is not None:
            d = k * math.exp(min(700.0, (k - 1) * a.eps)) * a.delta
            conv = f"({k * a.eps:.3g}, {d:.3g})"
        print(f"| {k} | {eps:.3f} | {conv} |")


if __name__ == "__main__":
    main()
