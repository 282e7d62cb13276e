"""The training loop of a job: steps, evaluation, checkpoints, Ctrl-C, non-finite losses,
and SPARTA's private phases before it."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import offline
from ..checkpoint import CheckpointError, atomic_save
from .errors import ConfigError, RunFailed
from .build import make_optimizer
from .config import CHECKPOINT, EPSILON_POINTS, MONITOR_SIZE, TrainConfig
from .prepare import (
    BatchPlan,
    Encoded,
    _Job,
    _Spent,
    _derive_seed,
    _fmt_eps,
    _rng_state,
    _set_rng_state,
    _trainable_state,
    _write_json,
    physical_chunks,
)
from .summarize import _epsilon, _finish, _remove_release


def _forward(model: nn.Module, inputs: dict) -> torch.Tensor:
    if "x" in inputs:
        return model(inputs["x"])
    return model(**inputs).logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Encoded,
    device: torch.device,
    batch_size: int,
    autocast: Callable,
    subset: np.ndarray | None = None,
    cancel: Callable[[], bool] | None = None,
) -> float | None:
    """Accuracy on the evaluation split (or on the examples ``subset`` of it).

    ``cancel``: checked before each batch; when it returns True the evaluation
    stops and ``None`` is returned (a Ctrl-C need not wait for a long evaluation).
    """
    was_training = model.training
    model.eval()
    order = np.arange(len(data.y_test)) if subset is None else np.asarray(subset)
    n = len(order)
    lens = data.lengths("test")
    if lens is not None:
        order = order[np.argsort(lens[order], kind="stable")]
    correct = 0
    try:
        for start in range(0, n, batch_size):
            if cancel is not None and cancel():
                return None
            idx = order[start : start + batch_size]
            inputs, y = data.batch("test", idx, device)
            with autocast():
                logits = _forward(model, inputs)
            correct += int((logits.argmax(-1) == y).sum())
    finally:
        model.train(was_training)
    return correct / max(n, 1)


def _sparta_phases(
    sp,
    model,
    r: TrainConfig,
    data: Encoded,
    device,
    autocast,
    n_train: int,
    steps_per_epoch: int,
    dp_secret: int,
    ckpt: dict | None,
    log,
    units: np.ndarray | None = None,
):
    """Warm-up (optional), private scoring, selection; returns the engine of the sparse
    training phase (attached to a fresh optimizer).  On --resume the row selection comes
    from the checkpoint (the engine's ledger is restored by the caller).

    Every phase draws its own Poisson batches (:class:`BatchPlan`, its own stream of the
    secret seed) and its own noise stream, and uses the training loss. ``units`` (the user
    of each training example, --privacy-unit user): batches sample users, and each phase's
    engine is told whose examples every physical chunk holds."""
    lengths = data.lengths("train")

    def loss_fn(m: nn.Module, chunk: np.ndarray) -> torch.Tensor:
        inputs, y = data.batch("train", chunk, device)
        with autocast():
            logits = _forward(m, inputs)
        if units is not None:
            sp.engine.set_units(units[chunk])
        return F.cross_entropy(logits.float(), y)

    def batches(steps: int, stream: int, desc: str):
        plan = BatchPlan(
            n_train, r.batch_size, steps_per_epoch, _derive_seed(dp_secret, stream), poisson=r.poisson, units=units
        )
        bar = _tqdm(r.progress)(total=steps, desc=desc, unit="step", leave=True, dynamic_ncols=True)
        try:
            for i in range(steps):
                idx = plan.batch(i // steps_per_epoch, i % steps_per_epoch)
                if lengths is not None and len(idx):  # cut padding, as physical_chunks does
                    idx = idx[np.argsort(lengths[idx], kind="stable")]
                yield idx
                bar.update(1)
        finally:
            bar.close()

    if ckpt is not None:
        masks = ckpt.get("sparta_masks")
        if masks is None:
            raise ConfigError("--resume: the checkpoint holds no SPARTA row selection")
        sp.masks = {n: torch.as_tensor(m, dtype=torch.bool) for n, m in masks.items()}
    else:
        if sp.steps["warmup"]:
            sp.engine_kwargs["noise_seed"] = _derive_seed(dp_secret, 3)
            sp._set_trainable()
            opt = make_optimizer(model, r)
            set_lr(opt, r, 0, 1)
            engine = sp.warmup(opt)
            for idx in batches(sp.steps["warmup"], 5, "SPARTA warm-up"):
                chunks = physical_chunks(idx, r.max_physical_batch_size, None)
                for chunk in chunks:
                    loss_fn(model, chunk).backward()
                if not chunks:
                    engine.record_empty_batch()
                opt.step()
                opt.zero_grad(set_to_none=True)
        if sp.selection == "scores":
            sp.engine_kwargs["noise_seed"] = _derive_seed(dp_secret, 2)
            sp.score(
                batches(sp.steps["scoring"], 4, "SPARTA scoring"),
                loss_fn,
                max_physical_batch_size=r.max_physical_batch_size,
            )
            sp.select()
            log(f"  SPARTA: scored the rows privately ({sp.steps['scoring']} steps, ε so far {_fmt_eps(sp.epsilon)})")
        else:  # public and data-independent: no privacy cost, reproducible from --seed
            sp.select(seed=r.seed)
            log(f"  SPARTA: {sp.selection} row selection (public, no scoring pass)")
    sp.engine_kwargs["noise_seed"] = _derive_seed(dp_secret, 1)
    return sp.train(lambda params: make_optimizer(model, r))


def _sparta_trainable(model: nn.Module) -> int:
    """Trainable parameters, counting only the selected rows of row-restricted weights."""
    from ..methods.sparta import ATTR

    n = 0
    for p in model.parameters():
        if p.requires_grad:
            rm = getattr(p, ATTR, None)
            n += p.numel() if rm is None else int(rm.mask.sum()) * (p.numel() // p.shape[rm.dim])
    return n


def _run_sparta_phases(job: _Job) -> None:
    """SPARTA's warm-up and scoring (or the row selection from the checkpoint); then the
    engine and optimizer of its sparse training phase."""
    r, sp = job.r, job.sp
    job.engine = _sparta_phases(
        sp,
        job.model,
        r,
        job.data,
        job.device,
        job.autocast,
        job.n_train,
        job.steps_per_epoch,
        job.dp_secret,
        job.ckpt,
        job.log,
        units=job.units if job.user_level else None,
    )
    job.optimizer = job.engine.optimizer
    job.trainable = _sparta_trainable(job.model)
    rows = sum(int(m.sum()) for m in sp.masks.values())
    job.log(
        f"  SPARTA: {rows:,} of {sum(m.numel() for m in sp.masks.values()):,} candidate rows "
        f"selected; {job.trainable:,} trainable parameters ({100 * job.trainable / job.total:.2f}%)"
    )


# --- Ctrl-C ----------------------------------------------------------------------


class _Interrupts:
    """Ctrl-C during the training loop.

    The first Ctrl-C is acknowledged at once; the run stops after the step in
    progress (a progress evaluation is cut short), writes a checkpoint and
    exits, resumable. A second Ctrl-C stops at once: the unfinished step is
    rolled back (none of it was applied, it is not accounted) and the last
    finished step is checkpointed. While a step is being applied or a
    checkpoint written (:meth:`critical`), a second Ctrl-C waits for its end.
    """

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.requested = False
        self.exiting = False
        self._pending = False
        self._depth = 0
        self._old: Any = None

    def install(self) -> None:
        if threading_main():
            self._old = signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def _handler(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
            self.say(
                "\n  Ctrl-C: stopping after the current step, with a checkpoint (Ctrl-C again to "
                "stop at once: the unfinished step is rolled back)"
            )
            return
        if self._depth or self.exiting:
            self._pending = not self.exiting
            self.say("  Ctrl-C: writing the checkpoint first, one moment")
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        """A section that a second Ctrl-C must not cut (it takes effect right after it)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending and not self.exiting:
            self._pending = False
            raise KeyboardInterrupt


class _NonFinite(Exception):
    """A step whose loss (or per-example gradient) is NaN or infinite; nothing of it was applied."""


# --- the training loop -----------------------------------------------------------

_now = time.monotonic  # the clock of the periodic checkpoints (a test moves it)


class _Run:
    """The training loop of a prepared job, its checkpoints, and every way out of it."""

    def __init__(self, job: _Job, spent: _Spent) -> None:
        self.j = job
        self.log = job.log
        self.spent = spent
        self.step = 0
        self.elapsed_before = 0.0
        self.t_train = time.perf_counter()
        self.metrics_path = job.out / "metrics.jsonl"
        self.metrics_file: Any = None
        self.n_lines = 0
        self.last_acc: float | None = None
        self.saved_step: int | None = None  # step of the newest checkpoint on disk
        self.last_save = _now()
        self.step_rng: dict | None = None  # RNG state at the start of the step in progress
        self.in_step = False  # a step has begun and is not yet applied
        self._mine_empty = False
        self.interrupts = _Interrupts(self.log)
        n_eval = len(job.task.y_test)
        # Progress evaluations (before training, every eval_every steps, at epoch ends) use a
        # fixed subset of at most MONITOR_SIZE evaluation examples; the final one uses all.
        self.monitor = None
        if n_eval > MONITOR_SIZE:
            self.monitor = np.sort(np.random.default_rng([job.r.seed, 17]).permutation(n_eval)[:MONITOR_SIZE])

    # -- state ----------------------------------------------------------------
    def restore(self) -> None:
        """Load the checkpoint of a --resume, or start a fresh run directory."""
        j, ckpt = self.j, self.j.ckpt
        if ckpt is not None:
            _restore_checkpoint(j, ckpt)
            self.step = ckpt["step"]
            self.saved_step = self.step
            self.elapsed_before = ckpt.get("elapsed", 0.0)
            lines = (
                self.metrics_path.read_text().splitlines()[: ckpt["metrics_lines"]]
                if self.metrics_path.exists()
                else []
            )
            if j.world.rank == 0:
                self.metrics_path.write_text("".join(line + "\n" for line in lines))
            self.log(f"  resumed from step {self.step} ({self.spent.text()})")
        elif j.world.rank == 0:
            j.out.mkdir(parents=True, exist_ok=True)
            _write_json(j.out / "config.json", j.r.to_dict())
            self.metrics_path.write_text("")
            for stale in ("summary.json", "report.png", CHECKPOINT):
                (j.out / stale).unlink(missing_ok=True)
            _remove_release(j.out)
        j.world.barrier()
        if j.world.rank == 0:
            self.metrics_file = open(self.metrics_path, "a")
        self.n_lines = len(self.metrics_path.read_text().splitlines())

    def record(self, obj: dict) -> None:
        """One line of metrics.jsonl (rank 0 writes; every rank counts the lines)."""
        self.n_lines += 1
        if self.metrics_file is None:
            return
        try:
            self.metrics_file.write(json.dumps(obj, default=offline.json_default) + "\n")
            self.metrics_file.flush()
        except OSError as e:
            from ..checkpoint import describe_os_error

            raise CheckpointError(f"cannot write {self.metrics_path}: {describe_os_error(e)}") from e

    def save_checkpoint(self, rng: dict | None = None) -> None:
        """Write checkpoint.pt atomically (a second Ctrl-C waits for it)."""
        j = self.j
        self.last_save = _now()
        if j.world.rank != 0:
            self.saved_step = self.step
            return
        state = {
            "model": _trainable_state(j.model),
            "optimizer": j.optimizer.state_dict(),
            "engine": j.engine.state_dict() if j.engine is not None else None,
            "rng": rng if rng is not None else _rng_state(),
            "step": self.step,
            "metrics_lines": self.n_lines,
            "dp_seed": j.dp_secret,
            "elapsed": self.elapsed(),
            **({"sparta_masks": j.sp.masks} if j.sp is not None else {}),
        }
        with self.interrupts.critical():
            atomic_save(state, j.out / CHECKPOINT)
            self.saved_step = self.step

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_train

    def checkpoint_due(self, end_of_epoch: bool) -> bool:
        r = self.j.r
        if end_of_epoch or (r.checkpoint_every and self.step % r.checkpoint_every == 0):
            return True
        return bool(r.checkpoint_minutes) and _now() - self.last_save >= 60 * r.checkpoint_minutes

    # -- evaluation -----------------------------------------------------------
    def run_eval(self, epoch: int, final: bool) -> float | None:
        """Accuracy on the evaluation split (a fixed subset for progress evaluations);
        a Ctrl-C cuts an evaluation short (nothing is recorded; a cut final evaluation
        is made by --resume)."""
        j = self.j
        subset = None if final else self.monitor
        if j.world.rank == 0:  # under torchrun rank 0 alone evaluates (the model is the same everywhere)
            cancel = lambda: self.interrupts.requested  # noqa: E731
            acc = evaluate(
                j.model, j.data, j.device, 2 * j.r.max_physical_batch_size, j.autocast, subset, cancel=cancel
            )
            if acc is None:
                return None
        else:
            acc = math.nan
        self.record(
            {
                "event": "eval",
                "step": self.step,
                "epoch": epoch,
                "test_accuracy": acc,
                "examples": len(j.task.y_test) if subset is None else len(subset),
                "final": final,
                "epsilon": _epsilon(j.engine) if j.engine is not None else None,
            }
        )
        self.last_acc = acc
        return acc

    # -- one step -------------------------------------------------------------
    def compute(self, idx: np.ndarray) -> tuple[float, int]:
        """Forward and backward of this process's share of a logical batch, in physical
        chunks; returns the summed loss and the correct predictions of the global batch."""
        j = self.j
        mine = idx[j.world.rank :: j.world.size]  # this process's share of the global batch
        loss_sum, correct = 0.0, 0
        chunks = physical_chunks(mine, j.r.max_physical_batch_size, j.data.lengths("train"))
        for chunk in chunks:
            inputs, y = j.data.batch("train", chunk, j.device)
            with j.autocast():
                logits = _forward(j.net, inputs)
            loss = F.cross_entropy(logits.float(), y)
            if j.engine is not None and j.user_level:
                j.engine.set_units(j.units[chunk])
            if j.private or len(chunks) == 1:
                loss.backward()
            else:  # non-private accumulation: weight each chunk by its share
                (loss * len(chunk) / len(mine)).backward()
            loss_sum += float(loss.detach()) * len(chunk)
            correct += int((logits.argmax(-1) == y).sum())
        self._mine_empty = len(mine) == 0
        return j.world.sum(loss_sum, correct)

    def apply(self, idx: np.ndarray, loss_sum: float, correct: float) -> dict:
        """The optimizer step (privatized by the engine) and its metrics row."""
        j = self.j
        set_lr(j.optimizer, j.r, self.step, j.steps_total)
        try:
            if self._mine_empty and j.engine is not None:
                _empty_step(j.engine, j.optimizer)
            else:
                j.optimizer.step()
        except FloatingPointError as e:  # the engine refused a non-finite per-example gradient
            raise _NonFinite(f"a per-example gradient is NaN or infinite ({str(e).splitlines()[0]})") from e
        j.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        n = len(idx)
        row = {
            "event": "step",
            "step": self.step,
            "epoch": (self.step - 1) // j.steps_per_epoch + 1,
            "batch_size": int(n),
            "loss": loss_sum / n if n else None,
            "train_accuracy": correct / n if n else None,
            "epsilon": self.row_epsilon(),
            "lr": j.optimizer.param_groups[0]["lr"],
            "time": round(self.elapsed(), 3),
        }
        self.record(row)
        return row

    def row_epsilon(self) -> float | None:
        """ε after this step for metrics.jsonl: at EPSILON_POINTS evenly spaced steps and the last
        one (each value is an accountant query that takes up to a second; the engine's budget
        check needs none per step). A pure function of the step, so a resumed run writes the
        same rows."""
        j = self.j
        if j.engine is None:
            return None
        every = max(1, math.ceil(j.steps_total / EPSILON_POINTS))
        if self.step == 1 or self.step % every == 0 or self.step == j.steps_total:
            return _epsilon(j.engine)
        return None

    def one_step(self, epoch: int, b: int) -> dict:
        """Draw, compute and apply one logical batch. A non-finite loss or a second Ctrl-C
        before the step is applied leaves the model, optimizer and ledger as they were."""
        j = self.j
        self.step_rng = _rng_state()
        self.in_step = True
        idx = j.plan.batch(epoch, b)
        loss_sum, correct = self.compute(idx)
        if len(idx) and not math.isfinite(loss_sum):
            raise _NonFinite(f"the training loss is {'NaN' if math.isnan(loss_sum) else 'infinite'}")
        with self.interrupts.critical():
            row = self.apply(idx, loss_sum, correct)
            self.in_step = False
        return row

    # -- the loop -------------------------------------------------------------
    def loop(self) -> str | None:
        """All remaining steps; returns why it stopped early (None: it finished)."""
        j, r = self.j, self.j.r
        tqdm = _tqdm(r.progress and j.world.rank == 0)
        if self.step == 0 and r.eval_every:
            self.run_eval(0, final=False)
        while self.step < j.steps_total:
            epoch = self.step // j.steps_per_epoch
            first = self.step - epoch * j.steps_per_epoch
            last = min(j.steps_per_epoch, j.steps_total - epoch * j.steps_per_epoch)
            bar = tqdm(
                total=last,
                initial=first,
                desc=f"epoch {epoch + 1}/{math.ceil(r.epochs)}",
                unit="step",
                leave=True,
                dynamic_ncols=True,
            )
            loss_avg, eps = None, None
            try:
                for b in range(first, last):
                    row = self.one_step(epoch, b)
                    if row["loss"] is not None:
                        loss_avg = row["loss"] if loss_avg is None else 0.9 * loss_avg + 0.1 * row["loss"]
                    eps = row["epsilon"] if row["epsilon"] is not None else eps
                    bar.set_postfix_str(_postfix(loss_avg, row["train_accuracy"], eps, self.last_acc), refresh=False)
                    bar.update(1)
                    end_of_epoch = b == last - 1
                    if (r.eval_every and self.step % r.eval_every == 0) or end_of_epoch:
                        self.run_eval(epoch + 1, final=self.step == j.steps_total)
                        bar.set_postfix_str(_postfix(loss_avg, row["train_accuracy"], eps, self.last_acc))
                    stopped = None
                    if r.stop_after_steps and self.step >= r.stop_after_steps and self.step < j.steps_total:
                        stopped = f"stopped after {self.step} steps (--stop-after-steps)"
                    elif self.interrupts.requested:
                        stopped = f"interrupted (Ctrl-C) after step {self.step}"
                    if stopped or self.checkpoint_due(end_of_epoch):
                        self.save_checkpoint()
                    if stopped:
                        return stopped
            finally:
                bar.close()
        return None

    def run(self) -> dict:
        """Train to the end (then evaluate, summarise, release) or to a stop; on a fault,
        roll back the unfinished step, checkpoint, and raise :class:`RunFailed`."""
        j = self.j
        try:
            self.restore()
            self.interrupts.install()
            try:
                stopped = self.loop()
            except KeyboardInterrupt:  # a second Ctrl-C
                stopped = self.stop_at_once()
            except _NonFinite as e:
                raise RunFailed(self.fault_message(str(e))) from e
            finally:
                self.interrupts.uninstall()
            if stopped is not None:
                return self.stopped(stopped)
            return _finish(j, self)
        except CheckpointError as e:
            raise RunFailed(f"{e}. {self.resume_hint(after_fault=True)}; {self.spent.text()}") from e
        finally:
            if self.metrics_file is not None:
                self.metrics_file.close()

    def stop_at_once(self) -> str:
        """A second Ctrl-C: drop the unfinished step (nothing of it was applied) and
        checkpoint the last finished one, with the RNG state it ended with."""
        j = self.j
        self.interrupts.exiting = True
        if j.optimizer is not None:
            j.optimizer.zero_grad(set_to_none=True)
        rolled_back = self.in_step
        if self.saved_step != self.step:
            self.save_checkpoint(rng=self.step_rng if rolled_back else None)
        undo = "; the unfinished step was rolled back" if rolled_back else ""
        return f"interrupted (second Ctrl-C) after step {self.step}{undo}"

    def fault_message(self, what: str) -> str:
        """Roll back the step that failed, checkpoint the last good one, and say what to do."""
        j = self.j
        self.interrupts.exiting = True
        if j.optimizer is not None:
            j.optimizer.zero_grad(set_to_none=True)
        finite = all(bool(torch.isfinite(p).all()) for p in j.model.parameters() if p.requires_grad)
        if not finite:
            saved = "the parameters are no longer finite, so no checkpoint was written"
        elif self.saved_step != self.step:
            self.save_checkpoint(rng=self.step_rng)
            saved = f"checkpoint of step {self.step} saved"
        else:
            saved = f"checkpoint of step {self.step} kept"
        r = j.r
        return (
            f"{what} at step {self.step + 1}; the step was not applied and training stopped. "
            f"Likely causes: a learning rate too high for this model and data (--lr {r.lr:g}, head "
            f"{r.head_lr:g}: start a new run with a smaller one) or invalid values in the data. "
            f"{saved} in {j.out}; {self.spent.text()}"
        )

    def resume_hint(self, after_fault: bool = False) -> str:
        if self.saved_step is None:
            return "no checkpoint of this run was written yet: it must be started again"
        fix = "free space or fix the folder, then " if after_fault else ""
        return (
            f"the checkpoint of step {self.saved_step} in {self.j.out} is intact: {fix}continue with "
            f"dpft train --out {self.j.out} --resume"
        )

    def stopped(self, reason: str) -> dict:
        """A resumable stop (--stop-after-steps, Ctrl-C): say so, with the ε spent."""
        j = self.j
        status = "interrupted" if "Ctrl-C" in reason else "stopped"
        self.log(f"  {reason}; checkpoint saved; {self.spent.text()}. Continue with: dpft train --out {j.out} --resume")
        j.world.close()
        return {
            "stopped": True,
            "status": status,
            "step": self.step,
            "out": str(j.out),
            "epsilon": self.spent.epsilon(),
            "delta": getattr(self.spent.source, "target_delta", None),
        }


def _restore_checkpoint(j: _Job, ckpt: dict) -> None:
    """Put the checkpoint's parameters, optimizer, engine and RNG state back."""
    missing = set(_trainable_state(j.model)) ^ set(ckpt["model"])
    if missing:
        raise ConfigError(f"--resume: checkpoint parameters do not match the model ({sorted(missing)[:3]})")
    with torch.no_grad():
        named = dict(j.model.named_parameters())
        for n, t in ckpt["model"].items():
            named[n].copy_(t.to(named[n].device, named[n].dtype))
    j.optimizer.load_state_dict(ckpt["optimizer"])
    if j.engine is not None:
        j.engine.load_state_dict(ckpt["engine"])
    _set_rng_state(ckpt["rng"])


def set_lr(optimizer: torch.optim.Optimizer, r: TrainConfig, step: int, steps_total: int) -> None:
    """The learning rate of step ``step`` (0-based): a pure function of the step, so resumable."""
    factor = 1.0
    if r.lr_schedule == "linear":
        factor = 1.0 - step / steps_total
    elif r.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * step / steps_total))
    for group in optimizer.param_groups:
        group["lr"] = r.lr * group.get("lr_scale", 1.0) * factor


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _empty_step(engine, optimizer) -> None:
    """An empty Poisson batch: still one step of the mechanism (noise only, accounted)."""
    engine.record_empty_batch()
    optimizer.step()


def _postfix(loss, acc, eps, test_acc) -> str:
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if acc is not None:
        parts.append(f"acc {acc:.2f}")
    if test_acc is not None:
        parts.append(f"test {test_acc:.3f}")
    if eps is not None:
        parts.append(f"ε {eps:.2f}")
    return ", ".join(parts)


def _tqdm(enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm
        except ImportError:  # pragma: no cover
            pass

    class _Silent:
        def __init__(self, *a, **k):
            pass

        def set_postfix_str(self, *a, **k):
            pass

        def update(self, *a):
            pass

        def close(self):
            pass

    return _Silent
