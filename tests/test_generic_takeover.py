"""Parameters of a hooked module used directly by its parent (the module
itself never runs: Mamba's ``dt_proj``, whose weight and bias the mixer
reads), and generic-path modules given a transformers-style cache that their
forward fills: exact per-example gradients (float64, several steps, some
examples clipped), against a brute-force per-example loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference import check_steps

import dpft

B, T, D = 4, 5, 6


class Mixer(nn.Module):
    """Reads ``proj``'s weight and bias itself (``proj`` never runs); ``D``
    is held by the mixer (a container parameter) when ``own`` is set."""

    def __init__(self, own: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.proj = nn.Linear(D, D)
        self.D = nn.Parameter(torch.randn(D)) if own else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = torch.tanh(h @ self.proj.weight.t() + self.proj.bias) * h
        return h + x * self.D if self.D is not None else h


class ToyCache:
    """A stand-in for a transformers cache: per layer, the states its
    module stored during this forward."""

    def __init__(self) -> None:
        self.states: dict[int, Tensor] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        s = self.states.get(layer_idx)
        return 0 if s is None else s.shape[1]


class Scan(nn.Module):
    """A recurrence that starts from the cached state if there is one, and
    stores its final state (like Mamba's scan): recomputed with the filled
    cache, it would start from its own final state."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.decay = nn.Parameter(torch.rand(D) * 0.5 + 0.25)  # a container parameter: the generic path
        self.inp = nn.Linear(D, D)

    def forward(self, x: Tensor, cache: ToyCache | None = None) -> Tensor:
        u = self.inp(x)
        s = (
            cache.states[self.layer_idx][:, -1]
            if cache is not None and cache.get_seq_length(self.layer_idx)
            else torch.zeros_like(u[:, 0])
        )
        out = []
        for t in range(u.shape[1]):
            s = self.decay * s + u[:, t]
            out.append(s)
        h = torch.stack(out, 1)
        if cache is not None:
            cache.states[self.layer_idx] = h.detach()
        return h


class Model(nn.Module):
    def __init__(self, body: nn.Module, cached: bool = False) -> None:
        super().__init__()
        self.body = body
        self.cached = cached
        self.out = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x, cache=ToyCache()) if self.cached else self.body(x)
        return self.out(h.mean(1))


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _collate(examples):
    return tuple(torch.stack(v) for v in zip(*examples))


def _make():
    return torch.randn(T, D), torch.randint(0, 3, ())


@pytest.mark.parametrize("mode", ["auto", "ghost"])
@pytest.mark.parametrize("own", [False, True], ids=["parent-without-parameters", "generic-path-parent"])
def test_module_used_by_its_parent_full(own, mode):
    torch.manual_seed(0)
    model = Model(Mixer(own))
    check_steps(model, _make, _collate, _loss, steps=3, batch_size=B, mode=mode)
    assert (
        "body.proj.weight"
        in dpft.PrivacyEngine(
            Model(Mixer(own)), batch_size=B, sample_size=100, steps=3, noise_multiplier=1.0, max_grad_norm=1.0
        ).trainable_names
    )


@pytest.mark.parametrize("own", [False, True], ids=["parent-without-parameters", "generic-path-parent"])
def test_module_used_by_its_parent_bitfit(own):
    """DP-BiTFiT: ``proj.bias`` would be reduced in the flat lane by its own (never called) module."""
    torch.manual_seed(0)
    model = Model(Mixer(own))
    dpft.bitfit(model, extra=["body.D"] if own else [])
    check_steps(model, _make, _collate, _loss, steps=3, batch_size=B)


def test_generic_path_module_given_a_cache_it_fills():
    torch.manual_seed(0)
    check_steps(Model(Scan(layer_idx=0), cached=True), _make, _collate, _loss, steps=3, batch_size=B)


def test_row_checks_leave_the_dropout_stream_alone():
    """T5 trained with dropout: the first passes' check of flattened rows
    draws random probes inside the forward; drawn from the model's RNG
    stream, they moved it, the generic path's replay of the decoder then drew
    other dropout masks and the first-pass self-check refused the relative
    attention bias (its gradient differed from autograd's)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(
        d_model=16,
        d_kv=8,
        d_ff=24,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        vocab_size=64,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        use_cache=False,
        dropout_rate=0.1,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).double().train()
    src, tgt = torch.randint(2, 64, (B, 8)), torch.randint(2, 64, (B, 3))
    dec = torch.cat([torch.zeros_like(tgt[:, :1]), tgt[:, :-1]], 1)
    engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=10, noise_multiplier=1.0, max_grad_norm=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(opt)
    for _ in range(3):  # (the self-check runs in the first two)
        logits = model(input_ids=src, decoder_input_ids=dec).logits
        F.cross_entropy(logits.reshape(-1, 64), tgt.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    assert any("relative_attention_bias" in k for k in engine.generic_path())


class WithUnused(nn.Module):
    """A trainable module the forward never calls (a pooler no head reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.unused = nn.Linear(D, D)
        self.out = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)).mean(1))


@pytest.mark.parametrize("bitfit", [False, True], ids=["full", "bitfit"])
def test_unused_module_is_not_taken_over(bitfit):
    """An unused module is not run by its parent either: after the first
    pass it keeps its own hooks (the parent, here the whole model, is not
    recomputed at every step for it), and the updates stay exact."""
    torch.manual_seed(0)
    model = WithUnused()
    if bitfit:
        dpft.bitfit(model)
    check_steps(model, _make, _collate, _loss, steps=3, batch_size=B)
    model = WithUnused().double()
    engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=10, noise_multiplier=0.0, max_grad_norm=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.attach(opt)
    for _ in range(3):
        x, y = _collate([_make() for _ in range(B)])
        _loss(model, (x.double(), y)).backward()
        opt.step()
        opt.zero_grad()
    assert engine.generic_path() == {}
    assert engine._capture._idle_in == {}


class SharedTable(nn.Module):
    """DeBERTa's disentangled attention in miniature: ``pos_proj`` runs on a
    table shared by the whole batch (leading dimension 1) and the result is
    repeated to the batch with ``repeat`` and multiplied with ``bmm``, which
    need its shape as it is."""

    def __init__(self, shared_use_of_q: bool = False) -> None:
        super().__init__()
        self.table = nn.Embedding(4, D)
        self.q = nn.Linear(D, D)
        self.pos_proj = nn.Linear(D, D)
        self.shared_use_of_q = shared_use_of_q

    def forward(self, x: Tensor) -> Tensor:
        q = self.q(x)  # (B, T, D)
        rel = self.table.weight[None, : T - 1]  # (1, P, D): the same for every example
        pos = (self.q if self.shared_use_of_q else self.pos_proj)(rel)
        pos = pos.repeat(x.shape[0], 1, 1)  # (B, P, D): breaks if pos were expanded to (B, P, D)
        return torch.bmm(q, pos.transpose(1, 2))  # (B, T, P)


class SharedTableModel(nn.Module):
    def __init__(self, shared_use_of_q: bool = False) -> None:
        super().__init__()
        self.body = SharedTable(shared_use_of_q)
        self.out = nn.Linear(T - 1, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x).mean(1))


@pytest.mark.parametrize("bitfit", [False, True], ids=["full", "bitfit"])
def test_layer_on_a_table_shared_by_the_batch_keeps_its_shape(bitfit):
    torch.manual_seed(0)
    model = SharedTableModel()
    if bitfit:
        dpft.bitfit(model)
    check_steps(model, _make, _collate, _loss, steps=3, batch_size=B)


def test_layer_on_the_batch_and_on_a_shared_table_is_refused():
    model = SharedTableModel(shared_use_of_q=True).double()
    engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=10, noise_multiplier=1.0, max_grad_norm=1.0)
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(dpft.UnsupportedModuleError, match="'body.q' .*both to the batch"):
        model(torch.randn(B, T, D, dtype=torch.float64))
