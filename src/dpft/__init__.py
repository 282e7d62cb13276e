"""dpft: differentially private fine-tuning of foundation models.

Public API (see README and DESIGN): :func:`bitfit`, :class:`PrivacyEngine`, :class:`EngineOptions`,
:mod:`dpft.accounting`, :mod:`dpft.data`, :func:`convert_batchnorm_to_groupnorm`,
:func:`register_rule`.

The names are imported on first use (PEP 562), so that ``import dpft`` and
``dpft --help`` do not pay for importing torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> (submodule, attribute or None for the submodule itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "accounting": (".accounting", None),
    "data": (".data", None),
    "sparta": (".methods.sparta", None),
    "hf": (".hf", None),  # needs transformers
    "PrivacyBudgetExceeded": (".accounting", "PrivacyBudgetExceeded"),
    "convert_batchnorm_to_groupnorm": (".batchnorm", "convert_batchnorm_to_groupnorm"),
    "BatchNormError": (".capture", "BatchNormError"),
    "UnsupportedModuleError": (".capture", "UnsupportedModuleError"),
    "load_checkpoint": (".checkpoint", "load_checkpoint"),
    "save_checkpoint": (".checkpoint", "save_checkpoint"),
    "PrivacyEngine": (".engine", "PrivacyEngine"),
    "EngineOptions": (".options", "EngineOptions"),
    "bitfit": (".methods.bitfit", "bitfit"),
    "register_rule": (".rules", "register_rule"),
    "SamplingMismatch": (".sampling_check", "SamplingMismatch"),
    "SamplingMismatchWarning": (".sampling_check", "SamplingMismatchWarning"),
    "TwoPassMismatch": (".clip.two_pass", "TwoPassMismatch"),
}

__all__ = [
    "BatchNormError",
    "EngineOptions",
    "PrivacyBudgetExceeded",
    "PrivacyEngine",
    "SamplingMismatch",
    "SamplingMismatchWarning",
    "TwoPassMismatch",
    "UnsupportedModuleError",
    "accounting",
    "bitfit",
    "convert_batchnorm_to_groupnorm",
    "data",
    "load_checkpoint",
    "save_checkpoint",
    "register_rule",
    "sparta",
]


def __getattr__(name: str) -> Any:
    entry = _LAZY.get(name)
    if entry is None:
        raise AttributeError(f"module 'dpft' has no attribute {name!r}")
    module = importlib.import_module(entry[0], __name__)
    value = module if entry[1] is None else getattr(module, entry[1])
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from . import accounting, data
    from .accounting import PrivacyBudgetExceeded
    from .batchnorm import convert_batchnorm_to_groupnorm
    from .capture import BatchNormError, UnsupportedModuleError
    from .checkpoint import load_checkpoint, save_checkpoint
    from .clip.two_pass import TwoPassMismatch
    from .engine import PrivacyEngine
    from .options import EngineOptions
    from .methods import sparta
    from .methods.bitfit import bitfit
    from .rules import register_rule
    from .sampling_check import SamplingMismatch, SamplingMismatchWarning
