"""TEST-ONLY torchvision shim (see tests/shims/README.md)."""

from . import misc  # noqa: F401
