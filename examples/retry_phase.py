"""Retry a flaky phase across a crash: the count survives SIGKILL and a restart.

Phase 4 calls a service that fails twice with a transient error. The orchestrator runs
in a real child process and is killed with SIGKILL while it waits to retry after the
second failure. A new orchestrator reads the retry ledger from the state file, waits out
the rest of the backoff, and attempt 3 succeeds. The transaction history shows all three
attempts.

Run it with ``python examples/retry_phase.py [folder]``; without a folder it works in a
temporary one and removes it afterwards. It takes about two seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline_common import PipelineState
from pipeline_common.retry import RetryHandler

RETRY_DELAY = 0.5  # then 1.0 s: long enough to kill the orchestrator during the wait


def call_service(folder: Path) -> str:
    """Stand in for a remote service that is down for its first two calls."""
    counter = folder / "service_calls"
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls <= 2:
        raise ConnectionError(f"service unavailable (call {calls})")
    return "report.csv"


def run_phase4(state: PipelineState, folder: Path) -> str:
    """Run phase 4: call the service, then record its output and success."""
    output = call_service(folder)
    with state.transaction(operation="phase4 done") as txn:
        txn.data["phase4"].update(status="success", output=output)
    return output


def orchestrate(folder: Path) -> None:
    """Run the pipeline's phase 4 with retries: the child process's job."""
    state = PipelineState(folder / "pipeline.json")

    def sleep(seconds: float) -> None:
        # The parent watches for this line: the failure is already committed by now.
        print(f"waiting {seconds:.2f} s before the next attempt", flush=True)
        time.sleep(seconds)

    retry = RetryHandler(
        max_retries=3, retry_delay=RETRY_DELAY, jitter=False, state=state, sleep=sleep
    )
    done = retry.attempts("phase4")
    if done:
        ledger = retry.ledger("phase4")
        print(
            f"resuming: {done} attempts so far, last error "
            f"{ledger['last_error_type']}: {ledger['last_error_message']}",
            flush=True,
        )

    def attempt() -> str:
        print(f"phase 4, attempt {retry.attempts('phase4')}", flush=True)
        return run_phase4(state, folder)

    output = retry.call("phase4", attempt)
    print(f"phase 4 succeeded: {output}", flush=True)


def start_orchestrator(folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--orchestrate", str(folder)],
        stdout=subprocess.PIPE,
        text=True,
    )


def main(folder: Path) -> int:
    state = PipelineState(folder / "pipeline.json")
    state.write(
        {
            "phase1": {"status": "success"},
            "phase2": {"status": "success"},
            "phase3": {"status": "success"},
            "phase4": {"status": "pending"},
        }
    )
    print(f"state file: {state.path}")

    print("== run 1: phase 4 fails twice; the orchestrator is killed while it waits")
    child = start_orchestrator(folder)
    assert child.stdout is not None
    waits = 0
    for line in child.stdout:
        print(f"  [run 1] {line.rstrip()}")
        if line.startswith("waiting"):
            waits += 1
            if waits == 2:
                os.kill(child.pid, signal.SIGKILL)
                break
    child.wait(timeout=30)
    child.stdout.close()
    print(f"  [run 1] killed with SIGKILL (exit status {child.returncode})")
    ledger = state.read()["phase4"]["retry"]
    print(
        f"  ledger after the kill: attempts={ledger['attempts']}, in_flight={ledger['in_flight']}"
    )

    print("== run 2: a new orchestrator resumes the count")
    child = start_orchestrator(folder)
    out, _ = child.communicate(timeout=60)
    for line in out.splitlines():
        print(f"  [run 2] {line}")
    if child.returncode != 0:
        print(f"the second orchestrator failed with exit status {child.returncode}")
        return 1

    print("== transaction history (oldest first)")
    for record in reversed(state.get_transaction_history(50)):
        details = record["details"]
        extra = f" ({details['error']})" if "error" in details else ""
        outcome = details.get("outcome", "-")
        print(f"  {record['operation']:<24} {outcome:<10}{extra}".rstrip())

    final = state.read()["phase4"]
    print(
        f"phase4: status={final['status']}, output={final['output']}, "
        f"succeeded after {final['retry']['succeeded_after']} attempts"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--orchestrate":
        orchestrate(Path(sys.argv[2]))
    elif len(sys.argv) == 2:
        target = Path(sys.argv[1])
        target.mkdir(parents=True, exist_ok=True)
        sys.exit(main(target))
    else:
        with tempfile.TemporaryDirectory(prefix="retry_phase_") as tmp:
            sys.exit(main(Path(tmp)))
