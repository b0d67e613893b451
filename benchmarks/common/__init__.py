"""What the benchmark scripts share.

* ``machine``: the one line that describes the machine (CPU, cores, GPU, library versions);
* ``report``: Markdown tables, the command line, results files, goal verdicts;
* ``runner``: alternated timing and medians, 1-thread child processes of ``python -m benchmarks.NAME``;
* ``data``: Fashion-MNIST padded to 32 px (random images for ``--smoke``), the kNN evaluation;
* ``peer``: lucidrains/byol-pytorch, installed in isolation and loaded by file path;
* ``contenders``: ours, the peer and lightly as learners, one training step, seeded backbones.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root: scripts run from here (``python -m benchmarks.NAME``)."""
