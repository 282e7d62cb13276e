"""SPARTA (Makni et al. 2025): sparse DP fine-tuning of selected weight rows.

:func:`restrict` marks which rows of which weights train; the engine then
computes per-example norms and clipped sums from the selected rows only,
adds noise only to them, and keeps the other rows unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..rows import RowMask
from ..rules.linear import is_hf_conv1d

ATTR = "_dpft_rows"


def row_dim(module: nn.Module, local_name: str) -> int:
    """The dimension of ``module.<local_name>`` that indexes output features."""
    return 1 if is_hf_conv1d(module) and local_name == "weight" else 0


def restrict(model: nn.Module, masks: Mapping[str, Tensor]) -> list[str]:
    """Train only the rows selected by ``masks`` (parameter name -> bool mask
    over its rows) of the listed weights; sets ``requires_grad=True`` on them.

    Call before creating the :class:`dpft.PrivacyEngine`.  Rows are dim 0
    (output features / channels / vocabulary entries), except for
    transformers' ``Conv1D`` weights (stored (in, out)): dim 1.  Returns the
    names restricted."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    done = []
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"restrict: no parameter named {name!r} in the model")
        p = params[name]
        mod_name, _, local = name.rpartition(".")
        dim = row_dim(modules[mod_name], local)
        m = torch.as_tensor(mask)
        if m.dtype != torch.bool:
            raise ValueError(f"restrict: mask for {name!r} must be boolean, got {m.dtype}")
        if p.ndim == 0 or tuple(m.shape) != (p.shape[dim],):
            raise ValueError(
                f"restrict: mask for {name!r} must have shape ({p.shape[dim] if p.ndim else 0},) "
                f"(rows along dim {dim} of shape {tuple(p.shape)}), got {tuple(m.shape)}"
            )
        p.requires_grad_(True)
        setattr(p, ATTR, RowMask(m.to(p.device), dim))
        done.append(name)
    return done


def unrestrict(model: nn.Module) -> None:
    """Remove all row restrictions (the parameters stay trainable)."""
    for p in model.parameters():
        if hasattr(p, ATTR):
            delattr(p, ATTR)


def row_masks(params: Mapping[str, nn.Parameter]) -> dict[str, RowMask]:
    """The row masks of the given parameters (those restricted)."""
    return {n: getattr(p, ATTR) for n, p in params.items() if hasattr(p, ATTR)}


# ---------------------------------------------------------------------------
# The full method: warm-up, private scoring, selection, sparse training.

import math  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

from .. import accounting  # noqa: E402
from ..data import split_physical  # noqa: E402


def default_candidates(model: nn.Module) -> list[str]:
    """Weights of Linear, Conv and transformers Conv1D layers (rows = output features)."""
    from ..rules.conv import CONV_TYPES

    out = []
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, *CONV_TYPES)) or is_hf_conv1d(m):
            w = m._parameters.get("weight")
            if w is not None and w.ndim >= 2:
                out.append(f"{mname}.weight" if mname else "weight")
    canonical = {n for n, _ in model.named_parameters()}
    return [n for n in out if n in canonical]  # tied weights: one name


class Sparta:
    """SPARTA as one object with one privacy ledger::

        sp = Sparta(model, batch_size=256, sample_size=N, target_epsilon=3.0,
                    train_epochs=3, density=0.2, always_train=["classifier"])
        sp.warmup(optimizer)                 # optional (warmup_epochs > 0): biases + head
        ...train warm-up...
        sp.score(poisson_batches, loss_fn)   # private row scores (one pass)
        sp.select()                          # top `density` rows per layer (post-processing)
        engine = sp.train(lambda ps: torch.optim.AdamW(ps, lr=1e-3))
        ...train...

    The noise multiplier is calibrated once for warm-up + scoring + training
    steps at the same sampling rate; ``epsilon`` is the total.

    Args:
        candidates: weight names whose rows may be selected (default: every
            Linear / Conv / Conv1D weight except those in ``always_train``).
        always_train: names or prefixes trained in full in every phase
            besides biases (e.g. the classification head).
        density: fraction of rows kept per layer (or overall with ``global_selection``).
        squared: score rows by the sum of squared accumulated values instead of the sum.
        noise_multiplier: use this sigma instead of calibrating one to ``target_epsilon``
            (the budget still stops training at ``target_epsilon``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        sample_size: int,
        target_epsilon: float,
        train_epochs: float,
        scoring_epochs: float = 1.0,
        warmup_epochs: float = 0.0,
        density: float = 0.2,
        candidates: Sequence[str] | None = None,
        always_train: Sequence[str] = (),
        squared: bool = False,
        global_selection: bool = False,
        target_delta: float | None = None,
        accountant: str = "pld",
        noise_multiplier: float | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        if train_epochs <= 0 or scoring_epochs <= 0 or warmup_epochs < 0:
            raise ValueError(
                f"epochs must be positive (warmup_epochs may be 0), got train_epochs={train_epochs!r}, "
                f"scoring_epochs={scoring_epochs!r}, warmup_epochs={warmup_epochs!r}"
            )
        self.model = model
        self.always_train = tuple(always_train)
        names = candidates if candidates is not None else default_candidates(model)
        self.candidates = [n for n in names if not self._always(n)]
        if not self.candidates:
            raise ValueError("no candidate weights to select rows from")
        per_epoch = math.ceil(sample_size / batch_size)
        self.steps = {
            "warmup": int(math.ceil(warmup_epochs * per_epoch)),
            "scoring": int(math.ceil(scoring_epochs * per_epoch)),
            "train": int(math.ceil(train_epochs * per_epoch)),
        }
        self.batch_size, self.sample_size = batch_size, sample_size
        self.density, self.squared, self.global_selection = density, squared, global_selection
        self.target_epsilon = float(target_epsilon)
        self.target_delta = accounting.default_delta(sample_size) if target_delta is None else float(target_delta)
        self.accountant = accountant
        self.engine_kwargs = engine_kwargs
        if noise_multiplier is not None:  # explicit sigma (0 = no privacy, for tests and debugging)
            self.noise_multiplier = float(noise_multiplier)
        else:
            self.noise_multiplier = accounting.noise_multiplier(
                target_epsilon=self.target_epsilon, sample_rate=batch_size / sample_size,
                steps=sum(self.steps.values()), delta=self.target_delta, accountant=accountant,
            )
        self.ledger = accounting.Ledger()
        self.scores: dict[str, Tensor] | None = None
        self.masks: dict[str, Tensor] | None = None
        self.engine: Any = None

    def _always(self, name: str) -> bool:
        return any(name == a or name.startswith(a + ".") for a in self.always_train)

    def _set_trainable(self, extra: Iterable[str] = ()) -> None:
        extra = set(extra)
        for n, p in self.model.named_parameters():
            p.requires_grad_(n.endswith("bias") or self._always(n) or n in extra)

    def _engine(self, phase: str, **kw: Any):
        from ..engine import PrivacyEngine

        if self.engine is not None:
            self.engine.detach()
        self.engine = PrivacyEngine(
            self.model, batch_size=self.batch_size, sample_size=self.sample_size,
            steps=max(1, self.steps[phase]), noise_multiplier=self.noise_multiplier,
            epsilon_budget=self.target_epsilon, target_delta=self.target_delta,
            accountant=self.accountant, ledger=self.ledger, **self.engine_kwargs, **kw,
        )
        return self.engine

    def warmup(self, optimizer: torch.optim.Optimizer):
        """Phase 1 (optional): DP training of biases and ``always_train``."""
        self._set_trainable()
        engine = self._engine("warmup")
        engine.attach(optimizer)
        return engine

    def score(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], Tensor],
        *,
        max_physical_batch_size: int | None = None,
    ) -> dict[str, Tensor]:
        """Phase 2: the private scoring pass.  Each logical batch (empty ones
        included) releases ``|sum_i c_i g_i| + sigma R z`` for the candidate
        weights (accounted like a DP-SGD step; nothing moves); the releases are
        accumulated and summed per row.  ``loss_fn(model, batch)`` returns the
        mean loss of a physical batch."""
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = dict(self.model.named_parameters())
        for n in self.candidates:
            params[n].requires_grad_(True)
        engine = self._engine("scoring")
        dummy = torch.optim.SGD([params[n] for n in self.candidates], lr=0.0)
        engine.attach(dummy)
        acc: dict[str, Tensor] = {}
        try:
            for batch in batches:
                chunks = list(split_physical(batch, max_physical_batch_size or 1 << 62))
                if not chunks:
                    engine.record_empty_batch()
                for chunk in chunks:
                    loss_fn(self.model, chunk).backward()
                for n, v in engine.release(torch.abs).items():
                    acc[n] = acc[n] + v if n in acc else v
                dummy.zero_grad()
        finally:
            engine.detach()
            self.engine = None
            for n, p in self.model.named_parameters():
                p.requires_grad_(flags[n])
        modules = dict(self.model.named_modules())
        self.scores = {}
        for n, a in acc.items():
            mod, _, local = n.rpartition(".")
            dim = row_dim(modules[mod], local)
            v = a.pow(2) if self.squared else a
            self.scores[n] = v.transpose(0, dim).reshape(v.shape[dim], -1).sum(1)
        return self.scores

    def select(
        self, scores: Mapping[str, Tensor] | None = None, *, strategy: str = "scores", seed: int = 0
    ) -> dict[str, Tensor]:
        """Phase 3 (post-processing): keep the top ``ceil(density * rows)`` rows
        per layer (or across layers with ``global_selection``).

        ``strategy``: ``"scores"`` (SPARTA: the private scores), or the
        baselines ``"random"`` (uniformly random rows, ``seed``) and
        ``"magnitude"`` (rows with the largest L2 norm of the current,
        public pretrained weights); the baselines need no scoring pass."""
        if strategy == "scores":
            scores = dict(scores if scores is not None else (self.scores or {}))
            if not scores:
                raise RuntimeError("no scores: run score() first")
        elif strategy in ("random", "magnitude"):
            params = dict(self.model.named_parameters())
            modules = dict(self.model.named_modules())
            g = torch.Generator().manual_seed(seed)
            scores = {}
            for n in self.candidates:
                mod, _, local = n.rpartition(".")
                dim = row_dim(modules[mod], local)
                w = params[n].detach()
                rows = w.shape[dim]
                if strategy == "random":
                    scores[n] = torch.rand(rows, generator=g)
                else:
                    scores[n] = w.transpose(0, dim).reshape(rows, -1).float().norm(dim=1).cpu()
        else:
            raise ValueError(f"strategy must be 'scores', 'random' or 'magnitude', got {strategy!r}")
        masks = {}
        if self.global_selection:
            flat = torch.cat([s.flatten().float().cpu() for s in scores.values()])
            k = max(1, int(math.ceil(self.density * flat.numel())))
            top = torch.zeros(flat.numel(), dtype=torch.bool)
            top[flat.topk(k).indices] = True
            offset = 0
            for n, s in scores.items():
                masks[n] = top[offset : offset + s.numel()].clone()
                offset += s.numel()
        else:
            for n, s in scores.items():
                k = max(1, int(math.ceil(self.density * s.numel())))
                m = torch.zeros(s.numel(), dtype=torch.bool)
                m[s.float().cpu().topk(k).indices] = True
                masks[n] = m
        self.masks = masks
        return masks

    def train(self, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]):
        """Phase 4: DP training of the selected rows, biases and ``always_train``."""
        if self.masks is None:
            self.select()
        if self.scores is None:
            self.steps["scoring"] = 0  # a baseline selection: no scoring pass was run
        unrestrict(self.model)
        self._set_trainable()
        restrict(self.model, {n: m for n, m in self.masks.items() if m.any()})  # type: ignore[union-attr]
        engine = self._engine("train")
        engine.attach(make_optimizer([p for p in self.model.parameters() if p.requires_grad]))
        return engine

    @property
    def epsilon(self) -> float:
        """Total epsilon over all phases so far."""
        return self.ledger.epsilon(self.target_delta, accountant=self.accountant)
