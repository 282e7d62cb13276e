"""TEST-ONLY torchvision shim (see tests/shims/README.md); not torchvision.

Provides only the names timm needs to be imported and to build models; each
raises a clear error if it is actually used."""

__version__ = "0.0.0+dpft.test.shim"
SHIM = True


class ShimError(RuntimeError):
    """A torchvision feature was used through dpft's test-only shim."""


def unavailable(name: str):
    """A stand-in for ``name`` that raises :class:`ShimError` when called or instantiated."""

    def fail(*args, **kwargs):
        raise ShimError(
            f"torchvision.{name} is not available: this is dpft's test-only torchvision shim "
            "(tests/shims), which only lets timm build models; install a torchvision matching your torch"
        )

    return fail


class _Unavailable:
    """Base of stand-in classes: instantiating one raises :class:`ShimError`."""

    _name = "?"

    def __init__(self, *args, **kwargs):
        unavailable(self._name)()


def unavailable_class(name: str) -> type:
    """A stand-in class for ``name`` (usable as a base class or in isinstance checks)."""
    return type(name.rsplit(".", 1)[-1], (_Unavailable,), {"_name": name, "__module__": __name__})
