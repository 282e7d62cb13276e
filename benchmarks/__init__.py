"""Speed and memory benchmarks for dpft (GPU; a ``--smoke`` mode runs on CPU).

Entry points: ``python -m benchmarks.speed`` (run a suite) and
``python -m benchmarks.report`` (jsonl -> markdown tables and PNG charts).
See ``benchmarks/README.md``.
"""
