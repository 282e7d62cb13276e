"""SPARTA (Makni et al. 2025): sparse DP fine-tuning of selected weight rows.

:func:`restrict` marks which rows of which weights train; the engine then
computes per-example norms and clipped sums from the selected rows only,
adds noise only to them, and keeps the other rows unchanged.

:func:`compact_optimizer` makes an optimizer hold its state (Adam's moments,
momentum buffers) for the selected rows only: it optimizes one compact row
tensor per restricted weight, and the engine hands it the privatized
gradient of those rows directly (no full-size gradient is built).
:class:`Sparta` does this by default wherever the optimizer's update is
elementwise (:data:`ROW_SEPARABLE`), so that the result is exactly the one a
full-size optimizer would give.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data import split_physical
from ..options import EngineOptions
from ..rows import ATTR, REGISTRY, RowMask, compact_rows, reattach, row_masks  # noqa: F401 (dpft.sparta's names)
from ..rules.linear import is_hf_conv1d
from .phases import PhasePlan, split_options


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
        rm = RowMask(m.to(p.device), dim)
        setattr(p, ATTR, rm)
        # also noted on the owning module: copy.deepcopy keeps a module's
        # attributes but drops a Parameter's, and a copied model must not
        # silently train every row (see reattach)
        owner = modules[mod_name]
        owner.__dict__.setdefault(REGISTRY, {})[local] = rm
        done.append(name)
    return done


def unrestrict(model: nn.Module) -> None:
    """Remove all row restrictions (the parameters stay trainable)."""
    for p in model.parameters():
        if hasattr(p, ATTR):
            delattr(p, ATTR)
    for module in model.modules():
        module.__dict__.pop(REGISTRY, None)


# ---------------------------------------------------------------------------
# Optimizer state for the selected rows only.

#: Optimizer classes whose update of an element depends only on that
#: element's gradient and state (and on per-tensor step counts, which a
#: tensor and its rows share).  Run on the selected rows alone they give
#: exactly the rows the full-size optimizer gives, so :class:`Sparta` compacts
#: them by default.  Not here (their update mixes rows): ``LBFGS``,
#: ``Adafactor`` (column statistics), ``Muon`` (orthogonalization),
#: ``SparseAdam`` (sparse gradients).  Add your own elementwise classes.
ROW_SEPARABLE: set[type[torch.optim.Optimizer]] = {
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.ASGD,
    torch.optim.Rprop,
    torch.optim.Adadelta,
}


def row_separable(optimizer: torch.optim.Optimizer | type[torch.optim.Optimizer]) -> bool:
    """Whether compacting ``optimizer`` (an instance or a class) leaves its
    updates unchanged: its (base) class is in :data:`ROW_SEPARABLE`."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    cls = getattr(cls, "_dpft_base", cls)
    return cls in ROW_SEPARABLE


class _Twin:
    """A restricted weight and the compact tensor of its selected rows that the optimizer holds."""

    __slots__ = ("param", "rows", "mask", "index")

    def __init__(self, param: nn.Parameter, mask: RowMask) -> None:
        self.param = param
        self.mask = mask
        self.index = mask.index.to(param.device)
        # a leaf that does not require grad: the engine's attach() check sees no
        # stray trainable tensor, and autograd never touches it
        self.rows = param.detach().index_select(mask.dim, self.index)

    def pull(self) -> None:
        """Rows <- the parameter's selected rows (the parameter is the source of
        truth: a checkpoint load or any other write to it is picked up), and the
        rows' gradient from a full-size ``param.grad`` when there is one (plain
        autograd, or an engine that did not hand over a compact gradient)."""
        p = self.param
        if getattr(p, ATTR, None) is not self.mask:
            raise RuntimeError(
                "dpft: the row selection of a weight changed after its optimizer was compacted; "
                "build a new optimizer (and compact it) after restrict()"
            )
        torch.index_select(p.detach(), self.mask.dim, self.index, out=self.rows)
        if p.grad is not None:
            g = p.grad.index_select(self.mask.dim, self.index)
            self.rows.grad = g if g.dtype == self.rows.dtype else g.to(self.rows.dtype)

    def push(self) -> None:
        """The parameter's selected rows <- rows (the other rows are never written)."""
        self.param.index_copy_(self.mask.dim, self.index, self.rows)


class RowCompact(torch.optim.Optimizer):
    """What :func:`compact_optimizer` mixes into an optimizer's class.

    The optimizer's parameter groups hold, in place of each row-restricted
    weight, a compact tensor of its selected rows (:func:`compact_rows` maps
    the weights to them), so its state has the compact shape.  ``step()`` copies the
    selected rows (and their gradient, when it is in the weight's full-size
    ``.grad``) into the compact tensors, runs the original ``step()`` and
    copies the updated rows back; unselected rows are never written.
    ``state_dict()`` holds the compact state; ``load_state_dict()`` also
    accepts a full-size optimizer's state (its selected rows are kept)."""

    _dpft_base: type[torch.optim.Optimizer]
    _dpft_twins: dict[int, _Twin]  # id(weight) -> twin

    @torch.no_grad()
    def _dpft_pull(self) -> None:
        for t in self._dpft_twins.values():
            t.pull()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        self._dpft_pull()
        wrapped = None
        if closure is not None:

            def wrapped() -> Any:
                with torch.enable_grad():
                    loss = closure()
                self._dpft_pull()  # the closure's backward filled the full-size gradients
                return loss

        out = super().step(wrapped)
        with torch.no_grad():
            for t in self._dpft_twins.values():
                t.push()
        return out

    step.hooked = True  # type: ignore[attr-defined]  # torch's step hooks run in the wrapped step

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for t in self._dpft_twins.values():  # the weights' own (full-size) gradients too
            g = t.param.grad
            if g is None:
                continue
            if set_to_none:
                t.param.grad = None
            else:  # as torch's zero_grad does it
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                g.zero_()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if "_dpft_twins" in self.__dict__:  # not while the base class builds itself
            _compact_group(self, self.param_groups[-1])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for t in self._dpft_twins.values():  # a full-size optimizer's state: keep the selected rows
            st = self.state.get(t.rows)
            if st:
                _compact_state(st, t)

    def __reduce_ex__(self, protocol: Any) -> Any:
        state = self.__getstate__()
        state["_dpft_twins"] = self._dpft_twins
        return (_rebuild, (self._dpft_base, state))


_CLASSES: dict[type, type] = {}


def _compact_class(base: type[torch.optim.Optimizer]) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"RowCompact{base.__name__}", (RowCompact, base), {"_dpft_base": base, "__module__": __name__})
        _CLASSES[base] = cls
    return cls


def _rebuild(base: type[torch.optim.Optimizer], state: dict[str, Any]) -> torch.optim.Optimizer:
    """Unpickling / deep copy of a compacted optimizer."""
    obj = base.__new__(base)
    obj.__class__ = _compact_class(base)
    obj.__setstate__(state)
    for t in obj._dpft_twins.values():  # copy.deepcopy drops a Parameter's attributes: restore the selection
        if getattr(t.param, ATTR, None) is None:
            setattr(t.param, ATTR, t.mask)
    return obj


def _compact_state(state: dict[str, Any], twin: _Twin) -> None:
    """Cut full-size state tensors of ``twin``'s weight down to its selected rows."""
    full, compact = tuple(twin.param.shape), tuple(twin.rows.shape)
    if full == compact:
        return
    for key, v in list(state.items()):
        if isinstance(v, Tensor) and tuple(v.shape) == full:
            state[key] = v.index_select(twin.mask.dim, twin.index.to(v.device))


def _compact_group(opt: Any, group: dict[str, Any]) -> None:
    """Replace the row-restricted weights of one parameter group by compact row tensors."""
    twins: dict[int, _Twin] = opt._dpft_twins
    held = {id(t.rows) for t in twins.values()}
    params = group["params"]
    for i, p in enumerate(params):
        mask = getattr(p, ATTR, None)
        if mask is None or id(p) in held:
            continue
        if id(p) in twins:
            raise ValueError("compact_optimizer: a restricted weight appears in more than one parameter group")
        if len(mask.unselected) == 0:
            continue  # every row trains: the weight itself is its compact form
        t = _Twin(p, mask)
        twins[id(p)] = t
        params[i] = t.rows
        if p in opt.state:  # state from earlier full-size steps: keep the selected rows
            st = opt.state.pop(p)
            _compact_state(st, t)
            opt.state[t.rows] = st


def compact_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer`` hold state only for the selected rows of its
    row-restricted weights (:func:`restrict`); returns it (changed in place).

    Works with any optimizer class; the updates are those of the full-size
    optimizer (with the engine restoring unselected rows) for the elementwise
    classes of :data:`ROW_SEPARABLE` (for others, e.g. a trust ratio, the
    compact rows are what the optimizer sees).  Call it after
    :func:`restrict` and *before* ``PrivacyEngine.attach`` or creating an LR
    scheduler (both wrap ``optimizer.step``).  The optimizer stays an
    instance of its class (and of :class:`RowCompact`); its parameter groups
    hold compact row tensors in place of the restricted weights, which keep
    their names, shapes and values.  With the engine attached, the privatized
    gradient of the selected rows goes straight to the compact tensor and the
    weight's own ``.grad`` stays ``None``; without it, ``step()`` takes the
    selected rows of the weight's ``.grad``.  Weights with every row selected
    are left as they are.  Memory: the state of a weight shrinks to its
    selected rows, at the cost of one copy of those rows (the compact tensor).

    The weights stay the source of truth: the selected rows are copied into
    the compact tensors at every step, so loading a checkpoint into the model
    (or changing a weight in any other way) needs no care."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"compact_optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if "step" in optimizer.__dict__:
        raise RuntimeError(
            "compact_optimizer: optimizer.step is already wrapped (a PrivacyEngine attached, or an LR "
            "scheduler created); compact the optimizer first"
        )
    if not isinstance(optimizer, RowCompact):
        optimizer.__class__ = _compact_class(type(optimizer))
        optimizer._dpft_twins = {}  # type: ignore[attr-defined]
    for group in optimizer.param_groups:
        _compact_group(optimizer, group)
    return optimizer


# ---------------------------------------------------------------------------
# The full method: warm-up, private scoring, selection, sparse training.

#: Row selection strategies of :class:`Sparta`: SPARTA's private scores, or a
#: public, data-independent baseline (see :data:`PUBLIC_SELECTIONS`).
SELECTIONS: tuple[str, ...] = ("scores", "random", "magnitude")
#: Selections that read no private data: uniformly random rows, or the rows of
#: largest norm of the (public, pretrained) weights.  They need no scoring pass,
#: so a :class:`Sparta` built for one spends its whole budget on training.
PUBLIC_SELECTIONS: tuple[str, ...] = ("random", "magnitude")


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
    steps at the same sampling rate (a :class:`~dpft.methods.phases.PhasePlan`:
    one ledger for all phases); ``epsilon`` is the total.

    With a public baseline selection (``selection="random"`` or
    ``"magnitude"``, :data:`PUBLIC_SELECTIONS`) there is no scoring pass:
    ``steps["scoring"]`` is 0, σ is calibrated for warm-up + training steps
    only, and ``select()`` needs no ``score()`` first::

        sp = Sparta(model, ..., selection="random")
        sp.select(seed=0)                    # public: costs no privacy
        engine = sp.train(make_optimizer)

    Args:
        candidates: weight names whose rows may be selected (default: every
            Linear / Conv / Conv1D weight except those in ``always_train``).
        always_train: names or prefixes trained in full in every phase
            besides biases (e.g. the classification head).
        density: fraction of rows kept per layer (or overall with ``global_selection``).
        selection: how rows are selected (:data:`SELECTIONS`): ``"scores"``
            (SPARTA, the private scoring pass) or a public baseline of
            :data:`PUBLIC_SELECTIONS`, which plans no scoring steps.
        scoring_epochs: epochs of the scoring pass (default 1 with
            ``selection="scores"``; must be ``None`` or 0 with a public selection).
        squared: score rows by the sum of squared accumulated values instead of the sum.
        noise_multiplier: use this sigma instead of calibrating one to ``target_epsilon``
            (the budget still stops training at ``target_epsilon``).
        options: how every phase's engine privatizes (a :class:`dpft.EngineOptions`),
            or the same options as keywords (``max_grad_norm=``, ``clipping_fn=``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        sample_size: int,
        target_epsilon: float,
        train_epochs: float,
        scoring_epochs: float | None = None,
        warmup_epochs: float = 0.0,
        density: float = 0.2,
        selection: str = "scores",
        candidates: Sequence[str] | None = None,
        always_train: Sequence[str] = (),
        squared: bool = False,
        global_selection: bool = False,
        target_delta: float | None = None,
        accountant: str = "pld",
        noise_multiplier: float | None = None,
        options: EngineOptions | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(map(repr, SELECTIONS))}, got {selection!r}")
        if selection == "scores":
            scoring_epochs = 1.0 if scoring_epochs is None else scoring_epochs
        elif scoring_epochs:  # None or 0: a public selection runs no scoring pass
            raise ValueError(
                f"selection={selection!r} is public and runs no scoring pass; scoring_epochs must be "
                f"None or 0, got {scoring_epochs!r}"
            )
        else:
            scoring_epochs = 0.0
        if train_epochs <= 0 or warmup_epochs < 0 or (selection == "scores" and scoring_epochs <= 0):
            raise ValueError(
                f"epochs must be positive (warmup_epochs may be 0), got train_epochs={train_epochs!r}, "
                f"scoring_epochs={scoring_epochs!r}, warmup_epochs={warmup_epochs!r}"
            )
        self.selection = selection
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
        opts, self.engine_kwargs = split_options(
            options, dict(engine_kwargs, target_delta=target_delta, accountant=accountant)
        )
        # σ calibrated once for exactly the planned steps (no scoring steps with a public selection)
        self.plan = PhasePlan(
            batch_size=batch_size,
            sample_size=sample_size,
            steps=self.steps,
            target_epsilon=target_epsilon,
            options=opts,
            noise_multiplier=noise_multiplier,
        )
        self.target_epsilon = self.plan.target_epsilon
        self.target_delta, self.accountant = self.plan.target_delta, self.plan.accountant
        self.calibrated = self.plan.calibrated
        self.noise_multiplier = self.plan.noise_multiplier
        self.ledger = self.plan.ledger
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
        if self.engine is not None:
            self.engine.detach()
        self.engine = self.plan.engine(self.model, phase, **{**self.engine_kwargs, **kw})
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
        mean loss of a physical batch.

        Raises ``RuntimeError`` when the plan has no scoring steps (a public
        ``selection``): σ was not calibrated for them."""
        if not self.steps["scoring"]:
            raise RuntimeError(
                f"this Sparta plans no scoring pass (selection={self.selection!r}); its noise multiplier "
                "was calibrated without scoring steps. Build it with selection='scores' to score rows"
            )
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
        self, scores: Mapping[str, Tensor] | None = None, *, strategy: str | None = None, seed: int = 0
    ) -> dict[str, Tensor]:
        """Phase 3 (post-processing): keep the top ``ceil(density * rows)`` rows
        per layer (or across layers with ``global_selection``).

        ``strategy`` (default: the ``selection`` of the constructor):
        ``"scores"`` (SPARTA: the private scores), or the baselines
        ``"random"`` (uniformly random rows, ``seed``) and ``"magnitude"``
        (rows with the largest L2 norm of the current, public pretrained
        weights); the baselines need no scoring pass.

        A baseline on a Sparta whose calibrated σ counts scoring steps that
        were never run raises ``ValueError`` (the run would stop short of its
        ε with more noise than needed): build it with ``selection=strategy``."""
        strategy = self.selection if strategy is None else strategy
        if strategy in PUBLIC_SELECTIONS and self.scores is None and self.steps["scoring"] and self.calibrated:
            raise ValueError(
                f"strategy {strategy!r} runs no scoring pass, but the noise multiplier was calibrated for "
                f"{self.steps['scoring']} scoring steps; build Sparta(..., selection={strategy!r}) so that "
                "sigma is calibrated for warm-up + training steps only"
            )
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
            raise ValueError(f"strategy must be one of {', '.join(map(repr, SELECTIONS))}, got {strategy!r}")
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

    def train(
        self,
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        *,
        compact_state: bool | None = None,
    ):
        """Phase 4: DP training of the selected rows, biases and ``always_train``.

        ``make_optimizer`` gets the trainable parameters (full-size weights
        included; it may also build its groups from the model itself).
        ``compact_state``: hold optimizer state for the selected rows only
        (:func:`compact_optimizer`): ``None`` (default) when the optimizer is
        :func:`row_separable` (then the updates are exactly the full-size
        optimizer's) and its ``step`` is not wrapped yet (e.g. by an LR
        scheduler made inside ``make_optimizer``), ``True`` always, ``False``
        never.  The engine's ``optimizer`` is the one to step.

        ``steps`` stays the plan σ was calibrated for (with a public
        ``selection`` it holds no scoring steps); the masks may also be set
        directly (e.g. from a checkpoint) before calling this."""
        if self.masks is None:
            self.select()
        unrestrict(self.model)
        self._set_trainable()
        restrict(self.model, {n: m for n, m in self.masks.items() if m.any()})  # type: ignore[union-attr]
        engine = self._engine("train")
        optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        if compact_state is None:  # where the optimizer allows: elementwise, step not wrapped yet
            compact_state = row_separable(optimizer) and "step" not in optimizer.__dict__
        if compact_state:
            compact_optimizer(optimizer)
        engine.attach(optimizer)
        return engine

    @property
    def epsilon(self) -> float:
        """Total epsilon over all phases so far."""
        return self.plan.epsilon
