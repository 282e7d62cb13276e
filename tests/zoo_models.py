"""The architecture zoo of ``test_zoo.py``: real transformers / timm
architectures built from tiny configs (nothing downloaded), each with its
inputs, a per-example loss, its new head and its LoRA target modules.

Every batch is a dict of tensors whose leading dimension is the batch, so one
example is ``{k: v[i:i + 1]}``.  Every loss is the mean over the batch of a
loss that depends on one example alone (token-mean per example for language
modelling, then mean over the batch)."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

V = 64  # vocabulary
T = 6  # sequence length
IMG = 16  # timm image side (8 for the transformers vision models)
LABELS = 3


@dataclass
class Arch:
    """One architecture of the zoo."""

    name: str
    build: Callable[[], nn.Module]  # a fresh float32 model (random init)
    make: Callable[[int, torch.Generator], dict[str, Tensor]]  # a batch of n examples
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor]  # mean over the batch of per-example losses
    head: list[str] = field(default_factory=list)  # the new head: trainable with DP-BiTFiT, modules_to_save with LoRA
    lora: list[str] = field(default_factory=list)  # LoRA target modules
    library: str = "transformers"
    gc: bool = False  # supports model.gradient_checkpointing_enable()
    tol: float = 1e-6  # per-tensor relative error allowed (see F32)


#: Tolerance for models that compute some statistics in float32 even in a
#: float64 model (transformers' RMSNorm / T5 LayerNorm variance casts, float32
#: softmax in eager attention): batched and one-example forwards then differ
#: by float32 rounding (relative ~1e-7, up to ~2e-6 on a LoRA tensor of
#: Gemma2), whatever dpft does.  With those casts disabled (``python
#: tests/test_zoo.py --float64``, a diagnostic monkeypatch) the same cases
#: agree to ~1e-14.  A dpft error is orders of magnitude larger.
F32 = 1e-5


# -- inputs ----------------------------------------------------------------------------------------


def _ids(n: int, g: torch.Generator, lo: int = 3, t: int = T) -> Tensor:
    return torch.randint(lo, V, (n, t), generator=g)


def _padded(n: int, g: torch.Generator, pad: int, t: int = T) -> tuple[Tensor, Tensor]:
    """Token ids and an attention mask, right-padded to random lengths (>= 3)."""
    ids = _ids(n, g, t=t)
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        cut = int(torch.randint(3, t + 1, (), generator=g))
        mask[i, cut:] = 0
        ids[i, cut:] = pad
    return ids, mask


def text_cls_inputs(pad: int) -> Callable:
    def make(n, g):
        ids, mask = _padded(n, g, pad)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, LABELS, (n,), generator=g)}

    return make


def lm_inputs(pad: int | None = None) -> Callable:
    """Causal LM inputs; with ``pad`` right-padded with an attention mask."""

    def make(n, g):
        if pad is None:
            return {"input_ids": _ids(n, g)}
        ids, mask = _padded(n, g, pad)
        return {"input_ids": ids, "attention_mask": mask}

    return make


def seq2seq_inputs(pad: int, start: int) -> Callable:
    def make(n, g):
        ids, mask = _padded(n, g, pad)
        labels = _ids(n, g, t=4)
        dec = torch.cat([torch.full((n, 1), start), labels[:, :-1]], 1)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "labels": labels}

    return make


def image_inputs(side: int) -> Callable:
    def make(n, g):
        return {
            "pixel_values": torch.randn(n, 3, side, side, generator=g),
            "labels": torch.randint(0, LABELS, (n,), generator=g),
        }

    return make


# -- losses ----------------------------------------------------------------------------------------


def _token_mean(logits: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over examples of each example's mean token cross-entropy."""
    per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(
        targets.shape
    )
    if mask is None:
        return per_tok.mean(1).mean()
    mask = mask.to(per_tok.dtype)
    return ((per_tok * mask).sum(1) / mask.sum(1)).mean()


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    logits = model(**batch).logits
    return _token_mean(logits[:, :-1], ids[:, 1:], None if mask is None else mask[:, 1:])


def seq2seq_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return _token_mean(logits, batch["labels"], None)


def cls_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return F.cross_entropy(logits, batch["labels"])


def timm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch["pixel_values"]), batch["labels"])


# -- transformers ----------------------------------------------------------------------------------


def _tf():
    import transformers

    return transformers


def _config(cls_name: str, **kw) -> Any:
    """A transformers config with every dropout probability set to 0."""
    cfg = getattr(_tf(), cls_name)(**kw)
    _no_dropout(cfg)
    return cfg


def _no_dropout(cfg: Any) -> None:
    for k, v in list(vars(cfg).items()):
        if isinstance(v, float) and ("dropout" in k or "pdrop" in k or "drop_prob" in k or k == "layerdrop"):
            setattr(cfg, k, 0.0)
        elif hasattr(v, "to_dict") and hasattr(v, "model_type"):  # a sub-config (CLIP's vision/text)
            _no_dropout(v)


def _model(cls_name: str, cfg: Any) -> nn.Module:
    return getattr(_tf(), cls_name)(cfg)


ENC = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    vocab_size=V,
    max_position_embeddings=16,
)
DEC = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    vocab_size=V,
    max_position_embeddings=16,
)


def hf_text_cls(
    name: str,
    cfg_name: str,
    model_name: str,
    lora: list[str],
    pad: int = 0,
    head=("classifier",),
    gc: bool = False,
    tol: float = 1e-6,
    **kw,
) -> Arch:
    cfg = dict(ENC, num_labels=LABELS, pad_token_id=pad, **kw)
    return Arch(
        name,
        lambda: _model(model_name, _config(cfg_name, **cfg)),
        text_cls_inputs(pad),
        cls_loss,
        list(head),
        lora,
        gc=gc,
        tol=tol,
    )


def hf_causal(
    name: str,
    cfg_name: str,
    model_name: str,
    lora: list[str],
    base: dict | None = None,
    pad: int | None = None,
    gc: bool = False,
    tol: float = 1e-6,
    **kw,
) -> Arch:
    cfg = dict(DEC if base is None else base, **kw)
    return Arch(
        name, lambda: _model(model_name, _config(cfg_name, **cfg)), lm_inputs(pad), lm_loss, [], lora, gc=gc, tol=tol
    )


LLAMA_LIKE = dict(DEC, num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA = dict(LLAMA_LIKE, head_dim=8)


def _hf_vision(name: str, cfg_name: str, model_name: str, lora: list[str], side: int = 8, **kw) -> Arch:
    return Arch(
        name,
        lambda: _model(model_name, _config(cfg_name, num_labels=LABELS, **kw)),
        image_inputs(side),
        cls_loss,
        ["classifier"],
        lora,
    )


def _clip() -> nn.Module:
    tf = _tf()
    vision = dict(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
    )
    text = dict(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=V,
        max_position_embeddings=16,
    )
    cfg = tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=8, num_labels=LABELS)
    _no_dropout(cfg)
    return tf.CLIPForImageClassification(cfg)


def _whisper_inputs(n, g):
    labels = _ids(n, g, t=4)
    dec = torch.cat([torch.full((n, 1), 1), labels[:, :-1]], 1)
    return {"input_features": torch.randn(n, 8, 8, generator=g), "decoder_input_ids": dec, "labels": labels}


def _audio_inputs(n, g):
    return {"input_values": torch.randn(n, 40, generator=g), "labels": torch.randint(0, LABELS, (n,), generator=g)}


def transformers_zoo() -> dict[str, Arch]:
    s2s = dict(
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=24,
        vocab_size=V,
    )
    archs = [
        hf_text_cls("bert", "BertConfig", "BertForSequenceClassification", ["query", "value"], gc=True),
        hf_text_cls("roberta", "RobertaConfig", "RobertaForSequenceClassification", ["query", "value"], pad=1),
        hf_text_cls(
            "deberta-v2",
            "DebertaV2Config",
            "DebertaV2ForSequenceClassification",
            ["query_proj", "value_proj"],
            relative_attention=True,
            pos_att_type=["c2p", "p2c"],
            position_buckets=4,
            max_relative_positions=8,
        ),
        hf_text_cls(
            "electra", "ElectraConfig", "ElectraForSequenceClassification", ["query", "value"], embedding_size=16
        ),
        hf_text_cls(
            "modernbert",
            "ModernBertConfig",
            "ModernBertForSequenceClassification",
            ["Wqkv", "Wo"],
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
            local_attention=4,
            global_attn_every_n_layers=2,
            tol=F32,
        ),
        hf_causal(
            "gpt2",
            "GPT2Config",
            "GPT2LMHeadModel",
            ["c_attn"],
            pad=0,
            gc=True,
            base=dict(n_embd=16, n_layer=2, n_head=2, vocab_size=V, n_positions=16),
        ),
        hf_causal("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", ["query_key_value"], rotary_pct=0.5),
        hf_causal(
            "opt",
            "OPTConfig",
            "OPTForCausalLM",
            ["q_proj", "v_proj"],
            pad=1,
            base=dict(
                hidden_size=16,
                ffn_dim=24,
                num_hidden_layers=2,
                num_attention_heads=2,
                vocab_size=V,
                max_position_embeddings=16,
                word_embed_proj_dim=16,
                pad_token_id=1,
            ),
        ),
        hf_causal(
            "bloom",
            "BloomConfig",
            "BloomForCausalLM",
            ["query_key_value"],
            base=dict(hidden_size=16, n_layer=2, n_head=2, vocab_size=V),
            tol=F32,
        ),
        hf_causal(
            "llama",
            "LlamaConfig",
            "LlamaForCausalLM",
            ["q_proj", "v_proj"],
            base=LLAMA_LIKE,
            pad=0,
            gc=True,
            tie_word_embeddings=True,
            tol=F32,
        ),
        hf_causal(
            "mistral",
            "MistralConfig",
            "MistralForCausalLM",
            ["q_proj", "v_proj"],
            base=LLAMA_LIKE,
            sliding_window=4,
            tol=F32,
        ),
        hf_causal("qwen2", "Qwen2Config", "Qwen2ForCausalLM", ["q_proj", "v_proj"], base=LLAMA_LIKE, tol=F32),
        hf_causal("gemma", "GemmaConfig", "GemmaForCausalLM", ["q_proj", "v_proj"], base=GEMMA, tol=F32),
        hf_causal(
            "gemma2",
            "Gemma2Config",
            "Gemma2ForCausalLM",
            ["q_proj", "v_proj"],
            base=GEMMA,
            query_pre_attn_scalar=8,
            sliding_window=4,
            tol=F32,
        ),
        hf_causal(
            "gemma3",
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            ["q_proj", "v_proj"],
            base=GEMMA,
            query_pre_attn_scalar=8,
            sliding_window=4,
            tol=F32,
        ),
        hf_causal(
            "mixtral",
            "MixtralConfig",
            "MixtralForCausalLM",
            ["q_proj", "v_proj"],
            base=LLAMA_LIKE,
            num_local_experts=4,
            num_experts_per_tok=2,
            experts_implementation="eager",
            tol=F32,
        ),  # (the default grouped_mm kernel has no float64)
        hf_causal(
            "phi3", "Phi3Config", "Phi3ForCausalLM", ["qkv_proj"], base=dict(LLAMA_LIKE, num_key_value_heads=2), tol=F32
        ),
        hf_causal(
            "mamba",
            "MambaConfig",
            "MambaForCausalLM",
            ["in_proj", "x_proj"],
            base=dict(
                hidden_size=16,
                state_size=4,
                num_hidden_layers=2,
                vocab_size=V,
                expand=2,
                conv_kernel=3,
                time_step_rank=2,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            ),
            tol=F32,
        ),
        hf_causal("biogpt", "BioGptConfig", "BioGptForCausalLM", ["q_proj", "v_proj"], pad=1, pad_token_id=1),
        Arch(
            "t5",
            lambda: _model(
                "T5ForConditionalGeneration",
                _config(
                    "T5Config",
                    d_model=16,
                    d_kv=8,
                    d_ff=24,
                    num_layers=1,
                    num_decoder_layers=1,
                    num_heads=2,
                    vocab_size=V,
                    relative_attention_num_buckets=8,
                    relative_attention_max_distance=16,
                    decoder_start_token_id=0,
                    pad_token_id=0,
                    eos_token_id=1,
                ),
            ),
            seq2seq_inputs(0, 0),
            seq2seq_loss,
            [],
            ["q", "v"],
            gc=True,
            tol=F32,
        ),
        Arch(
            "bart",
            lambda: _model(
                "BartForConditionalGeneration",
                _config(
                    "BartConfig",
                    max_position_embeddings=16,
                    pad_token_id=1,
                    bos_token_id=0,
                    eos_token_id=2,
                    decoder_start_token_id=2,
                    forced_eos_token_id=None,
                    **s2s,
                ),
            ),
            seq2seq_inputs(1, 2),
            seq2seq_loss,
            [],
            ["q_proj", "v_proj"],
        ),
        Arch(
            "whisper",
            lambda: _model(
                "WhisperForConditionalGeneration",
                _config(
                    "WhisperConfig",
                    num_mel_bins=8,
                    max_source_positions=4,
                    max_target_positions=16,
                    pad_token_id=0,
                    bos_token_id=1,
                    eos_token_id=2,
                    decoder_start_token_id=1,
                    suppress_tokens=None,
                    begin_suppress_tokens=None,
                    **s2s,
                ),
            ),
            _whisper_inputs,
            seq2seq_loss,
            [],
            ["q_proj", "v_proj"],
        ),
        Arch(
            "wav2vec2",
            lambda: _model(
                "Wav2Vec2ForSequenceClassification",
                _config(
                    "Wav2Vec2Config",
                    hidden_size=16,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=24,
                    conv_dim=(8, 8),
                    conv_kernel=(4, 3),
                    conv_stride=(2, 2),
                    conv_bias=True,
                    num_conv_pos_embeddings=4,
                    num_conv_pos_embedding_groups=2,
                    num_labels=LABELS,
                    classifier_proj_size=8,
                    vocab_size=V,
                    mask_time_prob=0.0,
                ),
            ),
            _audio_inputs,
            cls_loss,
            ["projector", "classifier"],
            ["q_proj", "v_proj"],
        ),
        _hf_vision(
            "vit",
            "ViTConfig",
            "ViTForImageClassification",
            ["q_proj", "v_proj"],
            image_size=8,
            patch_size=4,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
        ),
        _hf_vision(
            "swin",
            "SwinConfig",
            "SwinForImageClassification",
            ["q_proj", "v_proj"],
            image_size=8,
            patch_size=2,
            embed_dim=8,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=2,
            mlp_ratio=2.0,
        ),
        _hf_vision(
            "convnext",
            "ConvNextConfig",
            "ConvNextForImageClassification",
            ["pwconv1", "pwconv2"],
            image_size=8,
            patch_size=2,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            num_stages=2,
        ),
        # layer scale and a relative position bias table per layer (batch-independent outputs) ...
        _hf_vision(
            "beit",
            "BeitConfig",
            "BeitForImageClassification",
            ["q_proj", "v_proj"],
            image_size=8,
            patch_size=4,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            use_mean_pooling=True,
            layer_scale_init_value=0.1,
            use_relative_position_bias=True,
        ),
        # ... or one table shared by every layer
        _hf_vision(
            "beit-shared-bias",
            "BeitConfig",
            "BeitForImageClassification",
            ["q_proj", "v_proj"],
            image_size=8,
            patch_size=4,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            use_mean_pooling=True,
            layer_scale_init_value=0.1,
            use_shared_relative_position_bias=True,
        ),
        Arch("clip-vision", _clip, image_inputs(8), cls_loss, ["classifier"], ["q_proj", "v_proj"]),
    ]
    return {a.name: a for a in archs}


# -- a hand-written mixture of experts -------------------------------------------------------------


class _Expert(nn.Module):
    """A gated MLP expert: three ``nn.Linear`` (older Mixtral's ``w1``/``w2``/``w3``)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class HandMoE(nn.Module):
    """A sparse mixture-of-experts block written the way older Mixtral and
    Qwen2-MoE were: a router ``nn.Linear``, top-k routing, each expert (a
    module of ``nn.Linear`` layers) called on the tokens gathered for it and
    scattered back with ``index_add_``, plus a shared expert on every token.
    Returns ``(hidden, router_logits)``."""

    def __init__(self, d: int, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(_Expert(d, hidden) for _ in range(experts))
        self.shared_expert = _Expert(d, hidden)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        b, t, d = h.shape
        x = h.view(-1, d)
        logits = self.gate(x)
        weights, chosen = torch.topk(F.softmax(logits, dim=-1), self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, len(self.experts)).permute(2, 1, 0)  # (experts, top_k, tokens)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        out = out + self.shared_expert(x)
        return out.view(b, t, d), logits


class _Out:
    def __init__(self, logits: Tensor) -> None:
        self.logits = logits


class HandMoELM(nn.Module):
    """A tiny causal LM of pre-norm MoE blocks (no attention: the blocks are what is tested)."""

    def __init__(self, d: int = 8, layers: int = 2, experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.moes = nn.ModuleList(HandMoE(d, 12, experts, top_k) for _ in range(layers))
        self.lm_head = nn.Linear(d, V)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> _Out:
        h = self.embed(input_ids)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))[0]
        return _Out(self.lm_head(h))


def hand_moe() -> Arch:
    return Arch("moe-linear", HandMoELM, lm_inputs(0), lm_loss, [], ["w1", "w2", "gate"], library="torch")


# -- timm ------------------------------------------------------------------------------------------

SHIMS = os.path.join(os.path.dirname(__file__), "shims")


_SHIMMED = False  # timm is imported over the test-only torchvision stand-in


def timm_installed() -> bool:
    """Whether timm is installed (without importing it)."""
    return importlib.util.find_spec("timm") is not None


def import_timm():
    """Import timm, or return ``None`` when it is not installed.

    timm imports torchvision; where a real torchvision cannot be imported
    (PyPI's wheel does not load beside the CPU torch the project pins), the
    test-only stand-in in ``tests/shims`` is used for timm's import only: it
    defines just the names timm reads to build models.  It is taken off
    ``sys.path`` and out of ``sys.modules`` right after, so that nothing else
    (transformers checks ``find_spec("torchvision")``) believes torchvision
    is installed; timm keeps the few stand-ins it imported.  Call
    :func:`forget_timm` when done, so that later code finds timm as
    unimportable as it was."""
    global _SHIMMED
    if not timm_installed():
        return None
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or present but broken (its C++ operators do not load)
        _drop("torchvision")
        _drop("timm")  # (what a failed import of timm left behind)
        sys.path.insert(0, SHIMS)
        try:
            import torchvision

            assert getattr(torchvision, "SHIM", False), f"expected the test-only shim, got {torchvision.__file__}"
            import timm
        finally:
            sys.path.remove(SHIMS)
            _drop("torchvision")
        _SHIMMED = True
    import timm

    return timm


def forget_timm() -> None:
    """Undo :func:`import_timm`'s import of timm over the stand-in (a no-op
    when timm was imported over a real torchvision)."""
    global _SHIMMED
    if _SHIMMED:
        _drop("timm")
        _SHIMMED = False


def _drop(package: str) -> None:
    for k in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
        del sys.modules[k]


def _timm_resnet():
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), stem_width=8, num_classes=LABELS)


def _timm_resnetv2():
    """BiT: pre-activation ResNet with weight-standardized convolutions and GroupNormAct."""
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=(1, 1),
        channels=(8, 16),
        stem_chs=8,
        num_classes=LABELS,
        conv_layer=StdConv2d,
        norm_layer=partial(GroupNormAct, num_groups=4),
    )


def _timm_efficientnet():
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    arch = [["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3_s2_e2_c8_se0.25"], ["ir_r1_k3_s2_e2_c16_se0.25"]]
    return EfficientNet(decode_arch_def(arch), num_features=16, stem_size=8, num_classes=LABELS)


def _timm_regnet():
    from timm.models.regnet import RegNet, RegNetCfg

    return RegNet(RegNetCfg(depth=4, w0=8, wa=8.0, wm=1.3, group_size=4, stem_width=8), num_classes=LABELS)


def _timm_mobilevit():
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block

    cfg = ByoModelCfg(
        blocks=(
            _inverted_residual_block(d=1, c=8, s=1, br=2.0),
            _mobilevit_block(d=1, c=16, s=2, transformer_dim=16, transformer_depth=1, patch_size=2, br=2.0),
        ),
        stem_chs=8,
        stem_type="3x3",
        stem_pool="",
        downsample="",
        act_layer="silu",
        num_features=32,
    )
    return ByobNet(cfg, num_classes=LABELS)


def _timm_convnext():
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=LABELS, patch_size=1)


def _timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=IMG,
        patch_size=2,
        window_size=4,
        embed_dim=8,
        depths=(1, 1),
        num_heads=(2, 2),
        mlp_ratio=2.0,
        num_classes=LABELS,
        drop_path_rate=0.0,
    )


def _timm(name: str, build: Callable, head: list[str], lora: list[str]) -> Arch:
    def make():
        import dpft

        import_timm()  # (timm's modules are imported over the stand-in torchvision where needed)
        # 4 groups at most: GroupNorm needs more than one value per group (1x1 maps at the end)
        return dpft.convert_batchnorm_to_groupnorm(build(), max_groups=4)

    return Arch(name, make, image_inputs(IMG), timm_loss, head, lora, library="timm")


TIMM_BUILDERS = {
    "timm-resnet": (_timm_resnet, ["fc"], ["conv1", "conv2"]),
    "timm-resnetv2": (_timm_resnetv2, ["head.fc"], ["conv1", "conv2"]),
    "timm-efficientnet": (_timm_efficientnet, ["classifier"], ["conv_pw", "conv_pwl"]),
    "timm-regnet": (_timm_regnet, ["head.fc"], ["conv1.conv", "conv3.conv"]),
    "timm-mobilevit": (_timm_mobilevit, ["head.fc"], ["qkv", "fc1"]),
    "timm-convnext": (_timm_convnext, ["head.fc"], ["fc1", "fc2"]),
    "timm-swin": (_timm_swin, ["head.fc"], ["qkv", "fc1"]),
}


def timm_zoo() -> dict[str, Arch]:
    return {n: _timm(n, b, h, lo) for n, (b, h, lo) in TIMM_BUILDERS.items()}
