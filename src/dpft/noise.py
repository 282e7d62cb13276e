"""Old path of :mod:`dpft.clip.noise` (this name is the same module object)."""

import sys

from .clip import noise as _module

sys.modules[__name__] = _module
