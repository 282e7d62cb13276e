"""Old path of :mod:`dpft.clip.functions` (this name is the same module object)."""

import sys

from .clip import functions as _module

sys.modules[__name__] = _module
