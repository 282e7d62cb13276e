"""Old path of :mod:`dpft.clip.clipped_sum` (this name is the same module object)."""

import sys

from .clip import clipped_sum as _module

sys.modules[__name__] = _module
