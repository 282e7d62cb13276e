"""The job's report figure (report.png): accuracy, loss and ε over the run."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: Path, summary: dict) -> Path | None:
    """report.png: training loss, test accuracy and ε against step (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = report_figure(out, summary)
    path = out / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_figure(out: Path, summary: dict):
    """The figure of report.png (three panels: loss, accuracy, ε) from out/metrics.jsonl.

    The accuracy panel draws the majority-class line of the full evaluation split and,
    when the progress evaluations use a subset, that subset's own majority line; the
    ε axis starts at 0."""
    import matplotlib.pyplot as plt

    steps, losses, eps, monitor, final = [], [], [], [], []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("event") == "step":
            if row.get("loss") is not None:
                steps.append(row["step"])
                losses.append(row["loss"])
            if row.get("epsilon") is not None:
                eps.append((row["step"], row["epsilon"]))
        elif row.get("event") == "eval":
            (final if row.get("final") else monitor).append((row["step"], row["test_accuracy"], row.get("examples")))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharex=True)
    axes[0].plot(steps, losses, lw=0.8, color="tab:blue", alpha=0.45, label="logical batch")
    if len(losses) > 4:
        ema, smooth = losses[0], []
        for v in losses:
            ema = 0.8 * ema + 0.2 * v
            smooth.append(ema)
        axes[0].plot(steps, smooth, lw=1.8, color="tab:blue", label="moving average")
        axes[0].legend(loc="upper right")
    axes[0].set(title="training loss", xlabel="step", xlim=(0, max(summary["steps"], 1) * 1.04))
    split = summary["eval_split"]
    sub_base = (summary.get("progress_eval") or {}).get("majority_baseline")
    if monitor:
        k = monitor[0][2]
        is_subset = bool(final and k and k < (final[-1][2] or 0))
        sub = f" ({k:,}-example subset)" if is_subset else ""
        axes[1].plot(
            [m[0] for m in monitor], [m[1] for m in monitor], "o-", ms=3, color="tab:green", label=f"{split}{sub}"
        )
        if is_subset and sub_base is not None:
            axes[1].axhline(
                sub_base, ls=":", color="tab:green", alpha=0.7, label=f"majority class on the subset ({sub_base:.3f})"
            )
    if final:
        axes[1].plot(
            [f[0] for f in final],
            [f[1] for f in final],
            "D",
            ms=7,
            color="darkgreen",
            label=f"{split} (all {final[-1][2]:,})",
        )
    axes[1].axhline(
        summary["majority_baseline"],
        ls="--",
        color="grey",
        label=f"majority class ({summary['majority_baseline']:.3f})",
    )
    axes[1].set(title=f"{split} accuracy", xlabel="step")
    if summary.get("learned") is False:
        axes[1].text(
            0.5,
            0.5,
            "NOT LEARNED:\nno better than the\nmajority class",
            color="red",
            ha="center",
            va="center",
            fontsize=13,
            fontweight="bold",
            transform=axes[1].transAxes,
            alpha=0.8,
        )
    axes[1].legend(loc="lower right", fontsize=8)
    if eps:
        axes[2].plot([s for s, _ in eps], [e for _, e in eps], color="tab:red")
        axes[2].axhline(summary["target_epsilon"], ls="--", color="grey", label="target")
        axes[2].set_ylim(bottom=0, top=max(summary["target_epsilon"], max(e for _, e in eps)) * 1.08)
        axes[2].legend(loc="lower right")
        unit = "per user" if summary.get("privacy_unit") == "user" else "per example"
        axes[2].set(title=f"ε spent {unit} (δ = {summary['delta']:.2g})", xlabel="step")
    else:
        axes[2].text(
            0.5, 0.5, "non-private:\nε = ∞", ha="center", va="center", fontsize=14, transform=axes[2].transAxes
        )
        axes[2].set_title("ε")
        axes[2].axis("off")
    title = f"dpft {summary['method']} · {summary['model']} · {summary['dataset']}"
    if summary.get("learned") is False:
        title += "  ·  NOT LEARNED (accuracy at the majority baseline; see summary.json warnings)"
    fig.suptitle(title, color="red" if summary.get("learned") is False else "black")
    fig.tight_layout()
    return fig
