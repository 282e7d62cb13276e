"""The public image data that ``--model cnn-fmnist`` is pretrained on, with a pip fallback.

Fashion-MNIST comes from the Debian/Ubuntu package ``dataset-fashion-mnist``
(``scripts/setup.sh`` installs it where apt-get is allowed); no pip package ships
it. Where it is missing, the public CNN is pretrained instead on scikit-learn's
1,797 8x8 handwritten digits (the UCI "optical recognition of handwritten
digits" set, which scikit-learn ships as a data file; read directly, scikit-learn
itself is never imported), each scaled to 20x20 and centred in a 28x28 frame
like MNIST's digits. They are public data from another source than MNIST (the
usual private task), so public pretraining / private fine-tuning still holds;
the features are those of digits rather than of clothing, and the run says so.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np

#: The data names that go into the public CNN's cache key.
FASHION_MNIST = "fashion-mnist"
SKLEARN_DIGITS = "sklearn-digits"
#: 1,797 digits split once (seed 0): 300 held out to report the pretraining accuracy.
DIGITS_TEST_SIZE = 300


def fashion_mnist_installed(root: str | os.PathLike | None = None) -> bool:
    """Whether the four Fashion-MNIST idx files are where :func:`dpft.offline.fashion_mnist` reads them."""
    from dpft import offline

    root = Path(root or os.environ.get("DPFT_FASHION_MNIST_DIR", offline.FASHION_MNIST_DIR))
    return all((root / f"{k}-{kind}-idx{1 if kind == 'labels' else 3}-ubyte.gz").is_file()
               for k in ("train", "t10k") for kind in ("images", "labels"))


def _digits_file() -> Path:
    from dpft.offline import DataUnavailable

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.origin:
        raise DataUnavailable(
            "neither Fashion-MNIST (Debian package dataset-fashion-mnist: apt-get install "
            "dataset-fashion-mnist, as root) nor the fallback, scikit-learn's digits (pip install "
            "--no-deps scikit-learn; scripts/setup.sh does), is installed: --model cnn-fmnist needs one")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing; reinstall with: pip install --no-deps scikit-learn")
    return path


def sklearn_digits(seed: int = 0):
    """scikit-learn's 1,797 handwritten digits as 1x28x28 images in [0, 1] (MNIST's layout: the
    digit scaled to 20x20, centred), split 1,497 train / 300 test with a fixed permutation."""
    import torch

    from dpft.offline import TaskData

    with gzip.open(_digits_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x, y = table[:, :64] / 16.0, table[:, 64].astype(np.int64)
    small = torch.as_tensor(x).reshape(-1, 1, 8, 8)
    big = torch.nn.functional.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    images = torch.nn.functional.pad(big, (4, 4, 4, 4)).clamp_(0.0, 1.0).numpy()
    perm = np.random.default_rng(seed).permutation(len(y))
    te, tr = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    return TaskData(SKLEARN_DIGITS, "image", images[tr], y[tr], images[te], y[te], [str(d) for d in range(10)],
                    f"scikit-learn digits (8x8, scaled to 28x28), {len(tr)} train / {len(te)} test")


def public_pretraining_source() -> str:
    """:data:`FASHION_MNIST` where it is installed, else :data:`SKLEARN_DIGITS`."""
    return FASHION_MNIST if fashion_mnist_installed() else SKLEARN_DIGITS


def fallback_note() -> str:
    """What a run prints when the public CNN is pretrained on the fallback."""
    return ("Fashion-MNIST is not installed (the Debian/Ubuntu package dataset-fashion-mnist; "
            "scripts/setup.sh installs it where apt-get is allowed): the public CNN 'cnn-fmnist' is "
            "pretrained on scikit-learn's 1,797 8x8 handwritten digits (scaled to 28x28) instead, "
            "public data of another source than MNIST; apt-get install dataset-fashion-mnist (as root) "
            "for the documented model")


def load_public_data(source: str, log: Callable[[str], None] | None = None):
    """The training data of the public CNN for ``source`` (see :func:`public_pretraining_source`)."""
    from dpft import offline

    if source == FASHION_MNIST:
        return offline.fashion_mnist()
    if log is not None:
        log(f"dpft: {fallback_note()}")
    return sklearn_digits()
