"""`dpft train` under torchrun (2 processes, gloo on CPU): the same job as
one process -- same steps, same sampling rate and the same epsilon -- with
DistributedDataParallel, and only rank 0 writing the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import socket

import pytest

ARGS = ["--dataset", "mnist", "--model", "cnn", "--method", "full", "--train-size", "96", "--eval-size", "40",
        "--batch-size", "32", "--epochs", "1", "--epsilon", "4", "--no-progress", "--dp-seed", "5",
        "--num-threads", "1"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_dpft_train_under_torchrun(tmp_path):
    pytest.importorskip("mlxtend")
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "dpft", "train", *ARGS, "--out", str(one)], check=True, env=_env(),
                   capture_output=True, text=True, timeout=240)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        _port(), "-m", "dpft", "train", *ARGS, "--out", str(two)],
                       env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["world_size"] == 2
    assert s2["steps"] == s1["steps"] and s2["noise_multiplier"] == s1["noise_multiplier"]
    assert s2["epsilon"] == pytest.approx(s1["epsilon"], rel=1e-9) and s2["epsilon"] <= 4.0
    # rank 0 alone wrote the metrics: one line per step and per evaluation, no duplicates
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in rows if x["event"] == "step"]
    assert steps == list(range(1, s2["steps"] + 1))
    # the global batch: the per-step batch sizes are those of the one-process run (same Poisson draws)
    rows1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert [x["batch_size"] for x in rows if x["event"] == "step"] == \
        [x["batch_size"] for x in rows1 if x["event"] == "step"]
    assert "data parallel over 2 processes" in p.stdout


def test_distributed_benchmark_smoke(tmp_path):
    """benchmarks.distributed (the multi-GPU benchmark) on CPU/gloo with toy
    sizes: a DDP and an FSDP2 configuration on 2 processes both train."""
    p = subprocess.run([sys.executable, "-m", "benchmarks.distributed", "--models", "gpt2", "--methods",
                        "dp-bitfit,dp-full-auto-fsdp", "--nproc", "2", "--tiny", "--steps", "2", "--warmup", "1",
                        "--batch-size", "2", "--out", str(tmp_path)], env=_env(), capture_output=True, text=True,
                       timeout=240, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "distributed.jsonl").read_text().splitlines()]
    assert [(r["method"], r["world_size"], r["status"]) for r in rows] == [
        ("dp-bitfit", 2, "ok"), ("dp-full-auto-fsdp", 2, "ok")]
    assert all(r["examples_per_s"] > 0 and r["global_batch"] == 4 for r in rows)
