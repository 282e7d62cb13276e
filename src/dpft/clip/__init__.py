"""The clipping stage: per-example norms, clipped sums and noise.

The engine hands each backward pass's per-example contributions to a
:class:`~dpft.clip.clipped_sum.ClippedSum`, which takes every example's norm,
clips it and adds the clipped gradients up; at the step, noise from
:class:`~dpft.clip.noise.GaussianNoise` goes on the sum.

- :mod:`.clipped_sum` the clipped sum of one step, as named stages
- :mod:`.functions` clipping functions (Abadi, automatic) and clipping groups
- :mod:`.norms` per-example squared norms (ghost, instantiated) and weighted sums of one layer
- :mod:`.stacked` same-shaped layers stacked into one batch of products
- :mod:`.ghost_kernel` a float32 layer's ghost norm in one fused Triton kernel (CUDA)
- :mod:`.units` user-level privacy: the clipped sum of each user's examples
- :mod:`.noise` the Gaussian noise (seeded, per-rank streams, secure mode)
- :mod:`.tuning` every tuning threshold and size bound, with where it was measured
"""
