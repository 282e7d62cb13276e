"""Smoke test of the benchmark harness on CPU: tiny GPT-2 and ResNet-GN,
non-private BiTFiT / DP-BiTFiT / DP full (auto) / SPARTA (density 0.2), each
in its own process."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = {"nonprivate-bitfit", "dp-bitfit", "dp-full-auto", "dp-sparta-0.2"}
MODELS = {"gpt2", "resnet50gn"}


def test_speed_smoke(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke suite is a CPU check even on a GPU machine
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    jsonl = tmp_path / "smoke.jsonl"
    assert jsonl.exists(), proc.stdout[-3000:]
    recs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    got = {(r["model"], r["method"]): r for r in recs}
    assert set(got) == {(m, k) for m in MODELS for k in METHODS}, sorted(got)
    for key, r in got.items():
        assert r["status"] == "ok", (key, r.get("error"), r.get("traceback", "")[-2000:])
        assert r["examples_per_s"] > 0, key
        assert len(r["step_times_s"]) >= 1, key
        assert r["trainable"] > 0 and r["params"] >= r["trainable"], key
        assert r["run_id"] == recs[0]["run_id"], key
    # BiTFiT trains exactly the biases, identically with and without privacy
    for m in MODELS:
        assert (
            got[(m, "dp-bitfit")]["trainable"]
            == got[(m, "nonprivate-bitfit")]["trainable"]
            < got[(m, "dp-full-auto")]["trainable"]
        )
        # SPARTA: biases (+ head) and a fifth of the rows of every candidate weight
        sp = got[(m, "dp-sparta-0.2")]
        assert sp["density"] == 0.2 and sp["sparta_weights"] > 0
        assert 0.2 <= sp["sparta_selected"] / sp["sparta_candidates"] < 0.35
        assert got[(m, "dp-bitfit")]["trainable"] < sp["trainable"] < got[(m, "dp-full-auto")]["trainable"]

    md = (tmp_path / "smoke.md").read_text()
    assert "<!--" not in md  # markers only in --docs files
    for name in ("GPT-2 small", "ResNet50-GN"):
        for meth in METHODS:
            assert any(name in line and f"| {meth} |" in line for line in md.splitlines()), (name, meth, md)
    assert "DP-BiTFiT / BiTFiT throughput" in md


def test_report_docs_sections(tmp_path):
    """The report rewrites only its own marked section of the docs file."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import report
    finally:
        sys.path.remove(str(REPO))
    base = dict(
        suite="core",
        run_id="r1",
        command="python -m benchmarks.speed",
        device="cuda",
        dtype="fp32",
        size="full",
        batch_size=32,
        seq_len=100,
        model="gpt2",
        status="ok",
        env={"gpu": "X", "torch": "2"},
    )
    recs = [
        dict(base, method="nonprivate-bitfit", examples_per_s=100.0, peak_mem_mb=1000.0, trainable=10),
        dict(base, method="dp-bitfit", examples_per_s=98.0, peak_mem_mb=1010.0, trainable=10),
        dict(base, method="opacus-bitfit", status="OOM", error="CUDA out of memory"),
        dict(base, method="dp-bitfit", run_id="r0", examples_per_s=1.0, peak_mem_mb=1.0, trainable=10),  # older run
    ]
    jsonl = tmp_path / "core.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\nintro\n\n<!-- suite:other start -->\nKEEP\n<!-- suite:other end -->\n")
    report.main([str(jsonl), "--docs", str(docs)])
    report.main([str(jsonl), "--docs", str(docs)])  # idempotent
    text = docs.read_text()
    assert text.count("<!-- suite:core start -->") == 1 and text.count("<!-- suite:core end -->") == 1
    assert "KEEP" in text and text.startswith("# Benchmarks")
    assert "0.98 ✓" in text  # 98 / 100 from the latest run, not the older r0
    assert "1.01 ✓" in text  # memory 1010 / 1000
    assert "OOM" in text


def test_report_keeps_tf32_off_runs_apart(tmp_path):
    """A run with ``--tf32 off`` gets its own section: it never replaces (or
    is compared with) the default-precision run of the same model."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import report, speed
    finally:
        sys.path.remove(str(REPO))
    assert speed.parse_args(["--tf32", "off"]).tf32 == "off"
    base = dict(
        suite="core",
        run_id="r1",
        command="c",
        device="cuda",
        dtype="fp32",
        size="full",
        batch_size=32,
        image_size=224,
        model="resnet50gn",
        status="ok",
        env={"gpu": "X", "torch": "2"},
    )
    ieee = dict(base, run_id="r2", tf32="off")
    recs = [
        dict(base, method="nonprivate-bitfit", examples_per_s=100.0, peak_mem_mb=1000.0, trainable=10),
        dict(base, method="dp-bitfit", examples_per_s=90.0, peak_mem_mb=1000.0, trainable=10),
        dict(ieee, method="nonprivate-bitfit", examples_per_s=50.0, peak_mem_mb=1000.0, trainable=10),
        dict(ieee, method="dp-bitfit", examples_per_s=49.0, peak_mem_mb=1000.0, trainable=10),
    ]
    jsonl = tmp_path / "core.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    docs = tmp_path / "benchmarks.md"
    report.main([str(jsonl), "--docs", str(docs)])
    text = docs.read_text()
    assert "TF32 off" in text
    assert "0.90 ✗" in text and "0.98 ✓" in text  # each run's ratio, in its own section


def test_repeat_interleaves_methods_and_report_takes_medians(tmp_path):
    """--repeat K runs each model's methods in turn K times; the report keeps,
    per method, the run's median throughput (the lower one of an even count)
    and its largest peak memory."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import report, speed
    finally:
        sys.path.remove(str(REPO))
    args = speed.parse_args(
        [
            "--suite",
            "bitfit",
            "--models",
            "gpt2,vit",
            "--methods",
            "nonprivate-bitfit,dp-bitfit",
            "--repeat",
            "3",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    order = [
        (c["model"], c["method"], c["repeat"])
        for c in speed.repeat_rounds(speed.build_configs(args, "r", "c"), args.repeat)
    ]
    m = ("nonprivate-bitfit", "dp-bitfit")
    assert order == [(model, meth, r) for model in ("gpt2", "vit") for r in range(3) for meth in m]
    base = dict(
        suite="core",
        run_id="r1",
        command="c",
        device="cuda",
        dtype="fp32",
        size="full",
        batch_size=32,
        seq_len=100,
        model="gpt2",
        status="ok",
        env={"gpu": "X", "torch": "2"},
    )
    recs = []
    for rep, (np_, dp_) in enumerate([(100.0, 90.0), (50.0, 97.0), (101.0, 99.0)]):
        recs.append(
            dict(base, method="nonprivate-bitfit", repeat=rep, examples_per_s=np_, peak_mem_mb=1000.0, trainable=10)
        )
        recs.append(
            dict(base, method="dp-bitfit", repeat=rep, examples_per_s=dp_, peak_mem_mb=1000.0 + rep, trainable=10)
        )
    merged = {r["method"]: r for r in report.latest(recs)}
    assert merged["nonprivate-bitfit"]["examples_per_s"] == 100.0 and merged["dp-bitfit"]["examples_per_s"] == 97.0
    assert merged["dp-bitfit"]["peak_mem_mb"] == 1002.0 and merged["dp-bitfit"]["repeats"] == 3
    with __import__("pytest").raises(SystemExit):
        speed.parse_args(["--suite", "maxbatch", "--repeat", "2"])


def test_report_sparta_section(tmp_path):
    """The `sparta` suite's docs section: step-time ratios to DP full, the
    density-0.2 target mark, a PNG; "not yet run" before any record exists."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks import report
    finally:
        sys.path.remove(str(REPO))
    docs = tmp_path / "docs" / "benchmarks.md"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    report.main([str(empty), "--suite", "sparta", "--docs", str(docs)])
    text = docs.read_text()
    assert "SPARTA: cost vs density" in text and "Not yet run" in text and "--suite sparta" in text

    base = dict(
        suite="sparta",
        run_id="r1",
        command="python -m benchmarks.speed --suite sparta",
        device="cuda",
        dtype="fp32",
        size="full",
        optimizer="adamw",
        batch_size=32,
        image_size=224,
        status="ok",
        env={"gpu": "X", "torch": "2"},
    )
    steps = {
        "nonprivate-full": 0.090,
        "dp-full-auto": 0.100,
        "dp-bitfit": 0.050,
        "dp-sparta-1.0": 0.101,
        "dp-sparta-0.5": 0.080,
        "dp-sparta-0.2": 0.058,
        "dp-sparta-0.05": 0.052,
    }
    recs = []
    for model, scale in (("vit", 1.0), ("resnet50gn", 1.2)):
        for meth, t in steps.items():
            t = t * (scale if meth.startswith("dp-sparta-0.2") else 1.0)
            recs.append(
                dict(
                    base,
                    model=model,
                    method=meth,
                    median_step_s=t,
                    examples_per_s=32 / t,
                    peak_mem_mb=1000.0 * (1 + t),
                    trainable=10,
                    optimizer_state_mb=1.0,
                )
            )
    jsonl = tmp_path / "sparta.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report.main([str(jsonl), "--docs", str(docs)])
    text = docs.read_text()
    assert text.count("<!-- suite:sparta start -->") == 1 and "Not yet run" not in text
    assert "0.58 ✓" in text and "0.70 ✗" in text  # ViT 58/100 meets the target, ResNet 69.6/100 does not
    assert "| 0.50 |" in text  # DP-BiTFiT: the floor
    pngs = list((tmp_path / "docs" / "benchmarks").glob("sparta_*_density.png"))
    assert len(pngs) == 1 and f"]({'benchmarks/' + pngs[0].name})" in text
