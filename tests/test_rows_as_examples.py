"""A layer output whose leading dimension equals the batch size is not
always one row per example (issue 22, "never silently wrong"): a table shared
by the batch that happens to have as many rows as there are examples, a layer
run sequence-first with as many positions as examples, experts (not named
so) fed exactly as many tokens as examples, T5's relative attention bias when
the target length equals the batch size.  Each must be exact (float64,
several steps, every example clipped or some, against a brute-force
per-example loop) or refused with a dpft message: never silently wrong."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import zoo_models as Z
from reference import check_steps
from dpft.rules.base import UnsupportedModuleError

B, T, D = 4, 4, 6


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _collate(examples):
    return tuple(torch.stack(v) for v in zip(*examples))


def _make():
    return torch.randn(T, D), torch.randint(0, 3, ())


def exact_or_refused(model, make=_make, collate=_collate, loss=_loss, mode="auto", batch_size=B) -> str:
    """ "exact" if dpft's steps match the brute-force loop, "refused" if dpft
    refused with its own message; an AssertionError (a wrong gradient) fails."""
    try:
        check_steps(model, make, collate, loss, steps=3, batch_size=batch_size, mode=mode)
    except UnsupportedModuleError as e:
        assert str(e).startswith("dpft:"), str(e)
        return "refused"
    return "exact"


class SharedTable(nn.Module):
    """A layer applied to a table shared by the whole batch whose leading
    size equals the batch size; every example reads every row."""

    def __init__(self, rows: int = B) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(rows, D))
        self.inp = nn.Linear(D, D)
        self.proj = nn.Linear(D, D)
        self.out = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = self.proj(self.table)  # (rows, D), rows == batch size: not one row per example
        h = torch.tanh(self.inp(x)) + t.mean(0)
        return self.out(h.mean(1))


class SequenceFirst(nn.Module):
    """A layer run sequence-first, ``(T, B, d)``, with ``T == B``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.mid = nn.Linear(D, D)
        self.out = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x)).transpose(0, 1)  # (T, B, D)
        h = torch.tanh(self.mid(h)).transpose(0, 1)
        return self.out(h.mean(1))


class Ffn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, 7)
        self.down = nn.Linear(7, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class SignRouted(nn.Module):
    """A hand-written mixture whose feed-forward blocks are not named
    "expert": a token goes to block 1 when the first feature of its input is
    positive, else to block 0, weighted by a learned gate.  Fed examples whose
    two tokens are both positive or both negative, alternately, each block's
    layers see exactly as many rows as there are examples: two rows from each
    of half the examples."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.router = nn.Linear(D, 2)
        self.ffns = nn.ModuleList(Ffn() for _ in range(2))
        self.out = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        chosen = (x.reshape(b * t, d)[:, 0] > 0).long()
        h = torch.tanh(self.inp(x)).reshape(b * t, d)
        gate = torch.softmax(self.router(h), -1)
        out = h.clone()
        for k, ffn in enumerate(self.ffns):
            token = torch.where(chosen == k)[0]
            out = out.index_add(0, token, ffn(h[token]) * gate[token, k : k + 1])
        return self.out(out.view(b, t, d).mean(1))


def _make_signed():
    count = iter(range(10**6))

    def make():  # two tokens of one sign, the sign alternating between examples
        x = torch.randn(2, D)
        x[:, 0] = x[:, 0].abs() * (1 if next(count) % 2 else -1)
        return x, torch.randint(0, 3, ())

    return make


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_layer_on_a_shared_table_of_batch_size_rows(mode):
    torch.manual_seed(0)
    assert exact_or_refused(SharedTable(), mode=mode) == "exact"


def test_layer_on_a_shared_table_other_size_is_exact():
    torch.manual_seed(0)
    assert exact_or_refused(SharedTable(rows=B + 1)) == "exact"


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_sequence_first_layer_with_as_many_positions_as_examples(mode):
    torch.manual_seed(0)
    assert exact_or_refused(SequenceFirst(), mode=mode) == "exact"


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_unnamed_experts_fed_as_many_tokens_as_examples(mode):
    torch.manual_seed(0)
    assert exact_or_refused(SignRouted(), make=_make_signed(), mode=mode) == "exact"


def _t5():
    return Z._model(
        "T5ForConditionalGeneration",
        Z._config(
            "T5Config",
            d_model=16,
            d_kv=8,
            d_ff=24,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            vocab_size=Z.V,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
    )


@pytest.mark.parametrize("target", [B, B + 1])
def test_t5_full_with_target_length_equal_to_the_batch_size(target):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _t5()
    g = torch.Generator().manual_seed(1)

    def make():
        ids = torch.randint(3, Z.V, (Z.T,), generator=g)
        labels = torch.randint(3, Z.V, (target,), generator=g)
        dec = torch.cat([torch.zeros(1, dtype=torch.long), labels[:-1]])
        return {"input_ids": ids, "decoder_input_ids": dec, "labels": labels}

    def collate(examples):
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}

    def loss(m, batch):
        return Z.seq2seq_loss(m, batch)

    assert exact_or_refused(model, make, collate, loss, batch_size=B) == "exact"


def test_refusal_names_the_module_where_no_enclosing_module_can_take_over():
    """A block run sequence-first (``T == B``) inside a model that holds no
    trainable layer of its own: no module around the block that dpft watches
    returns one row per example, so the layer is refused, by name, before a
    step is applied."""
    torch.manual_seed(0)

    class SeqFirstBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(D, D))

        def forward(self, x: Tensor) -> Tensor:
            return self.block(x.transpose(0, 1)).transpose(0, 1)

    model = SeqFirstBlock().double()
    with pytest.raises(UnsupportedModuleError, match="'block.0' .*not one row per example"):
        check_steps(model, _make, _collate, lambda m, b: m(b[0]).pow(2).sum((1, 2)).mean(), steps=1, batch_size=B)


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_batch_size_meets_the_table_length_only_after_the_first_passes(mode):
    """Poisson batches vary in size: the batch first has as many examples as
    the shared table has rows after the engine's first (checking) passes.
    The layer is verified in that forward, the first where its rows look like
    examples, and handed to the enclosing module's recomputation there."""
    from reference import per_example_grads, pick_threshold, steps_exact, to_double
    import copy

    torch.manual_seed(0)
    model = SharedTable(rows=B).double()
    ref = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [B + 1, B + 1, B + 1, B, B]
    exs = [[_make() for _ in range(k)] for k in sizes]
    R = pick_threshold(per_example_grads(ref, names, [to_double(_collate([e])) for e in exs[0]], _loss))

    def batches():
        for step_exs in exs:
            yield to_double(_collate(step_exs)), [to_double(_collate([e])) for e in step_exs]

    # (the loss is a mean over the physical batch; the engine and the reference both divide by the expected size)
    steps_exact(model, ref, batches(), _loss, batch_size=B + 1, R=R, mode=mode).detach()


class _Checkpointed(nn.Module):
    """``inner`` run as one activation-checkpointed segment after a first
    layer (so that the segment's input requires grad, as reentrant
    checkpointing needs)."""

    def __init__(self, inner: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.pre = nn.Linear(D, D)
        self.inner = inner
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, self.pre(x), use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("build", [SharedTable, SequenceFirst], ids=["shared-table", "sequence-first"])
def test_rows_inside_a_checkpointed_segment_are_checked(build, reentrant):
    """The same layers inside an activation-checkpointed segment: a
    non-reentrant segment is recomputed by the check's own pull-back (its
    forward hooks run as in the backward pass's recomputation); a reentrant
    segment, whose forward ran without gradients, is checked when it is
    recomputed, against the segment's inputs.  Exact or refused, never a
    wrong step (both were silently wrong before)."""
    torch.manual_seed(0)
    model = _Checkpointed(build(), reentrant)
    ref = _Checkpointed(copy.deepcopy(model.inner), False)
    ref.load_state_dict(model.state_dict())
    ref = ref.double()
    try:
        check_steps(model, _make, _collate, _loss, steps=3, batch_size=B, ref=ref)
    except UnsupportedModuleError as e:
        assert str(e).startswith("dpft:") and ("proj" in str(e) or "mid" in str(e)), str(e)
        if reentrant:
            assert "reentrant" in str(e)


def _t5_case(target: int, source: int):
    g = torch.Generator().manual_seed(1)

    def make():
        ids = torch.randint(3, Z.V, (source,), generator=g)
        labels = torch.randint(3, Z.V, (target,), generator=g)
        dec = torch.cat([torch.zeros(1, dtype=torch.long), labels[:-1]])
        return {"input_ids": ids, "decoder_input_ids": dec, "labels": labels}

    def collate(examples):
        return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}

    return make, collate, lambda m, batch: Z.seq2seq_loss(m, batch)


@pytest.mark.parametrize("target", [B, B + 1])
def test_t5_under_non_reentrant_checkpointing_with_target_length_equal_to_the_batch_size(target):
    """Hugging Face's gradient checkpointing (non-reentrant, its default): the
    relative attention bias's rows are checked through the checkpointed
    blocks and taken over by the enclosing module where they are not
    examples: exact (silently wrong before, 0.75 % relative error)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _t5()
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    make, collate, loss = _t5_case(target, Z.T)
    check_steps(model, make, collate, loss, steps=3, batch_size=B, ref=ref)


def test_t5_under_reentrant_checkpointing_with_every_length_equal_to_the_batch_size_is_refused():
    """Reentrant checkpointing with source and target lengths both equal to
    the batch size: the bias's rows, first seen in a recomputation, depend on
    no example; refused by name (silently wrong before)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _t5()
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    make, collate, loss = _t5_case(B, B)
    with pytest.raises(UnsupportedModuleError, match="relative_attention_bias.*reentrant"):
        check_steps(model, make, collate, loss, steps=2, batch_size=B, ref=ref)


def test_a_model_returning_only_its_loss_is_warned_once():
    """Without a batch-first output nothing can be pulled back from the
    examples' outputs: the rows check cannot run, and dpft says so (once)."""
    import warnings

    import dpft
    from dpft.capture.checks import UncheckedRowsWarning

    class LossOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = SequenceFirst()

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(self.net(x), y)

    torch.manual_seed(0)
    model = LossOnly()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(model, batch_size=B, sample_size=100, steps=10, noise_multiplier=1.0)
        opt = engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _collate([_make() for _ in range(B)])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            model(x, y).backward()
            opt.step()
            opt.zero_grad()
    unchecked = [w for w in seen if issubclass(w.category, UncheckedRowsWarning)]
    assert len(unchecked) == 1 and "return loss, logits" in str(unchecked[0].message)


def test_rows_check_holds_no_layer_outputs_gradients_at_once(monkeypatch):
    """The rows check's pull-back (first forward) reads each layer output's
    gradient in a hook as it passes and differentiates the layers' smallest
    parameters: what autograd returns to it is a few LoRA factors, not the
    gradient of every layer's ``B x T x d`` output at once (a whole model's
    activations: under checkpointing a 1B Llama at 8 x 2048 ran out of
    memory on an 80 GB GPU that way)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import dpft

    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(cfg),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    pulled: list[int] = []
    real = torch.autograd.grad

    def grad(outputs, inputs, *a, **kw):
        seq = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        pulled.append(sum(t.numel() * t.element_size() for t in seq))
        return real(outputs, inputs, *a, **kw)

    with pytest.warns(UserWarning):  # noise_multiplier=0
        engine = dpft.PrivacyEngine(
            model, batch_size=4, sample_size=100, steps=10, noise_multiplier=0.0, max_grad_norm=1.0
        )
    engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    ids = torch.randint(0, 40, (4, 64))
    monkeypatch.setattr(torch.autograd, "grad", grad)
    logits = model(input_ids=ids, use_cache=False).logits
    monkeypatch.undo()
    assert pulled, "the first forward ran no rows check"
    one_output = 4 * 64 * 32 * 4  # (bytes of one q_proj output: B x T x hidden, float32)
    assert max(pulled) <= lora_bytes < one_output, (pulled, lora_bytes, one_output)
    logits.float().pow(2).mean().backward()
    engine.detach()


class _AfterReentrant(nn.Module):
    """A reentrant checkpointed block, then ``tail`` outside it (downstream of
    the block) whose rows are not examples; ``reentrant=None``: no
    checkpointing (the reference)."""

    def __init__(self, tail: nn.Module, reentrant: bool | None = True) -> None:
        super().__init__()
        self.pre = nn.Linear(D, D)
        self.block = nn.Linear(D, D)
        self.tail = tail
        self.reentrant = reentrant

    def _block(self, h: Tensor) -> Tensor:
        return torch.tanh(self.block(h))

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        h = self.pre(x)
        h = self._block(h) if self.reentrant is None else checkpoint(self._block, h, use_reentrant=True)
        return self.tail(h)


@pytest.mark.parametrize("build", [SharedTable, SequenceFirst], ids=["shared-table", "sequence-first"])
def test_rows_after_a_reentrant_segment_are_checked(build):
    """Layers downstream of every reentrant checkpointed region are checked
    too (a pull-back from the outputs reaches them without going through a
    region): exact or refused (1.5-5 % off, silently, before)."""
    torch.manual_seed(0)
    model = _AfterReentrant(build())
    ref = copy.deepcopy(model)
    ref.reentrant = None
    try:
        check_steps(model, _make, _collate, _loss, steps=3, batch_size=B, ref=ref)
    except UnsupportedModuleError as e:
        assert str(e).startswith("dpft:") and ("proj" in str(e) or "mid" in str(e)), str(e)
