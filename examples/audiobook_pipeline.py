"""The audiobook orchestrator (phases 1-6) on ``Pipeline``: the runner does the bookkeeping.

The hand-written version is examples/phase_orchestrator.py: there, every phase repeats
"skip if done, mark running, count the attempt, record success or the error". Here each
phase is a function that does its work and fills ``ctx.record``; the ``Pipeline`` checks
the prerequisites, claims the phase (owner pid, host, start time), retries the TTS
service's transient errors, records the outcome, skips what is done when the script is
started again, and re-runs a phase whose process died (kill -9) on the next start.

Usage::

    python examples/audiobook_pipeline.py
        # in a new temp folder: run 1 fails in phase 4, run 2 resumes there and finishes
    python examples/audiobook_pipeline.py BOOK.txt pipeline.json [--fail-phase N]
        # one run; exit 1 if a phase failed (run again to resume)
    AUDIOBOOK_INPUT=book.txt AUDIOBOOK_STATE=pipeline.json \\
        pipeline-state run examples/audiobook_pipeline.py:from_env
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from pipeline_common import Pipeline, StageContext, StageFailedError, StateError

BOOK = (
    "Chapter 1. The lock file was never deleted.\n"
    "Chapter 2. The temp file lived beside its target.\n"
    "Chapter 3. Every fsync was checked, and none was retried.\n"
)


class FlakyTTS:
    """A stand-in TTS service: its first request fails with a transient ConnectionError."""

    def __init__(self, fail_chapter: int | None = None) -> None:
        self.requests = 0
        self.fail_chapter = fail_chapter

    def speak(self, number: int, text: str) -> bytes:
        self.requests += 1
        if self.requests == 1:
            raise ConnectionError("TTS service timed out (transient)")
        if number == self.fail_chapter:
            raise RuntimeError(f"TTS engine crashed on chapter {number}")
        return b"RIFF" + text.encode("utf-8")  # a stand-in for real audio


def build_pipeline(
    input_file: Path, pipeline_json: Path, fail_phase: int | None = None
) -> Pipeline:
    """The six phases, each requiring the one before; outputs in a folder beside the state."""
    pipeline = Pipeline(pipeline_json)
    workdir = pipeline.state.path.parent / "audiobook"
    tts = FlakyTTS(fail_chapter=2 if fail_phase == 4 else None)

    def injected(number: int) -> None:
        if fail_phase == number and number != 4:
            raise RuntimeError(f"phase {number} failed (injected with --fail-phase {number})")

    @pipeline.stage(name="phase1")
    def validate_input(ctx: StageContext) -> None:
        injected(1)
        if not input_file.is_file() or input_file.stat().st_size == 0:
            raise FileNotFoundError(f"{input_file}: no such book, or it is empty")
        ctx.record["input"] = str(input_file)
        ctx.record["bytes"] = input_file.stat().st_size

    @pipeline.stage(name="phase2", requires=["phase1"])
    def extract_text(ctx: StageContext) -> None:
        injected(2)
        workdir.mkdir(parents=True, exist_ok=True)
        text = input_file.read_text(encoding="utf-8").strip() + "\n"
        out = workdir / "book.txt"
        out.write_text(text, encoding="utf-8")
        ctx.record["outputs"] = {"text": str(out), "characters": len(text)}

    @pipeline.stage(name="phase3", requires=["phase2"])
    def split_chapters(ctx: StageContext) -> None:
        injected(3)
        text = Path(ctx.data["phase2"]["outputs"]["text"]).read_text(encoding="utf-8")
        chapters = []
        for i, line in enumerate(text.splitlines(), start=1):
            path = workdir / f"chapter{i:02d}.txt"
            path.write_text(line, encoding="utf-8")
            chapters.append(str(path))
        ctx.record["outputs"] = {"chapters": chapters}

    @pipeline.stage(
        name="phase4",
        requires=["phase3"],
        weight=4,
        retries=2,
        retry_on=(ConnectionError,),
        retry_delay=0.01,
    )
    def text_to_speech(ctx: StageContext) -> None:
        chapters = ctx.data["phase3"]["outputs"]["chapters"]
        audio = []
        for i, chapter in enumerate(ctx.track(chapters), start=1):
            wav = workdir / f"chapter{i:02d}.wav"
            wav.write_bytes(tts.speak(i, Path(chapter).read_text(encoding="utf-8")))
            audio.append(str(wav))
        ctx.record["outputs"] = {"audio": audio}

    @pipeline.stage(name="phase5", requires=["phase4"])
    def mix_audio(ctx: StageContext) -> None:
        injected(5)
        mixed = workdir / "book.wav"
        parts = ctx.data["phase4"]["outputs"]["audio"]
        mixed.write_bytes(b"".join(Path(p).read_bytes() for p in parts))
        ctx.record["outputs"] = {"mixed": str(mixed), "bytes": mixed.stat().st_size}

    @pipeline.stage(name="phase6", requires=["phase5"])
    def package(ctx: StageContext) -> None:
        injected(6)
        book = workdir / "book.m4b"
        book.write_bytes(Path(ctx.data["phase5"]["outputs"]["mixed"]).read_bytes())
        ctx.record["outputs"] = {"audiobook": str(book)}

    return pipeline


def run_orchestrator(
    input_file: str | os.PathLike[str],
    pipeline_json: str | os.PathLike[str],
    *,
    fail_phase: int | None = None,
) -> bool:
    """Run phases 1-6 (those not done yet); return True when all succeeded."""
    pipeline = build_pipeline(Path(input_file), Path(pipeline_json), fail_phase)
    try:
        result = pipeline.run()
    except StageFailedError as exc:
        print(f"stopped: {exc.stage} failed ({exc.error_type}: {exc.error_message})")
        print("run again to resume there")
        return False
    finally:
        print_summary(pipeline)
        pipeline.close()
    if result.already_done:
        print(f"already done, skipped: {', '.join(result.already_done)}")
    print("all phases done")
    return True


def from_env() -> Pipeline:
    """For ``pipeline-state run examples/audiobook_pipeline.py:from_env``."""
    return build_pipeline(Path(os.environ["AUDIOBOOK_INPUT"]), Path(os.environ["AUDIOBOOK_STATE"]))


def print_summary(pipeline: Pipeline) -> None:
    status = pipeline.status()
    print(f"  overall {status['status']} {status['overall_progress']:.1f}%")
    for name, stage in status["stages"].items():
        error = f"  error={stage['error']!r}" if stage["error"] else ""
        print(f"  {name}  {stage['status']:<8} attempts={stage['attempts']}{error}")


def scenario(folder: Path) -> int:
    """Run 1 fails in phase 4 (after a retried transient error); run 2 resumes and finishes."""
    book = folder / "book.txt"
    book.write_text(BOOK, encoding="utf-8")
    state = folder / "pipeline.json"
    print("== run 1: the TTS engine will crash in phase 4 ==")
    first = run_orchestrator(book, state, fail_phase=4)
    print("== run 2: resume ==")
    second = run_orchestrator(book, state)
    return 0 if second and not first else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", help="the book (default: a temp folder demo)")
    parser.add_argument("state", nargs="?", default="pipeline.json", help="the state file")
    parser.add_argument("--fail-phase", type=int, choices=range(1, 7), help="make phase N fail")
    args = parser.parse_args(argv)
    try:
        if args.input is None:
            with tempfile.TemporaryDirectory(prefix="audiobook-") as tmp:
                return scenario(Path(tmp))
        return 0 if run_orchestrator(args.input, args.state, fail_phase=args.fail_phase) else 1
    except StateError as exc:  # a busy stage, a lock timeout, a corrupt state file
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
