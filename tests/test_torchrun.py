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

ARGS = [
    "--dataset",
    "mnist",
    "--model",
    "cnn",
    "--method",
    "full",
    "--train-size",
    "96",
    "--eval-size",
    "40",
    "--batch-size",
    "32",
    "--epochs",
    "1",
    "--epsilon",
    "4",
    "--no-progress",
    "--dp-seed",
    "5",
    "--num-threads",
    "1",
]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The job in one process, the reference of the distributed runs."""
    pytest.importorskip("mlxtend")
    out = tmp_path_factory.mktemp("one") / "run"
    subprocess.run(
        [sys.executable, "-m", "dpft", "train", *ARGS, "--out", str(out)],
        check=True,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    return out


def test_dpft_train_under_torchrun(tmp_path, one):
    two = tmp_path / "two"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            _port(),
            "-m",
            "dpft",
            "train",
            *ARGS,
            "--out",
            str(two),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
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
    assert [x["batch_size"] for x in rows if x["event"] == "step"] == [
        x["batch_size"] for x in rows1 if x["event"] == "step"
    ]
    assert "data parallel over 2 processes" in p.stdout


def _summary_and_steps(run):
    s = json.loads((run / "summary.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return s, [x for x in rows if x["event"] == "step"]


def test_dpft_train_on_two_nodes(tmp_path, one):
    """Multi-node (issue 26): two torchrun launchers, one per "node" of 2
    processes, meeting through torchrun's c10d rendezvous on localhost (what
    `--nnodes 2 --rdzv-endpoint HOST:PORT` does across machines). The job is
    the one-process job: same steps, same global Poisson batches (drawn once,
    shared by the 4 ranks), the same ε, and each step written once."""
    multi = tmp_path / "multi"
    port = _port()
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "dpft-test",
    ]
    job = ["-m", "dpft", "train", *ARGS, "--out", str(multi)]
    # "node" 0 hosts the rendezvous store; "node" 1 joins it
    nodes = [
        subprocess.Popen(
            launch + ["--node-rank", str(r), *job],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = []
    try:
        for p in nodes:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    s1, steps1 = _summary_and_steps(one)
    s4, steps4 = _summary_and_steps(multi)
    assert s4["world_size"] == 4
    assert s4["steps"] == s1["steps"] and s4["noise_multiplier"] == s1["noise_multiplier"]
    assert s4["epsilon"] == pytest.approx(s1["epsilon"], rel=1e-9) and s4["epsilon"] <= 4.0
    assert [x["step"] for x in steps4] == list(range(1, s4["steps"] + 1))  # the ledger: each step once
    assert [x["batch_size"] for x in steps4] == [x["batch_size"] for x in steps1]  # one global Poisson draw
    assert sum("data parallel over 4 processes" in out for out, _ in outs) == 1  # rank 0 alone reports


def test_distributed_benchmark_smoke(tmp_path):
    """benchmarks.distributed (the multi-GPU benchmark) on CPU/gloo with toy
    sizes: a DDP and an FSDP2 configuration on 2 processes both train."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.distributed",
            "--models",
            "gpt2",
            "--methods",
            "dp-bitfit,dp-full-auto-fsdp",
            "--nproc",
            "2",
            "--tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "distributed.jsonl").read_text().splitlines()]
    assert [(r["method"], r["world_size"], r["status"]) for r in rows] == [
        ("dp-bitfit", 2, "ok"),
        ("dp-full-auto-fsdp", 2, "ok"),
    ]
    assert all(r["examples_per_s"] > 0 and r["global_batch"] == 4 for r in rows)
