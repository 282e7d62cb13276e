"""Activation checkpointing: what dpft holds, and that it stays exact.

Checkpointing frees a segment's activations after the forward and
recomputes them during the backward pass; dpft must not undo that by
keeping every weight layer's input alive.  The memory tests count the
tensor storage referenced by dpft's live per-call records (``Call.saved``
and ``Call.results``, found with the garbage collector), not wall time or
process memory:

* between forward and backward, dpft holds at most one segment's captures
  (not the whole model's);
* during the backward pass, after each segment's backward, the same bound
  holds (each layer's input and output gradient are dropped as soon as its
  per-example gradient is built).

The bound ("one segment's captures") is measured on the same model without
checkpointing: the bytes dpft keeps for the layers of one block after the
forward pass.

DP full fine-tuning under checkpointing takes two-pass clipping
(:mod:`dpft.clip.two_pass`) from its fourth backward pass on (the first ones
take the usual path, which cross-checks against autograd's full-loss gradient):
the same bound then holds at shapes where the usual path keeps every layer's input and
output gradient (or per-example gradient) to the end of the backward pass,
counting also the engine's lane of per-example gradients (biases, norm
weights) on top of the bound.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import dpft
from dpft.rules import Call
from reference import steps_exact, tensor_batches


def _tensors(value, out):
    if isinstance(value, Tensor):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _tensors(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors(v, out)


def held_bytes(modules: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages referenced by live dpft calls
    (``saved`` and ``results``); only calls of ``modules`` (ids) if given."""
    gc.collect()
    found: list[Tensor] = []
    for obj in gc.get_objects():
        if type(obj) is Call and (modules is None or id(obj.module) in modules):
            _tensors(obj.saved, found)
            _tensors(obj.results, found)
    seen: dict[int, int] = {}
    for t in found:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, h):
        return h + self.fc2(F.gelu(self.fc1(self.norm(h))))


class Stack(nn.Module):
    """``inp``, ``n`` blocks (each checkpointed if ``mode`` is ``"reentrant"``
    or ``"non-reentrant"``), a head on the mean over positions.  ``probe(h)``
    is called on every block's input (to hook it)."""

    def __init__(self, d=16, n=8, mode=None):
        super().__init__()
        self.mode = mode
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 2)
        self.probe = None

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            if self.probe is not None:
                self.probe(h)
            if self.mode is None:
                h = blk(h)
            else:
                h = checkpoint(blk, h, use_reentrant=self.mode == "reentrant")
        return self.head(h.mean(1))


def lane_bytes(engine) -> int:
    """Bytes of the capture's per-example lane buffer (biases, norm weights), if one is live."""
    buf = getattr(engine._capture, "_lane_buf", None)
    return buf.untyped_storage().nbytes() if buf is not None else 0


def _engine(model, B, R=1.0, **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine = dpft.PrivacyEngine(
        model, batch_size=B, sample_size=1000, steps=10, noise_multiplier=1.0, max_grad_norm=R, **kw
    )
    engine.attach(opt)
    return engine, opt


def _segment_bound(model, mods_of_first, run) -> int:
    """Bytes dpft keeps for one segment's layers after a forward without checkpointing."""
    engine, opt = _engine(model, 4, two_pass="off")
    loss = run(model)
    bound = held_bytes(mods_of_first)
    loss.backward()
    opt.zero_grad()
    engine.detach()
    return bound


def _measure(model, run, probe_of, steps=3, lane=False, **kw) -> tuple[int, int, int]:
    """(bytes held between forward and backward, most bytes held at a
    segment boundary during the backward pass, in the last of ``steps``
    steps -- the first ones cross-check against autograd and keep more;
    with ``lane`` the lane buffer's bytes are counted too -- and the number of backward
    passes that took two-pass clipping)."""
    engine, opt = _engine(model, 4, **kw)
    during: list[int] = []
    after_forward = 0
    for step in range(steps):

        def probe(h):
            if h.requires_grad:
                h.register_hook(lambda g: during.append(held_bytes() + (lane_bytes(engine) if lane else 0)))

        last = step == steps - 1  # (counting walks every live object: only in the step measured)
        probe_of(model, probe if last else None)
        loss = run(model)
        if last:
            after_forward = held_bytes()
        loss.backward()
        opt.step()
        opt.zero_grad()
    probe_of(model, None)
    two_pass_steps = engine.two_pass_steps
    engine.detach()
    assert during, "no segment boundary was reached"
    return after_forward, max(during), two_pass_steps


def _stack_probe(model, fn):
    model.probe = fn


@pytest.mark.parametrize("subset", ["full", "lora"])
@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_checkpointed_stack_holds_one_segment(mode, subset):
    """A checkpointed stack of 8 blocks: dpft holds at most one block's
    captures between forward and backward and at every segment boundary of
    the backward pass (without the change: all 8 blocks' inputs after the
    forward, and every layer's input and output gradient to the end of the
    backward pass)."""
    torch.manual_seed(0)
    x = torch.randn(4, 512, 4)

    def make(mode):
        torch.manual_seed(1)
        m = Stack(mode=mode)
        if subset == "lora":
            _loraize(m)
        return m

    def run(m):
        return m(x).pow(2).sum(1).mean()

    ref = make(None)
    first = {id(m) for m in ref.blocks[0].modules()}
    bound = _segment_bound(ref, first, run)
    assert bound > 0
    model = make(mode)
    after_forward, during, _ = _measure(model, run, _stack_probe)
    assert after_forward <= bound, f"held {after_forward} bytes after the forward, one segment is {bound}"
    assert during <= bound, f"held {during} bytes during the backward, one segment is {bound}"


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (as LoRA adapters)."""

    def __init__(self, base: nn.Linear, r: int = 2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Linear(base.in_features, r, bias=False)
        self.b = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.b.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def _loraize(model: Stack) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for blk in model.blocks:
        blk.fc1 = LoRALinear(blk.fc1)
        blk.fc2 = LoRALinear(blk.fc2)
    model.head.requires_grad_(True)
    model.inp.requires_grad_(True)  # (reentrant checkpointing needs block inputs that require grad)


# -- Hugging Face: gradient_checkpointing_enable() on a tiny Llama with LoRA --

transformers = pytest.importorskip("transformers")


def _tiny_llama(layers=4, tied=False):
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _lora(model):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    return peft.get_peft_model(model, cfg)


def lm_loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    per_tok = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none"
    )
    return per_tok.view(ids.shape[0], -1).mean(1).mean()


def _decoder_layers(model):
    return model.get_base_model().model.layers


def _hf_probe(model, fn):
    layers = _decoder_layers(model)
    for h in getattr(model, "_probe_handles", []):
        h.remove()
    model._probe_handles = []
    if fn is not None:
        for layer in layers:
            model._probe_handles.append(
                layer.register_forward_pre_hook(
                    lambda mod, args, kwargs: fn(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
                )
            )


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_lora_holds_one_layer(reentrant):
    """``gradient_checkpointing_enable()`` on a 4-layer Llama with LoRA on
    q, k, v, o (peft): dpft holds at most one decoder layer's captures
    between forward and backward and during the backward pass."""
    ids = torch.randint(0, 50, (4, 128), generator=torch.Generator().manual_seed(0))
    ref = _lora(_tiny_llama())
    ref.train()
    first = {id(m) for m in _decoder_layers(ref)[0].modules()}
    bound = _segment_bound(ref, first, lambda m: lm_loss(m, ids))
    assert bound > 0
    model = _lora(_tiny_llama())
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # the embeddings are frozen
    after_forward, during, _ = _measure(model, lambda m: lm_loss(m, ids), _hf_probe)
    assert after_forward <= bound, f"held {after_forward} bytes after the forward, one layer is {bound}"
    assert during <= bound, f"held {during} bytes during the backward, one layer is {bound}"


# -- exactness under checkpointing (float64 brute force, several steps) --


def _early_choices(engine) -> dict:
    return {b.name: dict(b.early_by_shape) for b in engine._capture.bindings if b.early_by_shape}


@pytest.mark.parametrize("subset", ["full", "full-two-pass", "lora", "bitfit"])
@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_checkpointed_stack_exact(mode, subset):
    """DP full, LoRA and BiTFiT of a checkpointed stack equal the brute-force
    clipped means of the same model without checkpointing, over several
    steps (float64).  The shapes are chosen so that the mixed rule alone
    would take ghost norms at the end (``2 T^2 < P D``) while the per-example
    gradients fit: under checkpointing the usual path (``two_pass='off'``)
    builds them in the backward hook instead; with ``two_pass='auto'`` DP
    full takes two-pass clipping in the last three steps (the first three
    take the usual path and cross-check it), LoRA and BiTFiT
    never (their per-example gradients are small)."""
    B, T, d = 4, 32, 32

    def make(ckpt):
        torch.manual_seed(3)
        m = Stack(d=d, n=2, mode=mode if ckpt else None)
        if subset == "lora":
            _loraize(m)
        return m.double()

    model, ref = make(True), make(False)
    if subset == "bitfit":
        dpft.bitfit(model)
    for p, q in zip(model.parameters(), ref.parameters()):
        q.requires_grad_(p.requires_grad)
    batches = tensor_batches(lambda: torch.randn(B, T, 4, dtype=torch.float64), 6)
    engine = steps_exact(
        model,
        ref,
        batches,
        lambda m, b: m(b).pow(2).sum(1).mean(),
        batch_size=B,
        R=0.05,
        tol=1e-9,
        two_pass="off" if subset == "full" else "auto",
    )
    assert engine.two_pass_steps == (3 if subset == "full-two-pass" else 0)
    choices = _early_choices(engine)
    if subset == "full":
        # fc1 (32 -> 128): 2 T^2 = 2048 < P D = 4096 <= T (P + D) = 5120 (the captures it frees)
        assert all(v is True for k, v in choices["blocks.0.fc1"].items() if len(k) == 3), choices
        assert any(len(k) == 3 for k in choices["blocks.0.fc1"]), choices
    engine.detach()


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_lora_exact(reentrant):
    """peft LoRA on a tiny Llama with ``gradient_checkpointing_enable()``:
    several steps equal the brute force on the same model without
    checkpointing (float64)."""
    B, T = 4, 12
    model = _lora(_tiny_llama(layers=2)).double()
    model.train()
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    gen = torch.Generator().manual_seed(1)

    def batches():
        for _ in range(3):
            ids = torch.randint(0, 50, (B, T), generator=gen)
            yield ids, [ids[i : i + 1] for i in range(B)]

    steps_exact(model, ref, batches(), lm_loss, batch_size=B, R=0.01, tol=1e-6).detach()


# -- DP full fine-tuning: two-pass clipping under checkpointing --


def _full_stack(mode, d=32, n=8):
    torch.manual_seed(1)
    return Stack(d=d, n=n, mode=mode)


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_checkpointed_full_two_pass_holds_one_segment(mode):
    """DP full fine-tuning of a checkpointed stack of 8 blocks at a short
    sequence (``T = 8``: every weight's per-example gradient is larger than
    its captures, so the usual path keeps each layer's input and output
    gradient to the end of the backward pass): from the fourth step on
    (two-pass clipping, chosen automatically) dpft holds at most one block's
    captures (plus the small lane of bias and norm-weight per-example
    gradients) between forward and backward and at every segment boundary
    of both backward passes."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 4)

    def run(m):
        return m(x).pow(2).sum(1).mean()

    ref = _full_stack(None)
    bound = _segment_bound(ref, {id(m) for m in ref.blocks[0].modules()}, run)
    assert bound > 0
    lane = 4 * sum(p.numel() for n, p in ref.named_parameters() if p.ndim == 1) * 4  # B x biases/norms x fp32
    after_forward, during, two_pass_steps = _measure(
        _full_stack(mode), run, _stack_probe, steps=5, lane=True, two_pass="auto"
    )
    assert two_pass_steps == 2, two_pass_steps
    assert after_forward <= bound + lane, f"held {after_forward} bytes after the forward, one segment is {bound}"
    assert during <= bound + lane, f"held {during} bytes during the backward, one segment is {bound} (+{lane})"


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_checkpointed_full_usual_path_grows(mode):
    """The measure above can fail: with ``two_pass='off'`` (the usual path)
    the same run holds the captures of every block by the end of the
    backward pass, more than twice one block's."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 4)

    def run(m):
        return m(x).pow(2).sum(1).mean()

    ref = _full_stack(None)
    bound = _segment_bound(ref, {id(m) for m in ref.blocks[0].modules()}, run)
    _, during, two_pass_steps = _measure(_full_stack(mode), run, _stack_probe, steps=5, two_pass="off")
    assert two_pass_steps == 0
    assert during > 2 * bound, (during, bound)


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_full_holds_one_layer(reentrant):
    """``gradient_checkpointing_enable()`` on a 4-layer Llama, every weight
    trained (DP full): from the fourth step on dpft holds at most one
    decoder layer's captures (plus the lane of norm-weight per-example
    gradients) during the backward passes."""
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = _tiny_llama()
    ref.train()
    first = {id(m) for m in ref.model.layers[0].modules()}
    bound = _segment_bound(ref, first, lambda m: lm_loss(m, ids))
    assert bound > 0
    lane = 4 * sum(p.numel() for p in ref.parameters() if p.ndim == 1) * 4
    model = _tiny_llama()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})

    def probe(m, fn):
        for h in getattr(m, "_probe_handles", []):
            h.remove()
        m._probe_handles = []
        if fn is not None:
            for layer in m.model.layers:
                m._probe_handles.append(
                    layer.register_forward_pre_hook(
                        lambda mod, args, kwargs: fn(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
                    )
                )

    _, during, two_pass_steps = _measure(model, lambda m: lm_loss(m, ids), probe, steps=5, lane=True, two_pass="auto")
    assert two_pass_steps == 2, two_pass_steps
    assert during <= bound + lane, f"held {during} bytes during the backward, one layer is {bound} (+{lane})"


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_full_exact(reentrant):
    """DP full fine-tuning of a tiny Llama with ``gradient_checkpointing_enable()``:
    six steps equal the brute force on the same model without checkpointing
    (float64); the last three take two-pass clipping, the engine's default there."""
    B, T = 4, 12
    model = _tiny_llama(layers=2).double()
    model.train()
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    gen = torch.Generator().manual_seed(1)

    def batches():
        for _ in range(6):
            ids = torch.randint(0, 50, (B, T), generator=gen)
            yield ids, [ids[i : i + 1] for i in range(B)]

    engine = steps_exact(model, ref, batches(), lm_loss, batch_size=B, R=0.01, tol=1e-6)  # (default: "auto")
    assert engine.two_pass_steps == 3
    assert engine.two_pass_worst < 0.1  # (the check's margin: pass 2 matches pass 1 far inside its tolerance)
    engine.detach()


def test_hf_tied_embeddings_two_pass_exact():
    """Tied input and output embeddings (one parameter, two uses in a pass):
    under two-pass clipping its norm is taken at the end of pass 1 from both
    uses (the norm of a sum), and the steps equal the brute force (float64)."""
    B, T = 4, 10
    model = _tiny_llama(layers=2, tied=True).double()
    model.train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(3)

    def batches():
        for _ in range(5):
            ids = torch.randint(0, 50, (B, T), generator=gen)
            yield ids, [ids[i : i + 1] for i in range(B)]

    engine = steps_exact(model, ref, batches(), lm_loss, batch_size=B, R=0.01, tol=1e-6, two_pass="auto")
    assert engine.two_pass_steps == 2
    engine.detach()


def test_hf_loss_in_output_takes_usual_path():
    """A model that returns its loss (``labels=``) beside the logits has two
    outputs that require grad: two-pass clipping is not used, and the steps
    stay exact."""
    B, T = 4, 10
    model = _tiny_llama(layers=2).double()
    model.train()
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(2)

    def batches():
        for _ in range(5):
            ids = torch.randint(0, 50, (B, T), generator=gen)
            yield ids, [ids[i : i + 1] for i in range(B)]

    def loss(m, ids):
        return m(input_ids=ids, labels=ids, use_cache=False).loss

    engine = steps_exact(model, ref, batches(), loss, batch_size=B, R=0.01, tol=1e-6)
    assert engine.two_pass_steps == 0
    engine.detach()


@pytest.mark.parametrize("subset", ["lora", "full"])
def test_two_pass_on_exact_without_checkpointing(subset):
    """``two_pass='on'``: LoRA and full fine-tuning of a stack without
    checkpointing, several steps against the brute force (float64)."""
    B, T, d = 4, 16, 16

    def make():
        torch.manual_seed(5)
        m = Stack(d=d, n=2)
        if subset == "lora":
            _loraize(m)
        return m.double()

    model, ref = make(), make()
    for p, q in zip(model.parameters(), ref.parameters()):
        q.requires_grad_(p.requires_grad)
    batches = tensor_batches(lambda: torch.randn(B, T, 4, dtype=torch.float64), 5)
    engine = steps_exact(
        model, ref, batches, lambda m, b: m(b).pow(2).sum(1).mean(), batch_size=B, R=0.05, tol=1e-9, two_pass="on"
    )
    assert engine.two_pass_steps == 2
    engine.detach()


def test_two_pass_option_checked():
    with pytest.raises(ValueError, match="two_pass must be one of"):
        dpft.EngineOptions(two_pass="yes")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_pass_accumulates_physical_batches(reduction):
    """Three physical batches (a backward pass each) before one step, under
    two-pass clipping (checkpointed stack, non-reentrant): each step is the brute-force clipped
    mean of all the examples (float64), the losses a mean or a sum."""
    from reference import clipped_mean, max_rel_error, per_example_grads

    B, T, d, R = 3, 8, 16, 0.05
    torch.manual_seed(7)
    model = Stack(d=d, n=2, mode="non-reentrant").double()
    ref = Stack(d=d, n=2).double()
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    with pytest.warns(UserWarning):
        engine = dpft.PrivacyEngine(
            model,
            batch_size=3 * B,
            sample_size=1000,
            steps=100,
            noise_multiplier=0.0,
            max_grad_norm=R,
            loss_reduction=reduction,
            two_pass="auto",
        )
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))

    def loss_fn(m, x):
        per = m(x).pow(2).sum(1)
        return per.mean() if reduction == "mean" else per.sum()

    gen = torch.Generator().manual_seed(8)
    for step in range(5):
        xs = [torch.randn(B, T, 4, dtype=torch.float64, generator=gen) for _ in range(3)]
        ref.load_state_dict(model.state_dict())
        singles = [x[i : i + 1] for x in xs for i in range(B)]
        want = clipped_mean(per_example_grads(ref, names, singles, loss_fn), [names], R, "abadi", 3 * B)
        before = {n: p.detach().clone() for n, p in params.items()}
        for x in xs:
            loss_fn(model, x).backward()
        opt.step()
        opt.zero_grad()
        err = max_rel_error({n: before[n] - params[n].detach() for n in names}, want)
        assert err <= 1e-9, f"step {step}: relative error {err:.3e}"
    assert engine.two_pass_steps == 3 * 5 - 3
    engine.detach()


def test_two_pass_half_reweight_never_rounds_up():
    """In bfloat16 the reweighted output gradient never exceeds the exact
    product in magnitude (the clip weights are shrunk before rounding)."""
    from dpft.clip.two_pass import reweight

    g = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w = torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    out = reweight(g, w.float())
    exact = g.double() * w.view(-1, 1)
    assert out.dtype == torch.bfloat16
    assert bool((out.double().abs() <= exact.abs()).all())
    assert float((out.double() - exact).abs().max() / exact.abs().max()) < 2**-6


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_two_pass_evaluation_between_forward_and_backward(mode):
    """A forward under ``torch.no_grad()`` between a training forward and its
    backward pass (an evaluation) does not change what the segments'
    recomputation sees: DP full stays exact under two-pass clipping."""
    B, T, d = 4, 8, 16

    def make(ckpt):
        torch.manual_seed(9)
        return Stack(d=d, n=2, mode=mode if ckpt else None).double()

    model, ref = make(True), make(False)

    def loss_fn(m, b):
        loss = m(b).pow(2).sum(1).mean()
        with torch.no_grad():
            m(b)
        return loss

    batches = tensor_batches(lambda: torch.randn(B, T, 4, dtype=torch.float64), 5)
    engine = steps_exact(model, ref, batches, loss_fn, batch_size=B, R=0.05, tol=1e-9, two_pass="auto")
    assert engine.two_pass_steps == 2
    engine.detach()


class _SideTerm(nn.Module):
    """Keeps an activation that the loss also reads (a regularizer on it): a
    loss term that reaches the weights without going through the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.h = torch.tanh(self.a(x))
        return self.b(self.h)


def _side_loss(m, x):
    return m(x).pow(2).sum(1).mean() + 5.0 * m.h.pow(2).sum(1).mean()


def _side_batches(B=4):
    for _ in range(5):
        x = torch.randn(B, 6, dtype=torch.float64)
        yield x, [x[i : i + 1] for i in range(B)]


def test_default_clips_a_loss_term_that_bypasses_the_output():
    """By default without checkpointing (the usual path) a loss term read from
    a stored activation is clipped with the rest, exact against the brute force over five steps."""
    torch.manual_seed(0)
    model = _SideTerm().double()
    engine = steps_exact(model, copy.deepcopy(model), _side_batches(), _side_loss, batch_size=4, R=0.05, tol=1e-9)
    assert engine.two_pass_steps == 0
    engine.detach()


def _refused_then_exact(model, loss_fn, match):
    """Five steps with ``two_pass='on'`` (noise 0, SGD lr 1): the fourth
    backward pass (the first two-pass one) must raise ``TwoPassMismatch``
    matching ``match`` and leave no gradient; that batch again and every
    other step take the usual path and equal the brute force (float64)."""
    from reference import clipped_mean, max_rel_error, per_example_grads

    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning):  # noise_multiplier=0
        engine = dpft.PrivacyEngine(
            model, batch_size=4, sample_size=1000, steps=100, noise_multiplier=0.0, max_grad_norm=0.05, two_pass="on"
        )
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    for step, (x, singles) in enumerate(_side_batches(B=4)):
        ref.load_state_dict(model.state_dict())
        want = clipped_mean(per_example_grads(ref, names, singles, loss_fn), [names], 0.05, "abadi", 4)
        before = {n: p.detach().clone() for n, p in params.items()}
        if step == 3:
            with pytest.raises(dpft.TwoPassMismatch, match=match):
                loss_fn(model, x).backward()
            assert all(p.grad is None for p in params.values())
        loss_fn(model, x).backward()
        opt.step()
        opt.zero_grad()
        err = max_rel_error({n: before[n] - params[n].detach() for n in names}, want)
        assert err <= 1e-9, f"step {step}: relative error {err:.3e}"
    assert engine.two_pass_steps == 1
    engine.detach()


def test_two_pass_refuses_a_loss_term_that_bypasses_the_output():
    """With ``two_pass='on'`` the same term would reach the weights in pass 2
    without its clip factor: the fingerprint check refuses the first two-pass
    backward pass, naming the layer, drops the step's gradients, and later
    backward passes take the usual path, exact."""
    torch.manual_seed(0)
    _refused_then_exact(
        _SideTerm().double(),
        _side_loss,
        r"layer 'a': its output gradient in pass 2 was not pass 1's times the clip factors.*not clip it",
    )


class _SideBranch(nn.Module):
    """A layer whose output only a loss term reads (never the model output):
    pass 1 never reaches it, pass 2 would train it unclipped."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)
        self.side = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        self.h = self.side(x)
        return self.b(torch.tanh(self.a(x)))


def test_two_pass_refuses_a_layer_only_a_loss_term_reaches():
    torch.manual_seed(0)

    def loss(m, x):
        return m(x).pow(2).sum(1).mean() + m.h.pow(2).sum(1).mean()

    _refused_then_exact(_SideBranch().double(), loss, "layer 'side': its output gradient came in pass 2 only")


def test_fingerprints_catch_a_small_residual():
    """The check itself: pass 2 equal to pass 1 times the weights up to
    float32 rounding passes; a residual of 10 % of one example's gradient at
    one layer is caught; a layer seen in one pass only is named."""
    from dpft.clip.two_pass import Fingerprints

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 16, 32, generator=gen)
    w = torch.rand(4, generator=gen) + 0.1
    for residual, bad in ((0.0, ""), (0.1, "'layer': its output gradient in pass 2 was not")):
        fps = Fingerprints()
        first: dict = {}
        Fingerprints.add(first, "layer", g, 4)
        Fingerprints.add(first, "layer", 2 * g, 4)  # (a layer called twice: the projections add up)
        fps.expect(first, w)
        g2 = g * w.view(-1, 1, 1)
        g2[2] += residual * g[2].norm() * torch.randn(16, 32, generator=gen) / 23
        Fingerprints.add(fps.seen, "layer", g2 * (1 + 1e-7 * torch.randn(g2.shape, generator=gen)), 4)
        Fingerprints.add(fps.seen, "layer", 2 * g2, 4)
        assert fps.mismatch().startswith(bad)
        assert (fps.worst > 1) == bool(bad)
    fps = Fingerprints()
    Fingerprints.add(fps.seen, "other", g, 4)
    assert fps.mismatch() == "'other': its output gradient came in pass 2 only"


def test_two_pass_check_passes_bfloat16_rounding():
    """A Llama in bfloat16 under checkpointing (DP full, two-pass clipping
    after the first passes): the two passes round differently, and the check's tolerance
    (``TWO_PASS_TOL``) leaves them a margin: the largest deviation stays
    under half of it, so no step is refused."""
    model = _tiny_llama(layers=4).to(torch.bfloat16)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, opt = _engine(model, 4, two_pass="on")
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):
        lm_loss(model, torch.randint(0, 50, (4, 32), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
    assert engine.two_pass_steps == 3
    assert 0 < engine.two_pass_worst < 0.5, engine.two_pass_worst
    engine.detach()


def test_two_pass_nonfinite_example_refuses_the_step_not_the_check():
    """A NaN input under two-pass clipping (the default for DP full under
    checkpointing): the fingerprint check does not mistake it for a loss
    term outside the output; the step is refused as on the usual path
    (``FloatingPointError``), nothing is applied, and training goes on."""
    torch.manual_seed(0)
    model = _full_stack("non-reentrant").double()
    engine, opt = _engine(model, 4)
    for group in opt.param_groups:
        group["lr"] = 1.0
    for _ in range(3):  # (the first passes take the usual path)
        model(torch.randn(4, 8, 4, dtype=torch.float64)).pow(2).sum(1).mean().backward()
        opt.step()
        opt.zero_grad()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 8, 4, dtype=torch.float64)
    x[2, 3, 1] = float("nan")
    model(x).pow(2).sum(1).mean().backward()
    with pytest.raises(FloatingPointError):
        opt.step()
    opt.zero_grad()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    model(torch.randn(4, 8, 4, dtype=torch.float64)).pow(2).sum(1).mean().backward()
    opt.step()
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert engine.two_pass_steps == 2
    engine.detach()


def test_two_pass_on_refuses_a_parameter_the_loss_reads_outside_the_model():
    """The loss reads a layer's weight itself (``out @ b.weight``, as in
    ``logits = h @ embed.weight.T`` in a loss function): that use's
    gradient goes to the weight without passing any layer output, so pass 2
    would hand it over unclipped and the layer check cannot see it.  The
    first backward passes take the usual path, whose cross-check against
    autograd's gradient of the whole loss refuses it, naming the weight."""
    torch.manual_seed(0)
    model = _SideTerm().double()

    def loss(m, x):
        out = m(x)
        return out.pow(2).sum(1).mean() + (out @ m.b.weight).pow(2).sum(1).mean()

    with pytest.warns(UserWarning):  # noise_multiplier=0
        engine = dpft.PrivacyEngine(
            model, batch_size=4, sample_size=1000, steps=100, noise_multiplier=0.0, max_grad_norm=0.05, two_pass="on"
        )
    engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    with pytest.raises(dpft.UnsupportedModuleError, match="'b.weight'"):
        loss(model, torch.randn(4, 6, dtype=torch.float64)).backward()
    assert engine.two_pass_steps == 0
    engine.detach()
