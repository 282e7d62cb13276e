"""Old path of :mod:`dpft.clip.ghost_kernel` (this name is the same module object)."""

import sys

from .clip import ghost_kernel as _module

sys.modules[__name__] = _module
