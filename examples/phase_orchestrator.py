"""A phase orchestrator migrated to pipeline_common: an audiobook pipeline in 5 phases.

Each phase keeps one record in ``pipeline.json`` (``phase1`` .. ``phase5``) with its
status, attempts, timestamps and outputs. A phase runs in three transactions:

1. ``phaseN: start`` marks it ``running`` (visible at once to other processes);
2. ``phaseN: <name>`` does the work and records the outputs: if the work raises, this
   transaction rolls back, so a half-filled record never reaches the file;
3. on failure, ``phaseN: failed`` records the status and the error.

A rerun skips the phases already ``success`` and resumes at the failed one.

Usage::

    python examples/phase_orchestrator.py
        # in a new temp folder: run 1 fails in phase 3, run 2 resumes and finishes
    python examples/phase_orchestrator.py path/to/pipeline.json [--fail-phase N]
        # one run on that state file; exit 1 if a phase failed (run again to resume)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline_common import PipelineState, StateError

BOOK = (
    "Chapter 1. The lock file was never deleted.\n"
    "Chapter 2. The temp file lived beside its target.\n"
    "Chapter 3. Every fsync was checked, and none was retried.\n"
)


@dataclass
class Context:
    """What the phases share: the work folder and the phase told to fail, if any."""

    workdir: Path
    fail_phase: int | None = None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# -- the phases: each returns its outputs; txn.data is the state being built ------


def extract_text(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
    text = ctx.workdir / "book.txt"
    text.write_text(BOOK, encoding="utf-8")
    return {"text": str(text), "characters": len(BOOK)}


def split_chapters(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
    text = Path(data["phase1"]["outputs"]["text"]).read_text(encoding="utf-8")
    chapters = []
    for i, line in enumerate(text.splitlines(), start=1):
        path = ctx.workdir / f"chapter{i:02d}.txt"
        path.write_text(line, encoding="utf-8")
        chapters.append(str(path))
    return {"chapters": chapters}


def text_to_speech(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
    record = data["phase3"]
    audio = []
    for i, chapter in enumerate(data["phase2"]["outputs"]["chapters"], start=1):
        if ctx.fail_phase == 3 and i == 2:
            raise RuntimeError(f"TTS engine crashed on chapter {i}")
        wav = ctx.workdir / f"chapter{i:02d}.wav"
        wav.write_bytes(b"RIFF" + Path(chapter).read_bytes())  # a stand-in for real audio
        audio.append(str(wav))
        # Progress inside the transaction: rolled back with everything else on failure.
        record["chapters_done"] = i
    return {"audio": audio}


def mix_audio(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
    mixed = ctx.workdir / "book.wav"
    mixed.write_bytes(b"".join(Path(p).read_bytes() for p in data["phase3"]["outputs"]["audio"]))
    return {"mixed": str(mixed), "bytes": mixed.stat().st_size}


def package(ctx: Context, data: dict[str, Any]) -> dict[str, Any]:
    book = ctx.workdir / "book.m4b"
    book.write_bytes(Path(data["phase4"]["outputs"]["mixed"]).read_bytes())
    return {"audiobook": str(book)}


Phase = Callable[[Context, dict[str, Any]], dict[str, Any]]

PHASES: list[tuple[str, str, Phase]] = [
    ("phase1", "extract text", extract_text),
    ("phase2", "split chapters", split_chapters),
    ("phase3", "tts", text_to_speech),
    ("phase4", "mix audio", mix_audio),
    ("phase5", "package", package),
]


# -- the orchestrator ------------------------------------------------------------


def run_phase(state: PipelineState, number: int, ctx: Context) -> bool:
    """Run phase ``number`` (1-5) through transactions; return True when it succeeded."""
    key, name, work = PHASES[number - 1]
    if state.read().get(key, {}).get("status") == "success":
        print(f"{key} {name}: already done, skipped")
        return True
    with state.transaction(operation=f"{key}: start") as txn:
        record = txn.data.setdefault(key, {})
        record.pop("error", None)
        record.update(
            name=name, status="running", started_at=now(), attempts=record.get("attempts", 0) + 1
        )
    started = time.perf_counter()
    try:
        with state.transaction(operation=f"{key}: {name}") as txn:
            if ctx.fail_phase == number and key != "phase3":
                txn.data[key]["half_done"] = True  # rolled back with the transaction
                raise RuntimeError(f"{name} failed (injected with --fail-phase {number})")
            outputs = work(ctx, txn.data)
            txn.data[key].update(status="success", finished_at=now(), outputs=outputs)
    except Exception as exc:  # noqa: BLE001 - a phase's failure is recorded, then reported
        with state.transaction(operation=f"{key}: failed") as txn:
            txn.data[key].update(
                status="failed", finished_at=now(), error=f"{type(exc).__name__}: {exc}"
            )
        print(f"{key} {name}: FAILED ({exc}); its partial record was rolled back")
        return False
    took = time.perf_counter() - started
    print(f"{key} {name}: success in {took * 1000:.1f} ms, outputs {sorted(outputs)}")
    return True


def run_pipeline(state: PipelineState, ctx: Context) -> bool:
    """Run every phase in order; stop at the first failure. Return True when all succeeded."""
    with state.transaction(operation="pipeline: open") as txn:
        txn.data.setdefault("pipeline", {"book": "demo", "created_at": now()})
        txn.data["pipeline"]["runs"] = txn.data["pipeline"].get("runs", 0) + 1
    for number, (key, _, _) in enumerate(PHASES, start=1):
        if not run_phase(state, number, ctx):
            print(f"stopped at {key}; run again to resume there")
            return False
    print("all phases done")
    return True


def print_summary(state: PipelineState) -> None:
    data = state.read()
    for key, _, _ in PHASES:
        record = data.get(key)
        if record is None:
            print(f"  {key}  not started")
            continue
        extra = f"  error={record['error']!r}" if "error" in record else ""
        print(f"  {key}  {record['status']:<8} attempts={record.get('attempts')}{extra}")


def print_history(state: PipelineState, limit: int = 20) -> None:
    for record in state.get_transaction_history(limit):
        outcome = "ok" if record["success"] else f"rolled back: {record['details'].get('error')}"
        print(f"  seq {record['seq']:>2}  {record['operation']:<22} {outcome}")


def scenario(folder: Path) -> int:
    """Run 1 fails in phase 3 and rolls back; run 2 resumes and finishes."""
    state = PipelineState(folder / "pipeline.json")
    print(f"state file: {state.path}")
    print("== run 1: the TTS engine will crash in phase 3 ==")
    first = run_pipeline(state, Context(folder, fail_phase=3))
    print("== state after run 1 ==")
    print_summary(state)
    phase3 = state.read()["phase3"]
    if first or phase3["status"] != "failed" or "chapters_done" in phase3:
        print("unexpected: phase 3 should have failed and rolled back its progress")
        return 1
    print("== run 2: resume ==")
    second = run_pipeline(state, Context(folder))
    print("== state after run 2 ==")
    print_summary(state)
    print("== transaction log, newest first ==")
    print_history(state)
    return 0 if second else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", nargs="?", help="the state file (default: a temp folder demo)")
    parser.add_argument("--fail-phase", type=int, choices=range(1, 6), help="make phase N fail")
    args = parser.parse_args(argv)
    try:
        if args.state is None:
            with tempfile.TemporaryDirectory(prefix="audiobook-") as tmp:
                return scenario(Path(tmp))
        path = Path(args.state).resolve()
        workdir = path.parent / "audiobook"
        workdir.mkdir(parents=True, exist_ok=True)
        state = PipelineState(path)
        ok = run_pipeline(state, Context(workdir, fail_phase=args.fail_phase))
        print_summary(state)
        return 0 if ok else 1
    except StateError as exc:  # a lock timeout, a corrupt state file: the message says what to do
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
