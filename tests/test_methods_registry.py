"""The method registry (dpft.methods.registry): names, what each built-in trains, registration."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

from dpft.methods import registry
from dpft.methods.registry import Method


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.norm(self.body(x)))


HEAD = ["fc.bias", "fc.weight"]


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_builtin_names_in_order():
    assert registry.names() == (
        "bitfit",
        "full",
        "lora",
        "last-layer",
        "sparta",
        "nonprivate-full",
        "nonprivate-bitfit",
    )
    assert registry.names(private=False) == ("nonprivate-full", "nonprivate-bitfit")
    from dpft.app.choices import METHODS, PRIVATE_METHODS

    assert METHODS == registry.names() and PRIVATE_METHODS == registry.names(private=True)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("full", {"body.weight", "body.bias", "norm.weight", "norm.bias", "fc.weight", "fc.bias"}),
        ("nonprivate-full", {"body.weight", "body.bias", "norm.weight", "norm.bias", "fc.weight", "fc.bias"}),
        ("last-layer", {"fc.weight", "fc.bias"}),
        ("bitfit", {"body.bias", "norm.bias", "fc.weight", "fc.bias"}),
        ("sparta", {"body.bias", "norm.bias", "fc.weight", "fc.bias"}),  # rows join after scoring
        ("nonprivate-bitfit", {"body.bias", "norm.bias", "fc.weight", "fc.bias"}),
    ],
)
def test_what_each_method_trains(name, expected):
    model = Net()
    for p in model.parameters():
        p.requires_grad_(name == "last-layer")  # last-layer must also switch others off
    out = registry.get(name).select(model, head=HEAD, notes=[], lora_rank=8)
    assert out is model
    assert _trainable(model) == expected


def test_lora_trains_adapters_and_head():
    pytest.importorskip("peft")
    out = registry.get("lora").select(Net(), head=HEAD, notes=[], lora_rank=2, head_modules=("fc",))
    names = _trainable(out)
    assert names and all("lora_" in n or n.endswith(("fc.weight", "fc.bias")) for n in names), names
    assert any("lora_A" in n for n in names) and any(n.endswith("fc.weight") for n in names)


def test_unknown_and_duplicate_names():
    with pytest.raises(KeyError, match="unknown method 'nope'; choose one of bitfit, full"):
        registry.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Method(name="bitfit", trains="x", select=lambda m, **_: m))
    with pytest.raises(TypeError):
        registry.register("bitfit")  # type: ignore[arg-type]


def test_a_registered_method_trains_through_the_app(monkeypatch):
    """A new method is one Method registered: the app's select_trainable and defaults use it."""
    from dpft.app.build import select_trainable
    from dpft.app.config import TrainConfig, _resolve_lr

    def norms_and_head(model, *, head, **_):
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("norm.") or n in head)
        return model

    m = Method(name="norm-tuning", trains="LayerNorm + head", select=norms_and_head, lr=7e-3, lr_cpu=5e-3, head_lr=2e-2)
    monkeypatch.setitem(registry._METHODS, m.name, m)
    assert _trainable(select_trainable(Net(), "norm-tuning")) == {"norm.weight", "norm.bias", *HEAD}
    r = TrainConfig(method="norm-tuning")
    _resolve_lr(r, "text", on_cpu=True)
    assert (r.lr, r.head_lr) == (5e-3, 2e-2)
    r = TrainConfig(method="norm-tuning")
    _resolve_lr(r, "image", on_cpu=False)
    assert (r.lr, r.head_lr) == (1e-2, 1e-2)


def test_registry_imports_no_torch():
    code = "import sys\nfrom dpft.methods import registry\nregistry.names()\nprint('torch' in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_defaults_of_the_tables_they_replaced():
    """The per-method defaults `dpft train` had before the registry (its CLI outputs are unchanged)."""
    lr = {n: registry.get(n).text_lr(on_cpu=False) for n in registry.names()}
    assert lr == {
        "bitfit": 3e-3,
        "last-layer": 3e-2,
        "lora": 2e-3,
        "full": 1.5e-3,
        "sparta": 1e-3,
        "nonprivate-bitfit": 1e-3,
        "nonprivate-full": 5e-5,
    }
    assert registry.get("full").text_lr(on_cpu=True) == 1e-4
    assert registry.get("full").text_head_lr(on_cpu=True) == 1e-2 and registry.get("full").head_lr is None
    styles = {n for n in registry.names() if registry.get(n).clipping_style == "separate-head"}
    assert styles == {"full", "sparta"}


def test_the_readme_walkthrough_method_works(monkeypatch):
    """README's "Add your own method" file, run as written (its relative import made absolute)."""
    import re
    from pathlib import Path

    from dpft.app.build import select_trainable

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("#### Add your own method", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from ..registry import Method, register" in code
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # the registration is undone after
    exec(code.replace("from ..registry", "from dpft.methods.registry"), {})
    assert registry.get("norms").lr == 3e-3
    assert _trainable(select_trainable(Net(), "norms")) == {"norm.weight", "norm.bias", *HEAD}
