"""Prove each guarantee of pipeline_common live, in a temporary folder.

Run ``python -m pipeline_common.demo``. Every line of output starts with ``PASS`` or
``FAIL``; the exit status is 1 when any check failed. The checks, in order:

1. atomic writes survive ``kill -9``: a child process commits in a loop with a growing
   payload and prints each acknowledged counter; it is killed at random moments, and
   after each kill the file must parse and hold the last acknowledged commit or the
   one in flight (never less), while unlocked reads made during the writes all parse;
2. rollback: an exception inside a transaction leaves the file byte-identical;
3. backups and restore: an older backup is restored, then the restore is undone;
4. no lost update: 4 processes increment one counter 100 times each: 400;
5. validation: a bad phase status is rejected and the file is untouched;
6. lock timeout: a child holds the lock for ``"phase3: tts"``; a writer with
   ``timeout=0.3`` gets a :class:`StateLockError` naming the holder's pid, host and
   operation;
7. a pipeline resumes after ``kill -9``: a child runs a three-stage :class:`Pipeline`
   and is killed in the middle of its second stage; another process sees the whole plan
   with that stage still "running" under a dead owner; the next ``run()`` re-runs only
   that stage, from its persisted progress, and records the interruption.

Children are started as ``sys.executable -m pipeline_common.demo --child ...``, so the
demo works from an installed package as well as from a checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from .errors import StateError, StateLockError, StateValidationError
from .pipeline import Pipeline, StageContext
from .progress import ProgressTracker
from .state import PipelineState

__all__ = ["main"]

_CHILD_TIMEOUT = 20.0  # seconds; generous, so a slow machine fails loudly, not forever


def _payload(n: int) -> str:
    """The payload of commit ``n``: grows to about 100 KB, then starts over."""
    return f"{n:08d}" * (n % 400 * 32)


# -- children --------------------------------------------------------------------


def _child_writer(path: str) -> int:
    """Commit forever; print each acknowledged counter (after the commit returned)."""
    state = PipelineState(path)
    while True:
        with state.transaction(operation="demo: write") as txn:
            n = int(txn.data.get("n", 0)) + 1
            txn.data["n"] = n
            txn.data["payload"] = _payload(n)
        print(n, flush=True)


def _child_increment(path: str, count: int) -> int:
    """Wait for the parent's go, then increment the counter ``count`` times."""
    state = PipelineState(path, timeout=_CHILD_TIMEOUT)
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(count):
        with state.transaction(operation="demo: increment") as txn:
            txn.data["counter"] = int(txn.data.get("counter", 0)) + 1
    return 0


def _child_hold(path: str) -> int:
    """Hold the lock inside a ``"phase3: tts"`` transaction until stdin says go."""
    state = PipelineState(path)
    with state.transaction(operation="phase3: tts") as txn:
        print("holding", flush=True)
        sys.stdin.readline()
        txn.data["phase3"] = {"status": "success"}
    return 0


_TTS_ITEMS = 20


def _demo_pipeline(path: str, effects: str, *, child: bool) -> Pipeline:
    """Three stages; each unit of work appends a line to ``effects`` (the side effects).

    In the ``child`` runner, tts announces each item and works slowly, so the parent can
    kill it in the middle of the stage.
    """
    pipeline = Pipeline(path, min_interval=0, timeout=_CHILD_TIMEOUT)

    def effect(line: str) -> None:
        with open(effects, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    @pipeline.stage()
    def extract(ctx: StageContext) -> None:
        effect("extract")
        ctx.record["chapters"] = _TTS_ITEMS

    @pipeline.stage(requires=["extract"], weight=3)
    def tts(ctx: StageContext) -> None:
        for i in ctx.track(range(ctx.data["extract"]["chapters"])):
            effect(f"tts {i}")
            if child:
                print(f"tts {i}", flush=True)
                time.sleep(0.05)

    @pipeline.stage(requires=["tts"])
    def mix(ctx: StageContext) -> None:
        effect("mix")

    return pipeline


def _child_stages(path: str, effects: str) -> int:
    """Run the demo pipeline slowly, so the parent can kill it inside ``tts``."""
    _demo_pipeline(path, effects, child=True).run()
    return 0


def _run_child(argv: Sequence[str]) -> int:
    mode, *args = argv
    if mode == "writer":
        return _child_writer(args[0])
    if mode == "increment":
        return _child_increment(args[0], int(args[1]))
    if mode == "hold":
        return _child_hold(args[0])
    if mode == "stages":
        return _child_stages(args[0], args[1])
    print(f"unknown child mode {mode!r}", file=sys.stderr)
    return 2


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline_common.demo", "--child", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _expect_line(proc: subprocess.Popen[str], want: str) -> None:
    """Wait for the child to print ``want``; raise with its stderr if it does not."""
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != want:
        proc.kill()
        _, err = proc.communicate(timeout=_CHILD_TIMEOUT)
        raise RuntimeError(f"child printed {line!r}, not {want!r}; stderr: {err.strip()[-500:]}")


def _finish(proc: subprocess.Popen[str]) -> None:
    """Let a child end; raise with its stderr if it fails."""
    _, err = proc.communicate(timeout=_CHILD_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"child exited with {proc.returncode}: {err.strip()[-500:]}")


# -- reporting -------------------------------------------------------------------


class _Report:
    """Prints one PASS or FAIL line per check and counts the failures."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str) -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(f"{'PASS' if ok else 'FAIL'}  {what}", file=self.out, flush=True)
        return ok

    def run(self, name: str, section: Callable[[], None]) -> None:
        """Run one section; an unexpected error is one FAIL line, not a crash."""
        try:
            section()
        except Exception as exc:  # noqa: BLE001 - reported as a FAIL line, then go on
            self.check(False, f"{name}: unexpected {type(exc).__name__}: {exc}")


# -- the checks ------------------------------------------------------------------


def _kill_round(path: Path, rng: random.Random) -> tuple[list[int], int, int]:
    """Run one writer until a random moment, SIGKILL it; return acks, reads, read errors."""
    proc = _spawn("writer", str(path))
    acks: list[int] = []
    first = threading.Event()

    def collect() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            acks.append(int(line))
            first.set()
        first.set()

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        if not first.wait(_CHILD_TIMEOUT) or not acks:
            raise RuntimeError("the writer acknowledged no commit")
        # Read without the lock while the writer commits, until the kill.
        deadline = time.monotonic() + rng.uniform(0.01, 0.15)
        reads = errors = 0
        seen = 0
        state = PipelineState(path)
        while time.monotonic() < deadline:
            try:
                n = int(state.read().get("n", 0))
            except StateError:
                errors += 1
            else:
                reads += 1
                if n < seen:  # a reader never goes back in time
                    errors += 1
                seen = max(seen, n)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=_CHILD_TIMEOUT)
        reader.join(timeout=_CHILD_TIMEOUT)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the writer ended with {proc.returncode} before it was killed")
    return acks, reads, errors


def _demo_kill(report: _Report, root: Path, rounds: int, rng: random.Random) -> None:
    path = root / "kill" / "pipeline.json"
    path.parent.mkdir()
    last_ack = 0
    for i in range(1, rounds + 1):
        acks, reads, read_errors = _kill_round(path, rng)
        in_order = acks == list(range(acks[0], acks[0] + len(acks))) and acks[0] > last_ack
        data = PipelineState(path).read()  # raises StateReadError if the file is torn
        n = int(data.get("n", -1))
        intact = data.get("payload") == _payload(n)
        ok = in_order and intact and n in (acks[-1], acks[-1] + 1) and read_errors == 0
        report.check(
            ok,
            f"kill -9 round {i}: writer killed after commit {acks[-1]} was acknowledged; "
            f"the file parses and holds commit {n} ({'intact' if intact else 'CORRUPT'}, "
            f"{'nothing lost' if n >= acks[-1] else 'LOST COMMITS'}); {reads} unlocked reads "
            f"during the writes, {read_errors} failed",
        )
        last_ack = acks[-1]
    state = PipelineState(path, timeout=1.0)
    start = time.monotonic()
    with state.transaction(operation="demo: after the kills") as txn:
        txn.data["n"] = int(txn.data["n"]) + 1
        txn.data["payload"] = _payload(int(txn.data["n"]))
    waited = time.monotonic() - start
    orphan = path.with_name(f".{path.name}.tmp").exists()
    history = state.get_transaction_history(limit=100_000)
    seqs = [int(r["seq"]) for r in history]
    ordered = seqs == list(range(len(seqs), 0, -1))
    report.check(
        waited < 1.0 and not orphan and ordered and bool(history[0]["success"]),
        f"kill -9 aftermath: the next writer got the lock in {waited * 1000:.0f} ms "
        f"(the kernel released it), committed, left no temp file; the log's {len(seqs)} "
        f"records are complete and in order",
    )


def _demo_rollback(report: _Report, root: Path) -> None:
    path = root / "rollback" / "pipeline.json"
    path.parent.mkdir()
    state = PipelineState(path)
    state.write({"phase1": {"status": "success"}, "counter": 1})
    before = path.read_bytes()
    try:
        with state.transaction(operation="demo: fails") as txn:
            txn.data["counter"] = 999
            txn.data["phase2"] = {"status": "running"}
            raise RuntimeError("simulated failure inside the transaction")
    except RuntimeError:
        pass
    record = state.get_transaction_history(limit=1)[0]
    report.check(
        path.read_bytes() == before and record["success"] is False,
        f"rollback: a RuntimeError inside a transaction left pipeline.json byte-identical "
        f"({len(before)} bytes) and was logged as {record['details'].get('error')!r}",
    )


def _demo_backups(report: _Report, root: Path) -> None:
    path = root / "backups" / "pipeline.json"
    path.parent.mkdir()
    state = PipelineState(path)
    for step in range(1, 5):
        state.write({"step": step})
    backups = state.list_backups()
    steps = [json.loads(b.read_bytes())["step"] for b in backups]
    report.check(
        steps == [3, 2, 1],
        f"backups: 4 commits left {len(backups)} backups, newest first, holding steps {steps}",
    )
    oldest = backups[-1]
    state.restore_backup(oldest)
    restored = state.read()
    record = state.get_transaction_history(limit=1)[0]
    report.check(
        restored == {"step": 1} and record["operation"] == "restore",
        f"restore: state.restore_backup({oldest.name!r}) brought back step "
        f"{restored.get('step')} as a logged 'restore' transaction",
    )
    undo = record["details"]["backup"]  # the version the restore replaced
    state.restore_backup(undo)
    report.check(
        state.read() == {"step": 4},
        f"undo restore: the restore backed up what it replaced; restoring {undo!r} "
        f"brought back step {state.read().get('step')}",
    )


def _demo_concurrency(report: _Report, root: Path, workers: int, increments: int) -> None:
    path = root / "counter" / "pipeline.json"
    path.parent.mkdir()
    PipelineState(path).write({"counter": 0})
    procs = [_spawn("increment", str(path), str(increments)) for _ in range(workers)]
    try:
        for proc in procs:
            _expect_line(proc, "ready")
        start = time.monotonic()
        for proc in procs:  # all start together, so they really contend for the lock
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            _finish(proc)
        elapsed = time.monotonic() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    state = PipelineState(path)
    counter = state.read().get("counter")
    logged = sum(
        1
        for r in state.get_transaction_history(limit=100_000)
        if r["operation"] == "demo: increment" and r["success"]
    )
    want = workers * increments
    report.check(
        counter == want and logged == want,
        f"no lost update: {workers} processes x {increments} increments = {counter} "
        f"(expected {want}); {logged} commits logged; {elapsed:.1f} s",
    )


def _demo_validation(report: _Report, root: Path) -> None:
    path = root / "validation" / "pipeline.json"
    path.parent.mkdir()
    state = PipelineState(path)
    state.write({"phase1": {"status": "running"}})
    before = path.read_bytes()
    message = "no error"
    rejected = False
    try:
        with state.transaction(operation="demo: bad status") as txn:
            txn.data["phase1"]["status"] = "done"
    except StateValidationError as exc:
        rejected = isinstance(exc, ValueError)
        message = str(exc).split(f"{state.schema.__name__}: ", 1)[-1]
    report.check(
        rejected and path.read_bytes() == before,
        f"validation: status 'done' rejected with StateValidationError ({message}); "
        "pipeline.json byte-identical",
    )


def _demo_lock(report: _Report, root: Path) -> None:
    path = root / "lock" / "pipeline.json"
    path.parent.mkdir()
    holder = _spawn("hold", str(path))
    try:
        _expect_line(holder, "holding")
        impatient = PipelineState(path, timeout=0.3)
        start = time.monotonic()
        error: StateLockError | None = None
        try:
            with impatient.transaction(operation="demo: impatient"):
                pass
        except StateLockError as exc:
            error = exc
        waited = time.monotonic() - start
        message = str(error)
        named = (
            error is not None
            and f"pid {holder.pid}" in message
            and socket.gethostname() in message
            and "'phase3: tts'" in message
            and isinstance(error, TimeoutError)
        )
        report.check(
            named and 0.25 <= waited < 2.0,
            f"lock timeout after {waited:.2f} s names the holder: {message}",
        )
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        _finish(holder)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    with PipelineState(path, timeout=1.0).transaction(operation="demo: after") as txn:
        phase3 = txn.data.get("phase3")
    report.check(
        phase3 == {"status": "success"},
        "lock released: the holder committed phase3 and the next writer got the lock",
    )


def _demo_pipeline_resume(report: _Report, root: Path) -> None:
    folder = root / "stages"
    folder.mkdir()
    path, effects = folder / "pipeline.json", folder / "effects.txt"
    runner = _spawn("stages", str(path), str(effects))
    try:
        _expect_line(runner, "tts 0")
        for i in range(1, 8):
            _expect_line(runner, f"tts {i}")
        runner.kill()
        runner.communicate(timeout=_CHILD_TIMEOUT)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()
    seen = ProgressTracker(PipelineState(path)).status()  # a process that declared nothing
    tts = seen["stages"].get("tts", {})
    report.check(
        list(seen["stages"]) == ["extract", "tts", "mix"]
        and tts.get("status") == "running"
        and seen["stages"]["mix"]["status"] == "pending",
        f"pipeline: runner killed with SIGKILL inside 'tts'; a fresh process sees the plan "
        f"{list(seen['stages'])} with tts running at {tts.get('current')}/{tts.get('total')} "
        f"(owner pid {(tts.get('owner') or {}).get('pid')}, now dead), mix pending, "
        f"overall {seen['overall_progress']:.1f}%",
    )
    resumed_from = int(tts.get("current") or 0)
    pipeline = _demo_pipeline(str(path), str(effects), child=False)
    result = pipeline.run()
    lines = effects.read_text(encoding="utf-8").splitlines()
    runs = {stage: sum(1 for x in lines if x.split()[0] == stage) for stage in ("extract", "mix")}
    tts_done = [int(x.split()[1]) for x in lines if x.startswith("tts ")]
    redone = len(tts_done) - _TTS_ITEMS
    record = pipeline.state.read()["tts"]
    interruptions = record.get("interruptions") or []
    report.check(
        pipeline.status()["status"] == "success"
        and runs == {"extract": 1, "mix": 1}
        and sorted(set(tts_done)) == list(range(_TTS_ITEMS))
        and 0 <= redone <= 1
        and len(interruptions) == 1
        and result.ran == ["tts", "mix"],
        f"pipeline: the next run() re-ran only tts, from item {resumed_from} (its persisted "
        f"progress; {redone} item done twice), then mix; extract ran once in all; the tts "
        f"record keeps the interruption ({len(interruptions)} recorded)",
    )


def _demo_all(
    report: _Report, root: Path, *, rounds: int, seed: int | None, workers: int, increments: int
) -> None:
    rng = random.Random(seed)
    sections: list[tuple[str, Callable[[], None]]] = [
        ("kill -9", lambda: _demo_kill(report, root, rounds, rng)),
        ("rollback", lambda: _demo_rollback(report, root)),
        ("backups", lambda: _demo_backups(report, root)),
        ("no lost update", lambda: _demo_concurrency(report, root, workers, increments)),
        ("validation", lambda: _demo_validation(report, root)),
        ("lock timeout", lambda: _demo_lock(report, root)),
        ("pipeline resume", lambda: _demo_pipeline_resume(report, root)),
    ]
    for name, section in sections:
        report.run(name, section)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return 0 when every check passed, 1 otherwise."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--child"]:
        return _run_child(args_list[1:])
    parser = argparse.ArgumentParser(
        prog="python -m pipeline_common.demo",
        description="Prove each guarantee of pipeline_common live, in a temporary folder.",
    )
    parser.add_argument("--rounds", type=int, default=6, help="kill -9 rounds (default 6)")
    parser.add_argument("--workers", type=int, default=4, help="counting processes (default 4)")
    parser.add_argument(
        "--increments", type=int, default=100, help="increments per process (default 100)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the kill moments")
    args = parser.parse_args(args_list)
    report = _Report(sys.stdout)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pipeline-common-demo-") as tmp:
        _demo_all(
            report,
            Path(tmp),
            rounds=args.rounds,
            seed=args.seed,
            workers=args.workers,
            increments=args.increments,
        )
    elapsed = time.monotonic() - start
    total = report.passed + report.failed
    if report.failed:
        report.check(False, f"{report.failed} of {total} checks failed ({elapsed:.1f} s)")
        return 1
    report.check(True, f"all {total} checks passed in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
