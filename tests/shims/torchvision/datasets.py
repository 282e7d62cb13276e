"""TEST-ONLY torchvision shim (see tests/shims/README.md): the dataset classes
timm imports unconditionally; instantiating one raises."""

from . import unavailable_class

CIFAR10 = unavailable_class("datasets.CIFAR10")
CIFAR100 = unavailable_class("datasets.CIFAR100")
MNIST = unavailable_class("datasets.MNIST")
KMNIST = unavailable_class("datasets.KMNIST")
FashionMNIST = unavailable_class("datasets.FashionMNIST")
ImageFolder = unavailable_class("datasets.ImageFolder")
