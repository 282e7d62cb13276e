"""Smoke test of the utility benchmark (``python -m benchmarks.utility``) on CPU.

One subprocess sweep in ``--quick`` mode (tiny MNIST subsets, the built-in CNN,
DP-BiTFiT and non-private full fine-tuning, ε = 3, one seed, a one-point search):
every job runs in its own process and appends one jsonl line; a rerun finds
them all finished and starts nothing; the report's tables, targets and PNG
agree with the jsonl.  A second test feeds the report hand-made records and
checks that the issue's targets are computed from the data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU check even on a GPU machine
    return env


def _utility(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.utility", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _import_utility():
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import utility
    finally:
        sys.path.remove(str(REPO))
    return utility


def test_quick_sweep_and_report(tmp_path):
    results = tmp_path / "utility.jsonl"
    docs = tmp_path / "docs" / "utility.md"
    args = [
        "--quick",
        "--device",
        "cpu",
        "--tasks",
        "vision",
        "--vision-model",
        "cnn",
        "--methods",
        "bitfit,nonprivate-full",
        "--epsilons",
        "3",
        "--lr-factors",
        "1",
        "--workers",
        "2",
        "--results",
        str(results),
        "--docs",
        str(docs),
        "--workdir",
        str(tmp_path / "runs"),
    ]
    proc = _utility(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    lines = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    assert len(lines) == 4, proc.stdout[-3000:]
    by = {(r["phase"], r["variant"]): r for r in lines}
    assert set(by) == {(p, v) for p in ("search", "test") for v in ("bitfit", "nonprivate-full")}
    for (phase, variant), r in by.items():
        assert r["status"] == "ok", (phase, variant, r.get("error"), r.get("traceback", "")[-2000:])
        assert r["task"] == "vision" and r["model"] == "cnn" and r["quick"] is True
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] >= 1 and r["job_wall_s"] > 0
        if phase == "search":
            assert r["eval_split"] == "validation" and r["val_accuracy"] == r["accuracy"]
            assert r["fields"]["validation_size"] > 0
        else:
            assert r["eval_split"] == "test" and r["test_accuracy"] == r["accuracy"]
            assert "validation_size" not in r["fields"]
            # the test run uses the hyper-parameters the search chose
            assert r["hp"] == by[("search", variant)]["hp"]
        if variant == "bitfit":
            assert r["epsilon_target"] == 3.0 and 2.9 <= r["epsilon"] <= 3.0
            assert r["noise_multiplier"] > 0 and r["delta"] is not None
            assert r["trainable_parameters"] < r["total_parameters"]
        else:
            assert r["epsilon_target"] is None and r["epsilon"] is None
            assert r["noise_multiplier"] == 0.0
            assert r["trainable_parameters"] == r["total_parameters"]
        assert r["resolved"]["seed"] == 0 and r["resolved"]["dp_seed"] == 1000
    # checkpoints are not kept (they would fill the disk on the full grid)
    assert not list((tmp_path / "runs").rglob("checkpoint.pt"))

    # resumable: a rerun finds every job finished and has nothing to start
    utility = _import_utility()
    ns = utility.parse_args(args)
    again = utility.Scheduler(utility.make_plan(ns), ns, "rerun")
    assert again.queue == [] and len(again.done) == 4

    md = docs.read_text()
    assert "QUICK MODE" in md
    png = docs.parent / "utility" / "vision-cnn.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "(utility/vision-cnn.png)" in md
    test_bitfit = by[("test", "bitfit")]
    test_full = by[("test", "nonprivate-full")]
    rows = {
        line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "head lr" in line
    }  # the results table
    assert f"| {100 * test_bitfit['accuracy']:.1f} |" in rows["DP-BiTFiT"], rows["DP-BiTFiT"]
    assert f"| {100 * test_full['accuracy']:.1f} |" in rows["non-private full"]
    # the ε actually spent is reported
    assert f"{test_bitfit['epsilon']:.3f}" in md
    # the vision target needs DP full, which did not run: not measured, never "met"
    target = next(line for line in md.splitlines() if "DP-BiTFiT vs DP full" in line)
    assert "not measured" in target and "**met**" not in target


def _rec(utility, variant: str, eps, seed: int, acc: float, phase: str = "test", hp=None) -> dict:
    hp = hp or {"lr": 1e-3, "head_lr": 1e-2, "epochs": 3.0}
    return {
        "schema": utility.SCHEMA,
        "id": f"{phase}-{variant}-{eps}-{seed}-{hp['lr']}",
        "name": "x",
        "phase": phase,
        "task": "sentiment",
        "variant": variant,
        "method": variant,
        "model": "minilm",
        "quick": False,
        "epsilon_target": eps,
        "seed": seed,
        "hp": hp,
        "grid_index": 0,
        "status": "ok",
        "accuracy": acc,
        "eval_split": "test",
        "epsilon": None if eps is None else eps * 0.997,
        "noise_multiplier": 0.0 if eps is None else 1.0,
        "delta": 1e-5,
        "steps": 60,
        "majority_baseline": 0.575,
        "train_size": 10000,
        "eval_size": 2752,
        "job_wall_s": 20.0,
        "started_at": 1.0e9,
        "finished_at": 1.0e9 + 20,
        "session": "s1",
        "workers": 4,
        "threads": 4,
        "commit": "abc",
        "command": "cmd",
        "env": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.x"},
        "device": "cuda:0",
        "resolved": {"batch_size": 512},
    }


def test_report_targets_from_data(tmp_path):
    utility = _import_utility()
    recs = []
    for v in ("bitfit", "full", "nonprivate-bitfit"):
        # two search points; the second is better on validation and must be the one used
        for i, (lr, acc) in enumerate(((1e-3, 0.70), (3e-3, 0.75))):
            hp = {"lr": lr, "head_lr": 1e-2, "epochs": 3.0}
            r = _rec(utility, v, None if v.startswith("nonprivate") else 3.0, 0, acc, "search", hp)
            r.update(grid_index=i, eval_split="validation")
            recs.append(r)
    chosen = {"lr": 3e-3, "head_lr": 1e-2, "epochs": 3.0}
    acc = {
        ("bitfit", 8.0): (0.80, 0.81, 0.82),
        ("bitfit", 1.0): (0.70, 0.71, 0.72),
        ("bitfit", 3.0): (0.78, 0.78, 0.78),
        ("full", 3.0): (0.80, 0.80, 0.80),
        ("nonprivate-bitfit", None): (0.83, 0.83, 0.83),
    }
    for (v, eps), xs in acc.items():
        for seed, a in enumerate(xs):
            recs.append(_rec(utility, v, eps, seed, a, hp=chosen))
    # a stale test run with another learning rate must be ignored
    recs.append(_rec(utility, "bitfit", 8.0, 0, 0.10, hp={"lr": 1e-3, "head_lr": 1e-2, "epochs": 3.0}))
    docs = tmp_path / "utility.md"
    utility.write_report(recs, docs, ["r.jsonl"])
    md = docs.read_text()
    lines = md.splitlines()

    def target(title: str) -> str:
        return next(x for x in lines if title in x and x.startswith("| sentiment"))

    # ε = 8: 83.0 - 81.0 = 2.0 <= 2 -> met; ε = 1: 83.0 - 71.0 = 12.0 > 4 -> not met
    assert "+2.0" in target("at ε = 8") and "**met**" in target("at ε = 8")
    assert "+12.0" in target("at ε = 1") and "**not met**" in target("at ε = 1")
    # ε = 3: DP full 80.0 - DP-BiTFiT 78.0 = 2.0 > 1 -> not met
    assert "+2.0" in target("DP full") and "**not met**" in target("DP full")
    row = next(x for x in lines if x.startswith("| DP-BiTFiT |") and "ε" not in x and "±" in x)
    assert "71.0 ± 1.0" in row and "78.0 ± 0.0" in row and "81.0 ± 1.0" in row
    assert "1 test run(s) with hyper-parameters other than the current choice" in md
    assert "NVIDIA H100 80GB HBM3" in md and "`abc`" in md
    assert (tmp_path / "utility" / "sentiment.png").read_bytes()[:8] == PNG_MAGIC
    # the search table marks the better validation point as chosen
    chosen_rows = [x for x in lines if x.startswith("| DP-BiTFiT | 0.003 ") and x.rstrip().endswith("✓ |")]
    assert chosen_rows, md


@pytest.mark.parametrize("variant", ["bitfit", "sparta-random"])
def test_plan_starts_from_train_defaults(variant):
    utility = _import_utility()
    from dpft.methods import registry

    args = utility.parse_args(["--device", "cpu", "--tasks", "sentiment,vision"])
    plan = utility.make_plan(args)
    task = utility.TASKS["sentiment" if variant == "bitfit" else "vision"]
    grid = utility.search_grid(plan, task, utility.VARIANTS[variant])
    assert len(grid) == len(utility.LR_FACTORS) * len(utility.EPOCH_FACTORS)
    if variant == "bitfit":
        assert grid[0]["lr"] == registry.get("bitfit").lr  # the default comes first
    jobs = utility.search_jobs(plan, task, utility.VARIANTS[variant])
    assert all(j.fields["validation_size"] == task.validation_size for j in jobs)
    assert len({j.id for j in jobs}) == len(jobs)
