"""Smoke test of ``benchmarks/generic_path.py`` on CPU (tiny configs): it
runs, prints one markdown row per model with both throughputs, and names the
parameters that took the generic path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_generic_path_benchmark_smoke():
    pytest.importorskip("transformers")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.generic_path",
            "--tiny",
            "--models",
            "t5_base,moe_1b",
            "--steps",
            "1",
            "--warmup",
            "2",
            "--batch",
            "3",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    table = out[out.index("| model |") :]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == ["T5-base", "Mixtral-style MoE"], out
    for r in rows:
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert float(cells[4]) > 0 and float(cells[5]) > 0, r  # non-private and DP examples/s
        assert cells[6].endswith("x") and "tensors" in cells[9], r
    details = out[out.index("Parameters on the generic path") :]
    assert "relative_attention_bias" in details, details
    assert "mlp.experts" in details and "mlp.gate" in details, details
