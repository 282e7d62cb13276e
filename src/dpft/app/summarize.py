"""The end of a job: the summary, the privacy record, the release folder and the console report."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..checkpoint import CheckpointError
from .config import CHECKPOINT, SMALL_DATA_MIN_STEPS
from .prepare import _Job, _fmt_eps, _write_json
from .report import write_report

if TYPE_CHECKING:  # annotations only: the loop calls this module
    from .loop import _Run


# --- the end of a run ------------------------------------------------------------


def _finish(j: _Job, run: _Run) -> dict:
    """Final evaluation, summary.json (with the learning check), report.png and the
    release folder; prints the summary."""
    r, world = j.r, j.world
    final_rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()] if world.rank == 0 else []
    final_rows = [x for x in final_rows if x.get("event") == "eval" and x.get("final")]
    if final_rows and final_rows[-1]["step"] == run.step:
        last_acc = final_rows[-1]["test_accuracy"]
    else:  # e.g. resumed from a checkpoint written after the last step
        last_acc = run.run_eval(math.ceil(r.epochs), final=True)
    summary = _summary(j, run, last_acc)
    if j.engine is not None:
        j.engine.detach()
    if world.rank == 0:
        _write_json(j.out / "summary.json", summary)
        plot = write_report(j.out, summary)
        _print_summary(summary, j.log, plot)
        release = _write_release(j, summary)
        if release is not None:
            j.log(
                f"  release: {release}/ (the model, its labels and privacy.json, no secrets: safe to "
                f"share as far as DP allows); predict with: dpft predict --run {j.out} --input FILE.csv"
            )
    world.close()
    return summary


def _privacy_record(j: _Job, summary: dict) -> dict:
    """privacy.json of the release: what the guarantee is, in numbers (no secrets, no accuracies)."""
    import dpft

    r = j.r
    rec = {
        "private": summary["private"],
        "method": r.method,
        "model": r.model,
        "dataset": summary["dataset"],
        "epsilon": summary["epsilon"] if summary["private"] else None,
        "delta": summary["delta"],
        "target_epsilon": summary["target_epsilon"],
        "noise_multiplier": summary["noise_multiplier"],
        "accountant": r.accountant if summary["private"] else None,
        "steps": summary["steps"],
        "sample_rate": summary["sample_rate"],
        "batch_size": r.batch_size,
        "training_examples": summary["train_size"],
        "epochs": r.epochs,
        "users": summary.get("users"),
        "sampling": "Poisson" if r.poisson else "shuffled fixed-size batches (the ε assumes Poisson: a heuristic)",
        "clipping": {"function": r.clipping_fn, "max_grad_norm": r.max_grad_norm, "style": r.clipping_style},
        "privacy_unit": (
            f"user: all the training examples of one {j.task.user_column or 'user'} value (add/remove one user)"
        )
        if summary.get("privacy_unit") == "user"
        else "one training example (one row of the training data), add/remove adjacency",
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "dpft_version": getattr(dpft, "__version__", None),
    }
    if "sparta" in summary:
        rec["steps_in_ledger"] = summary["sparta"]["ledger_steps"]
        rec["sparta"] = {
            k: summary["sparta"][k] for k in ("density", "selection", "scoring_steps", "warmup_steps", "training_steps")
        }
    return rec


def _write_release(j: _Job, summary: dict) -> Path | None:
    """out/release/: the model, its labels and privacy.json (see :mod:`dpft.app.release`)."""
    from .release import ReleaseError, export

    image_shape = None if j.task.kind == "text" else list(np.asarray(j.task.x_train).shape[1:])
    try:
        return export(
            j.out,
            j.model,
            kind=j.task.kind,
            label_names=j.task.label_names,
            privacy=_privacy_record(j, summary),
            tokenizer=j.tokenizer,
            max_seq_len=j.r.max_seq_len if j.task.kind == "text" else None,
            image_shape=image_shape,
            source_model=j.r.model,
        )
    except ReleaseError as e:
        j.log(f"  note: no release folder: {e}")
        return None
    except OSError as e:
        from ..checkpoint import describe_os_error

        raise CheckpointError(f"cannot write the release folder {j.out / 'release'}: {describe_os_error(e)}") from e


def _remove_release(out: Path) -> None:
    import shutil

    from .release import RELEASE_DIR

    if (out / RELEASE_DIR).is_dir():
        shutil.rmtree(out / RELEASE_DIR)


def _summary(j: _Job, run: _Run, last_acc: float) -> dict:
    r, task, engine = j.r, j.task, j.engine
    majority_label, majority_acc = task.majority_baseline()
    summary = {
        "method": r.method,
        "model": r.model,
        "dataset": task.name,
        "trainable_parameters": j.trainable,
        "total_parameters": j.total,
        "trainable_percent": 100 * j.trainable / j.total,
        "train_size": j.n_train,
        "eval_size": int(len(task.y_test)),
        "eval_split": "validation" if r.validation_size else "test",
        "test_accuracy": last_acc,
        "majority_label": majority_label,
        "majority_baseline": majority_acc,
        "label_names": list(task.label_names),
        "epsilon": _epsilon(engine) if engine is not None else float("inf"),
        "target_epsilon": r.epsilon if engine is not None else None,
        "delta": engine.target_delta if engine is not None else None,
        "noise_multiplier": engine.noise_multiplier if engine is not None else 0.0,
        "sample_rate": min(1.0, r.batch_size / j.n_units),
        # what ε protects: one training example, or all the training examples of one user
        "privacy_unit": r.privacy_unit if engine is not None else None,
        "epsilon_unit": None
        if engine is None
        else (
            f"all training examples of one user ({task.user_column or 'user'})"
            if j.user_level
            else "one training example"
        ),
        "users": j.n_units if j.user_level else None,
        "steps": run.step,
        "epochs": r.epochs,
        "batch_size": r.batch_size,
        "lr": r.lr,
        "head_lr": r.head_lr,
        "max_seq_len": r.max_seq_len or None,
        "train_time_s": run.elapsed(),
        "wall_time_s": time.perf_counter() - j.t_start + run.elapsed_before,
        "peak_memory_mb": _peak_memory_mb(j.device),
        "device": str(j.device),
        "private": engine is not None,
        "out": str(j.out),
    }
    if j.sp is not None:
        sp = j.sp
        summary["sparta"] = {
            "density": r.density,
            "selection": sp.selection,
            "candidates": len(sp.candidates),
            "selected_rows": sum(int(m.sum()) for m in sp.masks.values()),
            "candidate_rows": sum(m.numel() for m in sp.masks.values()),
            "warmup_steps": sp.steps["warmup"],
            "scoring_steps": sp.steps["scoring"],
            "training_steps": run.step,
            "ledger_steps": engine.steps,
        }
    if j.world.size > 1:
        summary["world_size"] = j.world.size
    if run.monitor is not None:
        top = task.label_names.index(majority_label)
        summary["progress_eval"] = {
            "examples": int(len(run.monitor)),
            "majority_baseline": float(np.mean(task.y_test[run.monitor] == top)),
        }
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()] if j.world.rank == 0 else []
    summary.update(learning_check(summary, rows))
    return summary


def _epsilon(engine) -> float | None:
    if engine is None:
        return None
    return float(engine.epsilon)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 1024 if sys.platform != "darwin" else rss / 2**20
    except ImportError:  # pragma: no cover - Windows
        return float("nan")


#: A run must beat always predicting the majority class by this much to count as learned.
LEARNED_MARGIN = 0.01


def learning_check(summary: dict, rows: list[dict]) -> dict:
    """``{"learned": bool | None, "warnings": [...]}`` for summary.json.

    A run whose accuracy is not above the majority baseline by LEARNED_MARGIN did
    not learn anything useful; the warning names the likely causes read from the
    run itself (training loss rising or flat, too few steps, a small training set).
    """
    acc, base = summary.get("test_accuracy"), summary.get("majority_baseline")
    if acc is None or base is None or not (math.isfinite(acc) and math.isfinite(base)):
        return {"learned": None, "warnings": []}
    if acc > base + LEARNED_MARGIN:
        return {"learned": True, "warnings": []}
    split = summary.get("eval_split", "test")
    msg = (
        f"NOT LEARNED: {split} accuracy {acc:.4f} is not above the majority baseline {base:.4f} "
        f"(always '{summary.get('majority_label')}') by {100 * LEARNED_MARGIN:g} point(s); the model is "
        f"no better than a constant. Likely causes: " + "; ".join(_likely_causes(summary, rows))
    )
    return {"learned": False, "warnings": [msg]}


def _likely_causes(summary: dict, rows: list[dict]) -> list[str]:
    losses = [
        r["loss"] for r in rows if r.get("event") == "step" and r.get("loss") is not None and math.isfinite(r["loss"])
    ]
    lr, steps, n = summary.get("lr"), summary.get("steps", 0), summary.get("train_size", 0)
    causes = []
    if len(losses) >= 10:
        k = max(2, len(losses) // 5)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        if last > 1.05 * first:
            causes.append(
                f"the training loss rose ({first:.3f} -> {last:.3f}): the learning rate is probably "
                f"too high (--lr {lr:g}, --head-lr {summary.get('head_lr', lr):g}: try 3-10x smaller)"
            )
        elif last > 0.97 * first:
            causes.append(
                f"the training loss hardly fell ({first:.3f} -> {last:.3f}): the learning rate may be "
                f"too low or too high under the noise (--lr {lr:g}), or there are too few steps"
            )
    if steps < SMALL_DATA_MIN_STEPS:
        causes.append(
            f"only {steps} optimizer steps: too few for the data size ({n:,} examples; more "
            "--epochs, or a smaller --batch-size)"
        )
    if summary.get("private") and n and n < 2000:
        causes.append(
            f"a small training set ({n:,} examples): at ε = {summary.get('target_epsilon')} the "
            "noise needed is large compared with the signal of so few examples"
        )
    if not causes:
        causes.append(
            f"the learning rate (--lr {lr:g}; try 3x smaller and 3x larger) or too few steps for "
            f"the data size ({steps} steps over {n:,} examples; more --epochs)"
        )
    return causes


def _print_summary(s: dict, log, plot: Path | None) -> None:
    rows = [
        ("method", s["method"] + ("" if s["private"] else " (NOT private)")),
        (
            "trainable params",
            f"{s['trainable_parameters']:,} of {s['total_parameters']:,} ({s['trainable_percent']:.2f}%)",
        ),
        (f"{s['eval_split']} accuracy", f"{s['test_accuracy']:.4f}  ({s['eval_size']:,} examples)"),
        ("majority baseline", f"{s['majority_baseline']:.4f}  (always '{s['majority_label']}')"),
        (
            "ε (spent / target)",
            f"{_fmt_eps(s['epsilon'])} / {s['target_epsilon']:g}"
            + (f"  (protects {s.get('epsilon_unit')})" if s.get("epsilon_unit") else "")
            if s["private"]
            else "inf (no privacy)",
        ),
        ("δ", f"{s['delta']:.3g}" if s["delta"] is not None else "-"),
        ("σ (noise multiplier)", f"{s['noise_multiplier']:.4f}"),
        (
            "steps",
            f"{s['steps']}  (q = {s['sample_rate']:.4f}, {s['train_size']:,} training examples"
            + (f", {s['users']:,} users)" if s.get("users") else ")"),
        ),
        ("wall time", f"{s['wall_time_s']:.1f} s  (training {s['train_time_s']:.1f} s)"),
        ("peak memory", f"{s['peak_memory_mb']:.0f} MB ({'GPU' if s['device'].startswith('cuda') else 'process RSS'})"),
    ]
    width = max(len(k) for k, _ in rows)
    log("")
    for k, v in rows:
        log(f"  {k:<{width}}  {v}")
    for w in s.get("warnings", []):
        bar = "!" * 78
        log(f"  {bar}")
        log(f"  !! {w}")
        log(f"  {bar}")
    extra = ", report.png" if plot else ""
    log(f"  results in {s['out']}/ (summary.json, metrics.jsonl, config.json{extra}, {CHECKPOINT})")
    if s["private"]:
        log(
            f"  keep {CHECKPOINT} and metrics.jsonl as private as the data: the checkpoint holds the secret "
            "seed of the batch sampling and the noise, metrics.jsonl the training loss of each batch "
            "(not private)"
        )
