"""The application around the library: the ``dpft`` command and the training job.

Nothing outside ``dpft.app`` imports it; it uses the library only through the
names any user could call (the engine, the methods, the data loaders, accounting).
"""
