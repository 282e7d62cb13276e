"""dpft: differentially private fine-tuning of foundation models.

Public API (see README and DESIGN): :func:`bitfit`, :class:`PrivacyEngine`,
:mod:`dpft.accounting`, :mod:`dpft.data`, :func:`convert_batchnorm_to_groupnorm`,
:func:`register_rule`.
"""

from . import accounting, data
from .accounting import PrivacyBudgetExceeded
from .batchnorm import convert_batchnorm_to_groupnorm
from .capture import BatchNormError, UnsupportedModuleError
from .checkpoint import load_checkpoint, save_checkpoint
from .engine import PrivacyEngine
from .methods import sparta
from .methods.bitfit import bitfit
from .rules import register_rule
from .sampling_check import SamplingMismatch, SamplingMismatchWarning

__version__ = "0.1.0"

__all__ = [
    "BatchNormError",
    "PrivacyBudgetExceeded",
    "PrivacyEngine",
    "SamplingMismatch",
    "SamplingMismatchWarning",
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


def __getattr__(name: str):
    """``dpft.hf`` (transformers integration) is imported on first use: it needs transformers."""
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'dpft' has no attribute {name!r}")
