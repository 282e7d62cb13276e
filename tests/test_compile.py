"""``torch.compile`` with dpft attached (dpft.compiled): the compiled model's
private update equals the brute-force per-example clipped mean (float64,
relative error <= 1e-6) step after step, in both orders (engine on the
compiled module, or compile after attaching), for DP full, DP-BiTFiT and
DP-LoRA; noise once per step and every step in the ledger; what cannot be
exact is refused.

Backend "aot_eager" (Dynamo + AOTAutograd, eager kernels) keeps these CPU
tests fast; they exercise what matters to dpft: Dynamo's graph breaks around
the hooks and AOTAutograd's compiled backward feeding the gradient hooks.
Inductor (C++ kernels, also float64) runs the MLP for each method in both
modes the issue names (``default``, ``max-autotune-no-cudagraphs``), and the
generic path.  One test checks that Dynamo never traces dpft's
own code and that Poisson batch sizes cause no recompilation once warm."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpft
from dpft.compiled import CompiledAutogradError
from reference import clipped_mean, max_rel_error, per_example_grads, pick_threshold, to_double

torch._dynamo = pytest.importorskip("torch._dynamo")

B = 4
TOL = 1e-6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()
    # (an engine left attached before its first passes ended keeps compiled
    # forwards eager, process-wide: see dpft.compiled)
    torch.compiler.set_stance("default")


def mlp():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))
    return model, lambda: (torch.randn(5), torch.randint(0, 3, ())), _stack, _cls_loss


def _stack(examples):
    return tuple(torch.stack(v) for v in zip(*examples))


def _cls_loss(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.logits if hasattr(out, "logits") else out, y)


def gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(cfg), lambda: torch.randint(0, 20, (5,)), torch.stack, _lm_loss


def _lm_loss(model, batch):
    logits = model(input_ids=batch).logits
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return per_tok.view(batch.shape[0], -1).mean(1).mean()


def vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.ViTForImageClassification(cfg)
    return model, lambda: (torch.randn(3, 8, 8), torch.randint(0, 3, ())), _stack, _cls_loss


class _Block(nn.Module):
    """Bias-free convolution, GroupNorm, in-place ReLU and an in-place residual add:
    the compiled segments change hooked layers' outputs in place."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.norm(self.conv(x))
        y += x
        return self.act(y)


def cnn():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        _Block(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return model, lambda: (torch.randn(3, 8, 8), torch.randint(0, 3, ())), _stack, _cls_loss


class _MoEHead(nn.Module):
    """A hand-written sparse MoE block (router, top-2 of 4 experts, a shared
    expert; :class:`zoo_models.HandMoE`) and a head: the block takes the
    routed-experts rule (its forward runs eagerly, replayed per example) and
    its parents carry the ancestry hooks."""

    def __init__(self):
        super().__init__()
        from zoo_models import HandMoE

        self.body = HandMoE(4, 6, experts=4, top_k=2)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.body(x)[0].mean(1))


def moe():
    return _MoEHead(), lambda: (torch.randn(3, 4), torch.randint(0, 3, ())), _stack, _cls_loss


def _builders():
    return {"mlp": mlp, "cnn": cnn, "gpt2": gpt2, "vit": vit, "moe": moe}


LORA_TARGETS = {"mlp": ["0", "3"], "gpt2": ["c_attn"], "vit": ["q_proj", "v_proj"], "cnn": ["0", "conv"]}


def _make(name: str, method: str):
    model, make, collate, loss_fn = _builders()[name]()
    if method == "bitfit":
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith("bias"))
    elif method == "lora":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS[name]))
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # peft starts B at zero: make A's gradients non-zero too
                nn.init.normal_(p, std=0.3)
    return model.double(), make, collate, loss_fn


def _engine(model, R, **kw):
    args = dict(batch_size=B, sample_size=100, steps=50, noise_multiplier=0.0, max_grad_norm=R)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_multiplier=0
        return dpft.PrivacyEngine(model, **args)


def run_exact(
    name: str,
    method: str,
    order: str,
    *,
    steps: int = 4,
    backend: str = "aot_eager",
    mode: str | None = None,
    tol: float = TOL,
    prepare=None,
) -> float:
    """``steps`` private steps of the compiled model, each compared with the
    brute-force clipped mean at the current weights (the engine changes path
    after its first backward passes: book-keeping switches weights off)."""
    model, make, collate, loss_fn = _make(name, method)
    ref = copy.deepcopy(model)
    if prepare is not None:
        prepare(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    first = [make() for _ in range(B)]
    R = pick_threshold(per_example_grads(ref, names, [to_double(collate([e])) for e in first], loss_fn))
    compile_kw = {"backend": backend} if mode is None else {"mode": mode}
    if order == "before":
        compiled = torch.compile(model, **compile_kw)
        engine = _engine(compiled, R)
        assert engine.trainable_names == names  # the original model's names, not _orig_mod.*
    else:
        engine = _engine(model, R)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine.attach(opt)
    if order == "after":
        compiled = torch.compile(model, **compile_kw)
    params = dict(model.named_parameters())
    worst = 0.0
    for step in range(steps):
        exs = first if step == 0 else [make() for _ in range(B)]
        batch, singles = to_double(collate(exs)), [to_double(collate([e])) for e in exs]
        ref.load_state_dict(model.state_dict())
        want = clipped_mean(per_example_grads(ref, names, singles, loss_fn), [names], R, "abadi", B)
        before = {n: params[n].detach().clone() for n in names}
        loss_fn(compiled, batch).backward()
        opt.step()
        opt.zero_grad()
        err = max_rel_error({n: before[n] - params[n].detach() for n in names}, want)
        assert err <= tol, f"step {step}: relative error {err:.3e} > {tol}"
        worst = max(worst, err)
    assert engine._compile.opaque  # the hooks ran eagerly, not traced by Dynamo
    assert engine.steps == steps
    engine.detach()
    return worst


@pytest.mark.parametrize("method", ["full", "bitfit", "lora"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_mlp_exact(method, order):
    run_exact("mlp", method, order)


@pytest.mark.parametrize("method,order", [("full", "before"), ("bitfit", "after")])
def test_cnn_exact(method, order):
    run_exact("cnn", method, order, steps=3)


@pytest.mark.parametrize("method,order", [("full", "before"), ("bitfit", "after"), ("lora", "before")])
def test_gpt2_exact(method, order):
    run_exact("gpt2", method, order, steps=3)


@pytest.mark.parametrize("method,order", [("full", "after"), ("lora", "after")])
def test_vit_exact(method, order):
    # (DP-BiTFiT and the "before" order: the MLP, CNN and GPT-2 cases)
    run_exact("vit", method, order, steps=3)


def test_moe_exact():
    run_exact("moe", "full", "before", steps=3)


def test_gpt2_activation_checkpointing_exact():
    # Hugging Face's default (non-reentrant): dpft's captures go through checkpoint's
    # saved-tensor hooks, here inside compiled code
    run_exact("gpt2", "full", "before", steps=3, prepare=lambda m: m.gradient_checkpointing_enable())


def _cxx_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


needs_cxx = pytest.mark.skipif(
    not _cxx_compiler(), reason="inductor's CPU backend compiles C++: no C++ compiler on this machine"
)


@needs_cxx
@pytest.mark.parametrize(
    "mode,method,order",
    [
        ("default", "full", "before"),
        ("default", "bitfit", "after"),
        ("default", "lora", "before"),
        ("max-autotune-no-cudagraphs", "full", "after"),
        ("max-autotune-no-cudagraphs", "bitfit", "before"),
        ("max-autotune-no-cudagraphs", "lora", "after"),
    ],
)
def test_inductor_modes_exact(mode, method, order):
    # the default backend (inductor: fused C++ kernels between the hooked layers), float64,
    # in both modes the issue names, for each method (the two modes generate the same CPU
    # kernels for these graphs, so the second compiles from inductor's cache)
    run_exact("mlp", method, order, steps=3, mode=mode)


def test_noise_once_per_step_and_ledger():
    """Under compile, with noise: the same updates as the eager engine with the
    same noise seed (noise drawn at optimizer.step(), once, never in backward),
    accumulation over two physical batches per step, every step in the ledger."""
    compile_kw = {"backend": "aot_eager"}  # (noise is drawn in optimizer.step(), outside any compiled code)
    model, make, collate, loss_fn = _make("mlp", "full")
    eager_model = copy.deepcopy(model)
    batches = [[to_double(collate([make() for _ in range(2)])) for _ in range(2)] for _ in range(4)]

    def train(m, compile_it):
        engine = dpft.PrivacyEngine(
            torch.compile(m, **compile_kw) if compile_it else m,
            batch_size=B,
            sample_size=100,
            steps=50,
            noise_multiplier=1.3,
            max_grad_norm=0.5,
            noise_seed=7,
        )
        opt = engine.attach(torch.optim.SGD(m.parameters(), lr=0.1))
        fwd = torch.compile(m, **compile_kw) if compile_it else m
        draws = []
        add = engine.noise.add_

        def counted(*a, **k):
            draws.append(engine.steps)
            return add(*a, **k)

        engine.noise.add_ = counted
        for step, phys in enumerate(batches):
            for batch in phys:
                loss_fn(fwd, batch).backward()
                assert len(draws) == 0 or draws[-1] == step - 1  # no noise in backward
            opt.step()
            opt.zero_grad()
            assert engine.steps == step + 1 and engine.ledger.steps == step + 1
        assert sorted(set(draws)) == list(range(len(batches)))  # every step drew noise, each in its own step()
        return engine

    e1 = train(model, True)
    e0 = train(eager_model, False)
    for (n, p), q in zip(model.named_parameters(), eager_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), n
    assert e1.epsilon == pytest.approx(e0.epsilon, rel=1e-12) and e1.epsilon < float("inf")


def test_graphs_compiled_before_attaching_are_not_reused():
    """A compiled model run before the engine existed: its cached graphs have no
    dpft hooks (Dynamo does not guard on module hooks); attaching clears them."""
    model, make, collate, loss_fn = _make("mlp", "full")
    compiled = torch.compile(model, backend="aot_eager")
    loss_fn(compiled, to_double(collate([make() for _ in range(B)]))).backward()  # warm-up, no engine
    model.zero_grad(set_to_none=True)
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    exs = [make() for _ in range(B)]
    grads = per_example_grads(ref, names, [to_double(collate([e])) for e in exs], loss_fn)
    R = pick_threshold(grads)
    engine = _engine(model, R)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn(compiled, to_double(collate(exs))).backward()
    opt.step()
    got = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    assert max_rel_error(got, clipped_mean(grads, [names], R, "abadi", B)) <= TOL


def test_detach_gives_back_ordinary_compiled_training():
    model, make, collate, loss_fn = _make("mlp", "full")
    compiled = torch.compile(model, backend="aot_eager")
    engine = _engine(compiled, 1.0)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    for _ in range(3):  # past the first passes: book-keeping switches weights off in the forward
        loss_fn(compiled, to_double(collate([make() for _ in range(B)]))).backward()
        opt.step()
        opt.zero_grad()
    engine.detach()
    batch = to_double(collate([make() for _ in range(B)]))
    loss_fn(compiled, batch).backward()
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    loss_fn(ref, batch).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12), n


def test_compiled_autograd_refused():
    model, make, collate, loss_fn = _make("mlp", "full")
    engine = _engine(torch.compile(model, backend="aot_eager"), 1.0)
    engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    compiled = torch.compile(model, backend="aot_eager")
    with torch._dynamo.config.patch(compiled_autograd=True), pytest.raises(Exception, match="compiled autograd"):
        loss_fn(compiled, to_double(collate([make() for _ in range(B)]))).backward()
    assert issubclass(CompiledAutogradError, RuntimeError)


def test_fullgraph_refused():
    """One graph cannot hold dpft's hooks: Dynamo's error names the disabled
    hook, at the first compiled forward (the first passes run eagerly)."""
    model, make, collate, loss_fn = _make("mlp", "full")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    engine = _engine(compiled, 1.0)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    for _ in range(engine._capture.check_passes):
        loss_fn(compiled, to_double(collate([make() for _ in range(B)]))).backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(Exception, match="dpft capture hook"):
        loss_fn(compiled, to_double(collate([make() for _ in range(B)])))


@pytest.mark.parametrize("method,later", [("full", False), ("bitfit", False), ("full", True)])
def test_hook_free_instance_compiled_first(method, later):
    """Another instance of the same classes, without hooks, compiled and run while
    the engine is attached: its graphs (which inline the modules' calls) must not
    be reused for the hooked model (Dynamo skips guards on module hooks unless told)."""
    model, make, collate, loss_fn = _make("mlp", method)
    plain, ref = copy.deepcopy(model), copy.deepcopy(model)  # (copied before the engine hooks the model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    exs = [make() for _ in range(B)]
    grads = per_example_grads(ref, names, [to_double(collate([e])) for e in exs], loss_fn)
    R = pick_threshold(grads)
    engine = _engine(torch.compile(model, backend="aot_eager"), R)
    opt = engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0))
    if later:  # past the first passes, where the engine no longer cross-checks with autograd
        for _ in range(3):
            loss_fn(
                torch.compile(model, backend="aot_eager"), to_double(collate([make() for _ in range(B)]))
            ).backward()
            opt.step()
            opt.zero_grad()
        ref.load_state_dict(model.state_dict())
        grads = per_example_grads(ref, names, [to_double(collate([e])) for e in exs], loss_fn)
    for _ in range(2):
        loss_fn(torch.compile(plain, backend="aot_eager"), to_double(collate(exs))).backward()
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    loss_fn(torch.compile(model, backend="aot_eager"), to_double(collate(exs))).backward()
    opt.step()
    got = {n: before[n] - params[n].detach() for n in names}
    assert max_rel_error(got, clipped_mean(grads, [names], R, "abadi", B)) <= TOL


class _TapLinear(nn.Linear):
    """Overrides its parent's forward: dpft catches the F.linear call inside it."""

    def forward(self, x):
        return 2.0 * F.linear(x, self.weight, self.bias)


class _ScaleDrop(nn.Module):
    """A module no rule knows, with dropout: the generic path replays its forward
    with the random state its forward saw."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return F.dropout(torch.tanh(x) * self.scale, 0.3, self.training)


def special():
    model = nn.Sequential(_TapLinear(5, 8), nn.Tanh(), _ScaleDrop(8), nn.Linear(8, 3))
    return model, lambda: (torch.randn(5), torch.randint(0, 3, ())), _stack, _cls_loss


@needs_cxx
def test_inductor_generic_path_and_operator_tap_exact():
    """Under inductor, dropout inside a compiled graph draws other random numbers
    than the eager replay of the generic path: such modules run eagerly."""
    model, make, collate, loss_fn = special()
    model = model.double()
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]

    def reference_grads(exs, seed):
        grads = []
        for i in range(len(exs)):  # example i sees the dropout mask row the batch forward gave it
            torch.manual_seed(seed)
            x, y = to_double(collate(exs))
            loss = F.cross_entropy(ref(x)[i : i + 1], y[i : i + 1])
            grads.append({n: g.detach() for n, g in zip(names, torch.autograd.grad(loss, list(ref.parameters())))})
        return grads

    data = [[make() for _ in range(B)] for _ in range(3)]
    R = pick_threshold(reference_grads(data[0], 100))
    compiled = torch.compile(model)
    engine = _engine(compiled, R)
    assert {b.name: (b.fallback, b.tap is not None) for b in engine._capture.bindings} == {
        "0": (False, True),
        "2": (True, False),
        "3": (False, False),
    }
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    params = dict(model.named_parameters())
    for step, exs in enumerate(data):
        ref.load_state_dict(model.state_dict())
        want = clipped_mean(reference_grads(exs, 100 + step), [names], R, "abadi", B)
        before = {n: params[n].detach().clone() for n in names}
        torch.manual_seed(100 + step)
        loss_fn(compiled, to_double(collate(exs))).backward()
        opt.step()
        opt.zero_grad()
        err = max_rel_error({n: before[n] - params[n].detach() for n in names}, want)
        assert err <= TOL, f"step {step}: relative error {err:.3e}"


class _DynamoRecord:
    """What Dynamo did while the block ran: the frames it started tracing
    (its INFO step log), its recompile-limit warnings, the guards that failed
    (``torch._dynamo.utils.guard_failures``: code object -> reasons) and its
    graph-break reasons (``counters["graph_break"]``)."""

    def __init__(self):
        self.traced: list[str] = []
        self.limit_hits: list[str] = []

    def __enter__(self):
        import logging

        from torch._dynamo.utils import counters, guard_failures

        record = self

        class _Handler(logging.Handler):
            def emit(self, rec):
                msg = rec.getMessage()
                if "start tracing" in msg:
                    record.traced.append(msg)
                elif "recompile_limit" in msg or "cache_size_limit" in msg:
                    record.limit_hits.append(msg)

        counters.clear()
        guard_failures.clear()
        self._counters, self._guard_failures = counters, guard_failures
        self._handler = _Handler(level=logging.INFO)
        self._loggers = [
            (lg, lg.level, lg.propagate)
            for lg in (
                logging.getLogger("torch._dynamo.symbolic_convert"),
                logging.getLogger("torch._dynamo.convert_frame"),
            )
        ]
        for lg, _, _ in self._loggers:
            lg.setLevel(logging.INFO)
            lg.propagate = False  # (not to stderr)
            lg.addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        for lg, level, propagate in self._loggers:
            lg.removeHandler(self._handler)
            lg.setLevel(level)
            lg.propagate = propagate

    def graphs(self) -> int:
        return self._counters["stats"].get("unique_graphs", 0)

    def guard_failures(self) -> dict:
        return {code: list(reasons) for code, reasons in self._guard_failures.items()}

    def graph_breaks(self) -> dict:
        return dict(self._counters["graph_break"])


def test_dpft_hooks_opaque_no_recompiles_across_batch_sizes():
    """Every module hook dpft registers is opaque to Dynamo (the MoE/rows-era
    ancestry hooks ``_anc_pre``/``_anc_post`` on watched parents included):
    Dynamo never traces a dpft frame, no guard and no graph break names dpft
    code other than the disabled hooks themselves, no function reaches
    Dynamo's recompile limit, the first passes compile nothing (they run
    eagerly), and once warm (a batch size change makes the batch dimension
    dynamic; the first passes' hooks come off) Poisson batches of new sizes
    compile nothing."""
    import os

    from dpft.compiled import REASON, dpft_hooks

    model, _, _, loss_fn = _make("gpt2", "full")
    here = os.path.dirname(dpft.__file__)
    compiled = torch.compile(model, backend="eager")
    engine = _engine(compiled, 1.0)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    hooks = dpft_hooks(engine._compile)
    names = {getattr(getattr(fn, "__wrapped__", fn), "__name__", "") for _, _, fn in hooks}
    assert {"_anc_pre", "_anc_post", "_root_pre"} <= names  # (the audit sees the ancestry hooks)
    assert all(getattr(fn, "_torchdynamo_disable", False) for _, _, fn in hooks), [
        (m, k, fn) for m, k, fn in hooks if not getattr(fn, "_torchdynamo_disable", False)
    ]
    sizes = [3, 5, 4, 6, 7, 8, 9]  # (the first passes run eagerly: 4 and 6 compile, 7-9 reuse)
    graphs = []
    with _DynamoRecord() as rec:
        for n in sizes:
            loss_fn(compiled, torch.randint(0, 20, (n, 5))).backward()
            opt.step()
            opt.zero_grad()
            graphs.append(rec.graphs())
    assert engine.steps == len(sizes)
    assert any(here not in t for t in rec.traced)  # (the log is read: the model's frames show)
    assert [t for t in rec.traced if here in t] == []
    assert rec.limit_hits == []
    bad = {
        c.co_name: r for c, r in rec.guard_failures().items() if here in c.co_filename or any(here in str(x) for x in r)
    }
    assert bad == {}
    assert [r for r in rec.graph_breaks() if "dpft" in r and REASON not in r] == []
    assert graphs[0] == 0 and graphs[-3:] == [graphs[-4]] * 3, graphs  # batch sizes 7, 8, 9: nothing compiled
    engine.detach()


@pytest.mark.parametrize("build", ["sequence_first", "shared_table"])
def test_rows_checked_in_the_first_passes_under_compile(build):
    """Issue 22 under ``torch.compile``: a layer run sequence-first whose
    length equals the batch size, and a layer on a table of as many rows as
    examples shared by the batch, are not one row per example.  The first
    passes run the compiled forward eagerly (so the rows check can pull
    gradients back through it) and every step, compiled ones included, equals
    the brute force (float64).  Without the eager first passes these steps
    were 5-50 % off, silently."""
    import test_rows_as_examples as R

    torch.manual_seed(0)
    model = (R.SequenceFirst() if build == "sequence_first" else R.SharedTable()).double()
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())

    def make():
        return torch.randn(R.T, R.D, dtype=torch.float64), torch.randint(0, 3, ())

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    first = [make() for _ in range(R.B)]
    R_ = pick_threshold(per_example_grads(ref, names, [_stack([e]) for e in first], loss))
    compiled = torch.compile(model, backend="aot_eager")
    engine = _engine(compiled, R_, batch_size=R.B)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    stances = []
    for step in range(4):
        exs = first if step == 0 else [make() for _ in range(R.B)]
        ref.load_state_dict(model.state_dict())
        want = clipped_mean(per_example_grads(ref, names, [_stack([e]) for e in exs], loss), [names], R_, "abadi", R.B)
        before = {n: params[n].detach().clone() for n in names}
        stances.append(torch._dynamo.eval_frame._stance.stance)
        loss(compiled, _stack(exs)).backward()
        opt.step()
        opt.zero_grad()
        err = max_rel_error({n: before[n] - params[n].detach() for n in names}, want)
        assert err <= TOL, f"step {step}: relative error {err:.3e}"
    assert stances[0] == "force_eager" and stances[-1] == "default", stances
    engine.detach()
    assert torch._dynamo.eval_frame._stance.stance == "default"


def test_batch_size_first_met_later_under_compile_is_refused():
    """After the first passes a compiled forward cannot be pulled back
    through: a batch whose size first equals a layer's leading dimension
    (here the sequence length of a sequence-first layer) is refused, naming
    the layer, every time, instead of trusted; other batch sizes go on."""
    import test_rows_as_examples as R

    torch.manual_seed(0)
    model = R.SequenceFirst().double()
    compiled = torch.compile(model, backend="aot_eager")
    engine = _engine(compiled, 1.0, batch_size=4)
    opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    for step, b in enumerate([4, 4, 4, 5, 5, 4]):
        x, y = torch.randn(b, 5, R.D, dtype=torch.float64), torch.randint(0, 3, (b,))
        if b == 5:
            with pytest.raises(dpft.UnsupportedModuleError, match=r"module 'mid' .* torch.compile'd forward"):
                F.cross_entropy(compiled(x), y).backward()
        else:
            F.cross_entropy(compiled(x), y).backward()
            opt.step()
        opt.zero_grad()
    engine.detach()
