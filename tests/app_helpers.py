"""Small models and data for the `dpft train` / `dpft predict` tests (tests/test_app_*.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAVE_PANDAS = importlib.util.find_spec("pandas") is not None

GOOD = ["great fun", "a joy to watch", "superb acting", "loved it", "wonderful and warm"]
BAD = ["boring mess", "a waste of time", "dull plot", "hated it", "awful and cold"]


def make_tiny_bert(path: Path) -> str:
    """A 2-layer, 32-wide BERT with a character-level vocabulary, saved like any HF checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
        )
        BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


def make_reviews_csv(path: Path, copies: int = 24, labels: tuple = (1, 0)) -> str:
    """Good and bad snippets, ``copies`` of each, labelled ``labels[0]`` / ``labels[1]``."""
    rows = [(t, labels[0]) for t in GOOD] * copies + [(t, labels[1]) for t in BAD] * copies
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


def tiny_args(model: str, data: str, out, *extra) -> list[str]:
    """`dpft train` of the tiny BERT; one torch thread (the model's operations are too small
    to gain from more, and a busy machine makes several threads wait on each other)."""
    return [
        "train",
        "--model",
        model,
        "--dataset",
        data,
        "--out",
        str(out),
        "--max-seq-len",
        "16",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--no-progress",
        "--num-threads",
        "1",
        *map(str, extra),
    ]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``dpft ARGV`` in this process: (exit code, stdout, stderr); torch's thread count is restored."""
    from dpft.app import cli

    threads = torch.get_num_threads()
    try:
        code = cli.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got: {err!r}"
    return lines[0]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
