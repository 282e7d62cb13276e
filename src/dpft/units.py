"""Old path of :mod:`dpft.clip.units` (this name is the same module object)."""

import sys

from .clip import units as _module

sys.modules[__name__] = _module
