"""BiTFiT: train only the bias terms (plus, optionally, named extra parameters).

Today's large language models (Llama, Mistral, Qwen3, Gemma, Phi-3, Mixtral,
T5, ...) have no bias terms at all, so "train only the biases" would train
nothing.  :func:`bitfit` then first adds zero-initialised biases to the
model's ``nn.Linear`` / ``nn.Conv*`` layers (the outputs do not change at
initialisation) and trains those; see :func:`bitfit` for which layers, and
for how the fine-tuned biases are saved and loaded back.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

AddBiases = Literal["auto", "config"] | bool

#: The layer types :func:`bitfit` (and :func:`add_zero_biases`) may give a bias.
BIAS_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, _ConvNd)


class BitFitNames(list[str]):
    """What :func:`bitfit` returns: the list of trainable parameter names (a
    plain ``list`` for every purpose), with what it changed in the model.

    Attributes:
        added: names of the zero-initialised biases that were added (empty when
            the model already had biases, or ``add_biases=False``).
        config_flags: the ``model.config`` flags that were set to ``True`` so that
            ``save_pretrained`` / ``from_pretrained`` rebuild exactly the added
            biases (e.g. Llama's ``{"attention_bias": True, "mlp_bias": True}``);
            empty when no flags of the config declare them (then reload as
            described in :func:`bitfit`).
        skipped: ``"name (reason)"`` for each bias-less Linear/Conv layer that was
            left without a bias (output embeddings, layers named in ``extra``,
            subclasses whose ``forward`` may ignore ``bias``, ...).
    """

    added: list[str]
    config_flags: dict[str, bool]
    skipped: list[str]

    def __init__(
        self,
        names: Iterable[str] = (),
        added: Iterable[str] = (),
        config_flags: dict[str, bool] | None = None,
        skipped: Iterable[str] = (),
    ) -> None:
        super().__init__(names)
        self.added = list(added)
        self.config_flags = dict(config_flags or {})
        self.skipped = list(skipped)


def bitfit(
    model: nn.Module,
    extra: Iterable[str] = (),
    *,
    add_biases: AddBiases = "auto",
    log: Callable[[str], None] | None = None,
) -> BitFitNames:
    """Freeze every parameter except those whose name ends in ``bias``
    (norm-layer biases included) and those named in ``extra`` (exact
    parameter names or name prefixes, e.g. ``"classifier"`` for a new head).

    **Bias-free models.** With ``add_biases="auto"`` (the default), a model
    with no parameter named ``*bias`` outside ``extra`` first gets a
    zero-initialised bias (in the weight's dtype and device) on every
    ``nn.Linear`` and ``nn.Conv*`` layer that lacks one, except

    * layers whose parameters are named in ``extra`` (a new head trains as it is),
    * the output embedding (a Linear whose weight is shared with an
      ``nn.Embedding``, or transformers' ``get_output_embeddings()``: a
      vocabulary-sized bias that no config flag rebuilds),
    * subclasses that override ``forward`` (they may ignore ``bias``), and
      LoRA adapter layers (``lora_*``).

    At initialisation the outputs are unchanged (the biases are zero); the
    added names are in the result and are logged (``log``, else a warning).
    ``add_biases=True`` adds them even if the model already has some biases,
    ``False`` never adds any, and ``"config"`` (transformers models) adds exactly
    the biases that the config's ``*bias*`` flags declare (e.g. only the
    attention biases of Qwen3 or Gemma, which have no ``mlp_bias``), so that the
    result is a standard checkpoint of the same architecture.

    **Saving and loading the fine-tuned biases.** For a transformers model whose
    config has flags that build exactly the added biases (Llama:
    ``attention_bias`` and ``mlp_bias``), :func:`bitfit` sets them on
    ``model.config``: ``save_pretrained`` writes them and ``from_pretrained``
    of the saved directory builds and loads the biases.  Otherwise (T5,
    Mistral, Phi-3, ...: ``result.config_flags`` is empty), add the same biases
    to a freshly built model before loading the state dict::

        model = build_the_same_architecture()      # e.g. from_pretrained(base)
        dpft.bitfit(model)                          # adds the same zero biases
        model.load_state_dict(fine_tuned_state_dict)

    (or ``add_zero_biases(model, result.added)`` for exactly the saved set).

    Returns the names of the trainable parameters, in ``named_parameters()``
    order, as a :class:`BitFitNames` (a ``list``; ``.added``,
    ``.config_flags``, ``.skipped`` say what changed)."""
    if add_biases not in ("auto", "config", True, False):
        raise ValueError(f"bitfit: add_biases must be 'auto', 'config', True or False, got {add_biases!r}")
    extra = tuple(extra)

    def in_extra(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in extra)

    added: list[str] = []
    flags: dict[str, bool] = {}
    skipped: list[str] = []
    if add_biases is not False:
        has_bias = any(n.endswith("bias") and not in_extra(n) for n, _ in model.named_parameters())
        eligible, skipped = _bias_candidates(model, in_extra)
        if add_biases == "config":
            flags, layers = _config_flags_for(model, eligible, exact=False)
            if not flags:
                raise ValueError(
                    f"bitfit(add_biases='config'): {type(model).__name__} has no config flag that "
                    "declares biases for its Linear/Conv layers; use add_biases='auto' or True"
                )
            skipped += [f"{n} (no config flag declares its bias)" for n in eligible if n not in layers]
            eligible = layers
        if add_biases in (True, "config") or (add_biases == "auto" and not has_bias):
            if add_biases != "config":
                flags, _ = _config_flags_for(model, eligible, exact=True)
            added = add_zero_biases(model, eligible)
            for k, v in flags.items():
                setattr(model.config, k, v)  # type: ignore[union-attr]
            if added:
                _say(log, _added_message(model, added, flags, skipped))

    names = []
    for name, p in model.named_parameters():
        train = name.endswith("bias") or in_extra(name)
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        _say(
            log,
            f"dpft.bitfit: {type(model).__name__} has no parameter to train (no bias terms, "
            "no Linear/Conv layer to add one to, nothing named in extra)",
        )
    return BitFitNames(names, added, flags, skipped)


def add_zero_biases(model: nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """Give each of ``layers`` (module names, or their ``....bias`` parameter
    names; default: every eligible layer, as in :func:`bitfit`) a
    zero-initialised bias in its weight's dtype and device, in place.  Layers
    that already have a bias are left as they are.  Returns the names of the
    biases added.  Use it to rebuild a checkpoint's architecture before
    ``load_state_dict``: ``add_zero_biases(model, result.added)``."""
    mods = dict(model.named_modules())
    if layers is None:
        layers, _ = _bias_candidates(model, lambda n: False)
    added = []
    for raw in layers:
        name = raw.removesuffix(".bias") if raw not in mods else raw
        m = mods.get(name)
        if not isinstance(m, BIAS_LAYER_TYPES):
            raise ValueError(f"add_zero_biases: {raw!r} is not a Linear/Conv layer of {type(model).__name__}")
        if m.bias is not None:
            continue
        w = m.weight
        out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        m.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device), requires_grad=w.requires_grad)
        added.append(f"{name}.bias" if name else "bias")
    return added


# ---------------------------------------------------------------------------


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)
    else:
        warnings.warn(msg, stacklevel=3)


def _overrides_forward(m: nn.Module) -> bool:
    """Whether ``type(m)`` has a ``forward`` of its own rather than torch's."""
    for c in type(m).__mro__:
        if c.__module__.startswith("torch.nn.") and "forward" in c.__dict__:
            return type(m).forward is not c.forward
    return True


def _output_embedding_names(model: nn.Module) -> set[str]:
    """Linear layers whose weight is an ``nn.Embedding``'s (tied output
    embeddings) and transformers' ``get_output_embeddings()``."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) in emb}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except Exception:  # some models raise NotImplementedError
            out = None
        names |= {n for n, m in model.named_modules() if out is not None and m is out}
    return names


def _bias_candidates(model: nn.Module, in_extra: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """(names of the bias-less Linear/Conv layers that may get a bias, ``"name (reason)"`` of those that may not)."""
    outputs = _output_embedding_names(model)
    ok, skipped = [], []
    for name, m in model.named_modules():
        if not isinstance(m, BIAS_LAYER_TYPES) or m.bias is not None:
            continue
        if in_extra(f"{name}.weight") or in_extra(f"{name}.bias"):
            skipped.append(f"{name} (named in extra)")
        elif name in outputs:
            skipped.append(f"{name} (output embedding)")
        elif any(part.startswith("lora_") for part in name.split(".")):
            skipped.append(f"{name} (LoRA adapter)")
        elif _overrides_forward(m):
            skipped.append(f"{name} ({type(m).__name__} overrides forward; it may not use a bias)")
        elif not m.weight.is_floating_point():
            skipped.append(f"{name} (weight of dtype {m.weight.dtype})")
        else:
            ok.append(name)
    return ok, skipped


def _config_flags_for(model: nn.Module, layers: list[str], *, exact: bool) -> tuple[dict[str, bool], list[str]]:
    """Boolean ``*bias*`` flags of a transformers model's config that are off
    and, switched on, build biases only on ``layers`` (and no other change).

    ``exact=True``: the flags must build a bias on every one of ``layers``
    (else ``{}``).  ``exact=False``: returns the flags and the layers they
    cover.  Checked by building the model from the changed config on the
    ``meta`` device."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not layers:
        return {}, []
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - config without transformers
        return {}, []
    if not isinstance(model, PreTrainedModel):
        return {}, []
    candidates = [k for k, v in config.to_dict().items() if "bias" in k and v is False and hasattr(config, k)]
    current = {n: tuple(p.shape) for n, p in model.named_parameters()}
    target = set(layers)

    def build(keys: Iterable[str]) -> dict[str, tuple[int, ...]] | None:
        cfg = copy.deepcopy(config)
        for k in keys:
            setattr(cfg, k, True)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                built = type(model)(cfg)
        except Exception:
            return None
        return {n: tuple(p.shape) for n, p in built.named_parameters()}

    def new_bias_layers(built: dict[str, tuple[int, ...]] | None) -> set[str] | None:
        """Layers that got a bias and nothing else changed; None if anything else changed."""
        if built is None or any(built.get(n) != s for n, s in current.items()):
            return None
        new = set(built) - set(current)
        if not all(n.endswith(".bias") for n in new):
            return None
        return {n.removesuffix(".bias") for n in new}

    chosen, covered = [], set()
    for k in candidates:
        got = new_bias_layers(build([k]))
        if got and got <= target:
            chosen.append(k)
            covered |= got
    if not chosen or (exact and covered != target):
        return {}, []
    if new_bias_layers(build(chosen)) != covered:  # flags that interact: give up
        return {}, []
    return {k: True for k in chosen}, [n for n in layers if n in covered]


def _added_message(model: nn.Module, added: list[str], flags: dict[str, bool], skipped: list[str]) -> str:
    kind = type(model).__name__
    msg = (
        f"dpft.bitfit: {kind} had no bias terms; added {len(added)} zero-initialised biases to its "
        f"Linear/Conv layers (outputs unchanged at initialisation), e.g. {added[0]}"
    )
    if skipped:
        msg += f"; left {len(skipped)} without: " + ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    if flags:
        msg += (
            "; set "
            + ", ".join(f"config.{k}=True" for k in flags)
            + " so that save_pretrained/from_pretrained rebuild them"
        )
    elif hasattr(model, "config"):
        msg += (
            "; no config flag declares them: to load the fine-tuned biases into a fresh model, "
            "call dpft.bitfit(model) on it before load_state_dict"
        )
    return msg
