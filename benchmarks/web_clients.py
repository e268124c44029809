"""50 event-stream clients on the status server while a writer commits 20 times a second.

Usage (needs ``pip install -e '.[test]'``)::

    python benchmarks/web_clients.py [--clients 50] [--seconds 30] [--rate 20]

Three runs of the same writer, each a separate process committing ``--rate`` progress
updates a second for ``--seconds`` seconds, then completing its stage:

1. alone: no server, no client;
2. served: ``pipeline-state serve`` with ``--clients`` clients reading ``/api/events``
   for the whole run. The server alternates blocks of ``--block`` seconds running
   (live) and frozen with SIGSTOP (its clients stay connected, idle), so the commits
   made with and without a working server share every drift of a busy machine;
3. alone again.

Reported: the writer's commit p50 in live versus frozen blocks and their ratio (the goal
is at most 1.10; on a shared machine the separate runs 1 and 3 differ from each other by
more than that, hence the blocks), the same for the separate runs, whether every client
received the final state (the generation of the last commit, status ``success``), the
events each client read, the server's resident memory (RSS, from /proc) when the clients
had connected, at its peak and at the end, and the CPU time the server used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

WRITER = """
import json, sys, time
from pipeline_common import PipelineState
from pipeline_common.progress import ProgressTracker

path, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
n = int(rate * seconds)
tracker = ProgressTracker(PipelineState(path), {"work": 1.0}, min_interval=0)
tracker.start("work", total=n, restart=True)
durations, starts = [], []
t0 = time.monotonic()
for i in range(1, n + 1):
    starts.append(time.monotonic())  # CLOCK_MONOTONIC: the same clock in every process
    begin = time.perf_counter()
    tracker.update("work", i, message=f"item {i}")
    durations.append(time.perf_counter() - begin)
    delay = t0 + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
tracker.complete("work")
tracker.close()
version = PipelineState(path).version
print(json.dumps({"durations": durations, "starts": starts, "generation": version}))
"""


def rss_kib(pid: int) -> int:
    """The resident set size of ``pid`` in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_writer(path: Path, rate: float, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", WRITER, str(path), str(rate), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def ms(durations: list[float]) -> str:
    return f"{statistics.median(durations) * 1000:.2f}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def client(url: str, seen: dict[str, Any], stop: asyncio.Event) -> None:
    """Read the event stream until ``stop``; keep the newest event's id and data.

    Only the ``id:`` line (the generation) is read per event; the newest data is parsed
    once, at the end: the clients share the machine with the writer, and parsing every
    event here would measure this harness, not the server.
    """
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http,
        http.stream("GET", url) as response,
    ):
        seen["connected"] = True
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                seen["events"] += 1
                seen["generation"] = int(line[4:])
            elif line.startswith("data: "):
                seen["data"] = line[6:]
            if stop.is_set():
                return


def final_status(seen: dict[str, Any]) -> str | None:
    """The pipeline status in the newest event a client read."""
    status = json.loads(seen["data"]).get("status") if seen.get("data") else None
    return status.get("status") if isinstance(status, dict) else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def with_clients(
    path: Path, clients: int, rate: float, seconds: float, block: float
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline_common", "serve", str(path), "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    server.stdout.readline()  # "serving ..."
    url = f"http://127.0.0.1:{port}/api/events"
    async with httpx.AsyncClient() as http:
        for _ in range(100):
            try:
                await http.get(f"http://127.0.0.1:{port}/api/health")
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.05)
    stop = asyncio.Event()
    seen = [{"connected": False, "events": 0, "generation": None} for _ in range(clients)]
    tasks = [asyncio.create_task(client(url, s, stop)) for s in seen]
    while not all(s["connected"] for s in seen):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    memory: dict[str, Any] = {"start": rss_kib(server.pid), "peak": 0, "end": 0}
    cpu_start = cpu_seconds(server.pid)
    writer = asyncio.create_task(asyncio.to_thread(run_writer, path, rate, seconds))
    # Blocks of `block` seconds: the server runs (live), then is frozen with SIGSTOP
    # (its clients stay connected, idle), and so on: the writer's commits in the two
    # kinds of block share every drift of a busy machine.
    frozen_blocks: list[tuple[float, float]] = []
    live = True
    switch = time.monotonic() + block
    while not writer.done():
        memory["peak"] = max(memory["peak"], rss_kib(server.pid))
        await asyncio.sleep(0.05)
        if time.monotonic() >= switch:
            if live:
                server.send_signal(signal.SIGSTOP)
                frozen_blocks.append((time.monotonic(), float("inf")))
            else:
                server.send_signal(signal.SIGCONT)
                frozen_blocks[-1] = (frozen_blocks[-1][0], time.monotonic())
            live = not live
            switch = time.monotonic() + block
    if not live:
        server.send_signal(signal.SIGCONT)
        frozen_blocks[-1] = (frozen_blocks[-1][0], time.monotonic())
    memory["frozen_blocks"] = frozen_blocks
    result = writer.result()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(
        s["generation"] == result["generation"] for s in seen
    ):
        await asyncio.sleep(0.05)
    memory["end"] = rss_kib(server.pid)
    memory["cpu_ms"] = round((cpu_seconds(server.pid) - cpu_start) * 1000)
    stop.set()
    server.send_signal(signal.SIGINT)
    server.wait(10)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return result, seen, memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument(
        "--block", type=float, default=3.0, help="seconds per live or frozen block of the server"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # alone before and after the served run, so drift of a shared machine hits both
        before = run_writer(Path(tmp) / "alone1.json", args.rate, args.seconds)
        shared, seen, memory = asyncio.run(
            with_clients(
                Path(tmp) / "served.json", args.clients, args.rate, args.seconds, args.block
            )
        )
        after = run_writer(Path(tmp) / "alone2.json", args.rate, args.seconds)
    frozen = [
        d
        for d, t in zip(shared["durations"], shared["starts"], strict=True)
        if any(a <= t < b for a, b in memory["frozen_blocks"])
    ]
    live = [
        d
        for d, t in zip(shared["durations"], shared["starts"], strict=True)
        if not any(a <= t < b for a, b in memory["frozen_blocks"])
    ]
    alone = before["durations"] + after["durations"]
    ratio_blocks = statistics.median(live) / statistics.median(frozen)
    ratio_runs = statistics.median(shared["durations"]) / statistics.median(alone)
    final = sum(
        1 for s in seen if s["generation"] == shared["generation"] and final_status(s) == "success"
    )
    events = [s["events"] for s in seen]
    print(f"writer: {len(shared['durations'])} commits at {args.rate:g}/s for {args.seconds:g} s")
    print(
        f"interleaved {args.block:g} s blocks: commit p50 with the server and {args.clients} "
        f"clients live {ms(live)} ms ({len(live)} commits, p90 {percentile(live, 0.9) * 1000:.2f})"
        f", server frozen {ms(frozen)} ms ({len(frozen)} commits, p90 "
        f"{percentile(frozen, 0.9) * 1000:.2f}); ratio {ratio_blocks:.2f} "
        f"(goal <= 1.10: {'PASS' if ratio_blocks <= 1.10 else 'MISS'})"
    )
    print(
        f"separate runs: writer alone (no server) p50 {ms(alone)} ms (before "
        f"{ms(before['durations'])}, after {ms(after['durations'])}), the whole served run "
        f"{ms(shared['durations'])} ms; ratio {ratio_runs:.2f}"
    )
    print(
        f"clients with the final state (generation {shared['generation']}, success): "
        f"{final}/{args.clients}; events per client min {min(events)} median "
        f"{statistics.median(events):g} max {max(events)}"
    )
    cpu = memory["cpu_ms"] / 1000
    print(
        f"server RSS: {memory['start'] / 1024:.1f} MiB with clients connected, peak "
        f"{memory['peak'] / 1024:.1f} MiB, end {memory['end'] / 1024:.1f} MiB; server CPU "
        f"during the run {cpu:.2f} s ({cpu / (args.seconds / 2) * 100:.1f}% of one core "
        "while live)"
    )
    return 0 if final == args.clients else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
