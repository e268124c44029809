"""Documents, the floor, and the peers the benchmark compares pipeline_common with.

Every peer does the same unit of work: a read-modify-write of one pipeline document
(read the current version, change one field, write the whole document back). Each one
declares the guarantees it gives, so a durable store is never compared with a
non-durable one unawares.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

PHASES = ("ingest", "validate", "transform", "train", "evaluate", "publish")
_TS = "2026-01-02T03:04:05.678901Z"


# -- documents -------------------------------------------------------------------


def _file_entry(i: int) -> dict[str, Any]:
    return {
        "hash": f"{(i * 2654435761) & 0xFFFFFFFF:08x}" * 8,  # a sha256-long hex string
        "size": 1000 + (i * 7919) % 10_000_000,
        "mtime": 1_700_000_000.0 + i * 0.25,
    }


def make_document(target_bytes: int) -> dict[str, Any]:
    """A realistic pipeline state of about ``target_bytes`` (as pipeline_common writes it).

    Six phases with status, timestamps and metrics; the bulk is a ``files`` map of
    path -> {hash, size, mtime} spread over the phases, as a pipeline that tracks its
    inputs and outputs keeps.
    """

    def build(n_files: int) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "pipeline": "nightly-etl",
            "run_id": "run-20260102-030405",
            "counter": 0,
            "created_at": _TS,
            "updated_at": _TS,
        }
        per_phase = [n_files // len(PHASES)] * len(PHASES)
        per_phase[-1] += n_files - sum(per_phase)
        k = 0
        for p, name in enumerate(PHASES):
            files = {}
            for _ in range(per_phase[p]):
                files[f"data/{name}/part-{k:07d}.parquet"] = _file_entry(k)
                k += 1
            doc[f"phase_{p + 1}_{name}"] = {
                "status": "success" if p < 3 else ("running" if p == 3 else "pending"),
                "started_at": _TS,
                "finished_at": _TS if p < 3 else None,
                "attempt": 1,
                "metrics": {
                    "rows_in": 123456 * (p + 1),
                    "rows_out": 12345 * (p + 1),
                    "seconds": 12.5 * (p + 1),
                    "errors": 0,
                },
                "files": files,
            }
        return doc

    def encoded_size(doc: dict[str, Any]) -> int:
        return len(orjson.dumps(doc, option=orjson.OPT_INDENT_2)) + 1

    base = encoded_size(build(0))
    per_file = max(1, (encoded_size(build(60)) - base) // 60)
    n = max(0, (target_bytes - base) // per_file)
    doc = build(n)
    while encoded_size(doc) < target_bytes * 0.98 and n < 10**7:
        n += max(1, (target_bytes - encoded_size(doc)) // per_file)
        doc = build(n)
    return doc


def encode_like_library(doc: dict[str, Any]) -> bytes:
    """The bytes pipeline_common writes for ``doc`` (orjson, indent 2, newline)."""
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


# -- syscall helpers ---------------------------------------------------------------


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the floor and the protocol minimum (bytes only, no parse, no serialize) ----------

FLOOR_STEPS = ("create temp", "write", "fsync file", "close", "replace", "fsync folder")
MINIMUM_STEPS = (
    "flock",
    "link backup",
    "fsync backups folder",
    *FLOOR_STEPS,
    "append log line",
    "fdatasync log",
    "unlock",
)


class Floor:
    """The durable replace and nothing else: create temp, write, fsync, replace, fsync dir."""

    steps = FLOOR_STEPS

    def __init__(self, folder: Path, payload: bytes) -> None:
        self.folder = str(folder)
        self.path = str(folder / "state.json")
        self.tmp = str(folder / ".state.json.tmp")
        self.payload = payload
        Path(self.path).write_bytes(payload)

    def replace(self, t: list[float]) -> None:
        clock = time.perf_counter
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        t.append(clock())
        os.write(fd, self.payload)  # one write: Linux writes regular files whole
        t.append(clock())
        os.fsync(fd)
        t.append(clock())
        os.close(fd)
        t.append(clock())
        os.replace(self.tmp, self.path)
        t.append(clock())
        fsync_dir(self.folder)
        t.append(clock())

    def op(self) -> list[float]:
        """One durable replace; returns the time of each step (seconds)."""
        t = [time.perf_counter()]
        self.replace(t)
        return [b - a for a, b in itertools.pairwise(t)]

    def cleanup(self) -> None:
        """Between timed operations: nothing to undo."""


class ProtocolMinimum(Floor):
    """The floor plus what the protocol must add: lock, hard-link backup, fsynced log."""

    steps = MINIMUM_STEPS

    def __init__(self, folder: Path, payload: bytes) -> None:
        super().__init__(folder, payload)
        self.backups = folder / ".state" / "backups"
        self.backups.mkdir(parents=True)
        self.lock_fd = os.open(str(folder / "state.json.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        self.log_fd = os.open(
            str(folder / ".state" / "transactions.log"),
            os.O_WRONLY | os.O_CREAT | os.O_APPEND,
            0o644,
        )
        self.n = 0
        self.line = (
            orjson.dumps(
                {
                    "seq": 0,
                    "timestamp": _TS,
                    "operation": "transaction",
                    "success": True,
                    "details": {"backup": "state_20260102_030405_678901.json.bak"},
                    "pid": 1,
                    "host": "bench",
                    "duration_ms": 1.234,
                    "sha256": "0" * 64,
                    "size": len(payload),
                    "stat": [123456, 1767323045678901234],
                    "generation": 1,
                    "prev": "0" * 64,
                }
            )
            + b"\n"
        )

    def op(self) -> list[float]:
        clock = time.perf_counter
        t = [clock()]
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        t.append(clock())
        self.n += 1
        os.link(self.path, str(self.backups / f"state_{self.n:08d}.json.bak"))
        t.append(clock())
        fsync_dir(str(self.backups))
        t.append(clock())
        self.replace(t)
        os.write(self.log_fd, self.line)
        t.append(clock())
        os.fdatasync(self.log_fd)
        t.append(clock())
        fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
        t.append(clock())
        return [b - a for a, b in itertools.pairwise(t)]

    def cleanup(self) -> None:
        """Remove the backup links outside the timing (pruning is not part of the minimum)."""
        for name in os.listdir(self.backups):
            os.unlink(self.backups / name)


# -- peers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Guarantees:
    durable: str
    atomic: str
    isolated: str
    backup: str
    log: str

    def cells(self) -> list[str]:
        return [self.durable, self.atomic, self.isolated, self.backup, self.log]


YES = "yes"
NO = "no"


class Peer:
    """A store under test: ``setup`` once per size, ``rmw`` once per timed operation."""

    name = ""
    guarantees = Guarantees(NO, NO, NO, NO, NO)
    note = ""

    def setup(self, folder: Path, doc: dict[str, Any]) -> None:
        raise NotImplementedError

    def rmw(self, i: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what setup opened."""


class PipelineCommon(Peer):
    name = "pipeline_common"
    guarantees = Guarantees(YES, YES, YES, YES, YES)
    note = "transaction(): flock, validate, hard-link backup, temp+fsync+replace+dir fsync, log"

    def setup(self, folder: Path, doc: dict[str, Any]) -> None:
        from pipeline_common import PipelineState

        self.state = PipelineState(folder / "state.json")
        self.state.write(doc)

    def rmw(self, i: int) -> None:
        with self.state.transaction() as txn:
            txn.data["counter"] = i


class NaiveJson(Peer):
    name = "naive json.dump (unsafe)"
    guarantees = Guarantees(NO, NO, NO, NO, NO)
    note = "json.load; open('w') truncates in place; json.dump(indent=2); no fsync, no lock"

    def setup(self, folder: Path, doc: dict[str, Any]) -> None:
        self.path = folder / "state.json"
        with open(self.path, "w") as fh:
            json.dump(doc, fh, indent=2)

    def rmw(self, i: int) -> None:
        with open(self.path) as fh:
            data = json.load(fh)
        data["counter"] = i
        with open(self.path, "w") as fh:
            json.dump(data, fh, indent=2)


class FilelockAtomicwrites(Peer):
    name = "filelock+atomicwrites (json)"
    guarantees = Guarantees(YES, YES, YES, NO, NO)
    note = "FileLock; json.load; atomic_write (fsync, rename, dir fsync); json.dumps(indent=2)"

    def _loads(self, raw: bytes) -> Any:
        return json.loads(raw)

    def _dumps(self, data: Any) -> bytes:
        return json.dumps(data, indent=2).encode()

    def setup(self, folder: Path, doc: dict[str, Any]) -> None:
        from filelock import FileLock

        self.path = folder / "state.json"
        self.lock = FileLock(str(folder / "state.json.lock"))
        self.path.write_bytes(self._dumps(doc))

    def rmw(self, i: int) -> None:
        from atomicwrites import atomic_write

        with self.lock:
            data = self._loads(self.path.read_bytes())
            data["counter"] = i
            with atomic_write(str(self.path), mode="wb", overwrite=True) as fh:
                fh.write(self._dumps(data))


class FilelockAtomicwritesOrjson(FilelockAtomicwrites):
    name = "filelock+atomicwrites (orjson)"
    note = "the same with orjson.loads / orjson.dumps(OPT_INDENT_2)"

    def _loads(self, raw: bytes) -> Any:
        return orjson.loads(raw)

    def _dumps(self, data: Any) -> bytes:
        return orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"


class HandFlock(Peer):
    name = "hand-written flock loop (orjson)"
    guarantees = Guarantees(YES, YES, YES, NO, NO)
    note = "fcntl.flock on a kept-open lock fd; orjson; temp+fsync+replace+dir fsync"

    def setup(self, folder: Path, doc: dict[str, Any]) -> None:
        self.folder = str(folder)
        self.path = str(folder / "state.json")
        self.tmp = str(folder / ".state.json.tmp")
        self.lock_fd = os.open(str(folder / "state.json.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        Path(self.path).write_bytes(encode_like_library(doc))

    def rmw(self, i: int) -> None:
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            with open(self.path, "rb") as fh:
                data = orjson.loads(fh.read())
            data["counter"] = i
            payload = orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
            fsync_dir(self.folder)
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.lock_fd)


class SqliteWal(Peer):
    guarantees = Guarantees(YES, YES, YES, NO, NO)

    def __init__(self, synchronous: str) -> None:
        self.synchronous = synchronous
        self.name = f"sqlite3 WAL synchronous={synchronous}"
        self.note = "one JSON row (orjson); BEGIN IMMEDIATE; SELECT; UPDATE; COMMIT"
        if synchronous != "FULL":
            self.guarantees = Guarantees("no (last commits may roll back)", YES, YES, NO, NO)

    def setup(self, folder: Path, doc: dict[str, Any]) -> None:
        self.db = sqlite3.connect(str(folder / "state.db"), isolation_level=None, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={self.synchronous}")
        self.db.execute("CREATE TABLE state (id INTEGER PRIMARY KEY, doc BLOB NOT NULL)")
        self.db.execute("INSERT INTO state VALUES (1, ?)", (orjson.dumps(doc),))

    def rmw(self, i: int) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            (raw,) = db.execute("SELECT doc FROM state WHERE id = 1").fetchone()
            data = orjson.loads(raw)
            data["counter"] = i
            db.execute("UPDATE state SET doc = ? WHERE id = 1", (orjson.dumps(data),))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


class TinyDb(Peer):
    name = "tinydb (JSONStorage)"
    guarantees = Guarantees("fsync, in place", NO, NO, NO, NO)
    note = "table.get + table.update; rewrites the file in place (truncate), fsyncs, no lock"

    def setup(self, folder: Path, doc: dict[str, Any]) -> None:
        from tinydb import TinyDB

        self.db = TinyDB(str(folder / "state.json"))
        self.table = self.db.table("_default")
        self.table.insert(doc)

    def rmw(self, i: int) -> None:
        doc = self.table.get(doc_id=1)  # read current (tinydb reads the whole file)
        assert doc is not None
        self.table.update({"counter": i}, doc_ids=[1])  # reads and rewrites it again

    def close(self) -> None:
        self.db.close()


class DiskCache(Peer):
    name = "diskcache (transact)"
    guarantees = Guarantees("no (synchronous=NORMAL, value files not fsynced)", YES, YES, NO, NO)
    note = "with cache.transact(): doc = cache['state']; cache['state'] = doc (pickled dict)"

    def setup(self, folder: Path, doc: dict[str, Any]) -> None:
        import diskcache

        self.cache = diskcache.Cache(str(folder / "cache"))
        self.cache["state"] = doc

    def rmw(self, i: int) -> None:
        with self.cache.transact():
            data = self.cache["state"]
            data["counter"] = i
            self.cache["state"] = data

    def close(self) -> None:
        self.cache.close()


def all_peers() -> list[Peer]:
    return [
        PipelineCommon(),
        NaiveJson(),
        FilelockAtomicwrites(),
        FilelockAtomicwritesOrjson(),
        HandFlock(),
        SqliteWal("FULL"),
        SqliteWal("NORMAL"),
        TinyDb(),
        DiskCache(),
    ]


CAREFUL = (FilelockAtomicwrites.name, FilelockAtomicwritesOrjson.name, HandFlock.name)


# -- contention workers (run in forked children) -------------------------------------


def increment_pipeline_common(path: str) -> Callable[[], None]:
    from pipeline_common import PipelineState

    state = PipelineState(path, timeout=None)

    def once() -> None:
        with state.transaction() as txn:
            txn.data["counter"] += 1

    return once


def increment_filelock_atomicwrites(path: str) -> Callable[[], None]:
    from atomicwrites import atomic_write
    from filelock import FileLock

    lock = FileLock(path + ".lock")

    def once() -> None:
        with lock:
            with open(path, "rb") as fh:
                data = json.loads(fh.read())
            data["counter"] += 1
            with atomic_write(path, mode="w", overwrite=True) as out:
                out.write(json.dumps(data, indent=2))

    return once


INCREMENTERS: dict[str, Callable[[str], Callable[[], None]]] = {
    "pipeline_common": increment_pipeline_common,
    "filelock+atomicwrites (json)": increment_filelock_atomicwrites,
}


def contention_worker(kind: str, path: str, n: int, barrier: Any, results: Any) -> None:
    """Do ``n`` increments after every worker is ready; report latencies and errors."""
    once = INCREMENTERS[kind](path)
    lat: list[float] = []
    errors: list[str] = []
    barrier.wait()
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            once()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        lat.append(time.perf_counter() - t0)
    end = time.perf_counter()
    results.put({"pid": os.getpid(), "start": start, "end": end, "lat": lat, "errors": errors})


def count_corrupt(folder: Path) -> tuple[int, int]:
    """(files checked, files that are not a JSON object): the state and its backups."""
    candidates = [
        p for p in folder.rglob("*.json*") if p.is_file() and not p.name.endswith((".lock", ".tmp"))
    ]
    bad = 0
    for p in candidates:
        try:
            value = orjson.loads(p.read_bytes())
        except orjson.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(value, dict):
            bad += 1
    return len(candidates), bad


def fresh_dir(root: Path, name: str) -> Path:
    folder = root / name
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder
