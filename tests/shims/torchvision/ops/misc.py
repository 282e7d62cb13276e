"""TEST-ONLY torchvision shim (see tests/shims/README.md): ``FrozenBatchNorm2d``
exists for timm's isinstance checks and norm-layer table; building one raises."""

import torch

from .. import unavailable


class FrozenBatchNorm2d(torch.nn.Module):
    """Stand-in: only for ``isinstance`` checks; instantiating it raises."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        unavailable("ops.misc.FrozenBatchNorm2d")()
