"""A REPL-style restore session: list the backups, inspect one, restore it, undo it.

The script first builds a small history (three phases succeed), then has a buggy
script overwrite the state (valid JSON, wrong content). It then replays what you would
type at a Python prompt to recover, printing each line as ``>>>`` and its result::

    python examples/repl_restore.py            # in a new temp folder
    python examples/repl_restore.py FOLDER     # in FOLDER (pipeline.json must not exist)

Every step is checked; the exit status is 1 if the recovery did not give back the state
from before the accident.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from pprint import pformat
from typing import Any

from pipeline_common import PipelineState


def repl(source: str, namespace: dict[str, Any]) -> Any:
    """Print ``source`` as typed at the prompt, run it, print its value like the REPL."""
    print(f">>> {source}")
    try:
        code = compile(source, "<repl>", "eval")
    except SyntaxError:
        exec(compile(source, "<repl>", "exec"), namespace)
        return None
    value = eval(code, namespace)
    if value is not None:
        print(pformat(value, width=96, sort_dicts=False))
    return value


def build_history(path: Path) -> dict[str, Any]:
    """Three phases succeed, then a buggy script resets the state; return the good state."""
    state = PipelineState(path)
    for n in (1, 2, 3):
        with state.transaction(operation=f"phase{n}: run") as txn:
            txn.data[f"phase{n}"] = {"status": "success", "outputs": [f"out{n}.dat"]}
    good = state.read()
    # The accident: a script meant for a new book writes a fresh state over this one.
    state.write({"phase1": {"status": "pending"}})
    return good


def session(folder: Path) -> int:
    path = folder / "pipeline.json"
    if path.exists():
        print(f"{path} exists already; choose an empty folder", file=sys.stderr)
        return 2
    good = build_history(path)
    print(f"# {path}: phases 1-3 succeeded, then a buggy script overwrote the state.\n")
    ns: dict[str, Any] = {"json": json}
    repl("from pipeline_common import PipelineState", ns)
    repl(f"state = PipelineState({str(path)!r})", ns)
    repl("state.read()", ns)
    print("\n# What happened? The audit log, newest first:")
    repl(
        "[(r['seq'], r['operation'], r['success'], r['details'].get('backup')) "
        "for r in state.get_transaction_history(5)]",
        ns,
    )
    print("\n# The backups, newest first: each is a version that a commit replaced.")
    repl("backups = state.list_backups()", ns)
    repl("[b.name for b in backups]", ns)
    print("\n# Inspect the newest one: the version the accident replaced.")
    repl("json.loads(backups[0].read_bytes())", ns)
    print("\n# Restore it. The restore is a logged transaction that backs up what it replaces.")
    repl("state.restore_backup(backups[0])", ns)
    restored = repl("state.read()", ns)
    repl("state.get_transaction_history(1)[0]['details']", ns)
    print("\n# Changed your mind? The restore's own backup undoes it.")
    repl("undo = state.get_transaction_history(1)[0]['details']['backup']", ns)
    repl("state.restore_backup(undo)", ns)
    undone = repl("state.read()", ns)
    print("\n# And redo: the backup restored first is still there, unchanged.")
    repl("state.restore_backup(backups[0])", ns)
    final = repl("state.read()", ns)
    ok = restored == good and undone == {"phase1": {"status": "pending"}} and final == good
    print(f"\n{'OK' if ok else 'MISMATCH'}: restore, undo and redo gave the expected states")
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if argv:
        folder = Path(argv[0])
        folder.mkdir(parents=True, exist_ok=True)
        return session(folder)
    with tempfile.TemporaryDirectory(prefix="repl-restore-") as tmp:
        return session(Path(tmp))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
