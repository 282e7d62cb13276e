"""User-level privacy (PrivacyEngine(privacy_unit="user")): exact per-user
clipping against a brute-force per-user loop in float64, the user sampler,
epsilon at the user rate against dp_accounting, and a user-level canary audit."""

from __future__ import annotations

import copy
import math
import warnings

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from scipy import stats
from torch import nn
from torch.nn import functional as F

import dpft
from dpft.data import split_physical, user_poisson_loader

VOCAB, T = 11, 3


class Tiny(nn.Module):
    """Embedding -> Linear (+ LoRA adapter) -> tanh -> LayerNorm -> head, mean over positions."""

    def __init__(self, lora: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6)
        self.fc = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)
        self.lora = lora
        if lora:
            self.lora_A = nn.Linear(6, 2, bias=False)
            self.lora_B = nn.Linear(2, 5, bias=False)
            nn.init.normal_(self.lora_B.weight, std=0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        z = self.fc(h)
        if self.lora:
            z = z + self.lora_B(self.lora_A(h))
        return self.head(self.ln(torch.tanh(z))).mean(1)


def make_model(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny(lora=method == "lora").double()
    for n, p in model.named_parameters():
        nn.init.normal_(p, std=0.7) if "lora_A" not in n else None
    if method == "bitfit":
        dpft.bitfit(model)
    elif method == "lora":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("lora_") or n.startswith("head."))
    elif method == "sparta":
        for p in model.parameters():
            p.requires_grad_(False)
        model.head.requires_grad_(True)
        mask = torch.tensor([True, False, True, False, True])
        dpft.sparta.restrict(model, {"fc.weight": mask, "emb.weight": torch.arange(VOCAB) % 3 == 0})
    return model


def make_data(counts: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Examples of users with ``counts[u]`` examples each, in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    units = torch.cat([torch.full((c,), u) for u, c in enumerate(counts)])
    units = units[torch.randperm(len(units), generator=g)]
    x = torch.randint(0, VOCAB, (len(units), T), generator=g)
    y = torch.randint(0, 3, (len(units),), generator=g)
    return x, y, units


def brute_force(model: nn.Module, x, y, units, R: float, groups, fn: str, divide: float) -> dict[str, torch.Tensor]:
    """sum_u clip(sum_{i in u} g_i) / divide, one example at a time in float64."""
    dpft.sparta.reattach(model)  # a deep copy keeps the row selection on its modules only
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    masks = {n: m for n, m in dpft.sparta.row_masks(params).items()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    K = len(groups)
    for u in units.unique().tolist():
        g_u = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in (units == u).nonzero().flatten().tolist():
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if g is not None:
                    g_u[n] += g
        for n, rm in masks.items():  # row-restricted weights: unselected rows take no part
            g_u[n] = g_u[n] * rm.view_for(g_u[n])
        for group in groups:
            norm = math.sqrt(sum(float(g_u[n].pow(2).sum()) for n in group))
            Rg = R / math.sqrt(K)
            c = (1.0 if norm == 0 else min(1.0, Rg / norm)) if fn == "abadi" else Rg / (norm + 0.01)
            for n in group:
                total[n] += c * g_u[n]
    return {n: t / divide for n, t in total.items()}


def user_norms(model, x, y, units) -> list[float]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for u in units.unique().tolist():
        idx = units == u
        loss = F.cross_entropy(model(x[idx]), y[idx], reduction="sum")
        gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        out.append(math.sqrt(sum(float(g.pow(2).sum()) for g in gs if g is not None)))
    return out


def dpft_step(model, x, y, units, *, R, style, fn, mode, chunk, B, reduction="mean"):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    engine = dpft.PrivacyEngine(
        model,
        batch_size=B,
        sample_size=100,
        steps=10,
        noise_multiplier=0.0,
        max_grad_norm=R,
        clipping_fn=fn,
        clipping_style=style,
        clipping_mode=mode,
        privacy_unit="user",
        loss_reduction=reduction,
    )
    opt = torch.optim.SGD(list(params.values()), lr=1.0)
    engine.attach(opt)
    for xb, yb, ub in split_physical((x, y, units), chunk):
        engine.set_units(ub)
        F.cross_entropy(model(xb), yb, reduction=reduction).backward()
    opt.step()
    opt.zero_grad()
    engine.detach()
    return {n: before[n] - p.detach() for n, p in params.items()}, engine


def rel_err(got, want) -> float:
    num = math.sqrt(sum(float((got[n] - want[n]).pow(2).sum()) for n in want))
    den = math.sqrt(sum(float(want[n].pow(2).sum()) for n in want))
    return num / den


COUNTS = [1, 3, 2, 5, 1, 4]  # 16 examples of 6 users


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "method,style,fn,mode,chunk",
    [
        ("full", "all-layer", "abadi", "auto", 5),
        ("full", "layer-wise", "automatic", "ghost", 4),
        ("full", "all-layer", "abadi", "instantiate", 16),
        ("bitfit", "all-layer", "abadi", "auto", 3),
        ("bitfit", "param-wise", "abadi", "auto", 7),
        ("lora", "all-layer", "abadi", "auto", 5),
        ("lora", "layer-wise", "abadi", "mixed", 2),
        ("sparta", "all-layer", "abadi", "auto", 5),
    ],
)
def test_exact_against_per_user_loop(method, style, fn, mode, chunk):
    x, y, units = make_data(COUNTS)
    model = make_model(method)
    # user norms straddle R: some users clipped, some not
    R = sorted(user_norms(model, x, y, units))[len(COUNTS) // 2] * 0.9
    ref = copy.deepcopy(model)
    got, engine = dpft_step(model, x, y, units, R=R, style=style, fn=fn, mode=mode, chunk=chunk, B=4)
    groups = engine.groups
    want = brute_force(ref, x, y, units, R, groups, fn, 4.0)
    assert rel_err(got, want) <= 1e-6
    # users really were split across physical batches, and per-user != per-example clipping here
    if chunk < len(units):
        spans = [{(i // chunk) for i in (units == u).nonzero().flatten().tolist()} for u in range(len(COUNTS))]
        assert any(len(s) > 1 for s in spans)
    per_example = brute_force(ref, x, y, torch.arange(len(units)), R, groups, fn, 4.0)
    assert rel_err(per_example, want) > 1e-3
    assert engine.sampling_check is not None


def test_exact_with_sum_reduction_and_several_steps():
    x, y, units = make_data(COUNTS, seed=3)
    model = make_model("full")
    R = sorted(user_norms(model, x, y, units))[3]
    want = brute_force(copy.deepcopy(model), x, y, units, R, [[n for n, _ in model.named_parameters()]], "abadi", 4.0)
    got, _ = dpft_step(
        model, x, y, units, R=R, style="all-layer", fn="abadi", mode="auto", chunk=6, B=4, reduction="sum"
    )
    assert rel_err(got, want) <= 1e-6


def test_sparta_scoring_release_is_per_user():
    """SPARTA's scoring pass: engine.release(torch.abs) of the per-user clipped sum."""
    x, y, units = make_data(COUNTS, seed=5)
    model = make_model("full")
    R = sorted(user_norms(model, x, y, units))[2]
    engine = dpft.PrivacyEngine(
        model,
        batch_size=4,
        sample_size=100,
        steps=10,
        noise_multiplier=0.0,
        max_grad_norm=R,
        privacy_unit="user",
    )
    engine.attach(torch.optim.SGD(model.parameters(), lr=1.0))
    for xb, yb, ub in split_physical((x, y, units), 5):
        engine.set_units(ub)
        F.cross_entropy(model(xb), yb).backward()
    got = engine.release(torch.abs)
    engine.detach()
    want = brute_force(model, x, y, units, R, [list(got)], "abadi", 1.0)
    assert rel_err(got, {n: w.abs() for n, w in want.items()}) <= 1e-6


def test_set_units_is_required_and_checked():
    x, y, units = make_data(COUNTS)
    model = make_model("bitfit")
    engine = dpft.PrivacyEngine(
        model, batch_size=4, sample_size=100, steps=10, noise_multiplier=1.0, privacy_unit="user"
    )
    engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    with pytest.raises(RuntimeError, match="set_units"):
        F.cross_entropy(model(x), y).backward()
    engine.set_units(units[:3])
    with pytest.raises(ValueError, match="3 user ids for a backward pass over 16"):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="privacy_unit"):
        dpft.PrivacyEngine(model, batch_size=4, sample_size=100, steps=10, noise_multiplier=1.0, privacy_unit="person")
    example = dpft.PrivacyEngine(make_model("bitfit"), batch_size=4, sample_size=100, steps=10, noise_multiplier=1.0)
    with pytest.raises(RuntimeError, match="privacy_unit='user'"):
        example.set_units(units)


def test_noise_is_sigma_R_per_step_over_users():
    """Noise std sigma*R on the clipped sum, divided by the expected number of users."""
    model = make_model("full")
    sigma, R, B = 3.0, 0.5, 4
    params = [p for p in model.parameters() if p.requires_grad]
    engine = dpft.PrivacyEngine(
        model,
        batch_size=B,
        sample_size=100,
        steps=10,
        noise_multiplier=sigma,
        max_grad_norm=R,
        privacy_unit="user",
        noise_seed=7,
    )
    opt = torch.optim.SGD(params, lr=1.0)
    engine.attach(opt)
    engine.record_empty_batch()  # a step with no user: pure noise
    before = torch.cat([p.detach().flatten().clone() for p in params])
    opt.step()
    delta = before - torch.cat([p.detach().flatten() for p in params])
    engine.detach()
    assert delta.numel() > 100
    assert float(delta.std()) == pytest.approx(sigma * R / B, rel=0.35)


# --------------------------------------------------------------------------
# the user sampler


def test_user_sampler_is_poisson_over_users():
    counts = [1 + (u % 7) for u in range(60)]
    names = [f"user{u}" for u, c in enumerate(counts) for _ in range(c)]
    data = torch.arange(len(names)).double().unsqueeze(1)
    q, steps = 0.2, 600
    loader = user_poisson_loader(data, names, sample_rate=q, steps=steps, seed=1234)
    assert loader.num_users == 60
    per_step = []
    inclusion = torch.zeros(60)
    for batch, units in loader:
        sampled = units.unique()
        # every sampled user comes with all of their examples
        for u in sampled.tolist():
            assert int((units == u).sum()) == counts[u]
        # the examples are the users' own
        assert all(names[int(i)] == loader.users[int(u)] for i, u in zip(batch[:, 0], units))
        per_step.append(len(sampled))
        inclusion[sampled] += 1
    # users per step ~ Binomial(60, q): chi-square over binned counts
    obs = torch.bincount(torch.tensor(per_step), minlength=61).double()
    pmf = torch.tensor(stats.binom.pmf(range(61), 60, q))
    bins = [(0, 8), (8, 10), (10, 12), (12, 14), (14, 16), (16, 61)]
    o = [float(obs[a:b].sum()) for a, b in bins]
    e = [float(pmf[a:b].sum()) * steps for a, b in bins]
    p_batch = stats.chisquare(o, e).pvalue
    # each user's inclusion count ~ Binomial(steps, q), independently of its number of examples
    z = (inclusion - steps * q) / math.sqrt(steps * q * (1 - q))
    p_users = stats.chi2.sf(float((z**2).sum()), 60)
    assert p_batch > 1e-3 and p_users > 1e-3, (p_batch, p_users)


def test_user_sampler_rejects_example_sampling():
    """The chi-square test of users per step can fail: sampling examples at rate q
    gives a wrong distribution of distinct users per step."""
    counts = [1 + (u % 7) for u in range(60)]
    names = [u for u, c in enumerate(counts) for _ in range(c)]
    q, steps = 0.2, 600
    loader = dpft.data.poisson_loader(torch.arange(len(names)), batch_size=round(q * len(names)), steps=steps, seed=1)
    per_step = [len({names[i] for i in b.tolist()}) for b in loader]
    obs = torch.bincount(torch.tensor(per_step), minlength=61).double()
    pmf = torch.tensor(stats.binom.pmf(range(61), 60, q))
    bins = [(0, 8), (8, 10), (10, 12), (12, 14), (14, 16), (16, 61)]
    o = [float(obs[a:b].sum()) for a, b in bins]
    e = [float(pmf[a:b].sum()) * steps for a, b in bins]
    assert stats.chisquare(o, e).pvalue < 1e-6


def test_user_sampler_max_per_user_and_resume():
    names = ["a"] * 10 + ["b"] * 2 + ["c"] * 5
    data = torch.arange(17)
    loader = user_poisson_loader(data, names, sample_rate=1.0, max_per_user=3, steps=5, seed=9)
    seen_a = set()
    for batch, units in loader:
        for u, name in enumerate(loader.users):
            assert int((units == u).sum()) == min(3, names.count(name))
        # the examples really are the user's
        for i, u in zip(batch.tolist(), units.tolist()):
            assert names[i] == loader.users[u]
        seen_a |= {i for i in batch.tolist() if names[i] == "a"}
    assert len(seen_a) > 3  # a fresh random subset each step
    state = loader.state_dict()
    assert state["max_per_user"] == 3
    with pytest.raises(ValueError, match="max_per_user"):
        user_poisson_loader(data, names, sample_rate=1.0, max_per_user=4, steps=5).load_state_dict(state)
    with pytest.raises(ValueError, match="one id per example"):
        user_poisson_loader(data, names[:-1], sample_rate=0.5)


def test_user_loader_empty_batch_and_engine_loop():
    names = [u // 3 for u in range(30)]  # 10 users, 3 examples each
    x = torch.randint(0, VOCAB, (30, T))
    y = torch.randint(0, 3, (30,))
    data = list(zip(x, y))
    loader = user_poisson_loader(data, names, batch_size=2, steps=8, seed=3)
    model = make_model("bitfit").float()
    engine = dpft.PrivacyEngine(
        model,
        batch_size=2,
        sample_size=loader.num_users,
        steps=8,
        noise_multiplier=1.0,
        privacy_unit="user",
        noise_seed=0,
    )
    opt = engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    sizes = []
    for (xb, yb), units in loader:
        sizes.append(len(units))
        if len(units) == 0:
            engine.record_empty_batch()
        for (xc, yc), uc in split_physical(((xb, yb), units), 4):
            engine.set_units(uc)
            F.cross_entropy(model(xc), yc).backward()
        opt.step()
        opt.zero_grad()
    assert engine.steps == 8 and all(s % 3 == 0 for s in sizes)
    assert engine.state_dict()["privacy_unit"] == "user"


# --------------------------------------------------------------------------
# accounting at the user rate


def test_epsilon_is_dp_accounting_at_user_rate():
    users, B, sigma, steps, delta = 200, 10, 1.1, 30, 1e-5
    model = make_model("bitfit")
    engine = dpft.PrivacyEngine(
        model,
        batch_size=B,
        sample_size=users,
        steps=steps,
        noise_multiplier=sigma,
        target_delta=delta,
        privacy_unit="user",
    )
    opt = engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            engine.record_empty_batch()
            opt.step()
    acc = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(B / users, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert engine.sample_rate == B / users
    assert engine.epsilon == pytest.approx(acc.get_epsilon(delta), rel=0.01)
    # the same engine at example level over 16x more examples would report a smaller epsilon (q/16)
    acc2 = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4)
    acc2.compose(dp_accounting.PoissonSampledDpEvent(B / (16 * users), dp_accounting.GaussianDpEvent(sigma)), steps)
    assert acc2.get_epsilon(delta) < engine.epsilon


# --------------------------------------------------------------------------
# a user-level canary audit (one-run, Steinke, Nasr & Jagielski 2023)


def _canary_run(unit: str, m: int, k: int, sigma: float, steps: int, seed: int):
    """m canary users, each in the data with probability 1/2, each with k
    identical white-box examples whose gradient points along the user's own
    coordinate of a bias vector (far above R: always clipped to exactly R).
    Full-batch steps (q = 1).  Returns (inclusion bits, scores, claimed epsilon)."""
    rng = torch.Generator().manual_seed(seed)
    included = torch.rand(m, generator=rng) < 0.5
    users = included.nonzero().flatten()
    ex_users = users.repeat_interleave(k)
    torch.manual_seed(seed)
    model = nn.Linear(1, m)
    model.weight.requires_grad_(False)
    nn.init.zeros_(model.bias)
    n = len(users) if unit == "user" else len(ex_users)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model,
            batch_size=n,
            sample_size=n,
            steps=steps,
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            target_delta=1e-5,
            loss_reduction="sum",
            privacy_unit=unit,
            noise_seed=seed,
        )
    opt = engine.attach(torch.optim.SGD([model.bias], lr=float(n)))  # undo the division by B
    onehot = F.one_hot(ex_users, m).float()
    for _ in range(steps):
        if unit == "user":
            engine.set_units(ex_users)
        (-(model(torch.zeros(len(ex_users), 1)) * onehot).sum() * 100).backward()
        opt.step()
        opt.zero_grad()
    engine.detach()
    return included, model.bias.detach().clone(), engine.epsilon


def _audit(included, scores, r: int) -> tuple[int, int]:
    order = torch.argsort(scores)
    guess_in, guess_out = order[-r // 2 :], order[: r // 2]
    v = int(included[guess_in].sum()) + int((~included[guess_out]).sum())
    return r, v


def test_user_level_canary_audit():
    """Each canary user has k = 8 examples.  Under the user-level engine the
    certified lower bound on a user's epsilon stays below the claim; under the
    example-level engine at the same sigma and q the same audit certifies a
    user's epsilon far above the (per-example) claim: group privacy, not a bug."""
    from dpft.audit import epsilon_lower_bound

    m, k, sigma, steps = 1000, 8, 4.0, 4
    inc, scores, eps_user = _canary_run("user", m, k, sigma, steps, seed=11)
    r, v = _audit(inc, scores, 200)
    lb_user = epsilon_lower_bound(m, r, v, 1e-5)
    inc, scores, eps_example = _canary_run("example", m, k, sigma, steps, seed=11)
    r, v2 = _audit(inc, scores, 200)
    lb_example = epsilon_lower_bound(m, r, v2, 1e-5)
    assert eps_user == pytest.approx(eps_example, rel=1e-6)  # same sigma, q = 1, steps: the same claim
    assert lb_user <= eps_user, (lb_user, eps_user)
    assert lb_example > eps_example + 1.0, (lb_example, eps_example)


# --------------------------------------------------------------------------
# DPTrainer(privacy_unit="user")


def _hf_setup():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(1)
    n = 18
    ids = torch.randint(1, 50, (n, 5), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    data = [
        {"input_ids": ids[i], "attention_mask": torch.ones(5, dtype=torch.long), "labels": labels[i]} for i in range(n)
    ]
    users = [f"u{(i * 7) % 6}" for i in range(n)]  # 6 users of 3 examples, interleaved
    return transformers, model, data, users


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dptrainer_user_level_equals_engine(tmp_path):
    transformers, model, data, users = _hf_setup()
    init = copy.deepcopy(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_steps=1,
        logging_steps=1,
        disable_tqdm=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        data_seed=5,
    )
    R = 0.5
    from dpft.hf import DPTrainer

    trainer = DPTrainer(
        model=model,
        args=args,
        train_dataset=data,
        noise_multiplier=0.0,
        max_grad_norm=R,
        privacy_unit="user",
        user_ids=users,
    )
    trainer.train()
    engine = trainer.dp_engine
    assert engine.privacy_unit == "user" and engine.sample_size == 6 and engine.sample_rate == pytest.approx(4 / 6)
    sampler = trainer.dp_train_dataloader.batch_sampler
    idx = sampler.batch(0, 0)
    assert len({users[i] for i in idx}) >= 2
    # the reference: the engine at user level over the same examples in chunks of 4
    ref = dpft.PrivacyEngine(
        init, batch_size=4, sample_size=6, steps=1, noise_multiplier=0.0, max_grad_norm=R, privacy_unit="user"
    )
    opt = ref.attach(torch.optim.SGD(init.parameters(), lr=1.0))
    for start in range(0, len(idx), 4):
        chunk = idx[start : start + 4]
        batch = transformers.default_data_collator([data[i] for i in chunk])
        y = batch.pop("labels")
        ref.set_units([users[i] for i in chunk])
        F.cross_entropy(init(**batch).logits, y).backward()
    opt.step()
    for (k, a), b in zip(model.named_parameters(), init.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), copy.deepcopy(_hf_setup()[1]).parameters()))


def test_dptrainer_user_column_of_a_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    transformers, model, data, users = _hf_setup()
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": [d["input_ids"].tolist() for d in data],
            "attention_mask": [[1] * 5] * len(data),
            "labels": [int(d["labels"]) for d in data],
            "author": users,
        }
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_steps=3,
        disable_tqdm=True,
        per_device_train_batch_size=2,
        logging_steps=1,
    )
    from dpft.hf import DPTrainer

    trainer = DPTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        target_epsilon=2.0,
        privacy_unit="user",
        user_column="author",
        max_per_user=2,
    )
    trainer.train()
    assert trainer.dp_engine.steps == 3 and trainer.dp_engine.sample_size == 6
    assert 0 < trainer.dp_engine.epsilon <= 2.0
    with pytest.raises(ValueError, match="no column 'writer'"):
        DPTrainer(
            model=model, args=args, train_dataset=ds, target_epsilon=2.0, privacy_unit="user", user_column="writer"
        )
    with pytest.raises(ValueError, match="exactly one of user_column"):
        DPTrainer(model=model, args=args, train_dataset=ds, target_epsilon=2.0, privacy_unit="user")


class _ColumnList(list):
    """A list of example dicts that also answers ``ds[column]`` and ``column_names``
    (what DPTrainer reads of a datasets.Dataset), for CPU tests without ``datasets``."""

    @property
    def column_names(self) -> list[str]:
        return list(self[0])

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self]
        return super().__getitem__(key)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dptrainer_user_column_without_datasets(tmp_path):
    transformers, model, data, users = _hf_setup()
    ds = _ColumnList([{**d, "author": u} for d, u in zip(data, users)])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_steps=3,
        disable_tqdm=True,
        per_device_train_batch_size=2,
        logging_steps=1,
    )
    from dpft.hf import DPTrainer

    trainer = DPTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        target_epsilon=2.0,
        privacy_unit="user",
        user_column="author",
        max_per_user=2,
    )
    trainer.train()
    assert trainer.dp_engine.steps == 3 and trainer.dp_engine.sample_size == 6
    assert trainer.dp_train_dataloader.batch_sampler.max_per_user == 2
    assert 0 < trainer.dp_engine.epsilon <= 2.0
