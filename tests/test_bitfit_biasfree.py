"""DP-BiTFiT on bias-free models: ``dpft.bitfit`` adds zero-initialised biases
(outputs unchanged), DP training moves them exactly (float64, brute-force
per-example loop), and they survive save_pretrained / state_dict round trips."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import check_model, check_steps

import dpft
from dpft.methods.bitfit import add_zero_biases

transformers = pytest.importorskip("transformers")

T = 7
V = 40


def lm_loss(model, batch):
    logits = model(input_ids=batch).logits
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return per_tok.view(batch.shape[0], -1).mean(1).mean()


def llama(**kw):
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=V,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg)


def mistral():
    cfg = transformers.MistralConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=V,
        max_position_embeddings=32,
    )
    return transformers.MistralForCausalLM(cfg)


def qwen3():
    cfg = transformers.Qwen3Config(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=V,
        max_position_embeddings=32,
    )
    return transformers.Qwen3ForCausalLM(cfg)


def ids(n=3):
    return torch.randint(0, V, (n, T))


def quiet_bitfit(model, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpft.bitfit(model, *args, **kw)


def randomize_biases(model, names, std=0.1):
    """Stand-in for fine-tuned biases (nonzero, so a lost bias shows)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].normal_(std=std)


# ---------------------------------------------------------------------------
# adding the biases


def test_llama_gets_zero_biases_outputs_unchanged_and_says_so():
    model = llama()
    x = ids()
    before = model(x).logits
    with pytest.warns(UserWarning, match=r"added 14 zero-initialised biases"):
        names = dpft.bitfit(model)
    assert model(x).logits.equal(before)  # zero biases: exactly the same outputs
    layers = [
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert sorted(names.added) == sorted(f"{n}.bias" for n in layers)
    assert list(names) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(names) == {n for n, _ in model.named_parameters() if n.endswith("bias")} == set(names.added)
    mods = dict(model.named_modules())
    for n in layers:
        b = mods[n].bias
        assert b.dtype == mods[n].weight.dtype and not b.any() and b.shape == (mods[n].out_features,)
    assert model.lm_head.bias is None and "lm_head (output embedding)" in names.skipped
    assert names.config_flags == {"attention_bias": True, "mlp_bias": True}
    assert model.config.attention_bias and model.config.mlp_bias


def test_log_callback_and_float64_dtype():
    model = llama().double()
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with log=, nothing is warned
        names = dpft.bitfit(model, log=lines.append)
    assert len(lines) == 1 and "added 14" in lines[0] and "config.attention_bias=True" in lines[0]
    assert all(dict(model.named_parameters())[n].dtype == torch.float64 for n in names.added)


def test_model_with_biases_is_left_alone():
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = dpft.bitfit(model)
    assert names == ["2.bias"] and names.added == [] and model[0].bias is None


def test_new_head_in_extra_does_not_count_and_keeps_its_shape():
    """A bias-free backbone plus a new head (with bias) named in extra: the
    backbone gets biases, the head trains as it is."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5, bias=False))
    names = quiet_bitfit(model, extra=["3"])
    assert names.added == ["0.bias"] and model[3].bias is None
    assert names == ["0.bias", "3.weight"] and "3 (named in extra)" in names.skipped


def test_add_biases_modes():
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2))
    assert quiet_bitfit(copy.deepcopy(model), add_biases=False) == ["2.bias"]
    names = quiet_bitfit(model, add_biases=True)  # even though the model has a bias
    assert names.added == ["0.bias"] and names == ["0.bias", "2.bias"]
    bare = nn.Sequential(nn.Linear(4, 8, bias=False))
    with pytest.warns(UserWarning, match="no parameter to train"):
        assert dpft.bitfit(bare, add_biases=False) == []
    with pytest.raises(ValueError, match="add_biases"):
        dpft.bitfit(bare, add_biases="yes")
    with pytest.raises(ValueError, match="no config flag"):
        dpft.bitfit(bare, add_biases="config")


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward ignores ``bias``: must not get one."""

    def forward(self, x):
        return 2 * F.linear(x, self.weight)


def test_subclass_that_overrides_forward_is_skipped_and_named():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), ScaledLinear(4, 2, bias=False))
    names = quiet_bitfit(model)
    assert names.added == ["0.bias"] and model[1].bias is None
    assert any(s.startswith("1 (ScaledLinear overrides forward") for s in names.skipped)


def test_tied_output_embedding_of_a_plain_model_is_skipped():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(4, 4, bias=False), head)
    names = quiet_bitfit(model)
    assert names.added == ["1.bias"] and "2 (output embedding)" in names.skipped


def test_config_mode_adds_only_what_the_config_declares():
    """Qwen3 has attention_bias but no mlp_bias: add_biases='config' adds the
    attention biases only, so the result is a standard Qwen3 checkpoint."""
    model = qwen3()
    names = quiet_bitfit(model, add_biases="config")
    assert names.config_flags == {"attention_bias": True} and model.config.attention_bias
    assert sorted(n.rsplit(".", 2)[-2] for n in names.added) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert model.model.layers[0].mlp.up_proj.bias is None
    # auto adds the MLP biases too, and then no flag set declares them all: none is set
    auto = quiet_bitfit(qwen3())
    assert len(auto.added) == 7 and auto.config_flags == {}


# ---------------------------------------------------------------------------
# DP training moves them exactly


def test_dp_step_on_added_biases_is_exact_llama():
    model = llama()
    names = quiet_bitfit(model)
    assert len(names) == 14
    model.eval()
    check_model(model, [torch.randint(0, V, (T,)) for _ in range(5)], torch.stack, lm_loss)


def test_dp_steps_on_added_biases_are_exact_several_steps():
    """Several steps: the engine changes path after its first passes."""
    model = llama()
    quiet_bitfit(model)
    model.eval()
    check_steps(model, lambda: torch.randint(0, V, (T,)), torch.stack, lm_loss, steps=3, batch_size=5)


class BiasFreeCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, bias=False)
        self.conv1d = nn.Conv1d(4, 3, 2, bias=False)
        self.fc = nn.Linear(3 * 5, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.conv(x))  # (B, 4, 6, 6)
        h = torch.tanh(self.conv1d(h.mean(2)))  # (B, 3, 5)
        return self.fc(h.flatten(1))


def test_dp_step_on_added_conv_biases_is_exact():
    model = BiasFreeCNN()
    names = quiet_bitfit(model)
    assert names == ["conv.bias", "conv1d.bias", "fc.bias"] == names.added

    def loss(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y)

    examples = [(torch.randn(2, 8, 8), torch.randint(0, 3, ())) for _ in range(6)]
    check_model(model, examples, lambda exs: tuple(torch.stack(v) for v in zip(*exs)), loss)


# ---------------------------------------------------------------------------
# saving and loading the fine-tuned biases


def _dp_train_step(model, x):
    """One noisy DP step (so the biases move away from zero)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dpft.PrivacyEngine(
            model, batch_size=x.shape[0], sample_size=100, steps=1, noise_multiplier=1.0, max_grad_norm=1.0
        )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine.attach(opt)
    lm_loss(model, x).backward()
    opt.step()
    opt.zero_grad()
    engine.detach()


def test_save_pretrained_from_pretrained_round_trips_trained_biases(tmp_path):
    model = llama().double()
    names = quiet_bitfit(model)
    _dp_train_step(model, ids(4))
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n in names.added}
    assert all(t.abs().max() > 0 for t in trained.values())
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float64)
    params = dict(loaded.named_parameters())
    for n, t in trained.items():
        assert params[n].equal(t), n
    x = ids()
    assert loaded(x).logits.equal(model(x).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loaded model has its biases: nothing is added again
        again = dpft.bitfit(loaded)
    assert again.added == [] and sorted(again) == sorted(names)


def test_config_mode_round_trips_through_from_pretrained(tmp_path):
    model = qwen3()
    names = quiet_bitfit(model, add_biases="config")
    randomize_biases(model, names.added)
    model.save_pretrained(tmp_path)
    loaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path)
    x = ids()
    assert torch.allclose(loaded(x).logits, model(x).logits, rtol=0, atol=1e-6)
    assert sorted(n for n, _ in loaded.named_parameters() if n.endswith("bias")) == sorted(names.added)


def test_state_dict_round_trip_without_config_flags():
    """Mistral has no bias flags: bitfit (or add_zero_biases) on a fresh model, then load_state_dict."""
    torch.manual_seed(1)
    model = mistral()
    names = quiet_bitfit(model)
    assert len(names.added) == 7 and names.config_flags == {}
    randomize_biases(model, names.added)
    sd = model.state_dict()
    x = ids()
    want = model(x).logits
    for rebuild in (lambda m: quiet_bitfit(m), lambda m: add_zero_biases(m, names.added)):
        fresh = mistral()
        with pytest.raises(RuntimeError, match="Unexpected key"):
            fresh.load_state_dict(sd)  # without the biases the state dict does not fit
        rebuild(fresh)
        fresh.load_state_dict(sd)
        assert fresh(x).logits.equal(want)


def test_add_zero_biases_rejects_a_name_that_is_not_a_layer():
    with pytest.raises(ValueError, match="not a Linear/Conv layer"):
        add_zero_biases(nn.Sequential(nn.ReLU()), ["0.bias"])


# ---------------------------------------------------------------------------
# dpft train --method bitfit


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="pandas not installed")
def test_train_cli_bitfit_on_a_bias_free_llama(tmp_path, capsys):
    from transformers import BertTokenizer, LlamaConfig, LlamaForSequenceClassification

    from dpft.app import cli

    path = tmp_path / "tiny-llama"
    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz ")
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        pad_token_id=0,
        num_labels=2,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    data = tmp_path / "reviews.csv"
    rows = [("great fun", 1), ("loved it", 1), ("dull plot", 0), ("hated it", 0)] * 8
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--model",
            str(path),
            "--dataset",
            str(data),
            "--out",
            str(out),
            "--method",
            "bitfit",
            "--max-seq-len",
            "8",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--no-progress",
            "--epsilon",
            "4",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    assert "note: dpft.bitfit: LlamaForSequenceClassification had no bias terms; added 7 zero-initialised" in stdout
    import json

    summary = json.loads((out / "summary.json").read_text())
    # 7 biases (4 attention: 16+8+8+16, 3 MLP: 24+24+16) + the head's weight (2 x 16, no bias)
    assert summary["trainable_parameters"] == (16 + 8 + 8 + 16) + (24 + 24 + 16) + 2 * 16
