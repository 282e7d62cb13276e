"""Brute-force reference: per-example gradients one example at a time (float64),
clipped and summed the textbook way.  Independent of dpft's code paths."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import dpft


def per_example_grads(
    model: nn.Module, names: Sequence[str], examples: Sequence, loss_fn: Callable
) -> list[dict[str, Tensor]]:
    params = dict(model.named_parameters())
    out = []
    for ex in examples:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, ex)
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        out.append(
            {n: (g if g is not None else torch.zeros_like(params[n])).detach().clone() for n, g in zip(names, grads)}
        )
    return out


def clipped_mean(
    grads: list[dict[str, Tensor]], groups: Sequence[Sequence[str]], R: float, fn: str, B: int
) -> dict[str, Tensor]:
    K = len(groups)
    total = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    for g in grads:
        for group in groups:
            norm = math.sqrt(sum(float(g[n].pow(2).sum()) for n in group))
            Rg = R / math.sqrt(K)
            if fn == "abadi":
                c = 1.0 if norm == 0 else min(1.0, Rg / norm)
            else:
                c = Rg / (norm + 0.01)
            for n in group:
                total[n] += c * g[n]
    return {n: t / B for n, t in total.items()}


def norms(grads: list[dict[str, Tensor]]) -> list[float]:
    return [math.sqrt(sum(float(v.pow(2).sum()) for v in g.values())) for g in grads]


def dpft_update(
    model: nn.Module,
    batches: Sequence,
    loss_fn: Callable,
    *,
    batch_size: int,
    R: float,
    fn: str = "abadi",
    style="all-layer",
    mode: str = "auto",
    sample_size: int = 1000,
) -> tuple[dict[str, Tensor], dpft.PrivacyEngine]:
    """Run one dpft step (noise 0, SGD lr=1) over ``batches`` (accumulated)
    and return minus the parameter change, i.e. the applied gradient."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    engine = dpft.PrivacyEngine(
        model,
        batch_size=batch_size,
        sample_size=sample_size,
        steps=10,
        noise_multiplier=0.0,
        max_grad_norm=R,
        clipping_fn=fn,
        clipping_style=style,
        clipping_mode=mode,
    )
    opt = torch.optim.SGD(list(params.values()), lr=1.0)
    engine.attach(opt)
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
    opt.step()
    opt.zero_grad()
    engine.detach()
    return {n: before[n] - p.detach() for n, p in params.items()}, engine


def max_rel_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    num = math.sqrt(sum(float((got[n] - want[n]).pow(2).sum()) for n in want))
    den = math.sqrt(sum(float(want[n].pow(2).sum()) for n in want))
    worst = num / max(den, 1e-300)
    return worst


def pick_threshold(grads: list[dict[str, Tensor]]) -> float:
    """A threshold that clips some examples and not others: the midpoint
    between the two middle *distinct* per-example norms."""
    uniq = sorted(set(norms(grads)))
    if len(uniq) == 1:
        return uniq[0] / 2
    mid = len(uniq) // 2
    return 0.5 * (uniq[mid - 1] + uniq[mid])


class Degenerate(Exception):
    """The case cannot discriminate right from wrong (randomized tests skip it)."""


def to_double(batch, device="cpu"):
    if isinstance(batch, Tensor):
        return (batch.double() if batch.is_floating_point() else batch).to(device)
    if isinstance(batch, dict):
        return {k: to_double(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_double(v, device) for v in batch)
    return batch


def check_model(
    model: nn.Module,
    examples: Sequence,
    collate: Callable,
    loss_fn: Callable,
    *,
    fn: str = "abadi",
    style="all-layer",
    mode: str = "auto",
    splits: Sequence[int] | None = None,
    tol: float = 1e-6,
    device: str = "cpu",
) -> float:
    """Compare dpft's update with the brute-force clipped mean; returns the error.

    ``examples``: a list of single examples; ``collate`` turns a list of
    examples into a batch; ``loss_fn(model, batch)`` is the mean loss over the batch."""
    model = model.double().to(device)
    base_collate = collate
    collate = lambda exs: to_double(base_collate(exs), device)  # noqa: E731
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref_model = copy.deepcopy(model)
    grads = per_example_grads(ref_model, names, [collate([e]) for e in examples], loss_fn)
    ns = norms(grads)
    if max(ns) < 1e-9 or max(ns) - min(ns) < 1e-9 * max(ns):
        # every example has (numerically) the same or no gradient: no threshold
        # clips some and not others, and rounding noise is all there is to compare
        raise Degenerate(f"per-example norms {ns}")
    R = pick_threshold(grads)
    assert any(x > R for x in ns) and any(x <= R for x in ns)
    if isinstance(style, str):
        if style == "all-layer":
            groups = [names]
        elif style == "param-wise":
            groups = [[n] for n in names]
        elif style == "layer-wise":
            by: dict[str, list[str]] = {}
            for n in names:
                by.setdefault(n.rsplit(".", 1)[0], []).append(n)
            groups = list(by.values())
        else:
            raise ValueError(style)
    else:
        groups = style
    want = clipped_mean(grads, groups, R, fn, len(examples))
    splits = splits or [len(examples)]
    batches, start = [], 0
    for s in splits:
        batches.append(collate(examples[start : start + s]))
        start += s
    got, _ = dpft_update(model, batches, loss_fn, batch_size=len(examples), R=R, fn=fn, style=style, mode=mode)
    err = max_rel_error(got, want)
    assert err <= tol, f"relative error {err:.3e} > {tol}"
    return err


def steps_exact(
    model: nn.Module,
    ref: nn.Module,
    batches: Any,
    loss_fn: Callable,
    *,
    batch_size: int,
    R: float,
    mode: str = "auto",
    tol: float = 1e-6,
    after_step: Callable[[int], None] | None = None,
    **engine_kw: Any,
) -> dpft.PrivacyEngine:
    """Several dpft steps in a row (noise 0, SGD lr=1), each compared with the
    brute-force clipped mean at the current weights.  ``batches``: an iterable
    of ``(batch, [single-example batches])``; ``ref``: a copy of ``model``
    without the engine's hooks (e.g. without activation checkpointing), on
    which the brute force runs; ``after_step(step)`` is called after each
    checked step; ``engine_kw`` go to the engine.  The engine behaves
    differently after its first backward passes (they cross-check its sums
    against autograd's), which a single step never reaches."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0
        engine = dpft.PrivacyEngine(
            model,
            batch_size=batch_size,
            sample_size=1000,
            steps=100,
            noise_multiplier=0.0,
            max_grad_norm=R,
            clipping_mode=mode,
            **engine_kw,
        )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine.attach(opt)
    params = dict(model.named_parameters())
    for step, (batch, singles) in enumerate(batches):
        ref.load_state_dict(model.state_dict())
        want = clipped_mean(per_example_grads(ref, names, singles, loss_fn), [names], R, "abadi", batch_size)
        before = {n: params[n].detach().clone() for n in names}
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
        err = max_rel_error({n: before[n] - params[n].detach() for n in names}, want)
        assert err <= tol, f"step {step}: relative error {err:.3e} > {tol}"
        if after_step is not None:
            after_step(step)
    return engine


def tensor_batches(make: Callable[[], Tensor], steps: int) -> Any:
    """``steps`` batches from ``make()`` (a batched tensor), with their single-example slices."""
    for _ in range(steps):
        x = make()
        yield x, [x[i : i + 1] for i in range(x.shape[0])]


def check_steps(
    model: nn.Module,
    make: Callable[[], Any],
    collate: Callable,
    loss_fn: Callable,
    *,
    steps: int = 4,
    batch_size: int = 6,
    mode: str = "auto",
    tol: float = 1e-6,
    ref: nn.Module | None = None,
) -> None:
    """:func:`steps_exact` for a layer-zoo model (examples from ``make``,
    batched by ``collate``); the threshold clips some of the first step's
    examples and not others.  ``ref``: the model the brute force runs on
    (default: a copy of ``model``; e.g. the same model without reentrant
    checkpointing, through which ``torch.autograd.grad`` cannot go)."""
    model = model.double()
    ref = copy.deepcopy(model) if ref is None else ref.double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    first = [make() for _ in range(batch_size)]
    R = pick_threshold(per_example_grads(ref, names, [to_double(collate([e])) for e in first], loss_fn))

    def batches():
        for step in range(steps):
            exs = first if step == 0 else [make() for _ in range(batch_size)]
            yield to_double(collate(exs)), [to_double(collate([e])) for e in exs]

    steps_exact(model, ref, batches(), loss_fn, batch_size=batch_size, R=R, mode=mode, tol=tol).detach()
