"""Issue 29 item 4: the vision path without the Debian package dataset-fashion-mnist.

scripts/setup.sh installs it where apt-get is allowed (scripts/system_data.sh) and says
so when it cannot; without it, ``--model cnn-fmnist`` is pretrained on scikit-learn's
digits (a data file the pip package ships) and every run says so."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import importlib.util

import numpy as np
import pytest

from app_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
# scikit-learn is installed --no-deps (only its digits file is read; importing it needs scipy)
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="scikit-learn's digits file (scripts/setup.sh installs it --no-deps)",
)


@pytest.fixture
def no_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("DPFT_FASHION_MNIST_DIR", str(tmp_path / "no-fashion-mnist"))
    monkeypatch.setenv("DPFT_CACHE", str(tmp_path / "cache"))


def test_digits_fallback_data():
    from dpft.app import offline

    d = offline.sklearn_digits()
    assert d.x_train.shape == (1497, 1, 28, 28) and d.x_test.shape == (300, 1, 28, 28)
    assert d.x_train.dtype == np.float32 and 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    # MNIST's layout: the digit in the centre 20x20, a 4-pixel empty border
    assert d.x_train[..., :4, :].max() == 0.0 and d.x_train[..., 4:24, 4:24].mean() > 0.1
    assert set(d.y_train.tolist()) == set(range(10)) and d.num_labels == 10
    assert not np.array_equal(d.x_train[0], d.x_train[1])


def test_public_cnn_falls_back_to_digits_and_says_so(tmp_path, no_fashion_mnist):
    from dpft.app import offline

    assert offline.public_pretraining_source() == "sklearn-digits"
    config = offline.PretrainConfig(epochs=1.0, batch_size=64, train_size=128)
    logs: list[str] = []
    _, info = offline.pretrained_cnn(config, log=logs.append)
    assert info["built"] and info["public_data"] == "sklearn-digits"
    assert "sklearn-digits" in Path(info["path"]).name and info["key"] != config.key()  # not Fashion-MNIST's cache
    assert any("Fashion-MNIST is not installed" in m and "scikit-learn's 1,797" in m for m in logs)
    assert any("128 scikit-learn digits" in m for m in logs)
    logs.clear()
    _, again = offline.pretrained_cnn(config, log=logs.append)  # from the cache: still said
    assert not again["built"] and again["path"] == info["path"]
    assert any("Fashion-MNIST is not installed" in m for m in logs)


def test_fashion_mnist_dataset_error_names_setup_and_mnist(tmp_path):
    from dpft.app import offline
    from dpft.app.offline import DataUnavailable

    with pytest.raises(DataUnavailable, match="scripts/setup.sh does where allowed") as e:
        offline.fashion_mnist(tmp_path)
    assert "--dataset mnist" in str(e.value) and "\n" not in str(e.value)


def test_dpft_train_cnn_fmnist_without_fashion_mnist(tmp_path, capsys, monkeypatch, no_fashion_mnist):
    monkeypatch.setenv("DPFT_CNN_FMNIST", "quick")
    code, out, err = run_cli(
        [
            "train",
            "--dataset",
            "mnist",
            "--model",
            "cnn-fmnist",
            "--train-size",
            "128",
            "--eval-size",
            "64",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--no-progress",
            "--eval-every",
            "0",
            "--dp-seed",
            "1",
            "--num-threads",
            "1",
            "--out",
            tmp_path / "run",
        ],
        capsys,
    )
    assert code == 0, err
    assert "Fashion-MNIST is not installed" in out
    assert "public weights pretrained (non-privately) on scikit-learn's digits (Fashion-MNIST not installed)" in out


def _setup_data(tmp_path: Path, data_dir: Path) -> subprocess.CompletedProcess:
    empty = tmp_path / "bin"  # a PATH without apt-get (nor sudo): the script must detect it
    empty.mkdir(exist_ok=True)
    env = {"PATH": str(empty), "HOME": str(tmp_path), "DPFT_FASHION_MNIST_DIR": str(data_dir)}
    return subprocess.run(
        ["/bin/bash", str(ROOT / "scripts" / "system_data.sh")], env=env, capture_output=True, text=True, timeout=60
    )


def test_setup_says_when_it_cannot_install_fashion_mnist(tmp_path):
    proc = _setup_data(tmp_path, tmp_path / "missing")
    assert proc.returncode == 0, proc.stderr
    assert "Fashion-MNIST NOT installed (no apt-get on this system" in proc.stdout
    assert "scikit-learn's digits instead" in proc.stdout


def test_setup_is_quiet_when_fashion_mnist_is_there(tmp_path):
    data = tmp_path / "fmnist"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (data / name).write_bytes(b"")
    proc = _setup_data(tmp_path, data)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout
    assert os.access(ROOT / "scripts" / "system_data.sh", os.R_OK)
