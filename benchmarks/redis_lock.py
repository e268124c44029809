"""The Redis lock against flock: transaction p50, 4-process throughput and fairness, and
how soon a SIGKILLed holder's lock is free.

Starts its own ``redis-server`` on a free loopback port (``apt-get install redis-server``;
the ``redis`` extra). The 4 processes of the Redis run pretend to be 4 hosts
(``PIPELINE_STATE_HOST``), so only Redis orders them, as on 4 machines; the flock run is
4 processes of one host. Same workload as ``benchmarks/run.py``'s contention benchmark:
a 10 KB document, ``counter += 1`` per transaction.

    python benchmarks/redis_lock.py            # the lead's numbers
    python benchmarks/redis_lock.py --quick    # a smoke run with small counts
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _workloads as w

from pipeline_common import PipelineState


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: apt-get install -y redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    proc.kill()
    sys.exit("redis-server did not start")


def worker(  # noqa: PLR0917 - multiprocessing passes args positionally
    path: str, lock: str | None, host: str, n: int, barrier: Any, results: Any
) -> None:
    """``n`` increments after every worker is ready; report latencies and errors."""
    os.environ["PIPELINE_STATE_HOST"] = host
    state = PipelineState(path, lock=lock, timeout=120, max_backups=5)
    lat: list[float] = []
    errors: list[str] = []
    barrier.wait()
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            with state.transaction(operation="increment") as txn:
                txn.data["counter"] += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        lat.append(time.perf_counter() - t0)
    results.put({"start": start, "end": time.perf_counter(), "lat": lat, "errors": errors})


def run(root: Path, lock: str | None, procs: int, n: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(dir=root))
    path = folder / "state.json"
    PipelineState(path, lock=lock).write({**w.make_document(10_000), "counter": 0})
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    children = [
        ctx.Process(target=worker, args=(str(path), lock, f"host{i}", n, barrier, results))
        for i in range(procs)
    ]
    for child in children:
        child.start()
    reports = [results.get(timeout=900) for _ in children]
    for child in children:
        child.join(60)
    state = PipelineState(path, lock=lock)
    errors = [e for r in reports for e in r["errors"]]
    walls = [r["end"] - r["start"] for r in reports]
    return {
        "p50": statistics.median([x for r in reports for x in r["lat"]]),
        "tps": procs * n / (max(r["end"] for r in reports) - min(r["start"] for r in reports)),
        "fairness": max(walls) / min(walls),
        "lost": procs * n - len(errors) - state.read()["counter"],
        "errors": errors[:3],
        "verify": bool(state.verify()),
    }


HOLDER = """
import sys
from pipeline_common import PipelineState
state = PipelineState(sys.argv[1], lock=sys.argv[2], timeout=30)
with state.transaction(operation="hold") as txn:
    print("holding", flush=True)
    sys.stdin.readline()
"""


def kill_release(root: Path, url: str, rounds: int) -> list[float]:
    """Seconds from SIGKILL of the holder (another host) to a waiter holding the lock."""
    folder = Path(tempfile.mkdtemp(dir=root))
    path = folder / "state.json"
    PipelineState(path, lock=url).write({"counter": 0})
    os.environ["PIPELINE_STATE_HOST"] = "waiter"
    waiter = PipelineState(path, lock=url, timeout=30)
    times = []
    for _ in range(rounds):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PIPELINE_STATE_HOST": "holder"},
        )
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        with waiter.transaction(operation="after-kill") as txn:
            times.append(time.perf_counter() - killed)
            txn.data["counter"] += 1
        holder.wait()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    args = parser.parse_args()
    n = 20 if args.quick else 200
    kills = 3 if args.quick else 20
    server, url = start_redis()
    root = Path(tempfile.mkdtemp(prefix="redis-lock-bench-"))
    try:
        rows = {}
        for name, lock in (("flock", None), ("redis", url)):
            for procs in (1, 4):
                rows[name, procs] = run(root, lock, procs, n)
                print(f"  {name} x{procs}: done", file=sys.stderr, flush=True)
        release = kill_release(root, url, kills)
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{n} transactions per process, 10 KB document, loopback Redis\n")
    header = "| lock  | procs | p50 ms | txn/s | slowest/fastest | lost | errors | verify |"
    print(header)
    print("|" + "|".join("---" for _ in header.split("|")[1:-1]) + "|")
    for (name, procs), r in rows.items():
        print(
            f"| {name} | {procs} | {r['p50'] * 1000:.2f} | {r['tps']:.0f} | "
            f"{r['fairness']:.2f} | {r['lost']} | {len(r['errors'])} | {r['verify']} |"
        )
    print("\nratios redis / flock")
    for procs in (1, 4):
        f, r = rows["flock", procs], rows["redis", procs]
        print(
            f"  {procs} proc: p50 x{r['p50'] / f['p50']:.1f}, throughput x{r['tps'] / f['tps']:.2f}"
        )
    release.sort()
    print(
        f"\nSIGKILLed holder -> lock free: median {statistics.median(release) * 1000:.0f} ms, "
        f"max {release[-1] * 1000:.0f} ms over {len(release)} kills"
    )
    for r in rows.values():
        if r["errors"]:
            print("errors:", r["errors"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
