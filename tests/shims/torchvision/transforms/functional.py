"""TEST-ONLY torchvision shim (see tests/shims/README.md): ``InterpolationMode``
(timm builds lookup tables from it at import time) and image functions that raise."""

from enum import Enum

from .. import unavailable


class InterpolationMode(Enum):
    """The interpolation names torchvision defines (values as torchvision's)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_NAMES = "crop get_dimensions get_image_size pad pil_to_tensor resize resized_crop to_tensor normalize".split()
for _n in _NAMES:
    globals()[_n] = unavailable(f"transforms.functional.{_n}")
del _n
