"""The ``pipeline-state`` command, run as a real child process against real state files.

Every test drives ``python -m pipeline_common`` in a subprocess and checks its output,
its ``--json`` shape and its exit code. Terminal behaviour (prompt, colour, bars) runs
on a pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pipeline_common import PipelineState
from pipeline_common.cli import main

TIMEOUT = 30.0
COMMANDS = ["show", "status", "history", "backups", "diff", "restore", "verify", "repair", "lock"]

# Holds a transaction open until its stdin closes, so the lock is held by a live process.
HOLDER = """
import sys
from pipeline_common import PipelineState
state = PipelineState(sys.argv[1])
with state.transaction(operation="nightly-load"):
    print("locked", flush=True)
    sys.stdin.read()
"""

# A tiny pipeline: two phases, three steps each, then success.
PIPELINE = """
import sys, time
from pipeline_common import PipelineState
state = PipelineState(sys.argv[1], durability="atomic")
for name in ("phase1", "phase2"):
    with state.transaction() as txn:
        txn.data[name] = {"status": "running", "progress": {"current": 0, "total": 3}}
    for i in range(1, 4):
        time.sleep(0.05)
        with state.transaction() as txn:
            txn.data[name]["progress"]["current"] = i
    with state.transaction() as txn:
        txn.data[name]["status"] = "success"
"""


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(extra or {})
    return env


def cli(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeline_common ARGS`` with stdin closed; capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline_common", *args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=_env(env),
        timeout=timeout,
    )


def cli_json(cwd: Path, *args: str, code: int = 0) -> Any:
    """Run a subcommand with ``--json``, check its exit code, and parse its output."""
    result = cli(cwd, *args, "--json")
    assert result.returncode == code, result.stderr
    return json.loads(result.stdout)


def on_terminal(
    cwd: Path, *args: str, answer: bytes = b"", env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Run the command on a pseudo-terminal (stdin, stdout, stderr), typing ``answer``."""
    master, slave = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "pipeline_common", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env=_env({"TERM": "xterm", **(env or {})}),
    ) as proc:
        os.close(slave)
        if answer:
            os.write(master, answer)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        code = proc.wait(TIMEOUT)
    return code, b"".join(chunks).decode("utf-8", "replace")


def build_state(path: Path) -> PipelineState:
    """A healthy state: three commits, one failed transaction, two backups."""
    state = PipelineState(path, durability="atomic")
    state.write({"name": "demo", "phase1": {"status": "pending"}, "phase2": {"status": "pending"}})
    with state.transaction(operation="start") as txn:
        txn.data["phase1"] = {
            "status": "running",
            "progress": {"current": 5, "total": 10, "started_at": "2024-01-01T00:00:00Z"},
            "retry": {"attempts": 2},
        }
    with pytest.raises(RuntimeError), state.transaction(operation="flaky"):
        raise RuntimeError("disk on fire")
    with state.transaction(operation="finish") as txn:
        txn.data["phase1"]["status"] = "success"
        txn.data["phase1"]["progress"]["current"] = 10
        txn.data["phase2"] = {"status": "running", "progress": {"current": 1, "total": 4}}
    return state


@pytest.fixture
def state(tmp_path: Path) -> PipelineState:
    """A healthy state in ``tmp_path/pipeline.json``."""
    return build_state(tmp_path / "pipeline.json")


@pytest.fixture
def holder(state: PipelineState, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A live child process that holds the state's lock inside a transaction."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline().strip() == "locked"
        try:
            yield proc
        finally:
            proc.stdin.close()
            proc.wait(TIMEOUT)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with ``code`` and said why in one line, without a traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pipeline-state: error: ")
    return lines[0]


# -- help, usage, entry points ---------------------------------------------------------


def run_main(args: list[str]) -> int:
    """Run the CLI's main() in this process (for quick parser checks)."""
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` works for the command and each subcommand, and lists the exit codes."""
    assert run_main(["--help"]) == 0
    top = capsys.readouterr().out
    for command in COMMANDS:
        assert command in top
    assert "exit codes" in top
    for command in COMMANDS:
        assert run_main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: pipeline-state {command}")
        assert "--json" in text


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate", "x.json"],
        ["show"],
        ["show", "pipeline.json", "--pointer", "phase1"],
        ["status", "pipeline.json", "--follow", "--interval", "-1"],
        ["history", "pipeline.json", "-n", "many"],
        ["diff", "pipeline.json", "99"],
        ["restore", "pipeline.json", "no-such-backup.json.bak", "--yes"],
    ],
)
def test_usage_errors_exit_2(
    state: PipelineState,
    tmp_path: Path,
    args: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bad arguments, an unknown generation or backup: exit 2 and one line, nothing changed."""
    monkeypatch.chdir(tmp_path)
    version = state.version
    assert run_main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if args:
        assert err.startswith("pipeline-state: error: ")
        assert len(err.splitlines()) == 1
    assert state.version == version


def test_usage_error_in_a_child_process(state: PipelineState, tmp_path: Path) -> None:
    """The real command exits 2 on an unknown backup and names the fix."""
    result = cli(tmp_path, "restore", "pipeline.json", "nope.json.bak", "--yes")
    assert "pipeline-state backups" in assert_one_line_error(result, 2)


def test_console_script_and_module_agree(tmp_path: Path) -> None:
    """The installed `pipeline-state` script runs the same main as `python -m`."""
    script = Path(sys.executable).with_name("pipeline-state")
    if not script.exists():
        pytest.skip("the console script is not installed in this environment")
    direct = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert direct.stdout == cli(tmp_path, "--version").stdout
    assert direct.stdout.startswith("pipeline-state ")


# -- reading commands --------------------------------------------------------------------


def test_show_prints_state_generation_and_last_commit(state: PipelineState, tmp_path: Path) -> None:
    """`show` prints the JSON under a header naming the generation and the last commit."""
    result = cli(tmp_path, "show", "pipeline.json")
    assert result.returncode == 0, result.stderr
    head, body = result.stdout.split("\n", 1)
    assert "generation 3" in head
    assert "'finish'" in head
    assert json.loads(body) == state.read()
    assert "\x1b[" not in result.stdout  # no colour when piped


def test_show_pointer_and_json(state: PipelineState, tmp_path: Path) -> None:
    """`--pointer` prints one value (strings bare, for scripts); `--json` wraps it."""
    result = cli(tmp_path, "show", "pipeline.json", "--pointer", "/phase1/status")
    assert (result.returncode, result.stdout) == (0, "success\n")
    result = cli(tmp_path, "show", "pipeline.json", "--pointer", "/phase2/progress")
    assert json.loads(result.stdout) == {"current": 1, "total": 4}
    doc = cli_json(tmp_path, "show", "pipeline.json")
    assert set(doc) == {"path", "generation", "last_commit", "pointer", "data"}
    assert doc["generation"] == 3
    assert doc["data"] == state.read()
    assert doc["last_commit"]["operation"] == "finish"
    assert doc["last_commit"]["generation"] == 3
    missing = cli(tmp_path, "show", "pipeline.json", "--pointer", "/phase9/status")
    assert "no value at /phase9/status" in assert_one_line_error(missing, 1)


def test_status_table_and_json(state: PipelineState, tmp_path: Path) -> None:
    """`status` lists the phase* stages in file order with percent, done and retries."""
    result = cli(tmp_path, "status", "pipeline.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("pipeline.json: running")
    assert lines[1].split() == [
        "STAGE", "STATUS", "PERCENT", "DONE", "ELAPSED", "ETA", "ATTEMPTS", "RETRIES"
    ]  # fmt: skip
    assert lines[2].split()[:4] == ["phase1", "success", "100.0%", "10/10"]
    assert lines[2].split()[-2:] == ["2", "1"]  # attempts 2: one retry
    assert lines[3].split()[:4] == ["phase2", "running", "25.0%", "1/4"]
    doc = cli_json(tmp_path, "status", "pipeline.json")
    assert {"status", "current_stage", "stages", "overall_progress", "eta_seconds"} <= set(doc)
    assert doc["status"] == "running"
    assert doc["current_stage"] == "phase2"
    assert list(doc["stages"]) == ["phase1", "phase2"]
    stage = doc["stages"]["phase1"]
    assert {"status", "progress_percent", "current", "total", "elapsed_seconds"} <= set(stage)
    assert {"eta_seconds", "retries"} <= set(stage)
    assert stage["retries"] == 1
    assert doc["overall_progress"] == pytest.approx(62.5)


def test_status_of_a_failed_pipeline_exits_1(state: PipelineState, tmp_path: Path) -> None:
    """A failed stage makes the pipeline failed: exit 1, so scripts can stop."""
    with state.transaction() as txn:
        txn.data["phase2"]["status"] = "failed"
    result = cli(tmp_path, "status", "pipeline.json")
    assert result.returncode == 1
    assert result.stdout.startswith("pipeline.json: failed")


def test_history_newest_first_and_failed_only(state: PipelineState, tmp_path: Path) -> None:
    """`history` prints one line per record, newest first; `--failed` keeps the failures."""
    result = cli(tmp_path, "history", "pipeline.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[4] for line in lines] == ["finish", "flaky", "start", "write"]
    assert "FAILED" in lines[1]
    assert "RuntimeError: disk on fire" in lines[1]
    assert len(cli(tmp_path, "history", "pipeline.json", "-n", "2").stdout.splitlines()) == 2
    failed = cli(tmp_path, "history", "pipeline.json", "--failed").stdout.splitlines()
    assert len(failed) == 1
    assert "flaky" in failed[0]
    doc = cli_json(tmp_path, "history", "pipeline.json", "-n", "0")
    assert [r["operation"] for r in doc["records"]] == ["finish", "flaky", "start", "write"]
    assert {"seq", "generation", "timestamp", "success", "changes", "details"} <= set(
        doc["records"][0]
    )


def test_backups_lists_generation_time_size_operation(state: PipelineState, tmp_path: Path) -> None:
    """`backups` prints a table newest first; `--json` gives every field."""
    result = cli(tmp_path, "backups", "pipeline.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "GEN", "CREATED", "SIZE", "OPERATION"]
    assert [line.split()[1] for line in lines[1:]] == ["2", "1"]
    doc = cli_json(tmp_path, "backups", "pipeline.json")
    infos = state.backups()
    assert [b["name"] for b in doc["backups"]] == [i.path.name for i in infos]
    first = doc["backups"][0]
    assert set(first) == {
        "name",
        "path",
        "generation",
        "created",
        "size",
        "operation",
        "compressed",
    }
    assert (first["generation"], first["operation"]) == (2, "start")
    assert first["size"] == infos[0].size


def test_diff_generation_backup_and_current(state: PipelineState, tmp_path: Path) -> None:
    """`diff` compares generations, backups (by name) and the current state."""
    result = cli(tmp_path, "diff", "pipeline.json", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("--- generation 2")
    assert lines[1].startswith("+++ current")
    assert '~ /phase1/status: "running" -> "success"' in lines
    name = state.backups()[-1].path.name  # generation 1
    doc = cli_json(tmp_path, "diff", "pipeline.json", name, "2")
    assert set(doc) == {"path", "from", "to", "changes"}
    assert {"pointer": "/phase1/status", "kind": "changed", "old": "pending", "new": "running"} in (
        doc["changes"]
    )
    added = next(c for c in doc["changes"] if c["pointer"] == "/phase1/progress")
    assert added["kind"] == "added"
    assert "old" not in added
    same = cli(tmp_path, "diff", "pipeline.json", "current", "3")
    assert same.stdout.splitlines()[-1] == "identical"


def test_lock_is_free(state: PipelineState, tmp_path: Path) -> None:
    """`lock` on an idle state says it is free."""
    result = cli(tmp_path, "lock", "pipeline.json")
    assert result.returncode == 0
    assert result.stdout.strip().endswith(": free")
    doc = cli_json(tmp_path, "lock", "pipeline.json")
    assert doc["held"] is False
    assert doc["holder"] is None


# -- a live lock holder ----------------------------------------------------------------


def test_lock_names_the_live_holder(holder: subprocess.Popen[str], tmp_path: Path) -> None:
    """`lock` shows the pid and operation of the process inside a transaction."""
    result = cli(tmp_path, "lock", "pipeline.json")
    assert result.returncode == 0, result.stderr
    assert f"held by pid {holder.pid}" in result.stdout
    assert "'nightly-load'" in result.stdout
    doc = cli_json(tmp_path, "lock", "pipeline.json")
    assert doc["held"] is True
    assert doc["holder"]["pid"] == holder.pid
    assert doc["holder"]["operation"] == "nightly-load"
    assert {"host", "since"} <= set(doc["holder"])


def test_writers_time_out_with_exit_3_while_readers_go_on(
    holder: subprocess.Popen[str], state: PipelineState, tmp_path: Path
) -> None:
    """`restore`/`repair` give up after --timeout (exit 3); `show` needs no lock."""
    backup = state.backups()[0].path.name
    started = time.monotonic()
    result = cli(tmp_path, "restore", "pipeline.json", backup, "--yes", "--timeout", "0.3")
    message = assert_one_line_error(result, 3)
    assert str(holder.pid) in message
    assert "nightly-load" in message
    assert_one_line_error(cli(tmp_path, "repair", "pipeline.json", "--timeout", "0.2"), 3)
    assert time.monotonic() - started < 10
    assert cli(tmp_path, "show", "pipeline.json").returncode == 0
    assert state.version == 3


# -- restore ------------------------------------------------------------------------------


def test_restore_refuses_to_prompt_without_a_terminal(state: PipelineState, tmp_path: Path) -> None:
    """Without a terminal and without --yes, restore exits 2 and changes nothing."""
    before = state.path.read_bytes()
    result = cli(tmp_path, "restore", "pipeline.json", "1")
    message = assert_one_line_error(result, 2)
    assert "not a terminal" in message
    assert "--yes" in message
    assert '~ /phase1/status: "success" -> "pending"' in result.stdout  # the diff came first
    assert state.path.read_bytes() == before


def test_restore_dry_run_changes_nothing(state: PipelineState, tmp_path: Path) -> None:
    """`--dry-run` prints the diff and leaves the state and the log alone."""
    before, version = state.path.read_bytes(), state.version
    result = cli(tmp_path, "restore", "pipeline.json", "2", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "dry run" in result.stdout
    doc = cli_json(tmp_path, "restore", "pipeline.json", "2", "--dry-run")
    assert doc["dry_run"] is True
    assert doc["restored"] is False
    assert any(c["pointer"] == "/phase2/status" for c in doc["changes"])
    assert (state.path.read_bytes(), state.version) == (before, version)


def test_restore_yes_restores_and_backs_up_the_replaced_state(
    state: PipelineState, tmp_path: Path
) -> None:
    """`--yes` restores at once; the replaced version becomes a backup."""
    name = state.backups()[-1].path.name  # generation 1
    doc = cli_json(tmp_path, "restore", "pipeline.json", name, "--yes")
    assert doc["restored"] is True
    assert doc["backup"] == name
    assert doc["generation"] == 4
    assert doc["replaced_state_backup"] in [b.path.name for b in state.backups()]
    assert state.read()["phase1"] == {"status": "pending"}
    assert state.history(limit=1)[0].operation == "restore"


def test_restore_asks_on_a_terminal(state: PipelineState, tmp_path: Path) -> None:
    """On a terminal restore asks: 'n' keeps the state (exit 1), 'y' restores."""
    before = state.path.read_bytes()
    code, output = on_terminal(tmp_path, "restore", "pipeline.json", "1", answer=b"n\n")
    assert code == 1, output
    assert "[y/N]" in output
    assert "not restored" in output
    assert state.path.read_bytes() == before
    code, output = on_terminal(tmp_path, "restore", "pipeline.json", "1", answer=b"y\n")
    assert code == 0, output
    assert "restored pipeline.json" in output
    assert state.read()["phase1"] == {"status": "pending"}


# -- damage: corrupt state, torn log ---------------------------------------------------------


def test_corrupt_state_exits_4_with_one_line(state: PipelineState, tmp_path: Path) -> None:
    """A corrupt state: readers exit 4 with one line (a traceback only with --debug)."""
    state.path.write_bytes(b'{"phase1": ')
    for command in ("show", "status", "diff"):
        args = [command, "pipeline.json"] + (["1"] if command == "diff" else [])
        message = assert_one_line_error(cli(tmp_path, *args), 4)
        assert "not a valid state file" in message
    debug = cli(tmp_path, "--debug", "show", "pipeline.json")
    assert debug.returncode == 4
    assert "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("pipeline-state: error: ")
    after = cli(tmp_path, "show", "pipeline.json", "--debug")
    assert after.returncode == 4
    assert "Traceback" in after.stderr


def test_corrupt_state_verify_then_restore(state: PipelineState, tmp_path: Path) -> None:
    """verify reports the corruption (exit 1); restoring a backup makes it healthy."""
    state.path.write_bytes(b'{"phase1": ')
    result = cli(tmp_path, "verify", "pipeline.json")
    assert result.returncode == 1
    assert "FAIL  state parses" in result.stdout
    restored = cli(tmp_path, "restore", "pipeline.json", "2", "--yes")
    assert restored.returncode == 0, restored.stderr
    assert "cannot be read" in restored.stdout
    assert "restored pipeline.json" in restored.stdout
    assert cli(tmp_path, "verify", "pipeline.json").returncode == 0
    assert state.read()["phase1"]["status"] == "running"


def test_torn_log_verify_repair_verify(state: PipelineState, tmp_path: Path) -> None:
    """A torn log tail: verify exits 1, repair cuts it (exit 0), verify exits 0."""
    with open(state.log_path, "ab") as fh:
        fh.write(b'{"seq": 5, "timestamp": "2024-')
    broken = cli(tmp_path, "verify", "pipeline.json")
    assert broken.returncode == 1
    assert "FAIL  log chain intact" in broken.stdout
    assert "torn" in broken.stdout
    doc = cli_json(tmp_path, "verify", "pipeline.json", code=1)
    assert doc["healthy"] is False
    assert {
        k: v for k, v in next(c for c in doc["checks"] if not c["ok"]).items() if k != "detail"
    } == {"name": "log chain intact", "ok": False}
    repaired = cli(tmp_path, "repair", "pipeline.json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert repaired.stdout.startswith("fixed  cut a torn tail")
    assert cli(tmp_path, "verify", "pipeline.json").returncode == 0
    again = cli_json(tmp_path, "repair", "pipeline.json")
    assert again == {"path": str(state.path), "actions": [], "remaining": [], "healthy": True}


def test_missing_state_file_exits_4(tmp_path: Path) -> None:
    """A path with no state file and no sidecars is reported, not treated as empty."""
    for command in ("show", "verify", "lock"):
        message = assert_one_line_error(cli(tmp_path, command, "nope.json"), 4)
        assert "no such state file" in message


# -- following a live pipeline ------------------------------------------------------------------


def test_follow_ends_when_the_child_pipeline_finishes(tmp_path: Path) -> None:
    """`status --follow` prints snapshots while a child pipeline runs, and exits 0 at its end."""
    path = tmp_path / "pipeline.json"
    PipelineState(path, durability="atomic").write(
        {"phase1": {"status": "pending"}, "phase2": {"status": "pending"}}
    )
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline_common",
            "status",
            str(path),
            "--follow",
            "--interval",
            "0.2",
            "--timeout",
            "25",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(),
    ) as follow:
        child = subprocess.run(
            [sys.executable, "-c", PIPELINE, str(path)], timeout=TIMEOUT, check=True
        )
        assert child.returncode == 0
        out, err = follow.communicate(timeout=TIMEOUT)
    assert follow.returncode == 0, err
    snapshots = [json.loads(line) for line in out.splitlines()]
    assert snapshots[-1]["status"] == "success"
    assert snapshots[-1]["overall_progress"] == 100.0
    assert all(s["status"] != "success" for s in snapshots[:-1])


def test_follow_plain_output_and_timeout(tmp_path: Path) -> None:
    """Piped, --follow prints plain snapshots; --timeout ends a stuck pipeline with exit 1."""
    PipelineState(tmp_path / "pipeline.json", durability="atomic").write(
        {"phase1": {"status": "running", "progress": {"current": 1, "total": 2}}}
    )
    result = cli(tmp_path, "status", "pipeline.json", "-f", "--interval", "0.1", "--timeout", "0.5")
    message = assert_one_line_error(result, 1)
    assert "still running after --timeout 0.5 s" in message
    assert result.stdout.startswith("pipeline.json: running")
    assert "\x1b[" not in result.stdout


# -- terminal only: colour and bars ------------------------------------------------------------


def test_colour_and_bars_only_on_a_terminal(state: PipelineState, tmp_path: Path) -> None:
    """A terminal gets colour and a PROGRESS bar; NO_COLOR keeps the bar, drops the colour."""
    code, output = on_terminal(tmp_path, "status", "pipeline.json")
    assert code == 0, output
    assert "\x1b[" in output
    assert "PROGRESS" in output
    code, output = on_terminal(tmp_path, "status", "pipeline.json", env={"NO_COLOR": "1"})
    assert code == 0, output
    assert "\x1b[" not in output
    assert "PROGRESS" in output
    piped = cli(tmp_path, "status", "pipeline.json")
    assert "PROGRESS" not in piped.stdout
    assert "\x1b[" not in piped.stdout


def test_scripts_can_chain_commands(state: PipelineState, tmp_path: Path) -> None:
    """A shell-style check: the exit codes compose (verify ok, then show one value)."""
    script = textwrap.dedent(
        f"""
        {sys.executable} -m pipeline_common verify pipeline.json > /dev/null &&
        {sys.executable} -m pipeline_common show pipeline.json --pointer /phase2/status
        """
    )
    result = subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=TIMEOUT,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "running\n")


# -- the documented commands run ---------------------------------------------------


DOCS_PIPELINE = """
from pipeline_common import Pipeline

pipeline = Pipeline("pipeline.json")


@pipeline.stage()
def extract(ctx):
    ctx.record["files"] = ["book.txt"]


@pipeline.stage(requires=["extract"])
def tts(ctx):
    for _ in ctx.track(range(10)):
        pass


@pipeline.stage(requires=["tts"])
def mix(ctx):
    pass
"""


def _documented_commands() -> list[str]:
    """Every ``$ pipeline-state ...`` line of docs/cli.md's console blocks."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    return [
        line[2:].split(" | ")[0].strip()  # drop a pipe into jq or the like
        for line in text.splitlines()
        if line.startswith("$ pipeline-state ")
    ]


@pytest.mark.parametrize("command", _documented_commands())
def test_documented_command_runs_without_a_usage_error(command: str, tmp_path: Path) -> None:
    """Each command shown in docs/cli.md parses and runs against a real state file."""
    state = PipelineState(tmp_path / "pipeline.json")
    for status in ("running", "success", "failed"):
        state.write(
            {"phase1_extract": {"status": "success"}, "phase2_transform": {"status": status}}
        )
    args = shlex.split(command)[1:]
    if args[0] in ("restore", "reset"):
        args.append("--yes")  # the docs show the prompt; a test has no terminal to answer it
    if args[0] in ("run", "reset"):  # the docs' pipeline: extract -> tts -> mix
        (tmp_path / "mypipeline.py").write_text(DOCS_PIPELINE, encoding="utf-8")
        state.path.unlink()
        cli(tmp_path, "run", "mypipeline:pipeline")
    if "--follow" in args:
        args += ["--timeout", "2"]
    result = cli(tmp_path, *args)
    assert result.returncode in (0, 1), (command, result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
