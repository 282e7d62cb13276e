"""dpft.hf.DPTrainer: a transformers.Trainer that trains through PrivacyEngine."""

from __future__ import annotations

import copy
import math
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dpft  # noqa: E402
from dpft.hf import DPTrainer, per_example_loss  # noqa: E402

N, T = 16, 6
# per-example gradient norms of _bert() on _cls_data() are about 0.90-0.94: with R = 0.92
# some examples are clipped and some are not, so a wrong loss scale changes the update
R = 0.92


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_steps=1,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def _cls_data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (N, T), generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": labels[i]} for i in range(N)
    ]


def _reference(model, data, batches, logical, R):
    """The engine's update for these physical batches (noise 0, SGD lr=1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model, batch_size=logical, sample_size=len(data), steps=1, noise_multiplier=0.0, max_grad_norm=R
        )
    opt = engine.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0))
    for idx in batches:
        batch = transformers.default_data_collator([data[i] for i in idx])
        labels = batch.pop("labels")
        logits = model(**batch).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
    opt.step()
    return model


def _assert_same(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("ga", [1, 2])
def test_one_step_equals_engine_shuffled(tmp_path, ga):
    data = _cls_data()
    model = _bert()
    ref = _reference(copy.deepcopy(model), data, [range(4 * i, 4 * i + 4) for i in range(ga)], 4 * ga, R)
    init = copy.deepcopy(model)
    args = _args(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=ga,
        train_sampling_strategy="sequential",
        max_grad_norm=5.0,
    )
    with pytest.warns(UserWarning):
        trainer = DPTrainer(
            model=model, args=args, train_dataset=data, noise_multiplier=0.0, max_grad_norm=R, poisson=False
        )
    assert args.max_grad_norm == 5.0  # the caller's arguments are not mutated
    assert trainer.args.max_grad_norm == 0.0
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.dp_engine.steps == 1
    assert trainer.dp_engine.batch_size == 4 * ga
    _assert_same(model, ref)
    # it did move
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), init.parameters()))
    assert all("grad_norm" not in h for h in trainer.state.log_history)


def test_one_step_equals_engine_poisson(tmp_path):
    data = _cls_data()
    model = _bert()
    init = copy.deepcopy(model)
    args = _args(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2, seed=7, data_seed=7)
    trainer = DPTrainer(model=model, args=args, train_dataset=data, noise_multiplier=0.0, max_grad_norm=R)
    trainer.train()
    sampler = trainer.dp_train_dataloader.batch_sampler
    assert sampler.sample_rate == pytest.approx(6 / N)
    idx = sampler.batch(0, 0)
    assert idx, "seed 7 should draw a non-empty first batch"
    chunks = [idx[i : i + 3] for i in range(0, len(idx), 3)]
    ref = _reference(init, data, chunks, 6, R)
    _assert_same(model, ref)
    assert trainer.dp_engine.steps == 1


def test_poisson_empty_batches_and_epsilon(tmp_path):
    data = _cls_data()
    args = _args(tmp_path, per_device_train_batch_size=1, max_steps=12, learning_rate=0.1)
    trainer = DPTrainer(model=_bert(), args=args, train_dataset=data, target_epsilon=3.0, max_grad_norm=1.0)
    trainer.train()
    sampler = trainer.dp_train_dataloader.batch_sampler
    sizes = [len(sampler.batch(0, i)) for i in range(12)]
    assert 0 in sizes  # q = 1/16: some batches are empty, and training went through them
    assert trainer.dp_engine.steps == 12
    eps = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h]
    assert eps and all(math.isfinite(e) for e in eps) and 0 < eps[-1] <= 3.0


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(cfg)


def _lm_data():
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(N):
        ids = torch.randint(0, 40, (8,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 4] = -100  # different numbers of labelled tokens per example
        out.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels})
    return out


def test_per_example_loss_causal_lm_matches_per_example_hf_loss():
    model = _gpt2().eval()
    data = _lm_data()[:4]
    batch = transformers.default_data_collator(data)
    logits = model(input_ids=batch["input_ids"]).logits
    mine = per_example_loss(logits, batch["labels"], shift=True)
    for i in range(4):
        hf = model(input_ids=batch["input_ids"][i : i + 1], labels=batch["labels"][i : i + 1]).loss
        torch.testing.assert_close(mine[i], hf, rtol=1e-5, atol=1e-6)


def test_causal_lm_trains_and_logs_epsilon(tmp_path):
    model = _gpt2()
    before = copy.deepcopy(model)
    args = _args(
        tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, learning_rate=0.05
    )
    trainer = DPTrainer(
        model=model,
        args=args,
        train_dataset=_lm_data(),
        eval_dataset=_lm_data()[:4],
        target_epsilon=3.0,
        max_grad_norm=1.0,
    )
    out = trainer.train()
    metrics = trainer.evaluate()  # evaluation uses the usual loss and does not touch the ledger
    assert math.isfinite(metrics["eval_loss"]) and trainer.dp_engine.steps == 4
    assert math.isfinite(out.training_loss)
    eps = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h]
    assert len(eps) >= 4 and math.isfinite(eps[-1]) and 0 < eps[-1] <= 3.0
    assert trainer.dp_engine.steps == 4 and trainer.dp_engine.planned_steps == 4
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))


def test_peft_lora_trains(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _gpt2(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    )
    lora = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    assert lora and all("lora_" in k for k in lora)
    assert dpft.hf._is_causal_lm(model) and not dpft.hf._is_causal_lm(_bert())
    args = _args(tmp_path, per_device_train_batch_size=4, max_steps=3, learning_rate=0.5)
    trainer = DPTrainer(model=model, args=args, train_dataset=_lm_data(), target_epsilon=3.0, max_grad_norm=1.0)
    trainer.train()
    assert set(trainer.dp_engine.trainable_names) == set(lora)
    now = dict(model.named_parameters())
    assert any(not torch.equal(now[k], v) for k, v in lora.items())
    assert all(torch.equal(now[k], v) for k, v in frozen.items())
    assert math.isfinite(trainer.dp_engine.epsilon) and trainer.dp_engine.epsilon <= 3.0


def test_bad_input(tmp_path):
    args = _args(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        DPTrainer(model=_bert(), args=args, train_dataset=_cls_data(), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPTrainer(
            model=_bert(),
            args=_args(tmp_path, label_smoothing_factor=0.1),
            train_dataset=_cls_data(),
            target_epsilon=3.0,
        )


def test_engine_options_object(tmp_path):
    """DPTrainer(options=dpft.EngineOptions(...)) is the keywords' trainer; an option given twice is refused."""
    opts = dpft.EngineOptions(max_grad_norm=0.5, clipping_fn="automatic", accountant="rdp", noise_seed=3)
    t = DPTrainer(model=_bert(), args=_args(tmp_path), train_dataset=_cls_data(), target_epsilon=3.0, options=opts)
    kw = DPTrainer(
        model=_bert(),
        args=_args(tmp_path),
        train_dataset=_cls_data(),
        target_epsilon=3.0,
        max_grad_norm=0.5,
        clipping_fn="automatic",
        accountant="rdp",
        noise_seed=3,
    )
    assert t.engine_options == kw.engine_options == opts
    with pytest.raises(ValueError, match="max_grad_norm given both"):
        DPTrainer(
            model=_bert(),
            args=_args(tmp_path),
            train_dataset=_cls_data(),
            target_epsilon=3.0,
            options=opts,
            max_grad_norm=2.0,
        )
    with pytest.raises(ValueError, match="clipping_fn must be one of"):
        DPTrainer(
            model=_bert(), args=_args(tmp_path), train_dataset=_cls_data(), target_epsilon=3.0, clipping_fn="tanh"
        )


# ---------------------------------------------------------------------------
# checkpoints: the privacy ledger, the noise and the sampling continue across a resume


def _resume_args(path, **kw):
    base = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=0.05,
        save_strategy="steps",
        save_steps=5,
        logging_steps=3,
        seed=3,
    )
    return _args(path, **{**base, **kw})


# sigma = 1: the noise matters for the parameters but PLD accounting stays cheap
_DP = dict(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=11)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps (4 per epoch) with a checkpoint after step 5: inside the second epoch."""
    path = tmp_path_factory.mktemp("uninterrupted")
    model = _gpt2()
    trainer = DPTrainer(model=model, args=_resume_args(path), train_dataset=_lm_data(), **_DP)
    trainer.train()
    return trainer, model, path / "out" / "checkpoint-5"


def test_checkpoint_resume_continues_the_ledger_exactly(tmp_path, uninterrupted):
    """A fresh trainer (other initial weights) resumed from checkpoint-5 must end with the
    epsilon, step count, ledger, noise and Poisson batches (hence the parameters) of the
    uninterrupted run."""
    full, full_model, ckpt = uninterrupted
    assert (ckpt / dpft.hf.DP_STATE_NAME).is_file() and (ckpt / "trainer_state.json").is_file()
    saved = torch.load(ckpt / dpft.hf.DP_STATE_NAME, weights_only=True)
    assert saved["global_step"] == 5 and sum(saved["engine"]["ledger"]["steps"]) == 5

    torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
    other = transformers.GPT2LMHeadModel(_gpt2().config)
    resumed = DPTrainer(model=other, args=_resume_args(tmp_path), train_dataset=_lm_data(), **_DP)
    resumed.train(resume_from_checkpoint=str(ckpt))

    e_full, e_res = full.dp_engine, resumed.dp_engine
    assert resumed.state.global_step == full.state.global_step == 6
    assert e_res.steps == e_full.steps == 6
    assert e_res.ledger.segments == e_full.ledger.segments
    eps = e_full.epsilon
    assert math.isfinite(eps) and e_res.epsilon == eps
    # restarting the ledger at 0 would have reported the epsilon of 1 step only
    one = dpft.accounting.epsilon(noise_multiplier=1.0, sample_rate=4 / N, steps=1, delta=e_full.target_delta)
    assert eps > one * 1.5
    # same noise and the same Poisson batch (epoch 1, batch 1) after the resume
    _assert_same(other, full_model)
    logged = [h["epsilon"] for h in resumed.state.log_history if "epsilon" in h]
    assert logged[-1] == pytest.approx(eps)


def test_resume_without_dp_state_or_with_other_noise_is_refused(tmp_path, uninterrupted):
    _, _, ckpt = uninterrupted
    other_sigma = DPTrainer(
        model=_gpt2(),
        args=_resume_args(tmp_path / "a"),
        train_dataset=_lm_data(),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
    )
    with pytest.raises(ValueError, match="noise_multiplier"):
        other_sigma.train(resume_from_checkpoint=str(ckpt))
    stripped = tmp_path / "checkpoint-5"
    shutil.copytree(ckpt, stripped)
    (stripped / dpft.hf.DP_STATE_NAME).unlink()
    again = DPTrainer(model=_gpt2(), args=_resume_args(tmp_path / "b"), train_dataset=_lm_data(), **_DP)
    with pytest.raises(FileNotFoundError, match="restart the privacy ledger"):
        again.train(resume_from_checkpoint=str(stripped))


# ---------------------------------------------------------------------------
# several processes / GPUs: refused with a message that names what works


@pytest.mark.parametrize("prop", ["world_size", "n_gpu"])
def test_multi_process_or_multi_gpu_is_refused(tmp_path, monkeypatch, prop):
    args = _args(tmp_path)
    monkeypatch.setattr(transformers.TrainingArguments, prop, property(lambda self: 2))
    with pytest.raises(NotImplementedError, match=r"single process.*dpft\.PrivacyEngine.*torchrun"):
        DPTrainer(model=_bert(), args=args, train_dataset=_cls_data(), target_epsilon=3.0)
