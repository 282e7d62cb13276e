"""Small real architectures built from configs (no downloads): dpft's update
equals the brute-force per-example clipped mean (float64, rel. error <= 1e-6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import check_model

import dpft

transformers = pytest.importorskip("transformers")

B = 5
T = 7


def lm_loss(model, batch):
    logits = model(input_ids=batch).logits
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return per_tok.view(batch.shape[0], -1).mean(1).mean()


def cls_loss(model, batch):
    x, y = batch
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits, y)


def text_cls_loss(model, batch):
    ids, mask, y = batch
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits, y)


def stack_tuple(examples):
    return tuple(torch.stack(v) for v in zip(*examples))


def gpt2():
    cfg = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(cfg), lambda: torch.randint(0, 50, (T,)), torch.stack, lm_loss


def llama():
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=40,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg), lambda: torch.randint(0, 40, (T,)), torch.stack, lm_loss


def _text(cls, cfg_cls, **kw):
    cfg = cfg_cls(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        vocab_size=60,
        max_position_embeddings=40,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )
    model = cls(cfg)

    def make():
        ids = torch.randint(3, 60, (T,))
        mask = torch.ones(T, dtype=torch.long)
        cut = int(torch.randint(3, T + 1, ()))
        mask[cut:] = 0
        ids[cut:] = cfg.pad_token_id or 0
        return ids, mask, torch.randint(0, 3, ())

    return model, make, stack_tuple, text_cls_loss


def bert():
    return _text(transformers.BertForSequenceClassification, transformers.BertConfig)


def roberta():
    return _text(transformers.RobertaForSequenceClassification, transformers.RobertaConfig, pad_token_id=1)


def vit():
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.ViTForImageClassification(cfg)
    return model, lambda: (torch.randn(3, 8, 8), torch.randint(0, 3, ())), stack_tuple, cls_loss


class Block(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 2 * c if stride == 2 else c, 3, stride=stride, padding=1, bias=False)
        out = self.conv1.out_channels
        self.bn1 = nn.GroupNorm(2, out)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.bn2 = nn.GroupNorm(2, out)
        self.down = (
            nn.Sequential(nn.Conv2d(c, out, 1, stride=stride, bias=False), nn.GroupNorm(2, out))
            if stride == 2
            else None
        )

    def forward(self, x):
        shortcut = x if self.down is None else self.down(x)
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y += shortcut
        return self.act(y)


class ResNetGN(nn.Module):
    """A small ResNet with GroupNorm, in-place residual adds and ReLUs."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.GroupNorm(2, 4), nn.ReLU(inplace=True)
        )
        self.layers = nn.Sequential(Block(4, 1), Block(4, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet():
    return ResNetGN(), lambda: (torch.randn(3, 10, 10), torch.randint(0, 3, ())), stack_tuple, cls_loss


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def encoder():
    return Encoder(), lambda: (torch.randn(T, 3), torch.randint(0, 3, ())), stack_tuple, cls_loss


MODELS = {
    "gpt2": gpt2,
    "bert": bert,
    "roberta": roberta,
    "vit": vit,
    "resnet-gn": resnet,
    "transformer-encoder": encoder,
    "llama": llama,
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("subset", ["bias", "all"])
def test_model_exact(name, subset):
    model, make, collate, loss = MODELS[name]()
    model.eval()  # no dropout; dpft's hooks do not depend on the mode
    if subset == "bias" and not dpft.bitfit(model):
        pytest.skip("model has no biases")
    examples = [make() for _ in range(B)]
    check_model(model, examples, collate, loss)


@pytest.mark.parametrize("name", ["gpt2", "vit", "resnet-gn"])
def test_model_accumulation_automatic(name):
    model, make, collate, loss = MODELS[name]()
    model.eval()
    examples = [make() for _ in range(B)]
    check_model(model, examples, collate, loss, fn="automatic", style="param-wise", splits=[2, 3])
