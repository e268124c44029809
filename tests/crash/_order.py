"""The call-order checker: the commit protocol's ordering rules over a recorded seam trace.

The analogue of SQLite's journal-test VFS: it looks at the order of the calls, not at
the files, so it catches a missing fsync that no process crash could ever reveal.
"""

from __future__ import annotations

from pathlib import Path

from pipeline_common.testing import Call, sidecar_paths


def order_violations(calls: list[Call], state_path: Path) -> list[str]:
    """Return every ordering rule that the trace of one operation breaks."""
    p = sidecar_paths(state_path)
    state, temp, lock = str(p.state), str(p.temp), str(p.lock)
    folder, backups, log = str(p.state.parent), str(p.backups_dir), str(p.log)
    done = [c for c in calls if c.when == "after"]
    out: list[str] = []

    def idx(op: str, path: str, start: int = 0, end: int | None = None) -> list[int]:
        stop = len(done) if end is None else end
        return [i for i in range(start, stop) if done[i].op == op and done[i].path == path]

    # The lock: taken on the lock file, never on the state file, held around everything.
    locks = [i for i, c in enumerate(done) if c.op == "lock"]
    unlocks = [i for i, c in enumerate(done) if c.op == "unlock"]
    for i in locks + unlocks:
        if done[i].path != lock:
            out.append(f"the lock is taken on {done[i].path}, not on the lock file")
    if any(c.op in ("unlink", "replace") and c.path == lock for c in done):
        out.append("the lock file is removed or replaced")
    if any(c.op in ("open", "write") and c.path == state for c in done):
        out.append("the state file is opened for writing in place")
    touching = [i for i, c in enumerate(done) if c.op not in ("lock", "unlock") and c.path != lock]
    if touching:
        if not locks or locks[0] > touching[0]:
            out.append("a file is changed before the lock is taken")
        if not unlocks or unlocks[-1] < touching[-1]:
            out.append("a file is changed after the lock is released")

    for r in idx("replace", state):
        # The temp file's data is on disk before the rename makes it the state.
        writes = list(idx("write", temp, 0, r))
        syncs = [i for i in idx("fsync", temp, 0, r) if not writes or i > writes[-1]]
        if not syncs:
            out.append("the temp file is not fsynced before the replace")
        # The rename is durable before the log claims it and before returning.
        dir_syncs = idx("fsync_dir", folder, r)
        log_writes = idx("write", log, r)
        end = unlocks[-1] if unlocks else len(done)
        if not dir_syncs or dir_syncs[0] > end:
            out.append("the state folder is not fsynced after the replace, before returning")
        elif log_writes and log_writes[0] < dir_syncs[0]:
            out.append("the log is appended before the state folder is fsynced")

        # The log is written only after the commit: nothing once the backup is made or
        # the temp file opened (a recover record, written while reading, comes earlier).
        def is_backup_link(c: Call) -> bool:
            return c.op == "link" and str(Path(c.path).parent) == backups

        starts = [i for i, c in enumerate(done[:r]) if is_backup_link(c)] + idx("open", temp, 0, r)
        if starts and idx("write", log, min(starts), r):
            out.append("the log is appended before the replace")
        # The replaced version is backed up, durably, before the replace.
        links = [i for i, c in enumerate(done[:r]) if is_backup_link(c)]
        late_links = [i for i, c in enumerate(done) if is_backup_link(c) and i > r]
        if late_links:
            out.append("a backup is made after the replace")
        if links and not idx("fsync_dir", backups, links[-1], r):
            out.append("the backups folder is not fsynced between the backup and the replace")
        # Pruning only after the commit is logged.
        record = list(idx("fdatasync", log, r))
        for i, c in enumerate(done):
            pruned = c.op == "unlink" and c.path.startswith(backups + "/")
            if pruned and (i < r or not record or i < record[0]):
                out.append("an old backup is pruned before the commit is logged")
                break
        for w in log_writes[:1]:
            if not idx("fdatasync", log, w, end):
                out.append("the log append is not fsynced before returning")
    return out


def replaced_state(calls: list[Call], state_path: Path) -> bool:
    """True when the trace replaced the state file."""
    state = str(sidecar_paths(state_path).state)
    return any(c.when == "after" and c.op == "replace" and c.path == state for c in calls)
