"""A power-loss model in the spirit of ALICE's default persistence model.

A workload of up to three operations runs for real while every write-path call is
recorded as logical file-system operations (with the bytes written). From that trace,
crash states are generated: at each crash point, everything a completed barrier made
durable is kept (fsync/fdatasync of a file keeps its earlier writes; fsync of a folder
keeps its earlier entry changes); of the rest, the generator keeps all, none, every
prefix, and all-but-one. Writes persist in 4 KiB blocks; an append may persist its
new size without its data (zeros, or garbage). Renames stay atomic (ext4, XFS and
btrfs keep them so; ALICE's model can also split them, which we do not), and folder
entry changes persist in order: later ones may be missing. Each state is
materialized into a fresh folder, checked, then recovered by one clean transaction.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import _fs

BLOCK = 4096
ROOT = 0


@dataclass
class Op:
    """One logical file-system operation; ``kind`` says which fields matter."""

    kind: str  # create mkdir unlink rename link extend data trunc fsync fsync_dir begin ack
    ino: int = -1
    dir: int = -1
    name: str = ""
    dir2: int = -1
    name2: str = ""
    off: int = 0
    size: int = 0
    data: bytes = b""
    op: int = 0  # for begin/ack: the operation number

    @property
    def dir_op(self) -> bool:
        return self.kind in ("create", "mkdir", "unlink", "rename", "link")

    @property
    def content_op(self) -> bool:
        return self.kind in ("extend", "data", "trunc")


class Recorder:
    """Wraps the seam functions and turns their calls into :class:`Op` records."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.ops: list[Op] = []
        self.view: dict[str, int] = {self.root: ROOT}  # path -> inode, as things are now
        self.sizes: dict[int, int] = {}
        self.fds: dict[int, tuple[int, bool]] = {}  # fd -> (inode, append)
        self.offsets: dict[int, int] = {}
        self.next_ino = 1

    def _new(self) -> int:
        self.next_ino += 1
        return self.next_ino

    def _split(self, path: str) -> tuple[int, str]:
        parent, name = os.path.split(path)
        return self.view[parent], name

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        orig = {
            n: getattr(_fs, n)
            for n in (
                "open_file",
                "write_all",
                "ftruncate",
                "fsync",
                "fdatasync",
                "replace",
                "link",
                "unlink",
                "mkdir",
                "fsync_dir",
            )
        }

        def open_file(path: str, flags: int, mode: int = 0o666) -> int:
            existed = os.path.lexists(path)
            fd: int = orig["open_file"](path, flags, mode)
            if not existed:
                ino = self._new()
                d, n = self._split(path)
                self.ops.append(Op("create", ino=ino, dir=d, name=n))
                self.view[path] = ino
                self.sizes[ino] = 0
            ino = self.view.get(path, -1)
            self.fds[fd] = (ino, bool(flags & os.O_APPEND))
            self.offsets[fd] = 0
            return fd

        def write_all(fd: int, data: bytes, path: str) -> None:
            orig["write_all"](fd, data, path)
            ino, append = self.fds[fd]
            if ino < 0:
                return
            off = self.sizes[ino] if append else self.offsets[fd]
            end = off + len(data)
            if end > self.sizes[ino]:
                self.ops.append(Op("extend", ino=ino, size=end))
                self.sizes[ino] = end
            pos = off
            while pos < end:
                stop = min(end, (pos // BLOCK + 1) * BLOCK)
                self.ops.append(
                    Op("data", ino=ino, off=pos, data=bytes(data[pos - off : stop - off]))
                )
                pos = stop
            self.offsets[fd] = end

        def ftruncate(fd: int, length: int, path: str) -> None:
            orig["ftruncate"](fd, length, path)
            ino, _ = self.fds[fd]
            self.ops.append(Op("trunc", ino=ino, size=length))
            self.sizes[ino] = length

        def fsync(fd: int, path: str) -> None:
            orig["fsync"](fd, path)
            self.ops.append(Op("fsync", ino=self.fds[fd][0]))

        def fdatasync(fd: int, path: str) -> None:
            orig["fdatasync"](fd, path)
            self.ops.append(Op("fsync", ino=self.fds[fd][0]))

        def replace(src: str, dst: str) -> None:
            orig["replace"](src, dst)
            sd, sn = self._split(src)
            dd, dn = self._split(dst)
            ino = self.view.pop(src)
            self.ops.append(Op("rename", ino=ino, dir=sd, name=sn, dir2=dd, name2=dn))
            self.view[dst] = ino

        def link(src: str, dst: str) -> None:
            orig["link"](src, dst)
            d, n = self._split(dst)
            self.ops.append(Op("link", ino=self.view[src], dir=d, name=n))
            self.view[dst] = self.view[src]

        def unlink(path: str) -> None:
            orig["unlink"](path)
            d, n = self._split(path)
            self.ops.append(Op("unlink", dir=d, name=n))
            self.view.pop(path, None)

        def mkdir(path: str, mode: int) -> None:
            orig["mkdir"](path, mode)
            ino = self._new()
            d, n = self._split(path)
            self.ops.append(Op("mkdir", ino=ino, dir=d, name=n))
            self.view[path] = ino

        def fsync_dir(path: str) -> None:
            orig["fsync_dir"](path)
            self.ops.append(Op("fsync_dir", ino=self.view[path]))

        for name, fn in {
            "open_file": open_file,
            "write_all": write_all,
            "ftruncate": ftruncate,
            "fsync": fsync,
            "fdatasync": fdatasync,
            "replace": replace,
            "link": link,
            "unlink": unlink,
            "mkdir": mkdir,
            "fsync_dir": fsync_dir,
        }.items():
            monkeypatch.setattr(_fs, name, fn)


def forced(ops: list[Op], c: int) -> set[int]:
    """Indices below ``c`` that a completed barrier before ``c`` made durable."""
    keep: set[int] = set()
    for j in range(c):
        b = ops[j]
        if b.kind == "fsync":
            keep.update(i for i in range(j) if ops[i].content_op and ops[i].ino == b.ino)
        elif b.kind == "fsync_dir":
            keep.update(i for i in range(j) if ops[i].dir_op and b.ino in (ops[i].dir, ops[i].dir2))
    return keep


def choices(ops: list[Op], c: int) -> Iterator[set[int]]:
    """The persisted subsets the model allows at crash point ``c`` (a bounded sample).

    Folder entry changes persist in order (a journaled file system never keeps a later
    one without an earlier one), so any *later* ones may be missing; file contents not
    yet fsynced may persist in any part: all, none, any prefix, all but one block.
    """
    durable = forced(ops, c)
    vdir = [i for i in range(c) if i not in durable and ops[i].dir_op]
    vdata = [i for i in range(c) if i not in durable and ops[i].content_op]
    for m in range(len(vdir) + 1):
        yield durable | set(vdir[:m]) | set(vdata)
        yield durable | set(vdir[:m])
    for m in range(1, len(vdata)):
        yield durable | set(vdir) | set(vdata[:m])
    for drop in vdata:
        yield durable | set(vdir) | {i for i in vdata if i != drop}


def materialize(ops: list[Op], keep: set[int], folder: Path, fill: bytes) -> str:
    """Write the crash state into ``folder``; return a digest of it (for de-duplication)."""
    dirs: dict[int, dict[str, int]] = {ROOT: {}}
    files: dict[int, bytearray] = {}
    for i in sorted(keep):
        o = ops[i]
        if o.kind in ("create", "link"):
            dirs.setdefault(o.dir, {})[o.name] = o.ino
            files.setdefault(o.ino, bytearray())
        elif o.kind == "mkdir":
            dirs.setdefault(o.dir, {})[o.name] = o.ino
            dirs.setdefault(o.ino, {})
        elif o.kind == "unlink":
            dirs.setdefault(o.dir, {}).pop(o.name, None)
        elif o.kind == "rename":
            dirs.setdefault(o.dir, {}).pop(o.name, None)
            dirs.setdefault(o.dir2, {})[o.name2] = o.ino
            files.setdefault(o.ino, bytearray())
        elif o.kind in ("extend", "trunc", "data"):
            content = files.setdefault(o.ino, bytearray())
            if o.kind == "extend" and len(content) < o.size:
                content.extend((fill * o.size)[: o.size - len(content)])
            elif o.kind == "trunc":
                del content[o.size :]
                content.extend(b"\0" * (o.size - len(content)))
            elif o.kind == "data":
                if len(content) < o.off:
                    content.extend((fill * o.off)[: o.off - len(content)])
                content[o.off : o.off + len(o.data)] = o.data
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    digest = hashlib.sha256()

    def write_dir(ino: int, at: Path) -> None:
        for name in sorted(dirs.get(ino, {})):
            child = dirs[ino][name]
            target = at / name
            digest.update(str(target.relative_to(folder)).encode() + b"\0")
            if child in dirs:
                target.mkdir()
                write_dir(child, target)
            else:
                data = bytes(files.get(child, b""))
                digest.update(hashlib.sha256(data).digest())
                target.write_bytes(data)

    write_dir(ROOT, folder)
    return digest.hexdigest()


@dataclass
class Workload:
    """Up to three operations from an empty folder."""

    name: str
    steps: list[Callable[[Path], Any]]
    max_backups: int


def record(
    workload: Workload,
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    bug: Callable[[pytest.MonkeyPatch], None] | None = None,
) -> tuple[list[Op], list[bytes | None]]:
    """Run the workload for real, recording ops; return them and the state after each step.

    ``bug`` is applied on top of the recorder, so a seeded no-op fsync is not recorded
    as a barrier.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.json"
    rec = Recorder(folder)
    versions: list[bytes | None] = [None]
    with monkeypatch.context() as m:
        rec.install(m)
        if bug is not None:
            bug(m)
        for j, step in enumerate(workload.steps, start=1):
            rec.ops.append(Op("begin", op=j))
            step(path)
            rec.ops.append(Op("ack", op=j))
            versions.append(path.read_bytes() if path.exists() else None)
    return rec.ops, versions


def expected_at(
    ops: list[Op], c: int, versions: list[bytes | None]
) -> tuple[bytes | None, list[bytes]]:
    """The acknowledged version at crash point ``c`` and the one in flight, if any."""
    acked = 0
    running = 0
    for o in ops[:c]:
        if o.kind == "begin":
            running = o.op
        elif o.kind == "ack":
            acked, running = o.op, 0
    flight = [v for v in ([versions[running]] if running else []) if v is not None]
    return versions[acked], flight
