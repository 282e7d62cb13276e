"""Mixture of experts (issue 22, Build 4): expert weights whose input rows
are tokens of several examples, gathered by a router, get exact per-example
gradients (float64, several steps, some examples clipped and others not,
against a brute-force per-example loop).  The architecture zoo
(``test_zoo.py``) runs transformers' Mixtral (fused ``(E, ...)`` expert
tensors) and ``moe-linear`` (per-expert ``nn.Linear``) under every method and
clipping mode; these tests pin the cases the zoo's random routing may miss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference import check_steps
from zoo_models import HandMoE

import dpft
from dpft.rules import find_rule
from dpft.rules.fallback import RoutedExpertsRule

B, T, D = 4, 5, 6


class _Head(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.out = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        h = h[0] if isinstance(h, tuple) else h
        return self.out(h.mean(1))


class FixedRouting(HandMoE):
    """:class:`HandMoE` with two experts and a router that sends a token to
    expert 1 when its first feature is positive, else to expert 0 (the
    router's logits still weight it).  Fed examples whose two tokens are
    both positive or both negative, alternately, each expert's layers see as
    many rows as there are examples, two rows from each of half the
    examples, which a per-layer rule would take for one row per example (a
    silently wrong per-example gradient)."""

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        b, t, d = h.shape
        x = h.view(-1, d)
        logits = self.gate(x)
        chosen = (x[:, 0] > 0).long()
        weights = F.softmax(logits, dim=-1).gather(1, chosen[:, None])
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token = torch.where(chosen == e)[0]
            out.index_add_(0, token, expert(x[token]) * weights[token])
        return out.view(b, t, d), logits


class TwoOutputs(nn.Module):
    """A leaf of unknown type (the generic path) returning its logits and a
    function of them, both used by the caller: the logits' gradient already
    contains what came back through the second output."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = x @ self.weight.t()
        return logits, torch.tanh(logits) * 2


class TwoOutputsBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.leaf = TwoOutputs()

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.leaf(x)
        return a.sin() + b


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _collate(examples):
    return tuple(torch.stack(v) for v in zip(*examples))


def _make():
    return torch.randn(T, D), torch.randint(0, 3, ())


@pytest.mark.parametrize("mode", ["auto", "ghost", "instantiate"])
def test_expert_fed_as_many_tokens_as_examples_is_exact(mode):
    torch.manual_seed(0)
    model = _Head(FixedRouting(D, 7, experts=2, top_k=1))
    count = iter(range(10**6))

    def make():  # two tokens of one sign, the sign alternating between examples
        x = torch.randn(2, D)
        x[:, 0] = x[:, 0].abs() * (1 if next(count) % 2 else -1)
        return x, torch.randint(0, 3, ())

    check_steps(model, make, _collate, _loss, steps=3, batch_size=B, mode=mode)


@pytest.mark.parametrize("mode", ["auto", "ghost", "instantiate"])
def test_hand_written_moe_exact(mode):
    torch.manual_seed(0)
    check_steps(_Head(HandMoE(D, 7, experts=4, top_k=2)), _make, _collate, _loss, steps=3, batch_size=B, mode=mode)


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_output_computed_from_another_output_counted_once(mode):
    torch.manual_seed(0)
    check_steps(_Head(TwoOutputsBody()), _make, _collate, _loss, steps=3, batch_size=B, mode=mode)


def test_moe_block_takes_the_routed_experts_rule():
    block = HandMoE(D, 7, experts=4, top_k=2)
    assert isinstance(find_rule(block), RoutedExpertsRule)
    assert find_rule(block.experts[0].w1) is not None and not isinstance(find_rule(block.experts[0]), RoutedExpertsRule)
    # a list of layers (not experts) is not a mixture of experts
    assert not isinstance(
        find_rule(nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))), RoutedExpertsRule
    )


def test_generic_parameters_are_reported():
    torch.manual_seed(0)
    model = _Head(HandMoE(D, 7, experts=4, top_k=2)).double()
    engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=10, noise_multiplier=1.0, max_grad_norm=1.0)
    generic = engine.generic_path()
    assert set(generic) == {n for n, _ in model.named_parameters() if n.startswith("body.")}
    assert all("mixture of experts" in why for why in generic.values())
    assert "out.weight" not in generic
