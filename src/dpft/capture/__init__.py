"""The capture stage: hooks that collect what per-example gradients need.

- :mod:`.hooks` :class:`Capture`: installs the forward and gradient hooks and
  hands each backward pass's contributions to the engine
- :mod:`.plan` which rule owns which trainable parameter, and the flat lane
- :mod:`.checks` the refusals and the first passes' self-checks
- :mod:`.autograd` the torch-internals corner (autograd functions, private hooks)
"""

from ..distributed import is_dtensor
from ..rules.base import UnsupportedModuleError
from .autograd import _add_grad_hook
from .checks import BATCHNORM_MESSAGE, BatchNormError
from .hooks import Capture, Sink
from .plan import EXPAND, Binding, plan_model

__all__ = [
    "BATCHNORM_MESSAGE",
    "EXPAND",
    "BatchNormError",
    "Binding",
    "Capture",
    "Sink",
    "UnsupportedModuleError",
    "_add_grad_hook",
    "is_dtensor",
    "plan_model",
]
