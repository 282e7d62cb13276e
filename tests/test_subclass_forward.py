"""Subclasses of ruled layers that override ``forward`` (issue 22's silent-wrong
cases): the rule sees the parent's operator itself, caught inside the
forward, so that what the subclass does around it (a scale, positions
computed from a mask, an activation, a permutation, padding) is
differentiated by autograd and not mistaken for the operator.  And the
first backward passes check every contribution kind against autograd, so
that a rule computing another function's gradient raises before a step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import check_steps

import dpft
from dpft import capture
from dpft.rules.base import UnsupportedModuleError

B = 4
T = 5
V = 11
D = 6


class ScaledEmbedding(nn.Embedding):
    """Gemma's token embedding: the parent's lookup times sqrt(hidden)."""

    def forward(self, ids):
        return super().forward(ids) * math.sqrt(self.embedding_dim)


class MaskPositions(nn.Embedding):
    """BioGPT's learned positions: called with the attention mask, the
    position ids are computed inside ``forward``."""

    offset = 2

    def forward(self, mask):
        positions = (torch.cumsum(mask, dim=1) * mask).long() - 1
        return super().forward(positions + self.offset)


class CastLinear(nn.Linear):
    """timm's Linear: the weight converted to the input's dtype first."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class GroupNormAct(nn.GroupNorm):
    """timm's GroupNormAct: the normalization, then an activation."""

    def forward(self, x):
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNorm2d(nn.LayerNorm):
    """timm's channel-first LayerNorm: permute, normalize the last dim, permute back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow-style asymmetric padding before the operator."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TextModel(nn.Module):
    def __init__(self, emb: nn.Module, pos: nn.Module | None = None):
        super().__init__()
        self.emb, self.pos = emb, pos
        self.proj = CastLinear(D, 3)

    def forward(self, ids, mask):
        h = self.emb(ids)
        if self.pos is not None:
            h = h + self.pos(mask)
        return self.proj(torch.tanh(h)).mean(1)


class ImageModel(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = Conv2dSame(2, 4, 3, bias=True)
        self.norm = norm
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


def _loss(model, batch):
    *inputs, y = batch
    return F.cross_entropy(model(*inputs), y)


def _text_example():
    n = int(torch.randint(2, T + 1, ()))
    mask = torch.zeros(T)
    mask[:n] = 1
    return torch.randint(0, V, (T,)), mask, torch.randint(0, 3, ())


def _image_example():
    return torch.randn(2, 6, 6), torch.randint(0, 3, ())


def _collate(examples):
    return tuple(torch.stack(v) for v in zip(*examples))


TEXT = {
    "scaled-embedding": lambda: TextModel(ScaledEmbedding(V, D)),
    "mask-positions": lambda: TextModel(nn.Embedding(V, D), MaskPositions(T + 3, D)),
}
IMAGE = {
    "groupnorm-act": lambda: ImageModel(GroupNormAct(2, 4)),
    "layernorm2d": lambda: ImageModel(LayerNorm2d(4)),
}


@pytest.mark.parametrize("mode", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("name", sorted(TEXT))
def test_text_subclasses_exact(name, mode):
    torch.manual_seed(0)
    check_steps(TEXT[name](), _text_example, _collate, _loss, steps=3, batch_size=B, mode=mode)


@pytest.mark.parametrize("mode", ["auto", "ghost"])
@pytest.mark.parametrize("name", sorted(IMAGE))
def test_image_subclasses_exact(name, mode):
    torch.manual_seed(0)
    check_steps(IMAGE[name](), _image_example, _collate, _loss, steps=3, batch_size=B, mode=mode)


def test_bias_only_subclasses_exact():
    torch.manual_seed(0)
    model = ImageModel(GroupNormAct(2, 4))
    dpft.bitfit(model)
    check_steps(model, _image_example, _collate, _loss, steps=3, batch_size=B)


def _engine(model):
    engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=10, noise_multiplier=1.0, max_grad_norm=1.0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine.attach(opt)
    return engine, opt


def test_self_check_catches_a_rule_that_models_another_function(monkeypatch):
    """Without the operator catch, the embedding rule would take the scaled
    output's gradient for the lookup's: the first backward pass compares the
    summed per-example gradients with autograd's and refuses, naming the
    parameter, before anything changes."""
    monkeypatch.setattr(capture.plan, "overriding_parent", lambda module: None)
    torch.manual_seed(0)
    model = TextModel(ScaledEmbedding(V, D)).double()
    before = model.emb.weight.detach().clone()
    _engine(model)
    ids, mask, y = _collate([_text_example() for _ in range(B)])
    with pytest.raises(UnsupportedModuleError, match=r"'emb\.weight'.*differ from autograd"):
        _loss(model, (ids, mask.double(), y)).backward()
    assert torch.equal(model.emb.weight, before)


def test_self_check_catches_a_wrong_weight_matrix_rule(monkeypatch):
    """Weight matrices (factored contributions) are checked too."""
    monkeypatch.setattr(capture.plan, "overriding_parent", lambda module: None)

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Doubled(3, 2, bias=False)).double()
    _engine(model)
    with pytest.raises(UnsupportedModuleError, match=r"'0\.weight'.*differ from autograd"):
        model(torch.randn(B, 3, dtype=torch.float64)).sum().backward()


def test_operator_with_other_arguments_is_refused():
    """A subclass that calls the operator with arguments the rule does not
    read off the module is refused, with the difference named."""

    class OtherEps(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, 1e-2)

    model = nn.Sequential(nn.Linear(3, 4), OtherEps(4)).double()
    _engine(model)
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(OtherEps\) overrides the forward of LayerNorm.*eps"):
        model(torch.randn(B, 3, dtype=torch.float64)).sum()


class StdConv2d(nn.Conv2d):
    """timm's StdConv2d: the weight is standardized before the operator, so
    the operator never sees the module's weight as it is."""

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_weight_transformed_before_the_operator_takes_the_generic_path(mode):
    """Where the weight does not enter the parent's operator as it is, the
    module takes the exact generic path (recomputation) from its first call on."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = StdConv2d(2, 4, 3, bias=False)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.conv(x)).mean((2, 3)))

    check_steps(Model(), _image_example, _collate, _loss, steps=3, batch_size=B, mode=mode)


def test_weight_transformed_before_the_operator_with_a_bias_in_the_lane_is_refused():
    """With its bias already reduced in the hooks (the lane), the module
    cannot move to the generic path: the unmodelled use is refused."""

    class Tripled(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight * 3, self.bias)

    model = nn.Sequential(Tripled(3, 2)).double()
    _engine(model)
    with pytest.raises(
        UnsupportedModuleError, match=r"'0\.(weight|bias)' received a gradient through a use that no dpft hook saw"
    ):
        model(torch.randn(B, 3, dtype=torch.float64)).sum().backward()


def test_internal_error_names_the_module():
    """An error inside a rule reaches the user as a dpft error naming the module."""

    class Broken(dpft.rules.linear.LinearRule):
        def contributions(self, call, params):
            raise IndexError("index 7 is out of bounds")

    class Odd(nn.Linear):
        pass

    dpft.register_rule(Odd, Broken(), first=True)
    try:
        model = nn.Sequential(Odd(3, 2)).double()
        _engine(model)
        with pytest.raises(UnsupportedModuleError, match=r"module '0' \(Odd\).*IndexError: index 7"):
            model(torch.randn(B, 3, dtype=torch.float64)).sum().backward()
    finally:
        dpft.rules._REGISTRY.pop(0)


transformers = pytest.importorskip("transformers")


def _lm_loss(model, batch):
    logits = model(input_ids=batch).logits
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return per_tok.view(batch.shape[0], -1).mean(1).mean()


def _s2s_loss(model, batch):
    logits = model(input_ids=batch, decoder_input_ids=batch).logits
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return per_tok.view(batch.shape[0], -1).mean(1).mean()


def _gemma():
    cfg = transformers.GemmaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=40,
    )
    return transformers.GemmaForCausalLM(cfg), _lm_loss


def _biogpt():
    cfg = transformers.BioGptConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=40,
        max_position_embeddings=32,
    )
    return transformers.BioGptForCausalLM(cfg), _lm_loss


def _bart():
    cfg = transformers.BartConfig(
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        vocab_size=40,
        max_position_embeddings=32,
    )
    return transformers.BartForConditionalGeneration(cfg), _s2s_loss


@pytest.mark.parametrize("build", [_gemma, _biogpt, _bart], ids=["gemma", "biogpt", "bart"])
def test_real_subclassed_embeddings_full_exact(build):
    """The issue's cases: Gemma's scaled embedding (wrong by 0.5 before),
    BioGPT's and BART's position embeddings called with other arguments
    (a crash inside dpft before); full fine-tuning, three steps."""
    torch.manual_seed(0)
    model, loss = build()
    check_steps(model.eval(), lambda: torch.randint(3, 40, (T + 1,)), torch.stack, loss, steps=3, batch_size=B)
