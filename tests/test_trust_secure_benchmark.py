"""Smoke test of benchmarks/secure_noise.py (the GPU benchmark of secure mode) on the CPU."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_secure_noise_benchmark_smoke(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import secure_noise

    assert secure_noise.main(["--smoke", "--methods", "bitfit", "--out", str(tmp_path)]) == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "secure_noise.jsonl").read_text().splitlines()]
    assert rec["model"] == "gpt2" and rec["method"] == "bitfit" and rec["trainable"] > 0
    assert rec["step_ms"] > 0 and rec["secure_step_ms"] > 0 and rec["secure_noise_ms"] > 0
    assert "| gpt2 | bitfit |" in capsys.readouterr().out
    sys.modules.pop("benchmarks.secure_noise", None)
