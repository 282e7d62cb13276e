"""benchmarks/llm.py's logic (issue 23's `llm` suite), with a stand-in runner
instead of GPU processes: the largest batch x length search and the targets."""

from __future__ import annotations

import argparse

from benchmarks import llm


def _args(**kw) -> argparse.Namespace:
    base = dict(
        models=["8b"],
        methods=["lora"],
        seqs=[4096],
        batch=4,
        ckpt=[True],
        reentrant=False,
        steps=4,
        warmup=2,
        device="cuda",
        candidates=llm.CANDIDATES,
    )
    return argparse.Namespace(**{**base, **kw})


def _runner(limit_plain: int, limit_dp: int, calls: list):
    """Trains while batch x seq tokens fit under the limit; records each call."""

    def run(cfg: dict) -> dict:
        calls.append(cfg)
        limit = limit_dp if cfg["private"] else limit_plain
        if cfg["batch"] * cfg["seq"] > limit:
            return {"error": "out of memory"}
        return {"peak_gib": cfg["batch"] * cfg["seq"] / 1000, "step_s": 1.0, "trainable": 1}

    return run


def test_largest_finds_the_most_tokens_that_fit_and_stops_after_two_misses():
    tried = []

    def fits(b, t):
        tried.append((b, t))
        return b * t <= 16384

    assert llm.largest(fits) == (1, 16384)  # 16384 tokens: 4 x 4096, 2 x 8192 or 1 x 16384 (longest kept)
    # ordered by tokens; after the first two misses in a row (32768 tokens) nothing larger is tried
    assert max(b * t for b, t in tried) == 32768 and len([1 for b, t in tried if b * t > 16384]) == 2
    assert llm.largest(lambda b, t: False) == (0, 0)


def test_search_marks_the_target_met_only_when_dpft_trains_as_much():
    calls: list = []
    rows = llm.search(_args(), _runner(16384, 16384, calls))
    assert rows[0]["plain"] == rows[0]["dp"] == "1 x 16384" and rows[0]["targets"] == "met"
    assert all(c["steps"] == 1 and c["warmup"] == 3 for c in calls)  # a probe: one step past the first passes
    rows = llm.search(_args(), _runner(16384, 8192, []))
    assert rows[0]["dp"] == "1 x 8192" and rows[0]["targets"] == "missed"


def test_grid_rows_compare_with_the_same_non_private_run_and_mark_targets():
    calls: list = []
    rows = llm.grid(_args(methods=["lora", "full"], ckpt=[True, False]), _runner(10**9, 10**9, calls))
    assert len(rows) == 4 and len(calls) == 8
    assert {(c["method"], c["ckpt"], c["private"]) for c in calls} == {
        (m, k, p) for m in ("lora", "full") for k in (True, False) for p in (True, False)
    }
    assert all(r["memory"] == "1.00x" and r["speed"] == "1.00x" and r["targets"] == "met" for r in rows)
    # dpft out of memory where non-private fits: missed, with the reason
    rows = llm.grid(_args(), _runner(10**9, 1, []))
    assert rows[0]["targets"].startswith("missed (dpft: out of memory")


def test_verdict_applies_each_methods_speed_target_and_the_memory_target_under_checkpointing():
    plain = {"peak_gib": 10.0, "step_s": 1.0}
    assert llm.verdict("full", True, plain, {"peak_gib": 10.4, "step_s": 1.2})[2] == "met"  # 0.83x, 1.04x
    assert llm.verdict("full", True, plain, {"peak_gib": 13.1, "step_s": 1.2})[2] == "missed"  # 1.31x memory
    assert llm.verdict("lora", True, plain, {"peak_gib": 10.0, "step_s": 1.2})[2] == "missed"  # 0.83x < 0.95x
    assert llm.verdict("full", False, plain, {"peak_gib": 13.1, "step_s": 1.2})[2] == "met"  # no memory target
