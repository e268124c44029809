"""Judge the goals on the median of several runs of ``benchmarks/run.py --json``.

Usage::

    python benchmarks/run.py --json run1.json   # three times, back to back
    python benchmarks/median.py run1.json run2.json run3.json

Prints one markdown table: each goal's median ratio, the ratio of every run, the
target and PASS/MISS judged on the median (issue #3 judges on the median of 3 runs).
"""

from __future__ import annotations

import json
import operator
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _number(text: str) -> float:
    match = _NUMBER.search(text)
    if match is None:
        raise ValueError(f"no number in {text!r}")
    return float(match.group())


def _unit(text: str) -> str:
    return (
        text.rsplit(maxsplit=1)[-1] if " " in text.strip() else text.strip().lstrip("-0123456789.")
    )


def median_table(runs: list[list[list[str]]]) -> tuple[str, int, int]:
    """The markdown table, and how many goals pass and miss on the median."""
    lines = [
        "| goal | median | the runs | target | result |",
        "|---|---|---|---|---|",
    ]
    passed = missed = 0
    for i, first in enumerate(runs[0]):
        name, measured, target = first[0], first[1], first[2]
        values = [_number(run[i][1]) for run in runs]
        assert all(run[i][0] == name for run in runs), "runs list different goals"
        median = statistics.median(values)
        op, bound = target.split()[0], _number(target)
        ok = _OPS[op](median, bound)
        passed += ok
        missed += not ok
        unit = _unit(measured)
        shown = f"{median:.3g}{' ' if unit == 'us' else ''}{unit}"
        each = " / ".join(f"{v:.3g}" for v in values)
        lines.append(f"| {name} | {shown} | {each} | {target} | {'PASS' if ok else 'MISS'} |")
    return "\n".join(lines), passed, missed


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    runs = [json.loads(Path(p).read_text())["goals"] for p in sys.argv[1:]]
    text, passed, missed = median_table(runs)
    print(f"Median of {len(runs)} runs ({passed} pass, {missed} miss):\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
