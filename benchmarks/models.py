"""Benchmark workloads: random-init models built from configs (no downloads)
and random data of the right shape, generated once on the target device.

Every workload exposes the same three things to the timing loop:

* ``wl.model``: the ``nn.Module`` (fp32 parameters);
* ``wl.logits(model)``: one forward pass on the pre-generated batch
  (``model`` may be a wrapper such as Opacus' ``GradSampleModule``);
* ``wl.loss(logits)``: the mean loss over the batch.  Language models use the
  token cross-entropy averaged over tokens per example, then over the batch
  (all sequences have the same length, so this is the mean over all tokens);
  classifiers use the cross-entropy averaged over the batch.

transformers and timm are imported lazily (timm is not installable on every
machine); ``--size tiny`` builds the same families at toy sizes for CPU checks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------
# model specs


@dataclass(frozen=True)
class Spec:
    """What a model name means."""

    family: str  # "gpt2" | "roberta" | "llama" | "vit" | "resnet"
    kind: str  # "lm" | "cls"
    seq_len: int = 0  # text models: default sequence length
    image_size: int = 0  # vision models: default image side
    default_batch: int = 32
    head: str = ""  # the task head's parameter-name prefix (informational)
    lora_targets: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)  # family-specific overrides
    tiny: dict = field(default_factory=dict)  # overrides for --size tiny


GPT2_TINY = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
ROBERTA_TINY = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=72,
)
LLAMA_TINY = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
VIT_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

SPECS: dict[str, Spec] = {
    # GPT-2 small / medium / large, E2E-like sequence length
    "gpt2": Spec("gpt2", "lm", seq_len=100, head="lm_head", lora_targets=("c_attn",), tiny=GPT2_TINY),
    "gpt2-medium": Spec(
        "gpt2",
        "lm",
        seq_len=100,
        head="lm_head",
        lora_targets=("c_attn",),
        config=dict(n_layer=24, n_embd=1024, n_head=16),
        tiny=GPT2_TINY,
    ),
    "gpt2-large": Spec(
        "gpt2",
        "lm",
        seq_len=100,
        head="lm_head",
        lora_targets=("c_attn",),
        config=dict(n_layer=36, n_embd=1280, n_head=20),
        tiny=GPT2_TINY,
    ),
    # RoBERTa base / large (the real checkpoints' embedding sizes)
    "roberta": Spec(
        "roberta",
        "cls",
        seq_len=256,
        head="classifier",
        lora_targets=("query", "value"),
        tiny=ROBERTA_TINY,
    ),
    "roberta-large": Spec(
        "roberta",
        "cls",
        seq_len=256,
        head="classifier",
        lora_targets=("query", "value"),
        config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        tiny=ROBERTA_TINY,
    ),
    # ViT-base/16 and ResNet50 with GroupNorm, 224 px, 10 classes (timm)
    "vit": Spec("vit", "cls", image_size=224, head="head", lora_targets=("qkv",), tiny=VIT_TINY),
    "resnet50gn": Spec("resnet", "cls", image_size=224, head="fc", tiny=dict(image_size=32)),
    # Llama-style ~1.1B model; biases switched on so that BiTFiT has something to train
    "llama1b": Spec(
        "llama",
        "lm",
        seq_len=256,
        default_batch=8,
        head="lm_head",
        lora_targets=("q_proj", "v_proj"),
        config=dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            vocab_size=32000,
            max_position_embeddings=4096,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        ),
        tiny=LLAMA_TINY,
    ),
}

ROBERTA_BASE = dict(
    vocab_size=50265,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    num_labels=2,
)
NUM_CLASSES = 10


# ----------------------------------------------------------------------------
# builders


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Create parameters directly on ``device`` (much faster random init on a GPU)."""
    return torch.device(device) if device.type != "cpu" else contextlib.nullcontext()


def _build(fn: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    try:
        with _on_device(device):
            model = fn()
    except Exception:  # some library inits do not like a default device: build on CPU, then move
        model = fn()
    return model.to(device)


def _gpt2(spec: Spec, tiny: bool, seq_len: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(spec.config)
    if tiny:
        kw.update(spec.tiny)
    kw["n_positions"] = max(kw.get("n_positions", 1024), seq_len)
    return GPT2LMHeadModel(GPT2Config(**kw))


def _roberta(spec: Spec, tiny: bool, seq_len: int) -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    kw = dict(ROBERTA_BASE)
    kw.update(spec.config)
    if tiny:
        kw.update(spec.tiny)
    # positions start at pad_token_id + 1
    kw["max_position_embeddings"] = max(kw["max_position_embeddings"], seq_len + 2)
    return RobertaForSequenceClassification(RobertaConfig(**kw))


def _llama(spec: Spec, tiny: bool, seq_len: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(spec.config)
    if tiny:
        kw.update(spec.tiny)
    kw["max_position_embeddings"] = max(kw.get("max_position_embeddings", 2048), seq_len)
    return LlamaForCausalLM(LlamaConfig(**kw))


def _timm():
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install (missing torchvision)
        raise ModuleNotFoundError(f"timm is not importable ({type(e).__name__}: {e})") from e
    return timm


def _vit(spec: Spec, tiny: bool, image_size: int) -> nn.Module:
    timm = _timm()
    kw: dict[str, Any] = dict(num_classes=NUM_CLASSES)
    if tiny:
        kw.update(spec.tiny)
    kw["img_size"] = image_size
    return timm.create_model("vit_base_patch16_224", **kw)


def _resnet_gn(spec: Spec, tiny: bool, image_size: int) -> tuple[nn.Module, str]:
    """ResNet50 with GroupNorm(32) in place of BatchNorm.  timm names it
    ``resnet50_gn``; older/newer timm: ``resnet50`` with ``norm_layer='groupnorm'``;
    last resort: dpft's BatchNorm -> GroupNorm conversion (gcd(C, 32) groups = 32)."""
    if tiny:
        return TinyResNetGN(), "benchmarks.models.TinyResNetGN"
    timm = _timm()
    errors = []
    for name, kw in (("resnet50_gn", {}), ("resnet50", {"norm_layer": "groupnorm"})):
        try:
            m = timm.create_model(name, num_classes=NUM_CLASSES, **kw)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{name}: {e}")
            continue
        if any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules()):
            errors.append(f"{name}{kw}: still has BatchNorm")
            continue
        return m, f"timm.{name}{kw or ''}"
    import dpft

    m = timm.create_model("resnet50", num_classes=NUM_CLASSES)
    return dpft.convert_batchnorm_to_groupnorm(m, max_groups=32), "timm.resnet50 + dpft.convert_batchnorm_to_groupnorm"


class TinyBottleneck(nn.Module):
    """timm/torchvision-style bottleneck: bias-free convs, GroupNorm, in-place
    ReLU and an in-place residual add (``x += shortcut``)."""

    def __init__(self, cin: int, width: int, stride: int, groups: int = 4) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.GroupNorm(groups, width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.GroupNorm(groups, width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.GroupNorm(groups, cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(groups, cout))
            if stride != 1 or cin != cout
            else None
        )
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class TinyResNetGN(nn.Module):
    """A two-stage toy ResNet-GN with the layout of timm's ResNet (no timm needed)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.GroupNorm(4, width)
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = TinyBottleneck(width, width, 1)
        self.layer2 = TinyBottleneck(width * 4, width * 2, 2)
        self.fc = nn.Linear(width * 8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------
# workload


@dataclass
class Workload:
    name: str
    spec: Spec
    model: nn.Module
    inputs: dict[str, Tensor]
    targets: Tensor
    info: dict[str, Any]
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def batch_size(self) -> int:
        return int(self.targets.shape[0])

    def logits(self, model: nn.Module | None = None, extra: dict[str, Tensor] | None = None) -> Tensor:
        m = self.model if model is None else model
        if self.spec.family in ("vit", "resnet"):
            return m(self.inputs["x"])
        out = m(**self.inputs, **(extra or {}), **self.call_kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    def loss(self, logits: Tensor) -> Tensor:
        if self.kind == "lm":
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), self.targets.reshape(-1))
        return F.cross_entropy(logits.float(), self.targets)

    def criterion_args(self, logits: Tensor) -> tuple[tuple, dict]:
        """Arguments for an ``nn.CrossEntropyLoss``-like criterion (Opacus'
        ghost-clipping wrapper) giving the same loss as :meth:`loss`."""
        if self.kind == "lm":
            return (logits.reshape(-1, logits.shape[-1]).float(), self.targets.reshape(-1)), {"shape": logits.shape}
        return (logits.float(), self.targets), {}


def names() -> list[str]:
    return list(SPECS)


def default_shape(name: str, tiny: bool = False) -> dict[str, int]:
    """``{"seq_len": T}`` for text models, ``{"image_size": S}`` for vision models."""
    spec = SPECS[name]
    if spec.family in ("gpt2", "roberta", "llama"):
        return {"seq_len": 16 if tiny else spec.seq_len}
    return {"image_size": int(spec.tiny.get("img_size", spec.tiny.get("image_size", 32))) if tiny else spec.image_size}


def build(
    name: str,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    tiny: bool = False,
    seq_len: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> Workload:
    """Random-init model + one random batch on ``device``."""
    if name not in SPECS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(SPECS)}")
    spec = SPECS[name]
    device = torch.device(device)
    torch.manual_seed(seed)
    info: dict[str, Any] = {"family": spec.family, "size": "tiny" if tiny else "full"}
    call_kwargs: dict[str, Any] = {}
    if spec.family in ("gpt2", "roberta", "llama"):
        t = seq_len or default_shape(name, tiny)["seq_len"]
        info["seq_len"] = t
        builder = {"gpt2": _gpt2, "roberta": _roberta, "llama": _llama}[spec.family]
        model = _build(lambda: builder(spec, tiny, t), device)
        vocab = model.config.vocab_size
        info["source"] = f"transformers.{type(model).__name__}"
        if spec.family in ("gpt2", "llama"):
            call_kwargs["use_cache"] = False
        g = torch.Generator(device=device).manual_seed(seed)
        low = 3 if spec.family == "roberta" else 0  # skip RoBERTa's bos/pad/eos ids
        ids = torch.randint(low, vocab, (batch_size, t), generator=g, device=device)
        inputs = {"input_ids": ids}
        if spec.kind == "lm":
            targets = torch.randint(0, vocab, (batch_size, t), generator=g, device=device)
        else:
            targets = torch.randint(0, model.config.num_labels, (batch_size,), generator=g, device=device)
    else:
        s = image_size or default_shape(name, tiny)["image_size"]
        info["image_size"] = s
        if spec.family == "vit":
            model = _build(lambda: _vit(spec, tiny, s), device)
            info["source"] = "timm.vit_base_patch16_224" + (" (tiny overrides)" if tiny else "")
        else:
            holder: dict[str, str] = {}

            def make() -> nn.Module:
                m, src = _resnet_gn(spec, tiny, s)
                holder["source"] = src
                return m

            model = _build(make, device)
            info["source"] = holder.get("source", "")
        g = torch.Generator(device=device).manual_seed(seed)
        inputs = {"x": torch.randn(batch_size, 3, s, s, generator=g, device=device)}
        targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g, device=device)
    model.train()
    info["params"] = sum(p.numel() for p in model.parameters())
    return Workload(name, spec, model, inputs, targets, info, call_kwargs)


def position_ids(wl: Workload) -> dict[str, Tensor]:
    """Per-example position ids ``(B, T)`` for GPT-2 / Llama (Opacus' embedding
    grad sampler cannot handle the default broadcast ``(1, T)`` ids)."""
    if wl.spec.family not in ("gpt2", "llama"):
        return {}
    ids = wl.inputs["input_ids"]
    return {"position_ids": torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()}


def count(params) -> int:
    """Number of elements of distinct parameters (tied weights once)."""
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def lora(wl: Workload, r: int = 16) -> list[str]:
    """Wrap ``wl.model`` with peft LoRA (rank ``r``) on the spec's target modules;
    only the LoRA matrices train.  Returns the trainable names."""
    if not wl.spec.lora_targets:
        raise ValueError(f"no LoRA target modules defined for {wl.name}")
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=list(wl.spec.lora_targets),
        fan_in_fan_out=wl.spec.family == "gpt2",
    )
    wl.model = get_peft_model(wl.model, cfg)
    wl.model.train()
    return [n for n, p in wl.model.named_parameters() if p.requires_grad]


def sparta_rows(wl: Workload, density: float, seed: int = 0) -> dict[str, Any]:
    """SPARTA's sparse training phase on ``wl.model``: the biases and the head
    train in full (what ``dpft.sparta.Sparta.train`` sets trainable), and
    ``ceil(density * rows)`` random rows of every other candidate weight
    (``dpft.sparta.default_candidates``: Linear / Conv / Conv1D weights) are
    made trainable with ``dpft.sparta.restrict``.  Which rows train does not
    change the cost of a step, so random rows stand for privately selected
    ones.  Returns fields for the benchmark record (``sparta_trainable``
    counts the selected rows only)."""
    import math

    import dpft

    head = wl.spec.head
    dpft.bitfit(wl.model, extra=[head] if head else [])
    in_head = lambda n: bool(head) and (n == head or n.startswith(head + "."))  # noqa: E731
    candidates = [n for n in dpft.sparta.default_candidates(wl.model) if not in_head(n)]
    params = dict(wl.model.named_parameters())
    modules = dict(wl.model.named_modules())
    g = torch.Generator().manual_seed(seed)
    masks: dict[str, Tensor] = {}
    selected = total = 0
    for n in candidates:
        mod, _, local = n.rpartition(".")
        dim = dpft.sparta.row_dim(modules[mod], local)
        rows = params[n].shape[dim]
        k = max(1, math.ceil(density * rows))
        m = torch.zeros(rows, dtype=torch.bool)
        m[torch.randperm(rows, generator=g)[:k]] = True
        masks[n] = m
        selected += k * (params[n].numel() // rows)
        total += params[n].numel()
    dpft.sparta.restrict(wl.model, masks)
    rest = count(p for n, p in params.items() if p.requires_grad and n not in masks)
    return {
        "density": density,
        "sparta_weights": len(masks),
        "sparta_selected": selected,  # elements in the selected rows
        "sparta_candidates": total,  # elements of the candidate weights
        "sparta_trainable": rest + selected,
    }


class _Clone(nn.Module):
    """``x -> x.clone()``: gives an in-place operation that follows a hooked
    module a tensor of its own."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clone()


def out_of_place(model: nn.Module) -> list[str]:
    """Make a ResNet-style model safe for Opacus, whose module backward hooks
    fail when a hooked module's output is modified in place ("Output 0 of
    BackwardHookFunction is a view and is being modified inplace"): turn off
    ``inplace`` activations, and follow the last norm of each residual block
    (its output takes ``x += shortcut``) by a clone.  Returns what changed."""
    changes: list[str] = []
    n_inplace = 0
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            n_inplace += 1
    if n_inplace:
        changes.append(f"inplace=False on {n_inplace} activations")
    n_res = 0
    for m in list(model.modules()):
        if not hasattr(m, "downsample"):
            continue
        last = (
            "bn3"
            if isinstance(getattr(m, "bn3", None), nn.Module)
            else "bn2"
            if isinstance(getattr(m, "bn2", None), nn.Module)
            else None
        )
        if last is not None and not isinstance(getattr(m, last), nn.Sequential):
            setattr(m, last, nn.Sequential(getattr(m, last), _Clone()))
            n_res += 1
    if n_res:
        changes.append(f"clone before the in-place residual add in {n_res} blocks")
    return changes


def describe_size(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


__all__ = [
    "SPECS",
    "Spec",
    "Workload",
    "build",
    "count",
    "default_shape",
    "lora",
    "names",
    "position_ids",
    "describe_size",
    "out_of_place",
    "sparta_rows",
]


def build_for_method(name: str, method: str, args) -> "Workload":
    """:func:`build` from a benchmark's arguments (``batch_size``, ``device``,
    ``size``, ``seq_len``, ``image_size``), made trainable for ``method``:
    ``bitfit`` (biases, via :func:`dpft.bitfit`), ``lora`` (:func:`lora`), else
    every parameter."""
    import dpft

    kw = {"seq_len": args.seq_len} if args.seq_len else {}
    if args.image_size:
        kw["image_size"] = args.image_size
    wl = build(name, batch_size=args.batch_size, device=args.device, tiny=args.size == "tiny", **kw)
    if method == "bitfit":
        dpft.bitfit(wl.model)
    elif method == "lora":
        lora(wl)
    return wl
