"""Every ```python block of README.md and docs/*.md runs, so the docs cannot rot.

The blocks of one file run in order, in one process, sharing one namespace, in a fresh
temporary folder (the cwd), with warnings as errors. Mark a block that must not run as
```text or ```console. A failing block is reported with its file and line number.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)[^`]*$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Return ``(line of the opening fence, source)`` for each ```python block, in order."""
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].lower()
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        if info in ("python", "py", "python3"):
            blocks.append((i + 1, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def doc_pages() -> list[str]:
    """README.md and every docs page that holds at least one python block."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    return [
        p.relative_to(ROOT).as_posix()
        for p in pages
        if python_blocks(p.read_text(encoding="utf-8"))
    ]


# Runs in the child: line numbers in tracebacks are those of the Markdown file.
_RUNNER = """
import json, sys
with open(sys.argv[2], encoding="utf-8") as fh:
    blocks = json.load(fh)
page = sys.argv[1]
namespace = {"__name__": "__main__"}
for fence_line, source in blocks:
    exec(compile("\\n" * fence_line + source, page, "exec"), namespace)
"""


def test_python_blocks_are_found_with_their_lines() -> None:
    """The extractor finds python blocks only, with the fence's line, and dedents them."""
    text = (
        "# Title\n"
        "```python\nx = 1\n```\n"
        "```text\nnot run\n```\n"
        "- item\n\n"
        "  ```python\n  y = x + 1\n  ```\n"
        "````markdown\n```python\nnested = 'not run'\n```\n````\n"
    )
    assert python_blocks(text) == [(2, "x = 1\n"), (10, "y = x + 1\n")]


@pytest.mark.parametrize("page", doc_pages())
def test_doc_examples_run(page: str, tmp_path: Path) -> None:
    """Every python block of the page runs, in order, in a fresh folder."""
    path = ROOT / page
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    blocks_file = tmp_path / "blocks.json"
    blocks_file.write_text(json.dumps(blocks), encoding="utf-8")
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", _RUNNER, str(path), str(blocks_file)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (
        f"{page}: a python block failed\n{result.stdout}\n{result.stderr}"
    )
    # Warnings raised where they cannot propagate (ResourceWarning in __del__) only print.
    assert "Exception ignored" not in result.stderr, result.stderr
