"""Turn benchmark JSON lines into markdown tables and PNG charts.

    python -m benchmarks.report results/core.jsonl --docs docs/benchmarks.md

All ratios are computed within one run of one model (same process tree, same
GPU, same batch): for every (model, sequence length / image size, batch size,
dtype) the latest run that measured it is used, so a suite split over several
invocations (``--models``) still compares like with like.  ``--docs`` replaces
only this suite's section of the file, between
``<!-- suite:NAME start -->`` and ``<!-- suite:NAME end -->``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

# the non-private counterpart of each trainable set, and the Opacus rivals
BASE = {"full": "nonprivate-full", "bitfit": "nonprivate-bitfit", "lora": "nonprivate-lora"}
OPACUS = {"full": ("opacus-full-hooks", "opacus-full-ghost"), "bitfit": ("opacus-bitfit",)}
DPFT_FULL = ("dp-full-auto", "dp-full-ghost", "dp-full-mixed", "dp-full-instantiate")
SPARTA = ("dp-sparta-1.0", "dp-sparta-0.5", "dp-sparta-0.2", "dp-sparta-0.05")
#: SPARTA's target: at density 0.2 a step takes at most this fraction of a DP full fine-tuning step
SPARTA_TARGET = (0.2, 0.6)
METHOD_ORDER = [
    "nonprivate-full",
    "nonprivate-bitfit",
    "nonprivate-lora",
    "dp-bitfit",
    "dp-lora",
    "dp-full-auto",
    "dp-full-ghost",
    "dp-full-mixed",
    "dp-full-instantiate",
    *SPARTA,
    "opacus-bitfit",
    "opacus-full-hooks",
    "opacus-full-ghost",
]
MODEL_ORDER = ["gpt2", "gpt2-medium", "gpt2-large", "roberta", "roberta-large", "vit", "resnet50gn", "llama1b"]
MODEL_LABEL = {
    "gpt2": "GPT-2 small",
    "gpt2-medium": "GPT-2 medium",
    "gpt2-large": "GPT-2 large",
    "roberta": "RoBERTa-base",
    "roberta-large": "RoBERTa-large",
    "vit": "ViT-base/16",
    "resnet50gn": "ResNet50-GN",
    "llama1b": "Llama ~1B",
}
# Reference numbers quoted in the issues (one H100, fp32, batch 32), as a
# fraction of the non-private counterpart's throughput.
REFERENCE = {
    "fastdp_bitfit": {"gpt2": 0.94, "roberta": 0.92, "vit": 0.93, "resnet50gn": 0.79},
    "opacus_bitfit": {"gpt2": 0.50, "roberta": 0.92, "vit": 0.92, "resnet50gn": 0.43},
    "fastdp_full": {"gpt2": 0.59, "roberta": 0.55, "vit": 0.61, "resnet50gn": 0.25},
    "opacus_full": {"gpt2": 0.46, "roberta": 0.60, "vit": 0.39, "resnet50gn": 0.20},
}


def trainable_kind(method: str) -> str:
    for k in ("bitfit", "lora", "full"):
        if k in method:
            return k
    return "full"


# ----------------------------------------------------------------------------
# loading and grouping


def load(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    recs = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
    return recs


def _variant(r: dict[str, Any]) -> tuple:
    return (r.get("model"), r.get("seq_len"), r.get("image_size"), r.get("batch_size"))


def _setting(r: dict[str, Any]) -> tuple:
    return (
        r.get("dtype", "fp32"),
        r.get("size", "full"),
        r.get("device", "cuda"),
        r.get("optimizer", "sgd"),
        r.get("tf32", "default"),
    )


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, model variant), the records of the latest run that measured it
    (the last record per method within that run)."""
    if records and records[0].get("suite") == "maxbatch":
        # batch varies by design; each method's latest run (a largest batch is a
        # memory limit, so runs on the same GPU model compare)
        keyf = lambda r: (_setting(r), r.get("model"), r.get("method"))  # noqa: E731
    else:
        keyf = lambda r: (_setting(r), _variant(r))  # noqa: E731
    best_run: dict[tuple, str] = {}
    measured: set[tuple] = set()  # keys some run actually measured (not only skipped)
    for r in sorted(records, key=lambda r: r.get("status") != "skipped"):  # skipped-only runs first
        k = keyf(r)
        run = str(r.get("run_id", ""))
        real = r.get("status") != "skipped"
        if k not in best_run or (real and k not in measured) or ((real or k not in measured) and run > best_run[k]):
            best_run[k] = run
        if real:
            measured.add(k)
    chosen: OrderedDict[tuple, list[dict[str, Any]]] = OrderedDict()
    for r in records:
        k = keyf(r)
        if str(r.get("run_id", "")) == best_run[k]:
            chosen.setdefault((k, r.get("method")), []).append(r)
    return [_merge(rs) for rs in chosen.values()]


def _merge(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from a run's repetitions of a configuration (``--repeat``):
    the one with the median throughput, with the largest peak memory of all;
    a single record (or no successful one: the last) as it is."""
    if len(recs) == 1 or recs[-1].get("repeat") is None:
        return recs[-1]
    ok = sorted((r for r in recs if _ok(r)), key=lambda r: r["examples_per_s"])
    if not ok:
        return recs[-1]
    out = dict(ok[(len(ok) - 1) // 2])  # the lower median: never flatter than the data
    mems = [r["peak_mem_mb"] for r in ok if r.get("peak_mem_mb")]
    if mems:
        out["peak_mem_mb"] = max(mems)
    out["repeats"] = len(ok)
    out["examples_per_s_range"] = [ok[0]["examples_per_s"], ok[-1]["examples_per_s"]]
    return out


def _sort_key(r: dict[str, Any]) -> tuple:
    m = r.get("model")
    meth = r.get("method")
    return (
        MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER),
        str(m),
        r.get("seq_len") or 0,
        r.get("image_size") or 0,
        r.get("batch_size") or 0,
        METHOD_ORDER.index(meth) if meth in METHOD_ORDER else len(METHOD_ORDER),
        str(meth),
    )


def _ok(r: dict[str, Any] | None) -> bool:
    return bool(r) and r.get("status") == "ok" and (r.get("examples_per_s") or 0) > 0


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def _f(x: float | None, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _mark(x: float | None, lo: float | None = None, hi: float | None = None) -> str:
    if x is None:
        return "–"
    good = (lo is None or x >= lo) and (hi is None or x <= hi)
    return f"{x:.2f} {'✓' if good else '✗'}"


def _gib(mb: float | None) -> float | None:
    return None if mb is None else mb / 1024


def _label(model: str) -> str:
    return MODEL_LABEL.get(model, model)


def _var_label(r: dict[str, Any]) -> str:
    if r.get("seq_len"):
        return f"T={r['seq_len']}"
    if r.get("image_size"):
        return f"{r['image_size']}px"
    return ""


def _by_group(recs: list[dict[str, Any]]) -> OrderedDict[tuple, dict[str, dict[str, Any]]]:
    groups: OrderedDict[tuple, dict[str, dict[str, Any]]] = OrderedDict()
    for r in sorted(recs, key=_sort_key):
        groups.setdefault(_variant(r), {})[r["method"]] = r
    return groups


# ----------------------------------------------------------------------------
# tables


def _env_lines(recs: list[dict[str, Any]]) -> list[str]:
    runs: OrderedDict[str, dict[str, Any]] = OrderedDict()
    models: dict[str, list[str]] = {}
    for r in sorted(recs, key=lambda r: str(r.get("run_id", ""))):
        run = str(r.get("run_id", "?"))
        env = r.get("env") or {}
        if run not in runs or (env.get("torch") and not (runs[run].get("env") or {}).get("torch")):
            runs[run] = r
        models.setdefault(run, [])
        if r.get("model") not in models[run]:
            models[run].append(r.get("model"))
    lines = [
        "| run | models | device | torch | transformers | timm | opacus | date | command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run, r in runs.items():
        env = r.get("env") or {}
        dev = env.get("gpu") or ("CPU" if r.get("device") == "cpu" else r.get("device", "?"))
        if env.get("cuda") and env.get("gpu"):
            dev += f" (CUDA {env['cuda']})"
        lines.append(
            f"| {run} | {', '.join(models[run])} | {dev} | {env.get('torch') or '–'} | {env.get('transformers') or '–'} "
            f"| {env.get('timm') or '–'} | {env.get('opacus') or 'not installed'} | {r.get('date', '–')} "
            f"| `{r.get('command', '?')}` |"
        )
    return lines


def _detail_table(groups: OrderedDict[tuple, dict[str, dict[str, Any]]]) -> tuple[list[str], list[str]]:
    lines = [
        "| model | setting | method | trainable | examples/s | × non-private | peak GiB | × non-private | × best Opacus | status |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    notes: list[str] = []
    for (model, _, _, b), methods in groups.items():
        for meth, r in methods.items():
            kind = trainable_kind(meth)
            base = methods.get(BASE.get(kind, ""))
            thr = r.get("examples_per_s") if _ok(r) else None
            mem = r.get("peak_mem_mb") if _ok(r) else None
            rthr = _ratio(thr, base.get("examples_per_s")) if _ok(base) and meth != BASE.get(kind) else None
            rmem = _ratio(mem, base.get("peak_mem_mb")) if _ok(base) and meth != BASE.get(kind) else None
            vs_op = None
            if meth.startswith("dp-"):
                rivals = [methods[o]["examples_per_s"] for o in OPACUS.get(kind, ()) if _ok(methods.get(o))]
                vs_op = _ratio(thr, max(rivals)) if rivals else None
            status = r.get("status", "?")
            if status != "ok":
                notes.append(
                    f"- {_label(model)} {_var_label(r)} `{meth}`: **{status}** — {str(r.get('error', ''))[:300]}"
                )
            elif r.get("model_patched"):
                notes.append(
                    f"- {_label(model)} {_var_label(r)} `{meth}`: model patched for Opacus ({r['model_patched']})"
                )
            if status == "ok" and r.get("opacus_functorch"):
                notes.append(
                    f"- {_label(model)} {_var_label(r)} `{meth}`: Opacus used its per-example vmap fallback for "
                    + ", ".join(f"`{t}`" for t in r["opacus_functorch"])
                )
            trainable = r.get("trainable")
            setting = ", ".join(x for x in (_var_label(r), f"B={b}") if x)
            lines.append(
                f"| {_label(model)} | {setting} | {meth} | {_size(trainable)} | {_f(thr, 1)} | {_f(rthr)} | "
                f"{_f(_gib(mem))} | {_f(rmem)} | {_f(vs_op)} | {status} |"
            )
    return lines, notes


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _summary_table(groups: OrderedDict[tuple, dict[str, dict[str, Any]]]) -> list[str]:
    """One row per model variant: the ratios the issues set targets for."""
    cols: list[tuple[str, Any]] = []

    def thr(ms, a, b):
        return _ratio(ms[a]["examples_per_s"], ms[b]["examples_per_s"]) if _ok(ms.get(a)) and _ok(ms.get(b)) else None

    def mem(ms, a, b):
        if not (_ok(ms.get(a)) and _ok(ms.get(b))):
            return None
        return _ratio(ms[a].get("peak_mem_mb"), ms[b].get("peak_mem_mb"))

    def best(ms, names):
        ok = [n for n in names if _ok(ms.get(n))]
        return max(ok, key=lambda n: ms[n]["examples_per_s"]) if ok else None

    have = set()
    for ms in groups.values():
        have |= set(ms)
    if {"dp-bitfit", "nonprivate-bitfit"} <= have:
        cols += [
            (
                "DP-BiTFiT / BiTFiT throughput (≥ 0.97)",
                lambda ms, m: _mark(thr(ms, "dp-bitfit", "nonprivate-bitfit"), lo=0.97),
            ),
            (
                "DP-BiTFiT / BiTFiT memory (≤ 1.03)",
                lambda ms, m: _mark(mem(ms, "dp-bitfit", "nonprivate-bitfit"), hi=1.03),
            ),
        ]
        if "opacus-bitfit" in have:
            cols.append(
                (
                    "Opacus bias-only / BiTFiT throughput",
                    lambda ms, m: _f(thr(ms, "opacus-bitfit", "nonprivate-bitfit")),
                )
            )
            cols.append(("DP-BiTFiT / Opacus bias-only", lambda ms, m: _f(thr(ms, "dp-bitfit", "opacus-bitfit"))))
        cols.append(("ref. FastDP / Opacus (issue 2)", lambda ms, m: _ref("fastdp_bitfit", "opacus_bitfit", m, ms)))
    if {"dp-full-auto", "nonprivate-full"} <= have:
        cols += [
            (
                "dpft auto / full throughput (≥ 0.85; RN50-GN ≥ 0.5)",
                lambda ms, m: _mark(thr(ms, "dp-full-auto", "nonprivate-full"), lo=0.5 if m == "resnet50gn" else 0.85),
            ),
            (
                "dpft auto / full memory (≤ 1.2)",
                lambda ms, m: _mark(mem(ms, "dp-full-auto", "nonprivate-full"), hi=1.2),
            ),
        ]
        if "dp-full-ghost" in have:
            cols.append(("dpft ghost / full throughput", lambda ms, m: _f(thr(ms, "dp-full-ghost", "nonprivate-full"))))
        if have & set(OPACUS["full"]):
            cols.append(
                (
                    "best Opacus / full throughput",
                    lambda ms, m: (
                        _f(thr(ms, best(ms, OPACUS["full"]), "nonprivate-full")) if best(ms, OPACUS["full"]) else "–"
                    ),
                )
            )
            cols.append(
                (
                    "dpft auto / best Opacus (≥ 1.3; issue 8: ≥ 2)",
                    lambda ms, m: (
                        _mark(thr(ms, "dp-full-auto", best(ms, OPACUS["full"])), lo=1.3)
                        if best(ms, OPACUS["full"])
                        else "–"
                    ),
                )
            )
        cols.append(("ref. FastDP / Opacus (issue 4)", lambda ms, m: _ref("fastdp_full", "opacus_full", m, ms)))
    if {"dp-bitfit"} <= have and have & set(DPFT_FULL):

        def speedup(ms, m):
            bf = best(ms, DPFT_FULL)
            return (
                _f(thr(ms, "dp-bitfit", bf)) + f" ({bf.replace('dp-full-', '')})"
                if bf and _ok(ms.get("dp-bitfit"))
                else "–"
            )

        def saving(ms, m):
            bf = best(ms, DPFT_FULL)
            return _f(mem(ms, bf, "dp-bitfit")) if bf else "–"

        cols += [("DP-BiTFiT speed-up over best dpft DP full", speedup), ("DP full / DP-BiTFiT memory", saving)]
    if {"dp-lora", "nonprivate-lora"} <= have:
        cols += [
            ("DP-LoRA / LoRA throughput", lambda ms, m: _f(thr(ms, "dp-lora", "nonprivate-lora"))),
            ("DP-LoRA / LoRA memory", lambda ms, m: _f(mem(ms, "dp-lora", "nonprivate-lora"))),
        ]
    if not cols:
        return []
    rows = []
    for (model, _, _, b), ms in groups.items():
        anyr = next(iter(ms.values()))
        name = _label(model) + (f" ({_var_label(anyr)})" if _var_label(anyr) and len(groups) > 1 else "")
        rows.append([name] + [fn(ms, model) for _, fn in cols])
    keep = [i for i in range(len(cols)) if any(row[i + 1] != "–" for row in rows)]
    if not keep:
        return []
    lines = ["| model | " + " | ".join(cols[i][0] for i in keep) + " |", "| --- |" + " ---: |" * len(keep)]
    for row in rows:
        lines.append(f"| {row[0]} | " + " | ".join(row[i + 1] for i in keep) + " |")
    return lines


ISSUE_SETTING = {
    "gpt2": ("seq_len", 100),
    "roberta": ("seq_len", 256),
    "vit": ("image_size", 224),
    "resnet50gn": ("image_size", 224),
}


def _ref(a: str, b: str, model: str, ms: dict[str, dict[str, Any]] | None = None) -> str:
    """The issues' reference ratio, only where our setting is theirs (batch 32, default T / size, fp32, full size)."""
    if ms:
        r = next(iter(ms.values()))
        key, val = ISSUE_SETTING.get(model, ("", None))
        if (
            r.get(key) != val
            or r.get("batch_size") != 32
            or r.get("dtype", "fp32") != "fp32"
            or r.get("size", "full") != "full"
        ):
            return "–"
    x, y = REFERENCE[a].get(model), REFERENCE[b].get(model)
    return "–" if x is None else f"{x:.2f} / {y:.2f}"


def _maxbatch_table(recs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | setting | method | max batch | × non-private | first OOM | examples/s at max | peak GiB at max | status |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    by_model: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()
    for r in sorted(recs, key=_sort_key):
        by_model.setdefault(r["model"], {})[r["method"]] = r
    for model, ms in by_model.items():
        for meth, r in ms.items():
            base = ms.get(BASE.get(trainable_kind(meth), ""))
            mb = r.get("max_batch")
            rel = _ratio(mb, base.get("max_batch")) if base and base is not r and base.get("max_batch") else None
            lines.append(
                f"| {_label(model)} | {_var_label(r) or '–'} | {meth} | {mb or '–'} | {_f(rel)} | {r.get('first_oom') or '–'} | "
                f"{_f(r.get('examples_per_s'), 1)} | {_f(_gib(r.get('peak_mem_mb')))} | {r.get('status')} |"
            )
    return lines


# ----------------------------------------------------------------------------
# charts


def _finish(fig, axes) -> None:
    """One legend for the figure, on the right; say so when a panel is empty (CPU: no GPU memory)."""
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        if not ax.get_legend_handles_labels()[0]:
            ax.text(
                0.5,
                0.5,
                "no data (CPU run: no GPU memory)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=8,
            )
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.82 if handles else 1, 1))


def _plots(recs: list[dict[str, Any]], prefix: Path) -> list[Path]:
    """Bar charts (throughput and memory relative to non-private full, per
    model) and, when a model was run at several sizes, lines against size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return []
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    groups = _by_group(recs)
    by_model: OrderedDict[str, list[tuple[tuple, dict[str, dict[str, Any]]]]] = OrderedDict()
    for k, ms in groups.items():
        by_model.setdefault(k[0], []).append((k, ms))

    single = [(k, ms) for m, lst in by_model.items() if len(lst) == 1 for k, ms in lst]
    if single:
        methods = [m for m in METHOD_ORDER if any(m in ms for _, ms in single)]
        methods += sorted({m for _, ms in single for m in ms} - set(methods))
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(single) + 4), 4.2))
        width = 0.8 / max(1, len(methods))
        for ax, key, title in (
            (axes[0], "examples_per_s", "throughput (× non-private full; higher is better)"),
            (axes[1], "peak_mem_mb", "peak memory (× non-private full; lower is better)"),
        ):
            for j, meth in enumerate(methods):
                xs, ys = [], []
                for i, (k, ms) in enumerate(single):
                    base = ms.get("nonprivate-full")
                    r = ms.get(meth)
                    if _ok(r) and _ok(base) and r.get(key) and base.get(key):
                        xs.append(i + (j - (len(methods) - 1) / 2) * width)
                        ys.append(r[key] / base[key])
                    elif r is not None and r.get("status") == "OOM":
                        xs.append(i + (j - (len(methods) - 1) / 2) * width)
                        ys.append(0)
                        ax.annotate("OOM", (xs[-1], 0), rotation=90, fontsize=6, ha="center", va="bottom")
                if xs:
                    ax.bar(xs, ys, width, label=meth)
            ax.set_xticks(range(len(single)))
            ax.set_xticklabels([_label(k[0]) for k, _ in single], fontsize=8)
            ax.axhline(1.0, color="k", lw=0.6)
            ax.set_title(title, fontsize=9)
        _finish(fig, axes)
        path = prefix.with_name(prefix.name + "_bars.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)

    for model, lst in by_model.items():
        if len(lst) < 2:
            continue
        xkey = "seq_len" if any(k[1] for k, _ in lst) else "image_size"
        methods = [m for m in METHOD_ORDER if any(m in ms for _, ms in lst)]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for meth in methods:
            pts = sorted((ms[meth][xkey], ms[meth]) for _, ms in lst if meth in ms and ms[meth].get(xkey) is not None)
            ok = [(x, r) for x, r in pts if _ok(r)]
            if ok:
                axes[0].plot([x for x, _ in ok], [r["examples_per_s"] for _, r in ok], marker="o", label=meth)
                if all(r.get("peak_mem_mb") for _, r in ok):
                    axes[1].plot([x for x, _ in ok], [r["peak_mem_mb"] / 1024 for _, r in ok], marker="o", label=meth)
            oom = [x for x, r in pts if r.get("status") == "OOM"]
            if oom:
                axes[1].scatter(oom, [0] * len(oom), marker="x", label=f"{meth} OOM")
        for ax, yl in ((axes[0], "examples/s"), (axes[1], "peak GiB (x = OOM)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xkey)
            ax.set_ylabel(yl)
        axes[0].set_yscale("log")
        fig.suptitle(_label(model), fontsize=10)
        _finish(fig, axes)
        path = prefix.with_name(f"{prefix.name}_{model}_{xkey}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out


# ----------------------------------------------------------------------------
# SPARTA: cost vs density


def _density(meth: str, r: dict[str, Any] | None = None) -> float | None:
    if r is not None and r.get("density") is not None:
        return float(r["density"])
    return float(meth.rsplit("-", 1)[1]) if meth.startswith("dp-sparta-") else None


def _step_ms(r: dict[str, Any] | None) -> float | None:
    if not _ok(r):
        return None
    if r.get("median_step_s"):  # type: ignore[union-attr]
        return 1000 * float(r["median_step_s"])  # type: ignore[index]
    return 1000 * r["batch_size"] / r["examples_per_s"]  # type: ignore[index]


def _sparta_tables(groups: OrderedDict[tuple, dict[str, dict[str, Any]]]) -> tuple[list[str], list[str], list[str]]:
    """Summary (step time of each density and of DP-BiTFiT as a fraction of
    DP full fine-tuning's), detail table, notes."""
    d_t, lim = SPARTA_TARGET
    summary = [
        "| model | DP full ms/step | "
        + " | ".join(f"density {_density(m):g}" + (f" (≤ {lim:g})" if _density(m) == d_t else "") for m in SPARTA)
        + " | DP-BiTFiT (density → 0) |",
        "| --- | ---: |" + " ---: |" * (len(SPARTA) + 1),
    ]
    detail = [
        "| model | setting | method | density | trainable | ms / step | examples/s | × DP full step time | "
        "peak GiB | × DP full memory | optimizer state MiB | status |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    notes: list[str] = []
    for (model, _, _, b), ms in groups.items():
        full = ms.get("dp-full-auto")
        base = _step_ms(full)
        cells = []
        for m in (*SPARTA, "dp-bitfit"):
            t = _step_ms(ms.get(m))
            x = _ratio(t, base)
            cells.append(_mark(x, hi=lim) if m != "dp-bitfit" and _density(m) == d_t else _f(x))
        anyr = next(iter(ms.values()))
        name = _label(model) + (f" ({_var_label(anyr)})" if _var_label(anyr) else "")
        summary.append(f"| {name} | {_f(base, 1)} | " + " | ".join(cells) + " |")
        for meth, r in ms.items():
            t = _step_ms(r)
            mem = r.get("peak_mem_mb") if _ok(r) else None
            rmem = _ratio(mem, full.get("peak_mem_mb")) if _ok(full) and meth != "dp-full-auto" else None
            rt = _ratio(t, base) if meth != "dp-full-auto" else None
            dens = _density(meth, r)
            setting = ", ".join(x for x in (_var_label(r), f"B={b}") if x)
            state = r.get("optimizer_state_mb") if _ok(r) else None
            detail.append(
                f"| {_label(model)} | {setting} | {meth} | {'–' if dens is None else f'{dens:g}'} | "
                f"{_size(r.get('trainable'))} | {_f(t, 1)} | {_f(r.get('examples_per_s') if _ok(r) else None, 1)} | "
                f"{_f(rt)} | {_f(_gib(mem))} | {_f(rmem)} | {_f(state, 1)} | {r.get('status', '?')} |"
            )
            if r.get("status") != "ok":
                notes.append(
                    f"- {_label(model)} {_var_label(r)} `{meth}`: **{r.get('status')}** — {str(r.get('error', ''))[:300]}"
                )
    return summary, detail, notes


def _sparta_plot(groups: OrderedDict[tuple, dict[str, dict[str, Any]]], path: Path) -> Path | None:
    """Step time and peak memory as a fraction of DP full fine-tuning's, against the density."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, ((model, _, _, _), ms) in enumerate(groups.items()):
        full = ms.get("dp-full-auto")
        color = f"C{i}"
        label = _label(model) + (f" ({_var_label(full)})" if full and _var_label(full) else "")
        for ax, val in ((axes[0], _step_ms), (axes[1], lambda r: r.get("peak_mem_mb") if _ok(r) else None)):
            base = val(full) if full else None
            pts = sorted((_density(m), _ratio(val(ms.get(m)), base)) for m in SPARTA if m in ms)
            pts = [(d, y) for d, y in pts if y is not None]
            if pts:
                ax.plot([d for d, _ in pts], [y for _, y in pts], marker="o", color=color, label=label)
            floor = _ratio(val(ms.get("dp-bitfit")), base) if "dp-bitfit" in ms else None
            if floor is not None:
                ax.axhline(floor, color=color, ls=":", lw=1, label=f"{_label(model)}: DP-BiTFiT")
    d_t, lim = SPARTA_TARGET
    axes[0].scatter([d_t], [lim], marker="*", s=120, color="k", zorder=5, label=f"target (≤ {lim:g} at {d_t:g})")
    for ax, title in ((axes[0], "step time (× DP full fine-tuning)"), (axes[1], "peak memory (× DP full fine-tuning)")):
        ax.set_xscale("log")
        ax.set_xlim(0.04, 1.25)
        ax.set_xticks([0.05, 0.1, 0.2, 0.5, 1.0])
        ax.minorticks_off()
        ax.set_xticklabels(["0.05", "0.1", "0.2", "0.5", "1"])
        ax.set_xlabel("density (fraction of rows trained)")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=9)
    _finish(fig, axes)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sparta_section(recs: list[dict[str, Any]], plot_path: Path | None, link_dir: Path | None) -> list[str]:
    groups = _by_group(recs)
    summary, detail, notes = _sparta_tables(groups)
    d_t, lim = SPARTA_TARGET
    lines = [
        f"Step time of SPARTA's sparse training phase (random rows at each density in every Linear / Conv "
        f"weight outside the head; biases and head in full; optimizer state for the selected rows only) "
        f"as a fraction of DP full fine-tuning's (`dp-full-auto`). Target: ≤ {lim:g} at density {d_t:g}. "
        "DP-BiTFiT is the floor: forward and input-gradient backward are paid whatever the density.",
        "",
    ]
    lines += summary + [""] + detail + [""]
    if notes:
        lines += ["Notes:", ""] + notes + [""]
    if plot_path is not None:
        p = _sparta_plot(groups, plot_path)
        if p is not None:
            rel = os.path.relpath(p, link_dir) if link_dir is not None else str(p)
            lines += [f"![{p.stem}]({Path(rel).as_posix()})", ""]
    return lines


SPARTA_COMMAND = "python -m benchmarks.speed --suite sparta --out results/ --time-budget 480"


# ----------------------------------------------------------------------------
# rendering


def render(
    records: list[dict[str, Any]], suite: str, plot_dir: Path | None = None, link_dir: Path | None = None
) -> str:
    """Markdown for one suite (without the marker comments).  Charts are
    written to ``plot_dir`` and linked relative to ``link_dir``."""
    recs = latest([r for r in records if r.get("suite") == suite])
    lines = [f"## Suite `{suite}`", ""] if suite != "sparta" else ["## SPARTA: cost vs density (suite `sparta`)", ""]
    if not recs:
        if suite == "sparta":
            return "\n".join(
                lines
                + [
                    "Not yet run on the GPU. Reproduce with `" + SPARTA_COMMAND + "` (see `benchmarks/README.md`, "
                    '"On the GPU machine"), then `python -m benchmarks.report results/sparta.jsonl --docs docs/benchmarks.md`.',
                    "",
                ]
            )
        return "\n".join(lines + ["No results.", ""])
    lines += [
        "Generated by `python -m benchmarks.report` from the JSON lines that "
        "`python -m benchmarks.speed` writes; every ratio compares configurations "
        "of the same run (same GPU, same batch).",
        "",
    ]
    lines += _env_lines(recs) + [""]
    settings: OrderedDict[tuple, list[dict[str, Any]]] = OrderedDict()
    for r in recs:
        settings.setdefault(_setting(r), []).append(r)
    for (dtype, size, device, opt, tf32), srecs in settings.items():
        head = f"### {dtype}" + (" (autocast, fp32 master weights)" if dtype == "bf16" else "")
        if tf32 == "off":
            head += ", TF32 off (IEEE float32 convolutions for every method)"
        head += f", {opt.upper() if opt == 'sgd' else opt}"
        if size != "full":
            head += f", {size} models"
        if device == "cpu":
            head += ", CPU"
        lines += [head, ""]
        if suite == "maxbatch":
            lines += _maxbatch_table(srecs) + [""]
            continue
        if suite == "sparta":
            tag = (
                f"{suite}_{dtype}_{opt}"
                + (f"_{size}" if size != "full" else "")
                + (f"_{device}" if device == "cpu" else "")
            )
            tag += "_ieee" if tf32 == "off" else ""
            plot = Path(plot_dir) / f"{tag}_density.png" if plot_dir is not None else None
            lines += _sparta_section(srecs, plot, link_dir)
            continue
        groups = _by_group(srecs)
        summary = _summary_table(groups)
        if summary:
            lines += ["Summary (✓/✗: the issues' targets):", ""] + summary + [""]
        detail, notes = _detail_table(groups)
        lines += detail + [""]
        if notes:
            lines += ["Notes:", ""] + notes + [""]
        if plot_dir is not None:
            tag = (
                f"{suite}_{dtype}" + (f"_{size}" if size != "full" else "") + (f"_{device}" if device == "cpu" else "")
            )
            tag += "_ieee" if tf32 == "off" else ""
            for p in _plots(srecs, Path(plot_dir) / tag):
                rel = os.path.relpath(p, link_dir) if link_dir is not None else str(p)
                lines += [f"![{p.stem}]({Path(rel).as_posix()})", ""]
    return "\n".join(lines)


def update_docs(path: str | Path, suite: str, body: str) -> None:
    """Replace (or append) this suite's marked section of ``path``."""
    path = Path(path)
    start, end = f"<!-- suite:{suite} start -->", f"<!-- suite:{suite} end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    if path.exists():
        text = path.read_text()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (
            "# Benchmarks\n\nSpeed and peak GPU memory of dpft against non-private training and Opacus. "
            "Reproduce with the commands in `benchmarks/README.md`; each section below is rewritten by "
            "`python -m benchmarks.report` between its marker comments.\n\n"
        )
    i, j = text.find(start), text.find(end)
    if i != -1 and j != -1 and j > i:
        text = text[:i] + block + text[j + len(end) :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def write_outputs(
    jsonl: str | Path,
    *,
    suite: str,
    out_dir: str | Path,
    docs: str | Path | None = None,
    plots_dir: str | Path | None = None,
) -> Path:
    """``<out_dir>/<suite>.md`` (+ PNGs beside it); with ``docs``, also that
    file's section, with PNGs under ``plots_dir`` (default ``<docs dir>/benchmarks``)."""
    records = load([jsonl])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{suite}.md"
    md.write_text(render(records, suite, plot_dir=out_dir, link_dir=out_dir) + "\n")
    if docs:
        docs = Path(docs)
        pdir = Path(plots_dir) if plots_dir else docs.parent / "benchmarks"
        update_docs(docs, suite, render(records, suite, plot_dir=pdir, link_dir=docs.parent))
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl", nargs="+", help="results/<suite>.jsonl file(s)")
    p.add_argument("--suite", default=None, help="default: every suite found in the files")
    p.add_argument(
        "--docs", default=None, help="markdown file whose suite sections to update (e.g. docs/benchmarks.md)"
    )
    p.add_argument(
        "--plots-dir", default=None, help="where the PNGs go (default: <docs dir>/benchmarks, or beside --out)"
    )
    p.add_argument("--out", default=None, help="also write the suites' markdown to this file ('-' = stdout)")
    args = p.parse_args(argv)
    records = load(args.jsonl)
    suites = (
        [args.suite] if args.suite else list(OrderedDict.fromkeys(r.get("suite") for r in records if r.get("suite")))
    )
    if not suites:
        raise SystemExit("no records found")
    chunks = []
    for suite in suites:
        if args.docs:
            docs = Path(args.docs)
            pdir = Path(args.plots_dir) if args.plots_dir else docs.parent / "benchmarks"
            update_docs(docs, suite, render(records, suite, plot_dir=pdir, link_dir=docs.parent))
            print(f"updated section '{suite}' of {docs}")
        if args.out:
            if args.out == "-":
                chunks.append(render(records, suite))
            else:
                out = Path(args.out)
                pdir = Path(args.plots_dir) if args.plots_dir else out.parent
                chunks.append(render(records, suite, plot_dir=pdir, link_dir=out.parent))
    if args.out == "-":
        print("\n\n".join(chunks))
    elif args.out:
        Path(args.out).write_text("\n\n".join(chunks) + "\n")
        print(f"wrote {args.out}")
    if not args.docs and not args.out:
        print("\n\n".join(render(records, s) for s in suites))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["load", "latest", "render", "update_docs", "write_outputs", "main"]
