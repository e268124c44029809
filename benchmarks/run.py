"""Benchmark pipeline_common against the floor and its peers; print markdown tables.

Usage::

    python benchmarks/run.py                 # full run (about 2-4 minutes)
    python benchmarks/run.py --quick         # smoke run (under a minute)
    python benchmarks/run.py --out results.md --json results.json

The machine is noisy: peers are interleaved round by round and medians reported, so
the ratios within one run are what count, not the absolute numbers across runs.
Benchmark files go to a temporary folder (``--dir`` or ``$TMPDIR``); it must be on a
real disk, not tmpfs, or fsync costs nothing and the floor means nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _workloads as w  # the sibling module, importable once the path is set
import orjson

SIZES = {"1 KB": 1_000, "10 KB": 10_000, "100 KB": 100_000, "1 MB": 1_000_000, "10 MB": 10_000_000}
FULL_ROUNDS = {"1 KB": 60, "10 KB": 50, "100 KB": 40, "1 MB": 15, "10 MB": 6}
QUICK_ROUNDS = {"1 KB": 10, "10 KB": 8, "100 KB": 6, "1 MB": 3, "10 MB": 1}
FLOOR = "floor (durable replace)"
MINIMUM = "protocol bytes-only minimum"
PC = w.PipelineCommon.name
FLJSON = w.FilelockAtomicwrites.name
FLORJSON = w.FilelockAtomicwritesOrjson.name
NAIVE = w.NaiveJson.name
SQLFULL = "sqlite3 WAL synchronous=FULL"


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """Collects markdown sections; prints each as soon as it is ready."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        print(text + "\n", flush=True)

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"


# -- single process: floor, minimum, peers, interleaved ---------------------------------


def bench_single(root: Path, rounds: dict[str, int], warmup: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label, target in SIZES.items():
        doc = w.make_document(target)
        payload = w.encode_like_library(doc)
        floor = w.Floor(w.fresh_dir(root, f"floor-{target}"), payload)
        minimum = w.ProtocolMinimum(w.fresh_dir(root, f"min-{target}"), payload)
        peers = w.all_peers()
        for i, peer in enumerate(peers):
            peer.setup(w.fresh_dir(root, f"peer{i}-{target}"), doc)
        times: dict[str, list[float]] = {FLOOR: [], MINIMUM: []}
        steps: dict[str, list[list[float]]] = {FLOOR: [], MINIMUM: []}
        for peer in peers:
            times[peer.name] = []
        runners: list[tuple[str, Callable[[int], list[float] | None]]] = [
            (FLOOR, lambda _i, f=floor: f.op()),
            (MINIMUM, lambda _i, m=minimum: m.op()),
        ]
        runners += [(peer.name, peer.rmw) for peer in peers]  # type: ignore[misc]
        n = rounds[label]
        order = random.Random(label)  # the same orders in every run
        started = time.perf_counter()
        for r in range(warmup + n):
            gc.collect()
            # A fresh random order each round. Rotating one fixed order kept the same
            # neighbours: each store always ran right after the same one, and on this
            # disk a store's time depends on what the one before left (a store that
            # does not fsync leaves its pages for the next fsync to write).
            for name, run in order.sample(runners, len(runners)):
                t0 = time.perf_counter()
                step_times = run(r)
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(dt)
                    if step_times is not None:
                        steps[name].append(step_times)
            minimum.cleanup()
        for peer in peers:
            peer.close()
        results[label] = {
            "bytes": len(payload),
            "rounds": n,
            "seconds": time.perf_counter() - started,
            "times": times,
            "steps": {
                k: [statistics.median(col) for col in zip(*v, strict=True)]
                for k, v in steps.items()
            },
        }
        print(
            f"  single process {label}: {n} rounds in {results[label]['seconds']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return results


def bench_reads(root: Path, rounds: dict[str, int], warmup: int) -> dict[str, Any]:
    from pipeline_common import PipelineState

    out: dict[str, Any] = {}
    for label, target in SIZES.items():
        folder = w.fresh_dir(root, f"read-{target}")
        state = PipelineState(folder / "state.json")
        state.write(w.make_document(target))
        path = str(state.path)

        def json_load(path: str = path) -> object:
            with open(path, "rb") as fh:
                return json.load(fh)

        def orjson_loads(path: str = path) -> object:
            with open(path, "rb") as fh:
                return orjson.loads(fh.read())

        runners = [
            ("state.read()", state.read),
            ("json.load", json_load),
            ("orjson.loads", orjson_loads),
        ]
        times: dict[str, list[float]] = {name: [] for name, _ in runners}
        n = rounds[label] * 3
        for r in range(warmup + n):
            k = r % len(runners)
            for name, run in runners[k:] + runners[:k]:
                t0 = time.perf_counter()
                run()
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(dt)
        out[label] = {name: statistics.median(v) for name, v in times.items()}
    return out


# -- contention -----------------------------------------------------------------------


def run_workers(kind: str, path: str, procs: int, n: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    children = [
        ctx.Process(target=w.contention_worker, args=(kind, path, n, barrier, results))
        for _ in range(procs)
    ]
    for child in children:
        child.start()
    reports = [results.get(timeout=600) for _ in children]
    for child in children:
        child.join(60)
    return {
        "wall": max(r["end"] for r in reports) - min(r["start"] for r in reports),
        "walls": [r["end"] - r["start"] for r in reports],
        "lat": [x for r in reports for x in r["lat"]],
        "errors": [e for r in reports for e in r["errors"]],
        "exitcodes": [c.exitcode for c in children],
    }


def bench_contention(root: Path, n: int, procs: int = 4) -> dict[str, Any]:
    doc = w.make_document(10_000)
    payload = w.encode_like_library(doc)
    out: dict[str, Any] = {}
    for kind in w.INCREMENTERS:
        runs = {}
        for label, p in (("single", 1), ("contended", procs)):
            folder = w.fresh_dir(root, f"contend-{kind.split()[0]}-{p}")
            path = folder / "state.json"
            if kind == PC:
                from pipeline_common import PipelineState

                state = PipelineState(path)
                state.write(doc)
                # Steady state, as in the single-process benchmark: every commit then
                # prunes one backup, in both runs (else the short single run would
                # prune half as often as the long contended one).
                for _ in range(state.max_backups + 2):
                    with state.transaction() as txn:
                        txn.data["counter"] = 0
            else:
                path.write_text(json.dumps(doc, indent=2))
            runs[label] = run_workers(kind, str(path), p, n)
            final = orjson.loads(path.read_bytes())["counter"]
            runs[label]["lost"] = p * n - len(runs[label]["errors"]) - final
            runs[label]["checked"], runs[label]["corrupt"] = w.count_corrupt(folder)
        single, many = runs["single"], runs["contended"]
        single_p50 = statistics.median(single["lat"])
        out[kind] = {
            "n": n,
            "procs": procs,
            "bytes": len(payload),
            "lost": many["lost"],
            "errors": len(many["errors"]) + len(single["errors"]),
            "error_sample": (many["errors"] + single["errors"])[:3],
            "corrupt": many["corrupt"],
            "checked": many["checked"],
            "single_tps": n / single["wall"],
            "contended_tps": procs * n / many["wall"],
            "single_p50": single_p50,
            "contended_p50": statistics.median(many["lat"]),
            "worst": max(many["lat"]),
            "fairness": max(many["walls"]) / min(many["walls"]),
        }
        print(f"  contention {kind}: done", file=sys.stderr, flush=True)
    return out


# -- progress tracker, memory ----------------------------------------------------------


def bench_progress(root: Path, calls: int) -> dict[str, Any]:
    try:
        from pipeline_common.progress import ProgressTracker  # being written in parallel
    except ImportError as exc:
        return {"available": False, "reason": f"not available ({exc})"}
    from pipeline_common import PipelineState

    try:
        state = PipelineState(w.fresh_dir(root, "progress") / "state.json")
        tracker = ProgressTracker(state, stages=["download", "process"], min_interval=3600.0)
        tracker.start("process", total=calls * 10)
        best = float("inf")
        for rep in range(5):
            base = rep * calls
            t0 = time.perf_counter()
            for i in range(base + 1, base + calls + 1):
                tracker.update("process", current=i)
            best = min(best, (time.perf_counter() - t0) / calls)
        t0 = time.perf_counter()
        for _ in range(calls):
            pass
        loop = (time.perf_counter() - t0) / calls
    except Exception as exc:
        return {"available": False, "reason": f"error: {type(exc).__name__}: {exc}"}
    return {"available": True, "per_call": best, "loop": loop, "calls": calls}


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(folder: str) -> None:
    """Run in a fresh interpreter: measure one 10 MB transaction's peak memory."""
    import tracemalloc

    from pipeline_common import PipelineState

    state = PipelineState(Path(folder) / "state.json")
    mode = sys.argv[-1]
    if mode == "rss":
        # VmHWM is this process's resident high-water mark (ru_maxrss would be wrong:
        # Linux carries it over from the parent across fork and exec). With nothing
        # big loaded yet, its growth is the transaction's peak, the document included.
        gc.collect()
        before = _vm_hwm()
        with state.transaction() as txn:
            txn.data["counter"] += 1
        after = _vm_hwm()
        print(json.dumps({"rss_delta": after - before}))
        return
    tracemalloc.start()
    data = state.read()
    doc_mem = tracemalloc.get_traced_memory()[0]
    del data
    gc.collect()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    with state.transaction() as txn:
        txn.data["counter"] += 1
    peak = tracemalloc.get_traced_memory()[1] - base
    print(json.dumps({"doc_mem": doc_mem, "peak": peak}))


def bench_memory(root: Path) -> dict[str, Any]:
    from pipeline_common import PipelineState

    folder = w.fresh_dir(root, "memory")
    state = PipelineState(folder / "state.json")
    doc = w.make_document(10_000_000)
    state.write(doc)
    del doc
    out: dict[str, Any] = {"bytes": state.path.stat().st_size}
    for mode in ("tracemalloc", "rss"):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(folder), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# -- report ---------------------------------------------------------------------------


def environment(root: Path, quick: bool) -> str:
    import pipeline_common

    fs = "?"
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mnt, kind, opts = line.split()[:4]
            if str(root).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, f"{kind} ({opts}) on {mnt}"
    except OSError:
        pass
    versions = []
    for mod in ("orjson", "pydantic", "filelock", "tinydb", "diskcache"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            versions.append(f"{mod} ?")
    import sqlite3

    return "\n".join(
        [
            "## Environment",
            "",
            f"- mode: {'quick (smoke: few rounds, numbers are rough)' if quick else 'full'}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S')}",
            f"- python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs",
            f"- benchmark folder file system: {fs}",
            f"- pipeline_common {pipeline_common.__version__}; {', '.join(versions)}; "
            f"sqlite {sqlite3.sqlite_version}",
        ]
    )


def single_tables(single: dict[str, Any]) -> list[str]:
    out = []
    labels = list(single)
    # floor steps
    rows = []
    for label in labels:
        r = single[label]
        st = r["steps"][FLOOR]
        rows.append(
            [
                label,
                f"{r['bytes']:,}",
                *[ms(x) for x in st],
                ms(statistics.median(r["times"][FLOOR])),
                ms(pct(r["times"][FLOOR], 0.95)),
            ]
        )
    out.append(
        "## The floor: a durable replace of the bytes, nothing else\n\n"
        "create temp (O_CREAT|O_EXCL), one write, fsync, close, os.replace, fsync of "
        "the folder. Medians of each step, in ms.\n\n"
        + table(["size", "bytes", *w.FLOOR_STEPS, "total p50", "total p95"], rows)
    )
    rows = []
    for label in labels:
        r = single[label]
        st = r["steps"][MINIMUM]
        total = statistics.median(r["times"][MINIMUM])
        ratio = total / statistics.median(r["times"][FLOOR])
        rows.append([label, *[ms(x) for x in st], ms(total), f"{ratio:.2f}x"])
    out.append(
        "## Protocol bytes-only minimum\n\nThe floor plus what the protocol cannot "
        "skip: blocking flock, hard-link backup + fsync of the backups folder, one "
        "O_APPEND log line + fdatasync, unlock. No parsing, validation, serializing or "
        "pruning. Medians in ms.\n\n"
        + table(["size", *w.MINIMUM_STEPS, "total p50", "/ floor"], rows)
    )
    # peers
    peers = w.all_peers()
    guar = [[p.name, *p.guarantees.cells(), p.note] for p in peers]
    out.append(
        "## Who guarantees what\n\n"
        "durable: survives power loss once the call returns; atomic: a crash leaves "
        "the old or the new version, never a mix; isolated: concurrent "
        "read-modify-writes from several processes lose nothing; backup: the "
        "replaced version is kept; log: an audit record per transaction.\n\n"
        + table(["store", "durable", "atomic", "isolated", "backup", "log", "what it does"], guar)
    )
    for label in labels:
        r = single[label]
        floor_p50 = statistics.median(r["times"][FLOOR])
        rows = []
        names = [FLOOR, MINIMUM] + [p.name for p in peers]
        g = {p.name: p.guarantees for p in peers}
        for name in names:
            v = r["times"][name]
            gt = g.get(name)
            short = (
                ("D A I - -" if name == MINIMUM else "D A - - -")
                if gt is None
                else " ".join(
                    flag if cell != w.NO else "-"
                    for flag, cell in zip("DAIBL", gt.cells(), strict=True)
                )
            )
            rows.append(
                [
                    name,
                    short,
                    ms(statistics.median(v)),
                    ms(pct(v, 0.95)),
                    f"{statistics.median(v) / floor_p50:.2f}x",
                ]
            )
        out.append(
            f"## Read-modify-write, single process, {label} "
            f"({r['bytes']:,} bytes, {r['rounds']} interleaved rounds)\n\n"
            "Guarantees: D durable, A atomic, I isolated, B backup, L log "
            "(- = not given; see the table above).\n\n"
            + table(["store", "guarantees", "p50 ms", "p95 ms", "p50 / floor"], rows)
        )
    return out


def marginal(single: dict[str, Any], name: str) -> float:
    lo, hi = single["1 KB"], single["10 MB"]
    dt = statistics.median(hi["times"][name]) - statistics.median(lo["times"][name])
    return dt / ((hi["bytes"] - lo["bytes"]) / 1e6)


def goals(
    single: dict[str, Any],
    reads: dict[str, Any],
    cont: dict[str, Any],
    progress: dict[str, Any],
    mem: dict[str, Any],
) -> tuple[list[list[str]], int, int]:
    rows: list[list[str]] = []

    def p50(label: str, name: str) -> float:
        return statistics.median(single[label]["times"][name])

    def add(
        goal: str,
        value: float | None,
        target: float,
        *,
        fmt: str = "{:.2f}x",
        op: str = "<=",
        note: str = "",
    ) -> None:
        if value is None:
            rows.append([goal, "n/a", f"{op} {fmt.format(target)}", "N/A", note])
            return
        ok = value <= target if op == "<=" else value >= target if op == ">=" else value < target
        rows.append(
            [goal, fmt.format(value), f"{op} {fmt.format(target)}", "PASS" if ok else "MISS", note]
        )

    for label, target in (("1 KB", 2.0), ("100 KB", 3.0), ("10 MB", 6.5)):
        add(
            f"durable txn p50 / floor, {label}",
            p50(label, PC) / p50(label, FLOOR),
            target,
            note=f"{ms(p50(label, PC))} vs {ms(p50(label, FLOOR))} ms",
        )
    for label in single:
        add(f"p50 / filelock+atomicwrites(json), {label}", p50(label, PC) / p50(label, FLJSON), 0.8)
    # Issue 16: against the by-hand store a user would glue (filelock + atomicwrites +
    # orjson), and against the protocol's own minimum.
    for label in single:
        add(
            f"p50 / filelock+atomicwrites(orjson), {label}",
            p50(label, PC) / p50(label, FLORJSON),
            1.0,
            note=f"{ms(p50(label, PC))} vs {ms(p50(label, FLORJSON))} ms",
        )
    add(
        "p50 / protocol bytes-only minimum, 1 KB",
        p50("1 KB", PC) / p50("1 KB", MINIMUM),
        1.6,
        note=f"{ms(p50('1 KB', PC))} vs {ms(p50('1 KB', MINIMUM))} ms",
    )
    for label in single:
        best = min(w.CAREFUL, key=lambda n, label=label: p50(label, n))
        add(
            f"p50 / best careful store, {label}",
            p50(label, PC) / p50(label, best),
            1.25,
            note=f"best: {best}, {ms(p50(label, best))} ms",
        )
    for label in ("100 KB", "10 MB"):
        add(f"p50 / sqlite WAL FULL, {label}", p50(label, PC) / p50(label, SQLFULL), 0.6)
        add(f"p50 / naive json.dump, {label}", p50(label, PC) / p50(label, NAIVE), 0.5)
    c = cont[PC]
    add(
        "4 procs: lost updates",
        c["lost"],
        0,
        fmt="{:.0f}",
        op="<=",
        note=f"{c['procs']} x {c['n']}; errors {c['errors']}; "
        f"corrupt {c['corrupt']}/{c['checked']}",
    )
    add(
        "4 procs: contended / single throughput",
        c["contended_tps"] / c["single_tps"],
        0.8,  # issue 16 (0.7 before)
        op=">=",
        note=f"{c['contended_tps']:.0f} vs {c['single_tps']:.0f} txn/s",
    )
    add(
        "4 procs: worst txn / single p50",
        c["worst"] / c["single_p50"],
        200,
        fmt="{:.1f}x",
        note=f"{ms(c['worst'])} vs {ms(c['single_p50'])} ms",
    )
    add("4 procs: slowest / fastest worker", c["fairness"], 1.5)
    for label in reads:
        ratio = reads[label]["state.read()"] / reads[label]["json.load"]
        add(
            f"read() / json.load, {label}",
            ratio,
            1.1,
            note="stretch <= 0.5x: " + ("met" if ratio <= 0.5 else "not met"),
        )
    if progress.get("available"):
        add(
            "ProgressTracker.update() (not persisting)",
            progress["per_call"] * 1e6,
            2.0,
            fmt="{:.2f} us",
            op="<",
        )
    else:
        add(
            "ProgressTracker.update() (not persisting)",
            None,
            2.0,
            fmt="{:.2f} us",
            op="<",
            note=progress.get("reason", ""),
        )
    add(
        "memory: txn RSS peak / doc in-memory size (10 MB)",
        mem["rss_delta"] / mem["doc_mem"],
        4.0,
        op="<",
        note=f"RSS growth {mem['rss_delta'] / 1e6:.1f} MB (doc included), doc "
        f"{mem['doc_mem'] / 1e6:.1f} MB; tracemalloc peak {mem['peak'] / 1e6:.1f} MB counts "
        "orjson's reserved but untouched parse buffer",
    )
    add(
        "marginal cost per MB / floor's",
        marginal(single, PC) / marginal(single, FLOOR),
        7.0,
        note=f"{ms(marginal(single, PC))} vs {ms(marginal(single, FLOOR))} ms/MB",
    )
    passed = sum(r[3] == "PASS" for r in rows)
    missed = sum(r[3] == "MISS" for r in rows)
    return rows, passed, missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke test")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--dir", type=Path, help="where to put benchmark files (a real disk)")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark files")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    root = Path(tempfile.mkdtemp(prefix="pc-bench-", dir=args.dir)).resolve()
    rounds = QUICK_ROUNDS if args.quick else FULL_ROUNDS
    warmup = 1 if args.quick else 3
    started = time.perf_counter()
    report = Report()
    try:
        report.add("# pipeline_common benchmarks\n\n" + environment(root, args.quick))
        single = bench_single(root, rounds, warmup)
        for part in single_tables(single):
            report.add(part)
        lines = []
        for name in (
            FLOOR,
            MINIMUM,
            PC,
            FLJSON,
            w.FilelockAtomicwritesOrjson.name,
            w.HandFlock.name,
            SQLFULL,
            NAIVE,
        ):
            lines.append(
                [
                    name,
                    ms(marginal(single, name)),
                    f"{marginal(single, name) / marginal(single, FLOOR):.2f}x",
                ]
            )
        report.add(
            "## Marginal cost per MB (slope of p50 from 1 KB to 10 MB)\n\n"
            + table(["store", "ms per MB", "/ floor's"], lines)
        )
        cont = bench_contention(root, 25 if args.quick else 100)
        rows = []
        for kind, c in cont.items():
            rows.append(
                [
                    kind,
                    f"{c['procs']} x {c['n']}",
                    str(c["lost"]),
                    str(c["errors"]),
                    f"{c['corrupt']}/{c['checked']}",
                    f"{c['single_tps']:.0f}",
                    f"{c['contended_tps']:.0f}",
                    f"{c['contended_tps'] / c['single_tps']:.2f}x",
                    ms(c["single_p50"]),
                    ms(c["contended_p50"]),
                    ms(c["worst"]),
                    f"{c['worst'] / c['single_p50']:.1f}x",
                    f"{c['fairness']:.2f}",
                ]
            )
        report.add(
            "## 4-process contention (10 KB document, counter += 1 per transaction)\n\n"
            "lost = increments done minus the final counter (must be 0); corrupt = "
            "files (state + backups) that do not parse; fairness = slowest worker's "
            "wall time / fastest's.\n\n"
            + table(
                [
                    "store",
                    "procs x txns",
                    "lost",
                    "errors",
                    "corrupt",
                    "single txn/s",
                    "contended txn/s",
                    "contended / single",
                    "single p50 ms",
                    "contended p50 ms",
                    "worst ms",
                    "worst / single p50",
                    "fairness",
                ],
                rows,
            )
        )
        reads = bench_reads(root, rounds, warmup)
        rows = [
            [
                label,
                ms(r["state.read()"]),
                ms(r["json.load"]),
                ms(r["orjson.loads"]),
                f"{r['state.read()'] / r['json.load']:.2f}x",
                f"{r['state.read()'] / r['orjson.loads']:.2f}x",
            ]
            for label, r in reads.items()
        ]
        report.add(
            "## Read latency (p50 ms; open + read + parse)\n\n"
            + table(
                [
                    "size",
                    "state.read()",
                    "json.load",
                    "orjson.loads",
                    "read() / json.load",
                    "read() / orjson",
                ],
                rows,
            )
        )
        progress = bench_progress(root, 20_000 if args.quick else 200_000)
        if progress["available"]:
            text = (
                f"{progress['per_call'] * 1e6:.3f} us per update() call (best of 5 x "
                f"{progress['calls']:,}; an empty loop costs {progress['loop'] * 1e6:.3f} us)"
            )
        else:
            text = progress["reason"]
        report.add("## ProgressTracker.update() when not persisting\n\n" + text)
        mem = bench_memory(root)
        report.add(
            "## Peak memory of one 10 MB transaction\n\n"
            + table(
                [
                    "file bytes",
                    "doc in memory (tracemalloc)",
                    "txn peak (tracemalloc)",
                    "peak / doc in memory",
                    "peak / file bytes",
                    "txn RSS growth, doc included (VmHWM)",
                ],
                [
                    [
                        f"{mem['bytes'] / 1e6:.1f} MB",
                        f"{mem['doc_mem'] / 1e6:.1f} MB",
                        f"{mem['peak'] / 1e6:.1f} MB",
                        f"{mem['peak'] / mem['doc_mem']:.2f}x",
                        f"{mem['peak'] / mem['bytes']:.2f}x",
                        f"{mem['rss_delta'] / 1e6:.1f} MB",
                    ]
                ],
            )
        )
        rows, passed, missed = goals(single, reads, cont, progress, mem)
        report.add(
            f"## Goals (issues #3 and #16): {passed} pass, {missed} miss\n\n"
            + table(["goal", "measured", "target", "result", "detail"], rows)
        )
        report.add(f"_total benchmark time: {time.perf_counter() - started:.0f} s_")
        if args.json:
            raw = {
                "single": single,
                "reads": reads,
                "contention": cont,
                "progress": progress,
                "memory": mem,
                "goals": rows,
            }
            args.json.write_text(json.dumps(raw, indent=1, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.out:
        args.out.write_text(report.text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
