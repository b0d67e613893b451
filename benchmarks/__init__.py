"""Benchmarks of byol_pytorch against what users would otherwise pick: speed, memory and quality.

Every script is a module of this package, run from the repository root:
``python -m benchmarks.NAME --help`` (``benchmarks/README.md`` lists them all). The pieces they
share (the data, the contenders, the timing, the report, the machine line) are in
``benchmarks.common``.
"""
