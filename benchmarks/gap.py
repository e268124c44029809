"""Where the gap to the by-hand store goes: what each guarantee costs, measured.

Usage::

    python benchmarks/gap.py                 # about 2 minutes
    python benchmarks/gap.py --quick         # a smoke run
    python benchmarks/gap.py --dir /dev/shm  # the same without the disk: CPU only

Issue 16 asks for commits at least as fast as filelock + atomicwrites + orjson (no
backup, no log). This benchmark explains, per size, the distance to it: it runs the
full transaction, the peer, the protocol's bytes-only minimum and the transaction
with **one** step switched off at a time, interleaved round by round, and reports the
p50 each step costs (full minus the variant without it).

The variants switch steps off by patching this process's copy of the library (the
type screen, the NaN screen, the change summary, the lock's holder record, the log)
or through the public API (``validate=False``, ``backup=False``). They exist only
here, to measure; the library has no switch for them. The costs of one step depend a
little on the others (fsyncs share journal commits), so they do not add up exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _workloads as w

SIZES = {"1 KB": 1_000, "10 KB": 10_000, "100 KB": 100_000, "1 MB": 1_000_000, "10 MB": 10_000_000}
FULL_ROUNDS = {"1 KB": 400, "10 KB": 300, "100 KB": 200, "1 MB": 60, "10 MB": 16}
QUICK_ROUNDS = {"1 KB": 20, "10 KB": 10, "100 KB": 8, "1 MB": 3, "10 MB": 2}


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


def _none(*_args: Any, **_kwargs: Any) -> None:
    return None


# Each variant: (label, what it removes, context factory, transaction keyword arguments).
Variant = tuple[str, str, Callable[[], contextlib.AbstractContextManager[None]], dict[str, Any]]


def variants() -> list[Variant]:
    from pipeline_common import _diff, _fs, _json
    from pipeline_common._lock import ProcessLock

    def nothing() -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def no_nan_screen() -> contextlib.AbstractContextManager[None]:
        stack = contextlib.ExitStack()
        stack.enter_context(patched(_json, "_may_hold_nonfinite", lambda _image: False))
        stack.enter_context(patched(_json, "_check_finite", _none))
        return stack

    def no_screens() -> contextlib.AbstractContextManager[None]:
        # The NaN screen reads the type screen's marshal bytes, so the two go together:
        # empty bytes (not None, which would send the NaN screen to its fallback).
        stack = no_nan_screen()
        stack.enter_context(patched(_json, "_reject_converted", lambda *_a, **_k: b""))
        return stack

    def no_summary() -> contextlib.AbstractContextManager[None]:
        # The spans stay: the NaN screen narrows on them too.
        return patched(_diff, "changed_top_level", _none)

    def no_holder_record() -> contextlib.AbstractContextManager[None]:
        stack = contextlib.ExitStack()
        stack.enter_context(patched(ProcessLock, "_write_holder", _none))
        stack.enter_context(patched(ProcessLock, "_blank_record", _none))
        return stack

    def no_log_sync() -> contextlib.AbstractContextManager[None]:
        # Only the fdatasync: without the record itself the next commit could not
        # recognise the file as its own and would record a recovery instead.
        return patched(_fs, "fdatasync", _none)

    return [
        ("full", "", nothing, {}),
        ("no type and NaN screens", "marshal of the new document, its floats", no_screens, {}),
        ("no NaN screen", "the NaN/Infinity check of the floats' bytes", no_nan_screen, {}),
        (
            "no validation",
            "the Pydantic schema check (validate=False)",
            nothing,
            {"validate": False},
        ),
        ("no change summary", "comparing old and new top-level values", no_summary, {}),
        (
            "no backup",
            "link, backups fsync, listing, prune (backup=False)",
            nothing,
            {"backup": False},
        ),
        ("no log fdatasync", "the fdatasync that makes the log line durable", no_log_sync, {}),
        (
            "no holder record",
            "the lock file's holder record, and its blanking on release",
            no_holder_record,
            {},
        ),
    ]


def run(root: Path, rounds: dict[str, int]) -> dict[str, dict[str, float]]:
    from pipeline_common import PipelineState

    out: dict[str, dict[str, float]] = {}
    plan = variants()
    shuffle = random.Random(16)
    for label, target in SIZES.items():
        doc = w.make_document(target)
        payload = w.encode_like_library(doc)
        peer = w.FilelockAtomicwritesOrjson()
        peer.setup(w.fresh_dir(root, f"peer-{target}"), doc)
        minimum = w.ProtocolMinimum(w.fresh_dir(root, f"min-{target}"), payload)
        states = {}
        for name, _what, factory, kwargs in plan:
            state = PipelineState(
                w.fresh_dir(root, f"{name.replace(' ', '-')}-{target}") / "s.json"
            )
            state.write(doc)
            for i in range(state.max_backups + 2):  # steady state: each commit prunes one
                with state.transaction() as txn:
                    txn.data["counter"] = i
            states[name] = (state, factory, kwargs)

        def ours(name: str, i: int, states: dict[str, Any] = states) -> None:
            state, factory, kwargs = states[name]
            with factory(), state.transaction(**kwargs) as txn:
                txn.data["counter"] = i

        runners: list[tuple[str, Callable[[int], Any]]] = [
            (peer.name, peer.rmw),
            ("protocol minimum", lambda _i, m=minimum: m.op()),
        ]
        runners += [(name, lambda i, name=name: ours(name, i)) for name, *_ in plan]
        times: dict[str, list[float]] = {name: [] for name, _ in runners}
        for r in range(rounds[label] + 2):
            gc.collect()  # once a round, as benchmarks/run.py does
            # A fresh random order each round: on this disk a step's time depends on
            # what ran just before it, so no runner may always follow the same one.
            for name, step in shuffle.sample(runners, len(runners)):
                t0 = time.perf_counter()
                step(r)
                dt = time.perf_counter() - t0
                if r >= 2:
                    times[name].append(dt)
            minimum.cleanup()
        peer.close()
        # Medians of the values, and of each round's difference to the full
        # transaction (paired: a slow moment of the disk hits both sides of a pair).
        out[label] = {name: statistics.median(v) for name, v in times.items()}
        for name, values in times.items():
            out[label][f"full - {name}"] = statistics.median(
                f - v for f, v in zip(times["full"], values, strict=True)
            )
        print(f"  {label}: {rounds[label]} rounds", file=sys.stderr, flush=True)
    return out


def report(results: dict[str, dict[str, float]], where: str) -> str:
    plan = variants()
    peer = w.FilelockAtomicwritesOrjson.name
    labels = list(results)
    lines = [
        f"p50 per transaction (ms) in {where}. A step's cost is the median over the rounds "
        "of the full transaction's time minus the time without that step (paired: a slow "
        "moment of the disk hits both).",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]

    def row(title: str, cells: list[str]) -> None:
        lines.append(f"| {title} | " + " | ".join(cells) + " |")

    def ms(x: float) -> str:
        return f"{x * 1e3:.3f}" if x < 0.01 else f"{x * 1e3:.1f}"

    row(f"{peer} (the peer)", [ms(results[lb][peer]) for lb in labels])
    row("protocol bytes-only minimum", [ms(results[lb]["protocol minimum"]) for lb in labels])
    row("**pipeline_common, full**", [ms(results[lb]["full"]) for lb in labels])
    row("ratio to the peer", [f"{results[lb]['full'] / results[lb][peer]:.2f}x" for lb in labels])
    row(
        "ratio to the minimum",
        [f"{results[lb]['full'] / results[lb]['protocol minimum']:.2f}x" for lb in labels],
    )
    row("gap to the peer (paired)", [ms(results[lb][f"full - {peer}"]) for lb in labels])
    for name, what, *_ in plan[1:]:
        row(
            f"cost of {name.removeprefix('no ')} ({what})",
            [ms(results[lb][f"full - {name}"]) for lb in labels],
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke test")
    parser.add_argument("--dir", type=Path, help="where to put the files (default: $TMPDIR)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pc-gap-", dir=args.dir))
    started = time.perf_counter()
    try:
        results = run(root, QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(report(results, str(args.dir or Path(tempfile.gettempdir()))))
    print(f"\n_total: {time.perf_counter() - started:.0f} s_")
    return 0


if __name__ == "__main__":
    sys.exit(main())
