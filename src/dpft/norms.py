"""Old path of :mod:`dpft.clip.norms` (this name is the same module object)."""

import sys

from .clip import norms as _module

sys.modules[__name__] = _module
