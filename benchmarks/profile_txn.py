"""Where a pipeline_common transaction spends its time, at 1 KB, 100 KB and 10 MB.

Usage::

    python benchmarks/profile_txn.py            # step timeline + cProfile + strace -c
    python benchmarks/profile_txn.py --no-strace

Three views of the same transaction (``txn.data["counter"] = i`` on a realistic
document, with the default 50 backups already present, so pruning runs as in steady
state):

1. a timeline from the library's file-system seam (``pipeline_common._fs`` hook): the
   median time inside each file-system call and in the Python code between calls;
2. cProfile's top functions by own time;
3. ``strace -c -f`` over N transactions in a child (when strace is installed): the
   system calls per transaction, fsyncs included.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _workloads as w

SIZES = {"1 KB": 1_000, "100 KB": 100_000, "10 MB": 10_000_000}
ROUNDS = {"1 KB": 200, "100 KB": 100, "10 MB": 8}


def make_state(root: Path, target: int) -> object:
    from pipeline_common import PipelineState

    state = PipelineState(w.fresh_dir(root, f"s{target}") / "state.json")
    state.write(w.make_document(target))
    for i in range(state.max_backups + 2):  # steady state: every commit prunes one backup
        with state.transaction() as txn:
            txn.data["counter"] = i
    return state


def timeline(state: object, rounds: int) -> list[tuple[str, float]]:
    """Median seconds per segment: each fs call, and the Python gap before it."""
    from pipeline_common import _fs

    events: list[tuple[str, str, float]] = []

    def hook(when: str, op: str, path: str) -> None:
        events.append((when, f"{op} {_short(path)}", time.perf_counter()))

    per: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    previous = _fs.set_hook(hook)
    try:
        for i in range(rounds):
            events.clear()
            t0 = time.perf_counter()
            with state.transaction() as txn:  # type: ignore[attr-defined]
                txn.data["counter"] = -i
            t1 = time.perf_counter()
            segs: list[tuple[str, float]] = []
            last, seen = t0, defaultdict(int)
            for when, what, t in events:
                if when == "before":
                    segs.append((f"python, then {what}", t - last))
                else:
                    segs.append((f"  {what}", t - last))
                last = t
            segs.append(("python, to the end", t1 - last))
            segs.append(("TOTAL", t1 - t0))
            keys = []
            for name, dt in segs:
                seen[name] += 1
                key = name if seen[name] == 1 else f"{name} #{seen[name]}"
                per[key].append(dt)
                keys.append(key)
            if len(keys) > len(order):
                order = keys
    finally:
        _fs.set_hook(previous)
    return [(k, statistics.median(per[k])) for k in order if k in per]


def _short(path: str) -> str:
    name = os.path.basename(path)
    if name.endswith(".bak"):
        return "backups/<name>.bak"
    if name == "backups":
        return "backups/"
    if os.path.isdir(path) and not name.startswith("."):
        return "<state folder>/"
    return name


def profile(state: object, rounds: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for i in range(rounds):
        with state.transaction() as txn:  # type: ignore[attr-defined]
            txn.data["counter"] = i
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    return text[text.find("   ncalls") :].rstrip()


STRACE_CHILD = """
import sys
from pipeline_common import PipelineState
state = PipelineState(sys.argv[1])
for i in range(int(sys.argv[2])):
    with state.transaction() as txn:
        txn.data["counter"] = i
"""


def strace_counts(state_path: str, n: int) -> str | None:
    if shutil.which("strace") is None:
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        # A baseline run of 0 transactions is subtracted: imports and start-up.
        counts = []
        for k in (0, n):
            subprocess.run(
                [
                    "strace",
                    "-f",
                    "-c",
                    "-o",
                    out.name,
                    sys.executable,
                    "-c",
                    STRACE_CHILD,
                    state_path,
                    str(k),
                ],
                check=True,
                capture_output=True,
            )
            counts.append(_parse_strace(Path(out.name).read_text()))
    base, full = counts
    rows = []
    for call in sorted(full, key=lambda c: -(full[c] - base.get(c, 0))):
        per = (full[call] - base.get(call, 0)) / n
        if per >= 0.5:
            rows.append(f"| {call} | {per:.1f} |")
    return "| syscall | per transaction |\n|---|---|\n" + "\n".join(rows)


def _parse_strace(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--dir", type=Path, help="where to put the files (a real disk)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pc-profile-", dir=args.dir))
    try:
        for label, target in SIZES.items():
            state = make_state(root, target)
            rounds = ROUNDS[label]
            print(f"## {label}: timeline of one transaction (median of {rounds}, ms)\n")
            print("| segment | ms |\n|---|---|")
            for name, dt in timeline(state, rounds):
                print(f"| {name} | {dt * 1000:.3f} |")
            print(f"\n## {label}: cProfile, {rounds} transactions, by own time\n")
            print("```\n" + profile(state, rounds, 14) + "\n```\n")
            if not args.no_strace:
                counts = strace_counts(str(state.path), min(rounds, 50))  # type: ignore[attr-defined]
                print(f"## {label}: strace -c, system calls per transaction\n")
                print((counts or "strace is not installed") + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
