"""`dpft train` survives faults: a NaN loss, a full disk, Ctrl-C at a chosen step, a
damaged checkpoint, a folder it cannot write. Each way out leaves a checkpoint that
`--resume` continues (or says why not) and reports the ε already spent.

Every run is the tiny BERT of app_helpers on a 240-row CSV (a few seconds each).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import signal

import pytest
import torch

from app_helpers import (
    HAVE_PANDAS,
    HAVE_TRANSFORMERS,
    make_reviews_csv,
    make_tiny_bert,
    one_line,
    read_metrics,
    run_cli,
    tiny_args,
)

pytestmark = pytest.mark.skipif(not (HAVE_TRANSFORMERS and HAVE_PANDAS), reason="needs transformers and pandas")

COMMON = ("--dp-seed", "3", "--eval-every", "0", "--epsilon", "4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return make_tiny_bert(root / "bert"), make_reviews_csv(root / "reviews.csv")


def _args(tiny, out, *extra):
    return tiny_args(tiny[0], tiny[1], out, *COMMON, *extra)


def _nan_after(monkeypatch, calls: int):
    """Training forwards return NaN logits from the ``calls``-th on (evaluation is untouched)."""
    from dpft.app import loop as train_mod

    real, seen = train_mod._forward, {"n": 0}

    def forward(model, inputs):
        logits = real(model, inputs)
        if model.training:
            seen["n"] += 1
            if seen["n"] >= calls:
                return logits * float("nan")
        return logits

    monkeypatch.setattr(train_mod, "_forward", forward)
    return seen


def _ckpt_step(out) -> int:
    return torch.load(out / "checkpoint.pt", weights_only=False)["step"]


def _no_temp_files(out) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------
# NaN loss


@pytest.mark.parametrize("method", ["full", "bitfit"])
def test_nan_loss_stops_with_a_checkpoint_and_the_epsilon_spent(tiny, tmp_path, capsys, monkeypatch, method):
    out = tmp_path / "run"
    # 192 training rows, batch 16 -> 12 steps of about one physical chunk each: NaN from step 5 on
    _nan_after(monkeypatch, 5)
    code, stdout, err = run_cli(_args(tiny, out, "--method", method, "--checkpoint-every", "2"), capsys)
    assert code == 1, err
    line = one_line(err)
    assert "NaN" in line and "at step 5" in line and "not applied" in line
    assert "--lr" in line and "ε spent so far" in line
    assert "checkpoint of step 4" in line
    assert _ckpt_step(out) == 4 and _no_temp_files(out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert ckpt["engine"]["ledger"]  # the ledger of the 4 applied steps travels with it
    eps_said = float(line.split("ε spent so far ")[1].split(",")[0])
    from dpft import accounting

    state = ckpt["engine"]
    assert eps_said == pytest.approx(
        accounting.epsilon(
            noise_multiplier=state["noise_multiplier"],
            sample_rate=state["sample_rate"],
            steps=4,
            delta=state["target_delta"],
        ),
        abs=1e-3,
    )
    assert not (out / "summary.json").exists()
    # without the fault, --resume finishes the run from step 4
    monkeypatch.undo()
    code, stdout, err = run_cli(["train", "--out", out, "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert "resumed from step 4" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["epsilon"] <= 4.0


# ---------------------------------------------------------------------------
# a full disk


class _FullDisk(io.RawIOBase):
    """A file that accepts ``room`` bytes, then fails like a full disk."""

    def __init__(self, real, room: int):
        self.real, self.room = real, room

    def writable(self):
        return True

    def write(self, b):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(b), self.room)
        self.room -= n
        self.real.write(bytes(b[:n]))
        return n

    def fileno(self):
        return self.real.fileno()

    def flush(self):
        if not self.real.closed:
            self.real.flush()

    def close(self):
        super().close()
        self.real.close()


def _fill_disk_after(monkeypatch, writes_ok: int, room: int = 100):
    """The first ``writes_ok`` atomic writes succeed; later ones hit a full disk."""
    from dpft import checkpoint

    real_open, count = checkpoint._open_temp, {"n": 0}

    def open_temp(path):
        f, tmp = real_open(path)
        count["n"] += 1
        return (f if count["n"] <= writes_ok else _FullDisk(f, room)), tmp

    monkeypatch.setattr(checkpoint, "_open_temp", open_temp)
    return count


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    from dpft.checkpoint import CheckpointError, atomic_save

    path = tmp_path / "checkpoint.pt"
    atomic_save({"w": torch.ones(3)}, path)
    _fill_disk_after(monkeypatch, 0)
    with pytest.raises(CheckpointError, match="no space left on device") as e:
        atomic_save({"w": torch.zeros(10_000)}, path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert torch.equal(torch.load(path)["w"], torch.ones(3))  # the old checkpoint stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no stale temporary file


def test_full_disk_during_a_run_names_the_cause_and_the_intact_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    # atomic writes: config.json, then checkpoints at steps 3 and 6; the third checkpoint fails
    _fill_disk_after(monkeypatch, 3)
    code, stdout, err = run_cli(_args(tiny, out, "--checkpoint-every", "3"), capsys)
    assert code == 1, err
    line = one_line(err)
    assert "no space left on device" in line and "checkpoint" in line and "enforce fail" not in line
    assert "checkpoint of step 6" in line and "--resume" in line and "ε spent so far" in line
    assert _ckpt_step(out) == 6 and _no_temp_files(out)
    monkeypatch.undo()
    code, stdout, err = run_cli(["train", "--out", out, "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


# ---------------------------------------------------------------------------
# Ctrl-C


def _sigint_at(monkeypatch, capsys, call: int, times: int = 1):
    """Send ``times`` SIGINTs from inside the ``call``-th training forward; returns what had been
    printed right after the first one (the acknowledgement must be there already)."""
    from dpft.app import loop as train_mod

    real, seen = train_mod._forward, {"n": 0, "printed": None}

    def forward(model, inputs):
        if model.training:
            seen["n"] += 1
            if seen["n"] == call:
                os.kill(os.getpid(), signal.SIGINT)
                seen["printed"] = capsys.readouterr().out
                for _ in range(times - 1):
                    os.kill(os.getpid(), signal.SIGINT)
        return real(model, inputs)

    monkeypatch.setattr(train_mod, "_forward", forward)
    return seen


@pytest.fixture(scope="module")
def whole_run(tiny, tmp_path_factory):
    """The uninterrupted run the interrupted ones must equal after --resume."""
    from dpft.app import cli

    out = tmp_path_factory.mktemp("whole") / "run"
    threads = torch.get_num_threads()
    try:
        assert cli.main(_args(tiny, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _same_run(a, b):
    sa, sb = (json.loads((x / "summary.json").read_text()) for x in (a, b))
    assert sa["steps"] == sb["steps"] and sa["epsilon"] == sb["epsilon"]
    assert sa["test_accuracy"] == sb["test_accuracy"]
    pa, pb = (torch.load(x / "checkpoint.pt", weights_only=False)["model"] for x in (a, b))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))


def test_ctrl_c_is_acknowledged_at_once_and_the_step_finished(tiny, whole_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    seen = _sigint_at(monkeypatch, capsys, call=5)
    code, stdout, err = run_cli(_args(tiny, out), capsys)
    assert code == 130, err
    assert "Ctrl-C: stopping after the current step" in seen["printed"]  # before the step went on
    assert "interrupted (Ctrl-C) after step 5" in stdout and "ε spent so far" in stdout
    assert "dpft train --out" in stdout and "--resume" in stdout
    assert _ckpt_step(out) == 5
    assert [r["step"] for r in read_metrics(out) if r["event"] == "step"][-1] == 5
    monkeypatch.undo()
    assert run_cli(["train", "--out", out, "--resume", "--no-progress"], capsys)[0] == 0
    _same_run(whole_run, out)


def test_second_ctrl_c_rolls_the_unfinished_step_back(tiny, whole_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _sigint_at(monkeypatch, capsys, call=5, times=2)  # both inside the forward of step 5
    code, stdout, err = run_cli(_args(tiny, out), capsys)
    assert code == 130, err
    assert "after step 4; the unfinished step was rolled back" in stdout and "ε spent so far" in stdout
    assert _ckpt_step(out) == 4  # the last finished step, not a half-applied one
    monkeypatch.undo()
    assert run_cli(["train", "--out", out, "--resume", "--no-progress"], capsys)[0] == 0
    _same_run(whole_run, out)


def test_stop_after_steps_reports_the_epsilon_spent(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(_args(tiny, out, "--stop-after-steps", "3"), capsys)
    assert code == 0 and "stopped after 3 steps" in stdout and "ε spent so far" in stdout


def test_stop_after_zero_steps_is_an_error(tiny, tmp_path, capsys):
    code, _, err = run_cli(_args(tiny, tmp_path / "r", "--stop-after-steps", "0"), capsys)
    assert code == 2 and "--stop-after-steps must be a positive integer" in one_line(err)


# ---------------------------------------------------------------------------
# periodic checkpoints


def test_periodic_checkpoints_are_on_by_default(tiny, tmp_path, capsys, monkeypatch):
    from dpft.app import loop as train_mod
    from dpft.app.train import TrainConfig, resolve

    r, _ = resolve(TrainConfig(), kind="text", device=torch.device("cpu"), n_train_total=10_000)
    assert r.checkpoint_minutes == 2.0 and r.checkpoint_every == 0
    saved = []
    real = train_mod.atomic_save
    monkeypatch.setattr(
        train_mod, "atomic_save", lambda obj, path, **k: (saved.append(obj["step"]), real(obj, path, **k))
    )
    # a clock that moves 200 s per reading: every step comes more than 2 minutes after the last checkpoint
    clock = {"t": 0.0}

    def now():
        clock["t"] += 200.0
        return clock["t"]

    monkeypatch.setattr(train_mod, "_now", now)
    assert run_cli(_args(tiny, tmp_path / "run"), capsys)[0] == 0
    assert saved == list(range(1, 13))
    saved.clear()
    assert run_cli(_args(tiny, tmp_path / "off", "--checkpoint-minutes", "0"), capsys)[0] == 0
    assert saved == [12]  # the epoch end only


# ---------------------------------------------------------------------------
# damaged checkpoints, folders that cannot be written


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_checkpoint_is_a_one_line_error(tiny, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert run_cli(_args(tiny, out, "--stop-after-steps", "2"), capsys)[0] == 0
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint\n"}[damage])
    code, _, err = run_cli(["train", "--out", out, "--resume"], capsys)
    line = one_line(err)
    assert code == 2 and "checkpoint.pt" in line and "Traceback" not in err
    assert ("empty" in line) if damage == "empty" else ("cannot be read" in line)


def test_damaged_config_is_a_one_line_error(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(_args(tiny, out, "--stop-after-steps", "2"), capsys)[0] == 0
    (out / "config.json").write_text("{ not json")
    code, _, err = run_cli(["train", "--out", out, "--resume"], capsys)
    assert code == 2 and "config.json cannot be read" in one_line(err)


def test_read_only_output_folder_is_a_one_line_error(tiny, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "readonly"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **k: False if str(p) == str(folder) else real_access(p, mode, **k)
    )
    code, _, err = run_cli(_args(tiny, folder / "run"), capsys)
    assert code == 2 and "cannot be written" in one_line(err) and str(folder) in err
    assert list(folder.iterdir()) == []


def test_write_error_during_a_run_names_the_cause(tiny, tmp_path, capsys, monkeypatch):
    """A folder that turns read-only mid-run (EACCES on the checkpoint) gives one line too."""
    from dpft import checkpoint

    real_open, count = checkpoint._open_temp, {"n": 0}

    def open_temp(path):
        count["n"] += 1
        if count["n"] > 1:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path)

    monkeypatch.setattr(checkpoint, "_open_temp", open_temp)
    code, _, err = run_cli(_args(tiny, tmp_path / "run"), capsys)
    line = one_line(err)
    assert code == 1 and "permission denied" in line and "no checkpoint of this run was written yet" in line
    assert "ε spent so far" in line and math.isfinite(float(line.split("ε spent so far ")[1].split(",")[0]))
