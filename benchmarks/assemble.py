"""Rebuild BENCHMARKS.md from its hand-written head and the files in benchmarks/results/.

BENCHMARKS.md is its head (everything before the first ``---`` line: the machine and
where every goal stands, written by hand) followed by each results file, headings moved
one level down, in the order of ``SECTIONS``. Edit a results file (or re-run its script
with ``--out``; robustness.md: ``python -m benchmarks.robustness --document``), then run
this so that the two never disagree; ``--check`` only reports whether they do (the test
suite runs it).

    python -m benchmarks.assemble           # rewrite BENCHMARKS.md
    python -m benchmarks.assemble --check   # exit 1 if BENCHMARKS.md is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from benchmarks.common import REPO as ROOT
from benchmarks.common.report import write_or_check

SECTIONS = (
    "gpu",
    "augment",
    "data_loading",
    "data_index",
    "shard_loading",
    "embed",
    "train_step",
    "ema",
    "construction",
    "quality",
    "quality_before_21",
    "robustness",
    "robustness_before_views",
    "demo",
    "backbones",
)
RULE = "\n---\n"


def assemble(root: Path = ROOT) -> str:
    """The text BENCHMARKS.md should have."""
    current = (root / "BENCHMARKS.md").read_text()
    if RULE not in current:
        raise ValueError("BENCHMARKS.md has no '---' line after its head; add one before the first section")
    head = current.split(RULE, 1)[0]
    sections = []
    for name in SECTIONS:
        text = (root / "benchmarks" / "results" / f"{name}.md").read_text()
        sections.append(re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M).strip() + "\n")
    return head + RULE + "\n" + (RULE + "\n").join(sections)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="report whether BENCHMARKS.md is up to date; write nothing"
    )
    args = parser.parse_args(argv)
    stale = "BENCHMARKS.md differs from its head + benchmarks/results/*.md; run python -m benchmarks.assemble"
    return write_or_check(ROOT / "BENCHMARKS.md", assemble(), args.check, stale)


if __name__ == "__main__":
    sys.exit(main())
