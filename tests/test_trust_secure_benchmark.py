"""Smoke test of benchmarks/secure_noise.py (the GPU benchmark of secure mode) on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_secure_noise_benchmark_smoke(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.secure_noise", "--smoke", "--methods", "bitfit", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (rec,) = [json.loads(line) for line in (tmp_path / "secure_noise.jsonl").read_text().splitlines()]
    assert rec["model"] == "gpt2" and rec["method"] == "bitfit" and rec["trainable"] > 0
    assert rec["step_ms"] > 0 and rec["secure_step_ms"] > 0 and rec["secure_noise_ms"] > 0
    assert "| gpt2 | bitfit |" in proc.stdout
