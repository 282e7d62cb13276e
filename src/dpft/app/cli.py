"""The ``dpft`` command: a thin argparse layer over :mod:`dpft.app.train` and :mod:`dpft.accounting`.

    dpft train                                   # DP-BiTFiT, MiniLM, Rotten Tomatoes, ε = 3
    dpft train --config job.yaml --epsilon 8     # a YAML/TOML file, flags override it
    dpft accountant --sigma 1.0 --sample-rate 0.01 --steps 1000 --delta 1e-5
    dpft accountant --epsilon 3 --batch-size 256 --sample-size 10000 --epochs 3
    dpft audit --epsilon 3 --batch-size 256 --sample-size 10000 --epochs 1   # one-run privacy audit
    dpft predict --run runs/my-run --input new.csv                       # labels from a finished run

User errors (unknown method, bad value, missing data, an output directory that
holds another run) print one line and exit with code 2; a run that stops on a
fault (NaN loss, full disk) prints one line with its last checkpoint and the ε
spent, exit code 1; Ctrl-C exits with code 130 after a checkpoint.

Nothing heavy (torch, pandas) is imported until a command runs, so ``--help``
answers at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .choices import (
    ACCOUNTANTS,
    CLIPPING_FNS,
    CLIPPING_MODES,
    CLIPPING_STYLES,
    LR_SCHEDULES,
    MAX_EPSILON,
    METHODS,
    MIN_EPSILON,
    OPTIMIZERS,
    SPARTA_SELECTIONS,
)
from .errors import ConfigError, DataUnavailable, RunFailed

if TYPE_CHECKING:  # pragma: no cover
    from .train import TrainConfig

__all__ = ["main", "build_parser", "load_config_file", "train_config_from_args"]

_FLOAT = {
    "epsilon",
    "delta",
    "lr",
    "head_lr",
    "max_grad_norm",
    "epochs",
    "dropout",
    "density",
    "scoring_epochs",
    "warmup_epochs",
    "checkpoint_minutes",
}
_INT = {
    "batch_size",
    "max_physical_batch_size",
    "max_seq_len",
    "validation_size",
    "lora_rank",
    "num_threads",
    "eval_every",
    "checkpoint_every",
    "stop_after_steps",
    "seed",
    "dp_seed",
}
_BOOL = {"poisson", "bf16", "gradient_checkpointing", "resume", "overwrite", "progress"}
_SIZE = {"train_size", "eval_size"}  # int or "all"


def _positive_or_all(s: str):
    if s.lower() == "all":
        return "all"
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {s!r}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse's convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _version() -> str:
    from .. import __version__

    return f"dpft {__version__}"


def build_parser(audit: bool = True) -> argparse.ArgumentParser:
    """The ``dpft`` parser. ``audit=False`` puts a placeholder for ``dpft audit`` (whose
    options need torch to build) so that the other commands' ``--help`` stays instant."""
    parser = _Parser(prog="dpft", description="Differentially private fine-tuning.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="{train,predict,accountant,audit}", parser_class=_Parser)
    _add_train_parser(sub)
    _add_predict_parser(sub)
    _add_accountant_parser(sub)
    if audit:
        from ..audit import add_cli_parser as _add_audit_parser

        a = _add_audit_parser(sub)
        _alias(a, "--mode", "--method")  # the same word as `dpft train --method`
    else:
        sub.add_parser("audit", help="empirical ε lower bound of your engine settings (one-run audit)", add_help=False)
    return parser


def _alias(parser: argparse.ArgumentParser | None, existing: str, alias: str) -> None:
    """Let ``alias`` stand for the option ``existing`` of ``parser``."""
    if parser is None or alias in parser._option_string_actions:
        return
    action = parser._option_string_actions.get(existing)
    if action is not None:
        action.option_strings.append(alias)
        parser._option_string_actions[alias] = action


def _add_train_parser(sub) -> None:
    t = sub.add_parser(
        "train",
        argument_default=argparse.SUPPRESS,
        help="fine-tune a model with DP (default: DP-BiTFiT on all-MiniLM-L6-v2, Rotten Tomatoes, ε=3)",
        description="Fine-tune a pretrained model with differential privacy. Defaults: the packaged "
        "all-MiniLM-L6-v2, the packaged Rotten Tomatoes reviews, DP-BiTFiT, ε = 3, "
        "offline. Defaults that depend on the machine or the data size are chosen at the "
        "start and printed as notes. Every option can also be set in a --config YAML/TOML "
        "file; flags override the file.",
    )
    g = t.add_argument_group("what to train")
    g.add_argument("--config", metavar="FILE", help="YAML (.yaml/.yml) or TOML (.toml) file of options")
    g.add_argument(
        "--model",
        help="'minilm' (packaged, default for text), 'cnn' (default for "
        "images, from scratch), 'cnn-fmnist' (a CNN pretrained on the public "
        "Fashion-MNIST, built once and cached), a timm name for images ('timm:NAME'), "
        "or a Hugging Face model name/path",
    )
    g.add_argument(
        "--dataset",
        help="rotten-tomatoes (default) and mnist (from pip packages), fashion-mnist (from "
        "the Debian package dataset-fashion-mnist), "
        "a CSV/TSV/JSONL file with a text and a label column (20%% of it is held "
        "out for evaluation unless --test-file is given), or a Hugging Face "
        "dataset name",
    )
    g.add_argument(
        "--test-file", metavar="FILE", help="evaluation file for a CSV/JSONL --dataset (then all of --dataset trains)"
    )
    g.add_argument(
        "--text-column",
        metavar="NAME",
        help="text column of a CSV/JSONL/HF dataset (default: the first of text, sentence, content, review, document)",
    )
    g.add_argument(
        "--label-column",
        metavar="NAME",
        help="label column (default: label or labels); integer or string labels, one class per distinct value",
    )
    g.add_argument(
        "--user-column",
        metavar="NAME",
        help="with --privacy-unit user: the column naming each "
        "example's user (CSV/JSONL/HF dataset; the packaged "
        "rotten-tomatoes data: movie_name, the default there)",
    )
    g.add_argument(
        "--method",
        choices=METHODS,
        help="default bitfit (DP-BiTFiT: biases + head); full for the built-in CNN (no pretrained weights)",
    )
    g.add_argument("--lora-rank", type=int, help="LoRA rank (method lora; default 8)")
    g.add_argument(
        "--density",
        type=float,
        help="SPARTA: fraction of the rows of each encoder Linear weight to train (method sparta; default 0.2)",
    )
    g.add_argument(
        "--scoring-epochs",
        type=float,
        help="SPARTA: epochs of the private row-scoring pass (default 1 on a GPU, 0.5 on a CPU)",
    )
    g.add_argument(
        "--warmup-epochs", type=float, help="SPARTA: epochs of DP training of biases + head before scoring (default 0)"
    )
    g.add_argument(
        "--sparta-selection",
        choices=SPARTA_SELECTIONS,
        help="SPARTA: how rows are selected: scores (default; the private scoring pass), or "
        "the public baselines random / magnitude (no scoring pass: the whole ε goes to "
        "training)",
    )
    g = t.add_argument_group("privacy")
    g.add_argument("--epsilon", type=float, help=f"target ε (default 3; {MIN_EPSILON:g} to {MAX_EPSILON:g})")
    g.add_argument("--delta", type=float, help="δ (default dpft.accounting.default_delta(N), at most 1/(10·N))")
    g.add_argument(
        "--max-grad-norm",
        type=float,
        help="clipping threshold R (default 1.0; 4.0 for --method full on a CPU text job)",
    )
    g.add_argument("--clipping-fn", choices=CLIPPING_FNS, help="default abadi")
    g.add_argument(
        "--clipping-mode",
        choices=CLIPPING_MODES,
        help="how per-example norms are computed (default auto: the fastest per layer)",
    )
    g.add_argument(
        "--clipping-style",
        choices=CLIPPING_STYLES,
        help="all-layer: one clipping group; separate-head: the new classification head and the "
        "rest are clipped as two groups, each to R/√2, so that the head keeps its share "
        "(default for full, lora, sparta; all-layer otherwise)",
    )
    g.add_argument("--accountant", choices=ACCOUNTANTS, help="default pld")
    g.add_argument(
        "--privacy-unit",
        choices=("example", "user"),
        help="what ε protects: one training example (default), or all the examples of one user "
        "(--user-column): users are Poisson-sampled, each user's examples in a step summed "
        "and clipped together; --batch-size then counts users",
    )
    g.add_argument(
        "--poisson",
        action=argparse.BooleanOptionalAction,
        help="Poisson sampling (default) or shuffled fixed-size batches",
    )
    g = t.add_argument_group(
        "optimisation (defaults depend on the method, the data and the machine; the chosen values are printed)"
    )
    g.add_argument(
        "--epochs",
        type=float,
        help="passes over the training set (text: 1 on a CPU, 3 on a GPU; "
        "images: 10; raised for a small training set to reach "
        "60 steps)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        help="logical batch size, the expected size under Poisson "
        "sampling (text: 128 on a CPU, 512 on a GPU; images: 256; "
        "non-private: 32 / 64; smaller for a small training set)",
    )
    g.add_argument(
        "--max-physical-batch-size",
        type=int,
        help="examples per forward/backward (text: 64 on a CPU, 256 on a GPU; images: 256)",
    )
    g.add_argument(
        "--lr",
        type=float,
        help="learning rate of Adam (per method and machine, e.g. bitfit 3e-3; printed at the start)",
    )
    g.add_argument(
        "--head-lr",
        type=float,
        help="learning rate of the new classification head (default 1e-2 for most text methods; else = --lr)",
    )
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="default adam")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="default constant")
    g.add_argument(
        "--dropout",
        type=float,
        help="override every dropout probability (default 0 for private methods, the model's own otherwise)",
    )
    g.add_argument("--max-seq-len", type=int, help="tokens per text (default: 64 on a CPU, 128 on a GPU)")
    g.add_argument(
        "--train-size",
        type=_positive_or_all,
        help="subsample the training set (N or 'all'; default all, at most 10,000 for text on a CPU)",
    )
    g.add_argument("--eval-size", type=_positive_or_all, help="subsample the test set (N or 'all'; default all)")
    g.add_argument(
        "--validation-size",
        type=int,
        help="hold out N training examples and evaluate on them instead of the test set (for tuning)",
    )
    g.add_argument(
        "--seed",
        type=int,
        help="seed of the data subsample, head init and dropout (default 0; batches and noise use --dp-seed)",
    )
    g.add_argument(
        "--dp-seed",
        type=int,
        help="seed of the Poisson sampling and the DP noise (default: OS entropy, kept in "
        "checkpoint.pt for --resume). For reproducible tests only: ε assumes nobody "
        "else knows it",
    )
    g = t.add_argument_group("machine and output")
    g.add_argument("--device", help="auto (default: cuda if present), cpu, cuda[:N], mps")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bfloat16 autocast (default off)")
    g.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="activation checkpointing of a Hugging Face model (non-reentrant; default off): "
        "less memory, one more forward per step (DP full: two-pass clipping, a second backward "
        "and recomputation, to hold no more than non-private training); exact under dpft",
    )
    g.add_argument("--num-threads", type=int, help="CPU threads for torch (default: torch's)")
    g.add_argument("--out", metavar="DIR", help="output directory (default runs/<dataset>-<method>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument(
        "--eval-every",
        type=int,
        help="progress evaluation every N steps on a 512-example subset "
        "(default: 8 per run, plus each epoch end; 0: only at "
        "epoch ends)",
    )
    g.add_argument(
        "--checkpoint-every", type=int, help="also checkpoint every N steps (default 0: by time and at epoch ends only)"
    )
    g.add_argument(
        "--checkpoint-minutes",
        type=float,
        help="checkpoint when this many minutes have passed "
        "since the last one (default 2; 0: off); always "
        "at epoch ends, Ctrl-C and faults",
    )
    g.add_argument(
        "--stop-after-steps",
        type=int,
        help="stop after N steps (N > 0), checkpointed and resumable with --resume (default: no limit)",
    )
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar (default on)")


def _add_predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="label new data with the model of a finished run (its release/ folder)",
        description="Load the released model of a finished `dpft train` run (OUT/release, which holds no "
        "secrets) and write one row per input: the predicted label, its probability and the "
        "probability of every label. Text models read a CSV/TSV/JSON/JSONL file with a text "
        "column; image models a .npy array (N, C, H, W).",
    )
    p.add_argument("--run", required=True, metavar="DIR", help="the run folder (or its release/ folder)")
    p.add_argument("--input", required=True, metavar="FILE", help="the data to label")
    p.add_argument("--output", metavar="FILE", help="CSV file to write (default: standard output)")
    p.add_argument("--text-column", metavar="NAME", help="text column of --input (default: text, sentence, ...)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default 64)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda[:N], mps")


def _add_accountant_parser(sub) -> None:
    a = sub.add_parser(
        "accountant",
        help="ε for (σ, q, steps, δ), or σ for a target ε",
        description="Privacy accounting for the Poisson-subsampled Gaussian mechanism. Give "
        "--sigma to get ε, or --epsilon to get σ. The sampling rate and steps come "
        "from --sample-rate/--steps or from --batch-size/--sample-size/--epochs.",
    )
    what = a.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma", "--noise-multiplier", dest="sigma", type=float, help="noise multiplier σ")
    what.add_argument(
        "--epsilon", type=float, help=f"target ε ({MIN_EPSILON:g} to {MAX_EPSILON:g}): print the σ that reaches it"
    )
    a.add_argument("--sample-rate", "-q", type=float, help="sampling rate q")
    a.add_argument("--steps", type=int, help="number of steps")
    a.add_argument("--batch-size", type=int, help="expected batch size B (q = B/N)")
    a.add_argument("--sample-size", type=int, help="dataset size N")
    a.add_argument("--epochs", type=float, help="epochs (steps = epochs · N/B)")
    a.add_argument(
        "--delta", type=float, help="δ (default with --sample-size: dpft.accounting.default_delta(N), below 1/(10·N))"
    )
    a.add_argument("--accountant", choices=ACCOUNTANTS, default="pld", help="default pld")


# ---------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML options file into TrainConfig field names (dashes → underscores).

    The file is a flat mapping of option names, or has them under a ``train`` table.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise ConfigError("YAML config files need PyYAML: pip install pyyaml") from e
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"--config {path}: use a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - parse errors of either library
        raise ConfigError(f"--config {path}: cannot parse: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of options, got {type(data).__name__}")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    from .train import TrainConfig

    fields = set(TrainConfig.field_names()) - {"config"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        out[name] = _coerce(name, value, f"--config {path}: option {key!r}")
    return out


def _coerce(name: str, value: Any, where: str) -> Any:
    if value is None:
        return None
    try:
        if name in _BOOL:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.lower() in ("true", "yes", "on", "1")
            raise ValueError
        if name in _FLOAT:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if name in _INT:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if name in _SIZE:
            return _positive_or_all(str(value))
        return str(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"{where}: bad value {value!r}") from None


def train_config_from_args(ns: argparse.Namespace) -> "TrainConfig":
    """Defaults < --config file < flags given on the command line."""
    given = {k: v for k, v in vars(ns).items() if k != "command"}
    merged: dict[str, Any] = {}
    if given.get("config"):
        merged.update(load_config_file(given["config"]))
    merged.update({k: v for k, v in given.items() if k != "config"})
    from .train import TrainConfig

    return TrainConfig(**merged)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _cmd_train(ns: argparse.Namespace) -> int:
    """0: finished or stopped by --stop-after-steps; 130: Ctrl-C (checkpointed); faults raise RunFailed."""
    cfg = train_config_from_args(ns)
    from .train import train

    result = train(cfg)
    if result is None:
        return 1
    return 130 if result.get("status") == "interrupted" else 0


def _cmd_predict(ns: argparse.Namespace) -> int:
    from . import release

    if ns.batch_size <= 0:
        raise ConfigError(f"--batch-size must be a positive integer, got {ns.batch_size!r}")
    try:
        model = release.load(ns.run, device=ns.device)
        result = release.predict_file(model, ns.input, ns.output, text_column=ns.text_column, batch_size=ns.batch_size)
    except release.ReleaseError as e:
        raise ConfigError(str(e)) from e
    done = f"dpft predict: {result['rows']:,} rows labelled" + (f", written to {ns.output}" if ns.output else "")
    if "accuracy" in result:
        done += f"; accuracy on the {result['labelled_rows']:,} rows with a known label: {result['accuracy']:.4f}"
    print(done, file=sys.stderr)
    return 0


def _finite_positive(value: float | None, flag: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{flag} must be a finite number > 0, got {value!r}")


def _accountant_inputs(ns: argparse.Namespace) -> tuple[float, int, float]:
    """(q, steps, δ) from the flags, each checked with a one-line error."""
    from .. import accounting

    for value, flag in ((ns.sample_rate, "--sample-rate"), (ns.epochs, "--epochs"), (ns.delta, "--delta")):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value!r}")
    q, steps = ns.sample_rate, ns.steps
    if q is None or steps is None:
        if ns.batch_size is None or ns.sample_size is None:
            raise ConfigError(
                "give --sample-rate and --steps, or --batch-size and --sample-size (and --epochs or --steps)"
            )
        if ns.batch_size <= 0 or ns.sample_size <= 0 or ns.batch_size > ns.sample_size:
            raise ConfigError("need 0 < --batch-size <= --sample-size")
        q = q if q is not None else ns.batch_size / ns.sample_size
        if steps is None:
            if ns.epochs is None:
                raise ConfigError("give --steps or --epochs")
            _finite_positive(ns.epochs, "--epochs")
            steps = max(1, math.ceil(ns.epochs * math.ceil(ns.sample_size / ns.batch_size)))
    if not 0 < q <= 1:
        raise ConfigError(f"--sample-rate must be in (0, 1], got {q!r}")
    if steps <= 0:
        raise ConfigError(f"--steps must be positive, got {steps!r}")
    delta = ns.delta
    if delta is None:
        if ns.sample_size is None:
            raise ConfigError("give --delta (or --sample-size for the default δ)")
        delta = accounting.default_delta(ns.sample_size)
    if not 0 < delta < 1:
        raise ConfigError(f"--delta must be in (0, 1), got {delta!r}")
    return q, steps, delta


def _cmd_accountant(ns: argparse.Namespace) -> int:
    if ns.epsilon is not None:  # checked before the accountant is even imported
        _finite_positive(ns.epsilon, "--epsilon")
        if ns.epsilon > MAX_EPSILON:
            raise ConfigError(
                f"--epsilon {ns.epsilon:g} is above {MAX_EPSILON:g}: no meaningful guarantee, and "
                "calibrating σ for it takes minutes (for no privacy, σ = 0)"
            )
        if ns.epsilon < MIN_EPSILON:
            raise ConfigError(
                f"--epsilon {ns.epsilon:g} is below {MIN_EPSILON:g}: the accountant cannot resolve an ε that small"
            )
    if ns.sigma is not None and not (math.isfinite(ns.sigma) and ns.sigma >= 0):
        raise ConfigError(f"--sigma must be a finite number >= 0, got {ns.sigma!r}")
    from .. import accounting

    q, steps, delta = _accountant_inputs(ns)
    common = dict(sample_rate=q, steps=steps, delta=delta, accountant=ns.accountant)
    try:
        if ns.sigma is not None:
            eps = accounting.epsilon(noise_multiplier=ns.sigma, **common)
            print(f"ε = {eps:.4f}  (σ = {ns.sigma:g}, q = {q:.6g}, steps = {steps}, δ = {delta:.3g}, {ns.accountant})")
        else:
            sigma = accounting.noise_multiplier(target_epsilon=ns.epsilon, **common)
            print(
                f"σ = {sigma:.4f}  (ε = {ns.epsilon:g}, q = {q:.6g}, steps = {steps}, δ = {delta:.3g}, {ns.accountant})"
            )
    except (ValueError, RuntimeError, OverflowError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = f"ε = {ns.epsilon:g}" if ns.sigma is None else f"σ = {ns.sigma:g}"
        raise ConfigError(
            f"cannot compute the accounting for {what} (q = {q:.6g}, steps = {steps}, δ = {delta:.3g}): {first}"
        ) from e
    return 0


def silence_accounting_logs() -> None:
    """dp-accounting's RDP warns (through absl) about fractional orders it drops while
    calibrating; dropping them only makes ε larger, so the warnings are noise here."""
    logging.getLogger("absl").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    silence_accounting_logs()
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(audit=bool(args) and args[0] == "audit")
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        if ns.command == "train":
            return _cmd_train(ns)
        if ns.command == "predict":
            return _cmd_predict(ns)
        if ns.command == "audit":
            from ..audit import run_cli as _cmd_audit

            return _cmd_audit(ns)
        return _cmd_accountant(ns)
    except (ConfigError, DataUnavailable) as e:
        print(f"dpft {ns.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"dpft {ns.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dpft: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
