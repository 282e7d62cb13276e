"""Does the data the engine is fed match the sampling its ε assumes?

The accountant (:mod:`dpft.accounting`) assumes Poisson sampling: at every
logical step each of the ``N = sample_size`` examples joins the batch
independently with probability ``q = batch_size / sample_size``, so the
number of examples of a step is ``Binomial(N, q)``, independently from step
to step.  A loader that does something else silently changes the mechanism:
an ordinary full-batch loader (q = 1) with an engine told q = 0.25 (σ = 2.5,
20 steps, δ = 1e-5) reports ε = 2.1 where the mechanism run has ε = 8.7, and
fixed-size shuffled batches are not covered by the Poisson analysis at all
(Chua et al., ICML 2024).

:class:`SamplingCheck` watches the number of examples of each logical step
(the engine counts the examples of every ``backward()`` between two steps,
all physical batches of a step together, summed over the ranks of a
distributed run; an empty batch declared with ``record_empty_batch()`` counts
0) and runs two exact tests on the steps seen so far:

* **Too many examples** (what under-counts ε): the total ``S_t`` over ``t``
  steps is ``Binomial(t N, q)`` under the assumption; the check fires when
  ``P[Binomial(t N, q) >= S_t]`` is below ``α_t``.
* **Too regular** (fixed-size batches): ``K_t``, the number of steps whose
  size is within 1 of the expected ``N q``, is ``Binomial(t, p_c)`` with
  ``p_c = P[|Binomial(N, q) - N q| < 1]`` (about ``0.4 / sqrt(N q (1 - q))``);
  the check fires when ``P[Binomial(t, p_c) >= K_t]`` is below ``α_t``.

Both use ``α_t = α / (t (t + 1))`` with ``α = 1e-6`` and fire only from the
third step on.  Since ``Σ_t α / (t (t + 1)) = α``, the probability that a
loader that *does* sample as assumed ever sets the check off, over any
number of steps, is at most ``2 α = 2e-6`` (exact binomial tails and a union
bound; no approximation).  Fewer examples than expected never fire: a
smaller sampling rate, or a data set smaller than ``sample_size``, only
over-counts ε (under add/remove adjacency ε depends on q, not on N).

With ``poisson=False`` (fixed-size batches accepted explicitly) the second
test is off; the first is replaced by "more than ``batch_size`` examples in a
step", which a fixed-size loader never produces, on 3 steps.

Power (computed with this module): a q = 1 loader against an engine told
q = 0.25 fires at step 3 for any N; fixed-size batches of the expected size
fire at step 3 to 10 for expected batches of 10 to 10 000 (``N q (1 - q)``
from 9 to 9900: step 10 at 9, 6 at 90, 5 at 255, 3 at 9900) and at step 20
for an expected batch of 1.  A Poisson loader 20 % faster than told fires
after about 6 steps at N = 60 000, B = 256, after about 80 at N = 100, B = 10.
"""

from __future__ import annotations

import math
import warnings

__all__ = ["MISMATCH_CAVEAT", "NON_POISSON_CAVEAT", "SamplingCheck", "SamplingMismatch", "SamplingMismatchWarning"]

#: the label of an ε computed for Poisson sampling but spent on batches that were not
NON_POISSON_CAVEAT = (
    "assumes Poisson sampling; the batches were not Poisson-sampled (poisson=False), "
    "so this ε is not a guarantee for them"
)
#: the label of an ε after the check fired (warning mode)
MISMATCH_CAVEAT = (
    "the batches did not match the Poisson sampling this ε assumes (see the SamplingMismatchWarning); "
    "ε may be under-counted"
)

ALPHA = 1e-6
MIN_STEPS = 3


class SamplingMismatch(RuntimeError):
    """The batches the engine receives do not match the sampling its ε assumes."""


class SamplingMismatchWarning(UserWarning):
    """Warning form of :class:`SamplingMismatch` (``PrivacyEngine(strict=False)``)."""


def _upper_tail(k: int, n: float, p: float) -> float:
    """``P[Binomial(n, p) >= k]`` (exact)."""
    from scipy import special

    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return float(special.bdtrc(k - 1, n, p))


def _central_mass(n: int, q: float) -> float:
    """``P[|Binomial(n, q) - n q| < 1]``."""
    from scipy import special

    mean = n * q
    lo = math.floor(mean - 1) + 1  # smallest integer > mean - 1
    hi = math.ceil(mean + 1) - 1  # largest integer < mean + 1
    lo, hi = max(lo, 0), min(hi, n)
    if lo > hi:
        return 0.0
    upper = float(special.bdtr(hi, n, q)) if hi < n else 1.0
    lower = float(special.bdtr(lo - 1, n, q)) if lo > 0 else 0.0
    return min(1.0, max(0.0, upper - lower))


class SamplingCheck:
    """The two tests of the module docstring, fed one count per logical step.

    Args:
        sample_size: N (the engine's ``sample_size``).
        sample_rate: q.
        batch_size: the engine's expected batch size ``B = q N``.
        poisson: ``False`` when fixed-size batches are accepted explicitly.
        alpha: the false-alarm probability of each test over a whole run.
        min_steps: never fire before this many steps.

    Attributes:
        population: the number of examples the loader samples from (default
            ``sample_size``).  Set it when it is knowingly different (e.g. an
            audit that keeps ``sample_size`` fixed while the canaries it
            leaves out are absent).
        steps, total, central, over: steps seen, examples seen, steps of
            about the expected size, steps above ``batch_size``.
        message: the first message the check produced, else ``None``.
    """

    def __init__(
        self,
        sample_size: int,
        sample_rate: float,
        batch_size: int,
        *,
        poisson: bool = True,
        alpha: float = ALPHA,
        min_steps: int = MIN_STEPS,
    ) -> None:
        self.population = int(sample_size)
        self.sample_rate = float(sample_rate)
        self.batch_size = int(batch_size)
        self.poisson = bool(poisson)
        self.alpha = float(alpha)
        self.min_steps = int(min_steps)
        self.steps = 0
        self.total = 0
        self.central = 0
        self.over = 0
        self.message: str | None = None
        self._pc: tuple[int, float] | None = None

    def _central_p(self) -> float:
        if self._pc is None or self._pc[0] != self.population:
            self._pc = (self.population, _central_mass(self.population, self.sample_rate))
        return self._pc[1]

    def observe(self, count: int) -> str | None:
        """Record one logical step of ``count`` examples; returns a message
        (saying what is wrong and what to do) when a test fires, else ``None``."""
        count = int(count)
        if count < 0:
            raise ValueError(f"a step cannot have {count} examples")
        self.steps += 1
        self.total += count
        n, q = self.population, self.sample_rate
        mean = n * q
        if abs(count - mean) < 1:
            self.central += 1
        if count > self.batch_size:
            self.over += 1
        t = self.steps
        if t < self.min_steps:
            return None
        level = self.alpha / (t * (t + 1))
        msg = None
        if not self.poisson:
            if self.over >= self.min_steps:
                msg = (
                    f"dpft: {self.over} of the {t} steps so far had more than batch_size={self.batch_size} "
                    "examples, which fixed-size batches of that size never have, so the privacy accountant "
                    f"(q = batch_size / sample_size = {q:.4g}) under-counts ε. Pass the batch_size your "
                    "loader uses (the global batch size under data parallelism), or better, use "
                    f"dpft.data.poisson_loader(dataset, batch_size={self.batch_size})."
                )
        else:
            p_many = _upper_tail(self.total, t * n, q) if self.total > t * mean else 1.0
            if p_many < level:
                msg = (
                    f"dpft: the batches do not match the sampling the privacy accountant assumes: {t} steps "
                    f"had {self.total} examples ({self.total / t:.1f} per step), but Poisson sampling at "
                    f"q = batch_size / sample_size = {q:.4g} from {n} examples gives {mean:.1f} per step on "
                    f"average (P = {p_many:.1e} under that assumption), so ε is under-counted. Use "
                    f"dpft.data.poisson_loader(dataset, batch_size={self.batch_size}) as the training loader, "
                    "or pass the batch_size and sample_size that match your loader (batch_size = expected "
                    "examples per logical step over all ranks, sample_size = len(dataset))."
                )
            else:
                pc = self._central_p()
                p_regular = _upper_tail(self.central, t, pc) if pc < 1.0 else 1.0
                if p_regular < level:
                    msg = (
                        f"dpft: {self.central} of the {t} steps so far had {mean:.6g} ± 1 examples, which "
                        f"Poisson sampling at q = {q:.4g} from {n} examples makes rare (P = {p_regular:.1e}): "
                        "these look like fixed-size (shuffled) batches, for which the ε the accountant reports "
                        "(computed for Poisson sampling) is not a guarantee. Use "
                        f"dpft.data.poisson_loader(dataset, batch_size={self.batch_size}) as the training "
                        "loader, or pass PrivacyEngine(poisson=False) to accept fixed-size batches (ε is then "
                        "labelled as assuming Poisson sampling)."
                    )
        if msg is not None and self.message is None:
            self.message = msg
        return msg


def warn(message: str, stacklevel: int = 3) -> None:
    """Issue ``message`` as a :class:`SamplingMismatchWarning`."""
    warnings.warn(message, SamplingMismatchWarning, stacklevel=stacklevel)
