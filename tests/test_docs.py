"""Docs run: every code block of README.md and docs/*.md is executed.

* ``python`` blocks of one page run in order as one script, in a fresh process and an empty
  directory (so plugins a page registers and files it writes stay there);
* ``bash`` blocks: each ``tplimits ...`` command runs as it is; ``pip install`` steps and the test
  command itself are what CI runs (.ci/run runs README's test command), so they are not run again;
* ``text`` blocks are formulas and listings, not code; a block without a language is refused, so
  nothing that looks like code goes unexecuted.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
RUN_AGAIN_BY_CI = ("pip install", "python -m pytest")


def blocks(page: pathlib.Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def shell_commands(block: str) -> list[str]:
    """The ``tplimits`` commands of a shell block (``a && b`` chains split)."""
    commands = []
    for line in block.splitlines():
        for part in line.split("&&"):
            part = part.strip()
            if part and not part.startswith("#") and not part.startswith(RUN_AGAIN_BY_CI):
                commands.append(part)
    return commands


def test_every_block_has_a_language():
    for page in PAGES:
        for language, _ in blocks(page):
            assert language in ("python", "bash", "text"), f"{page.name}: a ``` block of language {language!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path):
    code = [body for language, body in blocks(page) if language == "python"]
    if not code:
        pytest.skip(f"{page.name} has no python block")
    script = tmp_path / f"{page.stem}_blocks.py"
    script.write_text("\n\n".join(code))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{page.name}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_shell_blocks_run(page, tmp_path):
    commands = [c for language, body in blocks(page) if language == "bash" for c in shell_commands(body)]
    if not commands:
        pytest.skip(f"{page.name} has no shell command to run")
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "tplimits", f"{page.name}: shell block runs {argv[0]!r}, which the docs runner does not"
        result = subprocess.run([sys.executable, "-m", "tplimits.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"{page.name}: {command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
