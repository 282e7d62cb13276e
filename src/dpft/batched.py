"""Old path of :mod:`dpft.clip.stacked` (this name is the same module object)."""

import sys

from .clip import stacked as _module

sys.modules[__name__] = _module
