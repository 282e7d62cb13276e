"""Fine-tuning methods built on the engine: which parameters train, and schedules.

:mod:`dpft.methods.registry` names the methods of ``dpft train --method`` (one file each in
:mod:`dpft.methods.builtin`); :mod:`~dpft.methods.bitfit`, :mod:`~dpft.methods.sparta` and
:mod:`~dpft.methods.schedules` are the library functions they use."""

from . import builtin  # noqa: F401  (registers the built-in methods, in order)
