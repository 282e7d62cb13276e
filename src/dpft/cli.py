"""The ``dpft`` command: a thin argparse layer over :mod:`dpft.train` and :mod:`dpft.accounting`.

    dpft train                                   # DP-BiTFiT, MiniLM, Rotten Tomatoes, ε = 3
    dpft train --config job.yaml --epsilon 8     # a YAML/TOML file, flags override it
    dpft accountant --sigma 1.0 --sample-rate 0.01 --steps 1000 --delta 1e-5
    dpft accountant --epsilon 3 --batch-size 256 --sample-size 10000 --epochs 3
    dpft audit --epsilon 3 --batch-size 256 --sample-size 10000 --epochs 1   # one-run privacy audit

User errors (unknown method, bad value, missing data, an output directory that
holds another run) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from .offline import PACKAGED_DATASETS, DataUnavailable
from .train import (ACCOUNTANTS, CLIPPING_FNS, LR_SCHEDULES, METHODS, OPTIMIZERS, SPARTA_SELECTIONS,
                    ConfigError, TrainConfig)

__all__ = ["main", "build_parser", "load_config_file", "train_config_from_args"]

_FLOAT = {"epsilon", "delta", "lr", "head_lr", "max_grad_norm", "epochs", "dropout", "density",
          "scoring_epochs", "warmup_epochs"}
_INT = {"batch_size", "max_physical_batch_size", "max_seq_len", "validation_size", "lora_rank",
        "num_threads", "eval_every", "checkpoint_every", "stop_after_steps", "seed", "dp_seed"}
_BOOL = {"poisson", "bf16", "resume", "overwrite", "progress"}
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpft", description="Differentially private fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="{train,accountant,audit}", parser_class=_Parser)

    t = sub.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="fine-tune a model with DP (default: DP-BiTFiT on all-MiniLM-L6-v2, Rotten Tomatoes, ε=3)",
        description="Fine-tune a pretrained model with differential privacy. Defaults: the packaged "
                    "all-MiniLM-L6-v2, the packaged Rotten Tomatoes reviews, DP-BiTFiT, ε = 3, "
                    "offline. Every option can also be set in a --config YAML/TOML file; flags "
                    "override the file.")
    g = t.add_argument_group("what to train")
    g.add_argument("--config", metavar="FILE", help="YAML (.yaml/.yml) or TOML (.toml) file of options")
    g.add_argument("--model", help="'minilm' (packaged, default for text), 'cnn' (default for "
                                   "images, from scratch), 'cnn-fmnist' (a CNN pretrained on the public "
                                   "Fashion-MNIST, built once and cached), a timm name for images ('timm:NAME'), "
                                   "or a Hugging Face model name/path")
    g.add_argument("--dataset", help=f"{', '.join(PACKAGED_DATASETS)} (packaged), a CSV/JSONL "
                                     "file with text,label columns, or a Hugging Face dataset name")
    g.add_argument("--method", choices=METHODS, help="default bitfit (DP-BiTFiT: biases + head); "
                                                      "full for the built-in CNN (no pretrained weights)")
    g.add_argument("--lora-rank", type=int, help="LoRA rank (method lora; default 8)")
    g.add_argument("--density", type=float, help="SPARTA: fraction of the rows of each encoder "
                                                 "Linear weight to train (method sparta; default 0.2)")
    g.add_argument("--scoring-epochs", type=float,
                   help="SPARTA: epochs of the private row-scoring pass (default 1 on a GPU, 0.5 on a CPU)")
    g.add_argument("--warmup-epochs", type=float,
                   help="SPARTA: epochs of DP training of biases + head before scoring (default 0)")
    g.add_argument("--sparta-selection", choices=SPARTA_SELECTIONS,
                   help="SPARTA: how rows are selected: scores (default; the private scoring pass), or "
                        "the public baselines random / magnitude (no scoring pass: the whole ε goes to "
                        "training)")
    g = t.add_argument_group("privacy")
    g.add_argument("--epsilon", type=float, help="target ε (default 3)")
    g.add_argument("--delta", type=float, help="δ (default dpft.accounting.default_delta(N), "
                                               "at most 1/(10·N))")
    g.add_argument("--max-grad-norm", type=float, help="clipping threshold R (default 1.0)")
    g.add_argument("--clipping-fn", choices=CLIPPING_FNS, help="default abadi")
    g.add_argument("--clipping-mode", help="engine clipping mode (default auto)")
    g.add_argument("--accountant", choices=ACCOUNTANTS, help="default pld")
    g.add_argument("--poisson", action=argparse.BooleanOptionalAction,
                   help="Poisson sampling (default) or shuffled fixed-size batches")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float)
    g.add_argument("--batch-size", type=int, help="logical batch size (expected size under Poisson)")
    g.add_argument("--max-physical-batch-size", type=int, help="examples per forward/backward")
    g.add_argument("--lr", type=float, help="learning rate (bitfit default 3e-3)")
    g.add_argument("--head-lr", type=float, help="learning rate of the new classification head "
                                                 "(default 1e-2 for bitfit/lora; = --lr for full, last-layer)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="default adam")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="default constant")
    g.add_argument("--dropout", type=float, help="override every dropout probability (default 0 for "
                                                 "private methods, the model's own otherwise)")
    g.add_argument("--max-seq-len", type=int, help="tokens per text (default: 64 on a CPU, 128 on a GPU)")
    g.add_argument("--train-size", type=_positive_or_all, help="subsample the training set (N or 'all')")
    g.add_argument("--eval-size", type=_positive_or_all, help="subsample the test set (N or 'all')")
    g.add_argument("--validation-size", type=int,
                   help="hold out N training examples and evaluate on them instead of the test set "
                        "(for tuning)")
    g.add_argument("--seed", type=int, help="seed of the data subsample, head init and dropout "
                                            "(default 0; batches and noise use --dp-seed)")
    g.add_argument("--dp-seed", type=int,
                   help="seed of the Poisson sampling and the DP noise (default: OS entropy, kept in "
                        "checkpoint.pt for --resume). For reproducible tests only: ε assumes nobody "
                        "else knows it")
    g = t.add_argument_group("machine and output")
    g.add_argument("--device", help="auto (cuda if present), cpu, cuda[:N], mps")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bfloat16 autocast")
    g.add_argument("--num-threads", type=int, help="CPU threads for torch")
    g.add_argument("--out", metavar="DIR", help="output directory (default runs/<dataset>-<method>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (default: each epoch)")
    g.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default: each epoch)")
    g.add_argument("--stop-after-steps", type=int, help="stop after N steps, resumable with --resume")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bar (default on)")

    a = sub.add_parser(
        "accountant", help="ε for (σ, q, steps, δ), or σ for a target ε",
        description="Privacy accounting for the Poisson-subsampled Gaussian mechanism. Give "
                    "--sigma to get ε, or --epsilon to get σ. The sampling rate and steps come "
                    "from --sample-rate/--steps or from --batch-size/--sample-size/--epochs.")
    what = a.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma", "--noise-multiplier", dest="sigma", type=float, help="noise multiplier σ")
    what.add_argument("--epsilon", type=float, help="target ε: print the σ that reaches it")
    a.add_argument("--sample-rate", "-q", type=float, help="sampling rate q")
    a.add_argument("--steps", type=int, help="number of steps")
    a.add_argument("--batch-size", type=int, help="expected batch size B (q = B/N)")
    a.add_argument("--sample-size", type=int, help="dataset size N")
    a.add_argument("--epochs", type=float, help="epochs (steps = epochs · N/B)")
    a.add_argument("--delta", type=float,
                   help="δ (default with --sample-size: dpft.accounting.default_delta(N), below 1/(10·N))")
    a.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")

    from .audit import add_cli_parser as _add_audit_parser
    _add_audit_parser(sub)
    return parser


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


def train_config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < flags given on the command line."""
    given = {k: v for k, v in vars(ns).items() if k != "command"}
    merged: dict[str, Any] = {}
    if given.get("config"):
        merged.update(load_config_file(given["config"]))
    merged.update({k: v for k, v in given.items() if k != "config"})
    return TrainConfig(**merged)


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _cmd_train(ns: argparse.Namespace) -> int:
    from .train import train
    cfg = train_config_from_args(ns)
    result = train(cfg)
    return 0 if result is not None else 1


def _cmd_accountant(ns: argparse.Namespace) -> int:
    try:
        from . import accounting
    except ImportError as e:
        raise ConfigError(f"accounting is not available in this build: {e}") from e
    q, steps = ns.sample_rate, ns.steps
    if q is None or steps is None:
        if ns.batch_size is None or ns.sample_size is None:
            raise ConfigError("give --sample-rate and --steps, or --batch-size and --sample-size "
                              "(and --epochs or --steps)")
        if ns.batch_size <= 0 or ns.sample_size <= 0 or ns.batch_size > ns.sample_size:
            raise ConfigError("need 0 < --batch-size <= --sample-size")
        q = q if q is not None else ns.batch_size / ns.sample_size
        if steps is None:
            if ns.epochs is None:
                raise ConfigError("give --steps or --epochs")
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
    common = dict(sample_rate=q, steps=steps, delta=delta, accountant=ns.accountant)
    if ns.sigma is not None:
        if ns.sigma < 0:
            raise ConfigError(f"--sigma must be >= 0, got {ns.sigma!r}")
        eps = accounting.epsilon(noise_multiplier=ns.sigma, **common)
        print(f"ε = {eps:.4f}  (σ = {ns.sigma:g}, q = {q:.6g}, steps = {steps}, δ = {delta:.3g}, "
              f"{ns.accountant})")
    else:
        if ns.epsilon <= 0:
            raise ConfigError(f"--epsilon must be positive, got {ns.epsilon!r}")
        sigma = accounting.noise_multiplier(target_epsilon=ns.epsilon, **common)
        print(f"σ = {sigma:.4f}  (ε = {ns.epsilon:g}, q = {q:.6g}, steps = {steps}, δ = {delta:.3g}, "
              f"{ns.accountant})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # dp-accounting's RDP warns (through absl) about fractional orders it drops while
    # calibrating; dropping them only makes ε larger, so the warnings are noise here.
    logging.getLogger("absl").setLevel(logging.ERROR)
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        if ns.command == "train":
            return _cmd_train(ns)
        if ns.command == "audit":
            from .audit import run_cli as _cmd_audit
            return _cmd_audit(ns)
        return _cmd_accountant(ns)
    except (ConfigError, DataUnavailable) as e:
        print(f"dpft {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
