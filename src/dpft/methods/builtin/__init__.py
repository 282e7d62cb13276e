"""The built-in methods of ``dpft train``, one file each; importing this package registers
them in this order (the order of ``--method``'s choices). A new method: one file here that
calls :func:`dpft.methods.registry.register`, and its name in the import below."""

from . import bitfit, full, lora, last_layer, sparta, nonprivate  # noqa: F401  (registration order)
