"""The release of a finished `dpft train` run, and predictions from it.

``dpft train`` ends by writing ``OUT/release/``, the part of a run that is meant
to leave the machine:

``model.safetensors``  every weight of the trained model (LoRA adapters merged in)
``dpft_model.json``    how to rebuild it: architecture, label names, input format
``config/``, ``tokenizer/``  the Hugging Face config and tokenizer (text models)
``privacy.json``       ε, δ, σ, steps, sampling rate, clipping, accountant, privacy unit
``README.md``          what is here, and what of the run is *not* here and why

What it leaves out: ``checkpoint.pt`` (the secret seed of the batch sampling
and the noise: with it the noise could be subtracted), ``metrics.jsonl`` and
``report.png`` (training loss and accuracy of each batch, computed on the
private data without noise), ``config.json`` (the secret seed when
``--dp-seed`` was given), and the evaluation accuracy (measured on data
that DP does not cover unless it is public).

:func:`load` rebuilds the model from the folder alone (no hub, no base
checkpoint) and :func:`predict_file` runs it on a CSV/JSONL file of texts or a
``.npy`` array of images; ``dpft predict --run OUT --input FILE`` is the command.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["RELEASE_DIR", "ReleaseError", "Released", "export", "load", "predict_file", "find_release"]

RELEASE_DIR = "release"
FORMAT = 1


class ReleaseError(ValueError):
    """A release folder or a prediction input that cannot be used (one-line message)."""


# ---------------------------------------------------------------------------
# Writing


def _architecture(model: nn.Module, source_model: str | None) -> dict[str, Any]:
    """How to rebuild ``model`` without its weights (see :func:`_rebuild`)."""
    from . import offline

    if isinstance(model, offline.PooledClassifier):
        return {"class": "pooled", "pooling": model.pooling}
    if isinstance(model, offline.SmallCNN):
        first = model.features[0]
        return {"class": "SmallCNN", "in_channels": first.in_channels, "width": first.out_channels}
    if isinstance(model, offline.FeatureCNN):
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        return {
            "class": "FeatureCNN",
            "in_channels": convs[0].in_channels,
            "widths": [c.out_channels for c in convs],
            "hidden": model.classifier.in_features,
        }
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        return {"class": "hf-sequence-classification"}
    if source_model and source_model.lower().startswith("timm:") or type(model).__module__.startswith("timm"):
        name = (
            source_model[len("timm:") :] if source_model and source_model.lower().startswith("timm:") else source_model
        )
        return {"class": "timm", "name": name, "in_channels": _in_channels(model)}
    raise ReleaseError(
        f"cannot describe a {type(model).__name__} for the release (rebuild it in your code "
        "and load model.safetensors into it)"
    )


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 1


def _plain_model(model: nn.Module) -> nn.Module:
    """The model without wrappers: DDP unwrapped, LoRA adapters merged into a copy."""
    model = getattr(model, "module", model)
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def export(
    out: str | os.PathLike,
    model: nn.Module,
    *,
    kind: str,
    label_names: Sequence[str],
    privacy: dict[str, Any],
    tokenizer: Any = None,
    max_seq_len: int | None = None,
    image_shape: Sequence[int] | None = None,
    source_model: str | None = None,
) -> Path:
    """Write ``out/release/`` (replacing an older one only once the new one is complete).

    ``privacy`` goes to privacy.json as given (the caller states ε, δ, σ, ...);
    nothing secret is passed here and nothing else of the run is copied.
    """
    from safetensors.torch import save_model

    out = Path(out)
    final = out / RELEASE_DIR
    plain = _plain_model(model)
    arch = _architecture(plain, source_model)
    meta = {
        "format": FORMAT,
        "kind": kind,
        "architecture": arch,
        "num_labels": len(label_names),
        "label_names": list(label_names),
        "max_seq_len": max_seq_len,
        "image_shape": list(image_shape) if image_shape is not None else None,
        "source_model": source_model,
    }
    from ..checkpoint import default_mode

    tmp = Path(tempfile.mkdtemp(prefix=f".{RELEASE_DIR}.", suffix=".tmp", dir=out))
    try:
        os.chmod(tmp, default_mode("dir"))  # meant to be shared: the usual permissions
        was_training = plain.training
        save_model(plain.eval(), str(tmp / "model.safetensors"))
        plain.train(was_training)
        if kind == "text":
            config = plain.config
            config.id2label = {i: str(n) for i, n in enumerate(label_names)}
            config.label2id = {str(n): i for i, n in enumerate(label_names)}
            config.save_pretrained(tmp / "config")
            tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "dpft_model.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "privacy.json").write_text(json.dumps(privacy, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(_readme(meta, privacy))
        for f in tmp.rglob("*"):
            os.chmod(f, default_mode("dir" if f.is_dir() else "file"))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _readme(meta: dict, privacy: dict) -> str:
    eps = privacy.get("epsilon")
    if privacy.get("private"):
        guarantee = (
            f"({eps:.3f}, {privacy.get('delta'):.3g})-differentially private with respect to one "
            f"{privacy.get('privacy_unit', 'training example')}"
        )
    else:
        guarantee = "NOT private: trained without differential privacy"
    return f"""# dpft release

A model fine-tuned by `dpft train` ({privacy.get("method")} on {privacy.get("dataset")}): {guarantee}.

| file | what |
| --- | --- |
| `model.safetensors` | all weights of the trained model |
| `dpft_model.json` | architecture, the {meta["num_labels"]} label names, the input format |
| `config/`, `tokenizer/` | Hugging Face config and tokenizer (text models) |
| `privacy.json` | ε, δ, σ, steps, sampling rate, clipping, accountant, privacy unit |

Predictions: `dpft predict --run THIS_FOLDER --input file.csv`, or
`dpft.app.release.load("THIS_FOLDER")` in Python.

What is safe to share: this folder. The DP guarantee covers the trained weights;
the label names come from the training data's label column (not protected by DP),
and privacy.json states the training-set size (under add/remove adjacency the
exact size is not protected). Not in this folder, and not to be shared like it:
the run's `checkpoint.pt` (the secret seed of the batch sampling and the noise),
`metrics.jsonl` and `report.png` (per-batch training loss and accuracy, computed
on the private data without noise), `config.json` (holds the secret seed when
`--dp-seed` was given), and accuracies measured on private evaluation data.
"""


# ---------------------------------------------------------------------------
# Reading


@dataclass
class Released:
    """A loaded release: the model (eval mode), its label names and input format."""

    model: nn.Module
    kind: str
    label_names: list[str]
    meta: dict[str, Any]
    privacy: dict[str, Any]
    tokenizer: Any = None

    @torch.no_grad()
    def predict_proba(self, inputs: Sequence[str] | np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Class probabilities, shape (N, num_labels)."""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            if self.kind == "text":
                enc = self.tokenizer(
                    [str(t) for t in chunk],
                    padding=True,
                    truncation=True,
                    max_length=self.meta.get("max_seq_len") or 512,
                    return_tensors="pt",
                )
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                logits = self.model(**enc).logits
            else:
                logits = self.model(torch.as_tensor(np.asarray(chunk), dtype=torch.float32, device=device))
            out.append(torch.softmax(logits.float(), -1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), np.float32)


def find_release(path: str | os.PathLike) -> Path:
    """The release folder of a run folder (``RUN/release``), or ``path`` itself if it is one."""
    path = Path(path)
    for cand in (path, path / RELEASE_DIR):
        if (cand / "dpft_model.json").is_file():
            return cand
    if (path / "config.json").is_file() and (path / "checkpoint.pt").is_file():
        raise ReleaseError(
            f"{path} holds a dpft run without a release folder: it did not finish "
            f"(continue it with dpft train --out {path} --resume)"
        )
    raise ReleaseError(f"{path} is neither a dpft run folder with a release/ nor a release folder")


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Released:
    """Rebuild the released model from its folder alone (offline) and load its weights."""
    from safetensors.torch import load_model

    root = find_release(path)
    try:
        meta = json.loads((root / "dpft_model.json").read_text())
        privacy = json.loads((root / "privacy.json").read_text()) if (root / "privacy.json").is_file() else {}
    except ValueError as e:
        raise ReleaseError(f"{root}/dpft_model.json cannot be read: {e}") from e
    if meta.get("format") != FORMAT:
        raise ReleaseError(f"{root} has release format {meta.get('format')!r}; this dpft reads {FORMAT}")
    model, tokenizer = _rebuild(root, meta)
    try:
        load_model(model, str(root / "model.safetensors"), strict=True)
    except Exception as e:  # noqa: BLE001 - missing file, torn file, shape mismatch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReleaseError(f"{root}/model.safetensors cannot be loaded: {first}") from e
    model.to(device).eval()
    return Released(model, meta["kind"], list(meta["label_names"]), meta, privacy, tokenizer)


def _rebuild(root: Path, meta: dict) -> tuple[nn.Module, Any]:
    """The architecture of ``dpft_model.json`` with fresh weights (the caller loads the real ones)."""
    from . import offline

    arch, n = meta["architecture"], meta["num_labels"]
    cls = arch["class"]
    with torch.random.fork_rng(devices=[]):
        if cls in ("pooled", "hf-sequence-classification"):
            from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
            config = AutoConfig.from_pretrained(root / "config", local_files_only=True)
            if cls == "pooled":
                try:
                    encoder = AutoModel.from_config(config, add_pooling_layer=False)
                except TypeError:
                    encoder = AutoModel.from_config(config)
                return offline.PooledClassifier(encoder, n, arch["pooling"]), tokenizer
            return AutoModelForSequenceClassification.from_config(config), tokenizer
        if cls == "SmallCNN":
            return offline.SmallCNN(n, arch["in_channels"], arch["width"]), None
        if cls == "FeatureCNN":
            return offline.FeatureCNN(n, arch["in_channels"], tuple(arch["widths"]), arch["hidden"]), None
        if cls == "timm":
            import timm
            from torch.nn.modules.batchnorm import _BatchNorm

            model = timm.create_model(arch["name"], pretrained=False, num_classes=n, in_chans=arch["in_channels"])
            if any(isinstance(m, _BatchNorm) for m in model.modules()):
                from ..batchnorm import convert_batchnorm_to_groupnorm

                model = convert_batchnorm_to_groupnorm(model)
            return model, None
    raise ReleaseError(f"{root}: unknown architecture {cls!r}")


# ---------------------------------------------------------------------------
# Predictions


def _read_texts(path: Path, text_column: str | None) -> tuple[list[str], list[Any] | None]:
    from . import offline

    df = offline.read_table(path)
    if text_column is not None:
        if text_column not in df.columns:
            raise ReleaseError(
                f"--text-column {text_column!r} is not a column of {path} (columns: {', '.join(map(str, df.columns))})"
            )
        col = text_column
    else:
        col = next((c for c in offline.TEXT_COLUMNS if c in df.columns), None)
        if col is None and len(df.columns) == 1:
            col = df.columns[0]
        if col is None:
            raise ReleaseError(
                f"{path} has no text column (looked for {', '.join(offline.TEXT_COLUMNS)}); "
                f"name it with --text-column (columns: {', '.join(map(str, df.columns))})"
            )
    labels = None
    lcol = next((c for c in offline.LABEL_COLUMNS if c in df.columns and c != col), None)
    if lcol is not None:
        labels = list(df[lcol])
    return ["" if (isinstance(t, float) and math.isnan(t)) else str(t) for t in df[col]], labels


def _read_images(path: Path, meta: dict) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ReleaseError(f"cannot read {path} as a .npy array of images: {e}") from e
    shape = meta.get("image_shape")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or (shape and tuple(x.shape[1:]) != tuple(shape)):
        raise ReleaseError(
            f"{path}: expected images of shape (N, {', '.join(map(str, shape or ['C', 'H', 'W']))}), got {x.shape}"
        )
    x = x.astype(np.float32)
    if x.max(initial=0.0) > 1.0:  # 0..255 pixels, as the training data were scaled to [0, 1]
        x = x / 255.0
    return x


def predict_file(
    release: Released,
    input_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    text_column: str | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Predict every row of ``input_path``; write a CSV (``output``, or stdout) with the
    predicted label, its probability and one probability column per label.

    Returns ``{"rows": N, "accuracy": ...}`` (accuracy when the input has a ``label`` column
    whose values are label names or indices of this model)."""
    path = Path(input_path)
    if not path.is_file():
        raise ReleaseError(f"--input {path}: no such file")
    labels = None
    if release.kind == "text":
        texts, labels = _read_texts(path, text_column)
        probs = release.predict_proba(texts, batch_size)
    else:
        if path.suffix.lower() != ".npy":
            raise ReleaseError(f"--input {path}: an image model reads a .npy array (N, C, H, W)")
        texts = None
        probs = release.predict_proba(_read_images(path, release.meta), batch_size)
    names = release.label_names
    pred = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow((["text"] if texts is not None else ["row"]) + ["label", "probability"] + [f"p_{n}" for n in names])
    for i in range(len(probs)):
        first = texts[i] if texts is not None else i
        w.writerow([first, names[pred[i]], f"{probs[i, pred[i]]:.6f}"] + [f"{p:.6f}" for p in probs[i]])
    if output is None:
        sys.stdout.write(buf.getvalue())
    else:
        Path(output).write_text(buf.getvalue())
    result: dict[str, Any] = {"rows": int(len(probs))}
    if labels is not None and len(labels):
        index = {str(n): i for i, n in enumerate(names)}
        truth = [index.get(str(v)) for v in labels]
        if all(t is None for t in truth):  # integer labels of a model whose labels have names
            truth = [int(v) if isinstance(v, (int, np.integer)) and 0 <= v < len(names) else None for v in labels]
        known = [(t, p) for t, p in zip(truth, pred) if t is not None]
        if known:
            result["accuracy"] = float(np.mean([t == p for t, p in known]))
            result["labelled_rows"] = len(known)
    return result
