"""The documentation's code runs: every ```python block in README.md and docs/*.md.

Blocks run in a fresh interpreter in a temporary directory, one file at a time
(the blocks of one page share a namespace, in order, like a reader typing them).
A block whose first line is ``# doc: no-run`` needs a service or a long-running
process and is only compiled, so it cannot rot into invalid syntax either.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
NO_RUN = "# doc: no-run"


def _blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text(encoding="utf-8"))


PAGES = [
    page for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))] if _blocks(page)
]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_runs(page: Path, tmp_path: Path) -> None:
    blocks = _blocks(page)
    runnable = []
    for i, block in enumerate(blocks):
        # Every block must at least be valid Python.
        compile(block, f"{page.name}[block {i}]", "exec")
        if not block.lstrip().startswith(NO_RUN):
            runnable.append(block)
    if not runnable:
        return
    script = tmp_path / "doc_example.py"
    script.write_text("\n\n".join(runnable), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, (
        f"code in {page.name} failed:\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
