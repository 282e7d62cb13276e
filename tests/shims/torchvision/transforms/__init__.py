"""TEST-ONLY torchvision shim (see tests/shims/README.md): the transform
classes timm names at import time; using any of them raises."""

from .. import unavailable_class
from . import functional  # noqa: F401
from .functional import InterpolationMode  # noqa: F401

_NAMES = (
    "CenterCrop ColorJitter Compose GaussianBlur Normalize RandomApply RandomCrop RandomGrayscale "
    "RandomHorizontalFlip RandomResizedCrop RandomVerticalFlip Resize ToTensor PILToTensor"
).split()
for _n in _NAMES:
    globals()[_n] = unavailable_class(f"transforms.{_n}")
del _n
